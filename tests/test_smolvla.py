"""A LeRobot SmolVLA as a policy backend: sampling, LeRobot parity, updates, checkpoints, bad input.

All on a tiny random SmolVLA built offline (tests/tiny_smolvla.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_smolvla import ACTION_DIM, CAMERAS, HORIZON, IMAGE_SIZE, NUM_STEPS, STATE_DIM, build_vlm_dir, observations
from tiny_smolvla import tiny_smolvla as make_tiny
from toy_env import PointReach

from stepnft_ros.algo.fsdp import full_state_dict
from stepnft_ros.algo.sft import flow_matching_loss
from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer
from stepnft_ros.episodes import Decision, Episode, collate_episodes
from stepnft_ros.episodes.demos import DemoSet
from stepnft_ros.episodes.store import EpisodeStore
from stepnft_ros.learner import Learner, LearnerConfig
from stepnft_ros.policy import CheckpointError, FlowPolicy, PolicyConfig, load_checkpoint, make_policy, save_checkpoint
from stepnft_ros.policy.checkpoint import read_header
from stepnft_ros.policy.onnx_backend import OnnxExportError
from stepnft_ros.policy.smolvla import VLM_ENV, VLM_SUBDIR, SmolVLABackend
from stepnft_ros.policy.types import stack_observations
from stepnft_ros.rollout import run_episode


@pytest.fixture(scope='module')
def vlm_dir(tmp_path_factory):
    return build_vlm_dir(tmp_path_factory.mktemp('smolvlm'))


@pytest.fixture(scope='module')
def checkpoint(vlm_dir, tmp_path_factory):
    """A saved tiny SmolVLA checkpoint (LeRobot's format, plus vlm/ and stepnft.json)."""
    path = tmp_path_factory.mktemp('ckpt') / 'smolvla'
    save_checkpoint(path, make_tiny(vlm_dir), {'weights_version': 3, 'stage': 'test'})
    return path


@pytest.fixture(autouse=True)
def _no_vlm_env(monkeypatch):
    monkeypatch.delenv(VLM_ENV, raising=False)


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    """The tiny model's ops are microseconds: more threads only contend (100x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected_config(**changes) -> PolicyConfig:
    fields = dict(action_dim=ACTION_DIM, horizon=HORIZON, state_dim=STATE_DIM, camera_names=CAMERAS,
                  image_size=IMAGE_SIZE, vision_patch=IMAGE_SIZE, use_language=True)
    return PolicyConfig(**{**fields, **changes})


def lerobot_chunks(backend: SmolVLABackend, obs, noise: torch.Tensor) -> torch.Tensor:
    """LeRobot's own path: preprocessor -> SmolVLAPolicy.predict_action_chunk -> postprocessor."""
    batch = stack_observations(obs, backend.config)
    raw = {'observation.state': batch.state, 'task': list(batch.instructions),
           **{f'observation.images.{c}': batch.images[:, i].float() / 255.0 for i, c in enumerate(CAMERAS)}}
    return backend.postprocessor(backend.policy.predict_action_chunk(backend.preprocessor(raw), noise=noise))


def test_config_comes_from_the_lerobot_features(vlm_dir):
    backend = make_tiny(vlm_dir)
    assert backend.config == expected_config(num_steps=NUM_STEPS)
    expert = {id(p) for p in backend.action_expert_parameters()}
    vlm = list(backend.flow.vlm_with_expert.vlm.parameters())
    assert expert and not any(id(p) in expert for p in vlm)
    assert not any(id(p) in expert for p in backend.flow.state_proj.parameters())  # it feeds the cached prefix


def test_sde_and_ode_sampling_give_traces_of_the_robot_shape(vlm_dir):
    backend = make_tiny(vlm_dir)
    obs = observations(3)
    for mode in ('sde', 'ode'):
        out = FlowPolicy(backend, mode=mode, seed=1).infer_batch(obs)
        assert out.chunks.shape == (3, HORIZON, ACTION_DIM) and np.isfinite(out.chunks).all()
        t = out.trace
        for x in (t.x_k, t.x_next, t.v_old, t.x_final):
            assert x.shape == (3, HORIZON, ACTION_DIM)
        assert ((0 <= t.k) & (t.k < NUM_STEPS)).all()
        assert torch.allclose(t.a, torch.full((3,), 0.3 if mode == 'sde' else 0.0))
        # the executed chunk is the unnormalized x_K
        assert np.allclose(out.chunks, backend.normalizer.unnormalize_action(t.x_final).numpy(), atol=1e-5)
    sde = FlowPolicy(backend, mode='sde', seed=1).infer_batch(obs).chunks
    ode = FlowPolicy(backend, mode='ode', seed=1).infer_batch(obs).chunks
    assert not np.allclose(sde, ode)


def test_ode_sampling_equals_lerobots_sample_actions(vlm_dir):
    backend = make_tiny(vlm_dir)
    obs = observations(3, seed=4)
    noise = torch.randn(3, HORIZON, ACTION_DIM, generator=torch.Generator().manual_seed(7))
    ours = FlowPolicy(backend, mode='ode').infer_batch(obs, initial_noise=noise).chunks
    theirs = lerobot_chunks(backend, obs, noise).numpy()
    assert np.abs(ours - theirs).max() < 1e-5


def test_velocity_equals_lerobots_denoise_step(vlm_dir):
    """Our velocity builds its masks on the device (CUDA-graph capturable); the result must not change."""
    backend = make_tiny(vlm_dir, action_pad=2)
    batch = stack_observations(observations(3, seed=5), backend.config)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, HORIZON, ACTION_DIM, generator=g)
    tau = torch.rand(3, generator=g)
    with torch.no_grad():
        pad, cache = backend.encode_prefix(batch)
        ours = backend.velocity(x, tau, (pad, cache))
        theirs = backend.flow.denoise_step(pad, cache, torch.nn.functional.pad(x, (0, 2)), tau)[..., :ACTION_DIM]
    assert torch.equal(ours, theirs)


def test_empty_camera_placeholders_are_not_robot_cameras(vlm_dir):
    backend = make_tiny(vlm_dir, empty_cameras=1)  # SmolVLA adds observation.images.empty_camera_0
    assert 'observation.images.empty_camera_0' in backend.policy.config.input_features
    assert backend.config.camera_names == CAMERAS
    noise = torch.randn(2, HORIZON, ACTION_DIM)
    ours = FlowPolicy(backend, mode='ode').infer_batch(observations(2), initial_noise=noise).chunks
    assert np.abs(ours - lerobot_chunks(backend, observations(2), noise).numpy()).max() < 1e-5


def test_padded_action_dims_stay_out_of_the_trace(vlm_dir):
    backend = make_tiny(vlm_dir, action_pad=2)  # max_action_dim = D + 2, as real checkpoints pad to 32
    out = FlowPolicy(backend, mode='sde', seed=0).infer_batch(observations(2))
    assert out.chunks.shape == (2, HORIZON, ACTION_DIM) and out.trace.x_k.shape == (2, HORIZON, ACTION_DIM)
    prefix = backend.encode_prefix(stack_observations(observations(2), backend.config))
    v = backend.velocity(torch.zeros(2, HORIZON, ACTION_DIM), torch.ones(2), prefix)
    assert v.shape == (2, HORIZON, ACTION_DIM) and torch.isfinite(v).all()


def assert_only_the_expert_changed(before: SmolVLABackend, after: SmolVLABackend) -> None:
    expert = {id(p) for p in after.action_expert_parameters()}
    expert_names = {name for name, p in after.named_parameters() if id(p) in expert}
    old = dict(before.named_parameters())
    changed = {name for name, p in after.named_parameters() if not torch.equal(p, old[name])}
    assert changed and changed <= expert_names, sorted(changed - expert_names)[:5]


def _episodes(backend, n_episodes=4, decisions=2):
    policy = FlowPolicy(backend, mode='sde', seed=3)
    episodes = []
    for i in range(n_episodes):
        obs = observations(decisions, seed=i)
        steps = []
        for o in obs:
            out = policy.infer(o)
            steps.append(Decision(o, out.chunks[0], out.trace))
        episodes.append(Episode(f'e{i}', 0, steps, success=i % 2 == 0))
    return episodes


def test_stepnft_update_changes_only_the_action_expert(vlm_dir):
    backend = make_tiny(vlm_dir)
    batch = collate_episodes(_episodes(backend), backend.config)
    expert = {id(p) for p in backend.action_expert_parameters()}
    before = {name: p.detach().clone() for name, p in backend.named_parameters()}
    metrics = StepNFTTrainer(backend, StepNFTConfig(lr=1e-3, epochs=1, minibatch_size=4), seed=0).update(batch)
    assert np.isfinite(metrics['loss']) and metrics['gradient_steps'] == 2
    changed = {name for name, p in backend.named_parameters() if not torch.equal(p, before[name])}
    expert_names = {name for name, p in backend.named_parameters() if id(p) in expert}
    assert changed and changed <= expert_names
    assert len(changed) > len(expert_names) // 2  # the update reaches the expert's layers, not one bias


def test_gradient_checkpointing_and_micro_batches_give_the_same_update(vlm_dir):
    def updated(checkpointing: bool, microbatch_size: int) -> torch.Tensor:
        backend = make_tiny(vlm_dir)
        if checkpointing:
            backend.enable_gradient_checkpointing()
            backend.enable_gradient_checkpointing()  # idempotent: one wrapper per MLP
        batch = collate_episodes(_episodes(backend), backend.config)
        trainer = StepNFTTrainer(backend, StepNFTConfig(lr=1e-3, epochs=1, minibatch_size=len(batch),
                                                        microbatch_size=microbatch_size), seed=0)
        trainer.optimizer = torch.optim.SGD(trainer.params, lr=0.1)  # Adam would magnify float-order noise
        trainer.update(batch)
        return torch.cat([p.detach().flatten() for p in backend.action_expert_parameters()])
    plain = updated(False, 0)
    assert torch.allclose(plain, updated(True, 0), atol=1e-6)
    assert torch.allclose(plain, updated(True, 2), atol=1e-6)


def _expert_names(vlm_dir) -> list[str]:
    backend = make_tiny(vlm_dir)
    expert = {id(p) for p in backend.action_expert_parameters()}
    return [n for n, p in backend.named_parameters() if id(p) in expert]


def _sgd_updated_expert(vlm_dir, fsdp: bool = False) -> torch.Tensor:
    """The action expert after one SGD update on the same episodes (FSDP: gathered; empty off rank 0)."""
    backend = make_tiny(vlm_dir)
    batch = collate_episodes(_episodes(backend), backend.config)
    trainer = StepNFTTrainer(backend, StepNFTConfig(lr=1e-3, epochs=1, minibatch_size=len(batch), grad_clip=1e6),
                             seed=0, fsdp=fsdp)
    trainer.optimizer = torch.optim.SGD(trainer.params, lr=0.1)
    trainer.update(batch)
    state = full_state_dict(backend) if fsdp else dict(backend.named_parameters())
    if not state:
        return torch.empty(0)
    return torch.cat([state[name].detach().flatten() for name in _expert_names(vlm_dir)])


def _fsdp_rank(rank: int, init_file: str, vlm_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        torch.save(_sgd_updated_expert(Path(vlm_dir), fsdp=True), f'{out}.{rank}')
    finally:
        dist.destroy_process_group()


def test_two_fsdp_ranks_take_the_update_one_process_takes(vlm_dir, tmp_path):
    single = _sgd_updated_expert(vlm_dir)
    before = torch.cat([dict(make_tiny(vlm_dir).named_parameters())[n].detach().flatten()
                        for n in _expert_names(vlm_dir)])
    assert (single - before).abs().max() > 1e-4, 'the update moved the expert'
    mp.spawn(_fsdp_rank, args=(str(tmp_path / 'rendezvous'), str(vlm_dir), str(tmp_path / 'out')), nprocs=2,
             join=True)
    sharded = torch.load(tmp_path / 'out.0', weights_only=True)
    assert torch.allclose(sharded, single, atol=1e-6)


def test_flow_matching_sft_steps_reduce_the_loss(vlm_dir):
    backend = make_tiny(vlm_dir)
    obs = stack_observations(observations(4), backend.config)
    actions = backend.normalizer.normalize_action(torch.randn(4, HORIZON, ACTION_DIM))
    opt = torch.optim.AdamW(backend.action_expert_parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    backend.train()
    losses = []
    for _ in range(12):
        g.manual_seed(0)  # the same noise and τ each step: the loss of one fixed draw must fall
        loss = flow_matching_loss(backend, obs, actions, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_save_load_round_trip_gives_identical_outputs(vlm_dir, checkpoint):
    original = make_tiny(vlm_dir)  # the same seed as the checkpoint's
    loaded, meta = load_checkpoint(checkpoint)
    assert isinstance(loaded, SmolVLABackend) and meta == {'weights_version': 3, 'stage': 'test'}
    assert loaded.config == original.config and read_header(checkpoint) == (loaded.config, meta)
    assert loaded.vlm_dir == checkpoint / VLM_SUBDIR  # self-contained: the VLM files travel with it
    obs = observations(2)
    noise = torch.randn(2, HORIZON, ACTION_DIM)
    for mode in ('ode', 'sde'):
        a = FlowPolicy(original, mode=mode, seed=5).infer_batch(obs, initial_noise=noise)
        b = FlowPolicy(loaded, mode=mode, seed=5).infer_batch(obs, initial_noise=noise)
        assert np.array_equal(a.chunks, b.chunks) and torch.equal(a.trace.v_old, b.trace.v_old)
    # make_policy takes the directory too; the onnxruntime backend refuses it by name
    assert isinstance(make_policy(checkpoint, mode='ode').model, SmolVLABackend)
    with pytest.raises(OnnxExportError, match='FlowVLA checkpoints only.*smolvla'):
        make_policy(checkpoint, backend='onnxruntime')


def test_lerobot_itself_loads_our_checkpoint(vlm_dir, checkpoint):
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    cfg = PreTrainedConfig.from_pretrained(str(checkpoint))
    cfg.vlm_model_name = str(checkpoint / VLM_SUBDIR)
    policy = SmolVLAPolicy.from_pretrained(str(checkpoint), config=cfg)
    ours, _ = load_checkpoint(checkpoint)
    for (name, p), (_, q) in zip(policy.named_parameters(), ours.policy.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_cli_info_reads_a_smolvla_checkpoint_and_refuses_a_bad_one(checkpoint, tmp_path, capsys):
    from stepnft_ros.cli import main

    assert main(['info', str(checkpoint)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['backend'] == 'smolvla' and info['config']['action_dim'] == ACTION_DIM
    assert info['config']['camera_names'] == list(CAMERAS)
    assert info['metadata']['weights_version'] == 3
    ckpt = _copy(checkpoint, tmp_path / 'act')
    (ckpt / 'config.json').write_text(json.dumps({**json.loads((ckpt / 'config.json').read_text()), 'type': 'act'}))
    assert main(['info', str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LeRobot policy type 'act'; supported: smolvla" in err


def test_hot_swap_check_against_the_robot_interface(checkpoint):
    load_checkpoint(checkpoint, expected=expected_config())  # the robot's own interface loads
    changes = {'action_dim': ACTION_DIM + 1, 'camera_names': ('wrist',), 'state_dim': STATE_DIM + 2,
               'horizon': HORIZON * 2}
    for field, value in changes.items():
        with pytest.raises(CheckpointError, match=f'{field} is .*the robot has'):
            load_checkpoint(checkpoint, expected=expected_config(**{field: value}))


def _copy(checkpoint: Path, dst: Path) -> Path:
    return Path(shutil.copytree(checkpoint, dst))


def test_missing_vlm_files_are_named_with_where_to_put_them(checkpoint, tmp_path, monkeypatch):
    ckpt = _copy(checkpoint, tmp_path / 'c')
    shutil.rmtree(ckpt / VLM_SUBDIR)
    config = json.loads((ckpt / 'config.json').read_text())
    config['vlm_model_name'] = 'HuggingFaceTB/SmolVLM2-500M-Video-Instruct'
    (ckpt / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"SmolVLM2-500M-Video-Instruct.*not available offline.*"
                                              r"config\.json, tokenizer_config\.json, preprocessor_config\.json and "
                                              rf"tokenizer\.json.*into {ckpt / VLM_SUBDIR}"):
        load_checkpoint(ckpt)
    monkeypatch.setenv(VLM_ENV, str(tmp_path / 'nowhere'))
    with pytest.raises(CheckpointError, match='nowhere'):
        load_checkpoint(ckpt)
    monkeypatch.setenv(VLM_ENV, str(checkpoint / VLM_SUBDIR))  # a local copy of the VLM's files
    load_checkpoint(ckpt)


def test_weights_that_do_not_fit_are_refused_never_left_random(checkpoint, tmp_path):
    weights = checkpoint / 'model.safetensors'
    tensors = safetensors.torch.load_file(str(weights))
    dropped = next(k for k in tensors if 'lm_expert' in k)
    cases = {
        'missing': {k: v for k, v in tensors.items() if k != dropped},
        'unexpected': {**tensors, 'model.extra.weight': torch.zeros(2)},
        'wrong shape': {**tensors, dropped: torch.zeros(3, 3)},
        'non-finite': {**tensors, dropped: torch.full_like(tensors[dropped], float('nan'))},
    }
    for i, (problem, content) in enumerate(cases.items()):
        ckpt = _copy(checkpoint, tmp_path / str(i))
        safetensors.torch.save_file(content, str(ckpt / 'model.safetensors'))
        with pytest.raises(CheckpointError, match=problem):
            load_checkpoint(ckpt)
    ckpt = _copy(checkpoint, tmp_path / 'torn')
    (ckpt / 'model.safetensors').write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='cannot read tensors'):
        load_checkpoint(ckpt)


def test_other_policy_types_missing_files_and_stats_are_refused(checkpoint, tmp_path):
    ckpt = _copy(checkpoint, tmp_path / 'act')
    config = json.loads((ckpt / 'config.json').read_text())
    (ckpt / 'config.json').write_text(json.dumps({**config, 'type': 'act'}))
    with pytest.raises(CheckpointError, match="policy type 'act'; supported: smolvla"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="policy type 'act'"):
        read_header(ckpt)
    ckpt = _copy(checkpoint, tmp_path / 'old')
    (ckpt / 'policy_preprocessor.json').unlink()
    with pytest.raises(CheckpointError, match='policy_preprocessor.json missing.*migrate_policy_normalization'):
        load_checkpoint(ckpt)
    ckpt = _copy(checkpoint, tmp_path / 'nostats')
    stats = next(ckpt.glob('policy_postprocessor_step_*_unnormalizer_processor.safetensors'))
    tensors = safetensors.torch.load_file(str(stats))
    safetensors.torch.save_file({k: v for k, v in tensors.items() if not k.startswith('action.')}, str(stats))
    with pytest.raises(CheckpointError, match="policy_postprocessor has no mean/std statistics for 'action'"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize('kind', ['pi0', 'pi05'])
def test_pi0_checkpoints_are_refused_with_what_is_missing(kind, tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps({'type': kind, 'chunk_size': 50}))
    for load in (load_checkpoint, read_header):
        with pytest.raises(CheckpointError, match=f"'{kind}': .*transformers == 4.53.2.*paligemma.*supported: smolvla"):
            load(tmp_path)


def test_unsupported_features_are_named(vlm_dir):
    from stepnft_ros.policy.smolvla import new_smolvla

    options = dict(num_vlm_layers=4, chunk_size=HORIZON, n_action_steps=HORIZON, resize_imgs_with_padding=(64, 64))
    with pytest.raises(CheckpointError, match=r"4 cameras \['a', 'b', 'c', 'd'\]; the project supports 1-3"):
        new_smolvla(vlm_dir, ACTION_DIM, STATE_DIM, ('a', 'b', 'c', 'd'), IMAGE_SIZE, **options)


def test_torchvision_shim_lets_transformers_and_lerobot_import():
    """The CUDA torchvision wheel next to the CPU torch: importing it, transformers' torch models and
    LeRobot's SmolVLA works after stepnft_ros.policy; its compiled ops still fail loudly."""
    pytest.importorskip('torchvision', reason='torchvision is not installed: nothing to shim')
    code = (
        'import stepnft_ros.policy, torch, transformers, torchvision\n'
        'from stepnft_ros.policy import torchvision_shim\n'
        'transformers.BertModel; transformers.SmolVLMImageProcessor\n'
        'from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy\n'
        'from torchvision.transforms import v2\n'
        'shimmed = torchvision_shim._library is not None\n'
        'try:\n'
        '    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5); ops = "ok"\n'
        'except RuntimeError as err:\n'
        '    ops = "error"\n'
        'print(shimmed, ops)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    shimmed, ops = out.stdout.split()[-2:]
    assert (shimmed, ops) in (('True', 'error'), ('False', 'ok'))  # shimmed: ops fail; a matching build: ops work


class CameraReach(PointReach):
    """PointReach seen by a camera and told in words, with a third (ignored) action dimension: the
    tiny SmolVLA's interface."""

    action_low, action_high = -np.ones(ACTION_DIM, np.float32), np.ones(ACTION_DIM, np.float32)

    def _obs(self) -> dict:
        image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for channel, point in ((0, self.pos), (1, self.goal)):
            row, col = np.clip(((point + 1) / 2 * IMAGE_SIZE).astype(int), 0, IMAGE_SIZE - 1)
            image[row, col, channel] = 255
        return {**super()._obs(), 'images': {CAMERAS[0]: image}, 'instruction': 'push the red cube'}

    def step(self, action: np.ndarray) -> tuple[dict, bool, bool]:
        return super().step(action[:2])


def test_learner_trains_smolvla_from_episode_bags_and_the_new_version_hot_swaps(checkpoint, tmp_path):
    model, _ = load_checkpoint(checkpoint)
    policy = FlowPolicy(model, mode='sde', seed=0)
    store = EpisodeStore(tmp_path / 'episodes')  # rosbag2 MCAP bags: images, instruction, traces
    env = CameraReach()
    for i in range(3):
        store.write(run_episode(env, policy, seed=i, actions_per_chunk=2, episode_id=f'ep{i:04d}'))
    learner = Learner(tmp_path / 'learner', checkpoint, store, LearnerConfig(episodes_per_update=3, tensorboard=False),
                      StepNFTConfig(lr=1e-3, minibatch_size=8), log=lambda _: None)
    assert [r['weights_version'] for r in learner.poll()] == [1]
    new, meta = load_checkpoint(learner.checkpoint_path(), expected=model.config)  # the policy server's swap check
    assert isinstance(new, SmolVLABackend) and meta['weights_version'] == 1
    assert_only_the_expert_changed(model, new)
    obs = observations(2)
    noise = torch.randn(2, HORIZON, ACTION_DIM)
    before = FlowPolicy(model, mode='ode').infer_batch(obs, initial_noise=noise).chunks
    policy.model = new  # hot swap
    policy.mode = 'ode'
    assert not np.allclose(policy.infer_batch(obs, initial_noise=noise).chunks, before)


def test_policy_server_answers_with_smolvla_and_hot_swaps(checkpoint, vlm_dir, tmp_path, probe):
    """The policy server, as its own process, on a SmolVLA checkpoint: state, camera and instruction
    topics in, the ODE chunk of the robot's own noise stream out; then a new version swapped in."""
    import time

    from ros_harness import Graph, spin_until

    from stepnft_ros import ros_io
    from stepnft_ros.nodes.policy_server import robot_noise
    from stepnft_ros.policy import Observation

    node, executor = probe
    graph = Graph(tmp_path / 'logs')
    try:
        server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
            'checkpoint': str(checkpoint), 'robots': ['arm'], 'mode': 'eval',
            'state_sources': ['joint_position', 'joint_velocity']})
        pubs = {'joints': node.create_publisher(ros_io.JointState, 'arm/joint_states', ros_io.SENSOR_QOS),
                'camera': node.create_publisher(ros_io.Image, f'arm/{ros_io.camera_topic(CAMERAS[0])}',
                                                ros_io.SENSOR_QOS),
                'task': node.create_publisher(ros_io.String, f'arm/{ros_io.INSTRUCTION}', ros_io.LATCHED_QOS),
                'weights': node.create_publisher(ros_io.String, ros_io.POLICY_WEIGHTS, ros_io.LATCHED_QOS)}
        chunks = []
        node.create_subscription(ros_io.JointTrajectory, 'arm/action_chunk', chunks.append, ros_io.RELIABLE_QOS)
        server.wait_for('serving 1 robot', timeout=120)
        spin_until(executor, lambda: pubs['joints'].get_subscription_count() > 0, 20, 'the server to subscribe')
        obs = observations(1, seed=9)[0]
        pubs['task'].publish(ros_io.String(data=obs.instruction))

        def answer(stamp_ns: int) -> np.ndarray:
            deadline = time.monotonic() + 60  # sensor-data QoS is best effort: re-send until answered
            while not any(ros_io.stamp_to_ns(c.header.stamp) == stamp_ns for c in chunks):
                assert time.monotonic() < deadline, f'no chunk for {stamp_ns}:\n{server.output()[-3000:]}'
                pubs['camera'].publish(ros_io.numpy_to_image(obs.images[CAMERAS[0]], stamp_ns))
                pubs['joints'].publish(ros_io.arrays_to_joint_state(['j0', 'j1'], obs.state[:2], obs.state[2:],
                                                                    stamp_ns))
                for _ in range(5):
                    executor.spin_once(timeout_sec=0.05)
            msg = next(c for c in chunks if ros_io.stamp_to_ns(c.header.stamp) == stamp_ns)
            return np.array([p.positions for p in msg.points])

        reference = FlowPolicy(load_checkpoint(checkpoint)[0], mode='ode')
        noise = robot_noise(0, 'arm', 0)  # server seed 0, robot 'arm', its first episode

        def expected() -> np.ndarray:
            eps = torch.randn((1, HORIZON, ACTION_DIM), generator=noise)
            return reference.infer_batch([Observation(obs.state, obs.images, obs.instruction)],
                                         initial_noise=eps).chunks[0]

        assert np.abs(answer(1_000) - expected()).max() < 1e-4
        v4 = tmp_path / 'v4'  # the checkpoint is version 3
        save_checkpoint(v4, make_tiny(vlm_dir, seed=1), {'weights_version': 4})
        pubs['weights'].publish(ros_io.WeightsAnnouncement(4, str(v4)).to_msg())
        server.wait_for('hot-swapped to weights version 4', timeout=60)
        reference.model = load_checkpoint(v4)[0]
        assert np.abs(answer(2_000) - expected()).max() < 1e-4
        assert server.proc.poll() is None
    finally:
        graph.stop_all()


def camera_reach_demos(n: int, seed: int = 0) -> DemoSet:
    """Straight-line expert demos of CameraReach with its camera frames and instructions."""
    env = CameraReach()
    states, actions, frames, lengths = [], [], [], []
    for i in range(n):
        obs, done = env.reset(seed + i), False
        while not done:
            heading = (env.goal - env.pos) / max(np.linalg.norm(env.goal - env.pos), 1e-6)
            act = np.append(heading, 0.0).astype(np.float32)
            states.append(obs['state'])
            frames.append(obs['images'][CAMERAS[0]])
            actions.append(act)
            obs, _, done = env.step(act)
        lengths.append(len(states) - sum(lengths))
    return DemoSet(np.asarray(states), np.asarray(actions), np.asarray(lengths),
                   images={CAMERAS[0]: np.asarray(frames)}, instructions=('push the red cube',) * n)


def test_cli_sft_fine_tunes_a_smolvla_checkpoint_on_camera_and_language_demos(checkpoint, tmp_path, capsys):
    from stepnft_ros.cli import main

    demos = camera_reach_demos(3).save(tmp_path / 'demos.npz')
    out = tmp_path / 'sft'
    assert main(['sft', '--demos', str(demos), '--init', str(checkpoint), '--out', str(out), '--steps', '3',
                 '--batch-size', '8']) == 0
    report = json.loads(capsys.readouterr().out)
    assert np.isfinite(report['final_loss']) and report['policy_config']['camera_names'] == list(CAMERAS)
    before, _ = load_checkpoint(checkpoint)
    after, meta = load_checkpoint(out)
    assert meta['stage'] == 'sft' and meta['init'] == str(checkpoint)
    old = dict(before.named_parameters())
    changed = {name for name, p in after.named_parameters() if not torch.equal(p, old[name])}
    trainable = {name for name, p in before.named_parameters() if p.requires_grad}  # LeRobot's choice: expert
    assert changed and changed <= trainable and not any('.vlm.' in name for name in changed)
    assert main(['sft', '--demos', str(demos), '--init', str(checkpoint), '--out', str(tmp_path / 'x'),
                 '--steps', '1']) == 0  # the checkpoint's normalization is kept, nothing refitted
    bad = camera_reach_demos(1)
    bad = DemoSet(bad.states, bad.actions[:, :2], bad.episode_lengths, images=bad.images,
                  instructions=bad.instructions).save(tmp_path / 'bad.npz')
    assert main(['sft', '--demos', str(bad), '--init', str(checkpoint), '--out', str(tmp_path / 'y')]) == 2
    assert 'demo actions have 2 dims' in capsys.readouterr().err


@pytest.mark.parametrize('problem, message', [
    ('type', "LeRobot policy type 'act'; supported: smolvla"),
    ('torn', 'cannot read tensors'),
    ('onnx', 'the onnxruntime backend runs FlowVLA checkpoints only, not smolvla')])
def test_policy_server_refuses_a_bad_smolvla_checkpoint_at_start(checkpoint, tmp_path, ros_domain, problem, message):
    from ros_harness import Graph

    ckpt = _copy(checkpoint, tmp_path / 'ckpt')
    params = {'robots': ['arm'], 'mode': 'eval', 'state_sources': ['joint_position', 'joint_velocity']}
    if problem == 'type':
        (ckpt / 'config.json').write_text(json.dumps({**json.loads((ckpt / 'config.json').read_text()), 'type': 'act'}))
    elif problem == 'torn':
        (ckpt / 'model.safetensors').write_bytes((ckpt / 'model.safetensors').read_bytes()[:4096])
    else:
        params['backend'] = 'onnxruntime'
    graph = Graph(tmp_path / 'logs')
    try:
        server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {'checkpoint': str(ckpt), **params})
        assert server.proc.wait(90) == 2
        assert message in server.output()
    finally:
        graph.stop_all()


def test_train_sim_on_maniskill_cameras_with_a_smolvla_checkpoint(vlm_dir, tmp_path, ros_domain):
    """`stepnft launch train_sim` from a SmolVLA checkpoint: a ManiSkill bridge with camera images and its
    instruction, SDE sampling in the policy server, episode bags, two learner updates of the expert only,
    the new weights hot-swapped into the server; then `stepnft eval` of the result."""
    import yaml
    from ros_harness import PICKCUBE_ACTION_DIM, PICKCUBE_STATE_DIM, REPO, run_launch

    ckpt = tmp_path / 'smolvla'
    save_checkpoint(ckpt, make_tiny(vlm_dir, state_dim=PICKCUBE_STATE_DIM, action_dim=PICKCUBE_ACTION_DIM),
                    {'weights_version': 0})
    params = yaml.safe_load((REPO / 'config/train_sim.yaml').read_text())
    params['learner']['ros__parameters'].update(episodes_per_update=2, max_updates=2, scan_period_s=0.5)
    params['/**']['ros__parameters'].update(max_episode_steps=8, env_id='PickCube-v1')
    params['/**/maniskill_bridge']['ros__parameters'].update(image_size=IMAGE_SIZE, reconfigure_on_reset=False)
    (tmp_path / 'params.yaml').write_text(yaml.safe_dump(params))
    run = tmp_path / 'run'
    proc = run_launch(['train_sim', '--run-dir', str(run), '--num-envs', '1', '--checkpoint', str(ckpt),
                       '--obs-mode', 'rgb', '--no-eval', '--params-file', str(tmp_path / 'params.yaml')],
                      300, tmp_path / 'launch.log')
    logs = {p.name: p.read_text() for p in (run / 'logs').glob('*.log')}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + ''.join(t[-2000:] for t in logs.values())
    assert 'update 2:' in logs['learner.log'] and 'hot-swapped to weights version 1' in logs['policy_server.log']
    assert 'sde sampler' in logs['policy_server.log']
    store = EpisodeStore(run / 'episodes')
    episodes = [store.load(e) for e in store.episode_ids()]
    assert len(episodes) >= 4
    decision = episodes[0].decisions[0]
    assert decision.observation.images[CAMERAS[0]].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert decision.observation.instruction
    assert decision.trace.x_k.shape == (1, HORIZON, PICKCUBE_ACTION_DIM) and float(decision.trace.a[0]) > 0
    start, _ = load_checkpoint(ckpt)
    final, meta = load_checkpoint(run / 'learner/checkpoints/v000002')
    assert isinstance(final, SmolVLABackend) and meta['weights_version'] == 2
    assert_only_the_expert_changed(start, final)
    # `stepnft eval` scores it on the same cameras (the evaluation protocol, ODE sampler)
    proc = subprocess.run(
        [sys.executable, '-m', 'stepnft_ros.cli', 'eval', '--checkpoint', str(run / 'learner/checkpoints/v000002'),
         '--episodes', '2', '--max-episode-steps', '8', '--out', str(tmp_path / 'eval.json')],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / 'eval.json').read_text())
    assert report['episodes'] == 2 and report['sampler'] == 'ode' and 0 <= report['success_rate'] <= 1
