"""ONNX export and the onnxruntime backend: same chunks as torch, dynamic batches, clear errors, ROS server."""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from stepnft_ros import cli
from stepnft_ros.policy import (
    FlowPolicy,
    FlowVLA,
    OnnxExportError,
    OnnxFlowPolicy,
    PolicyConfig,
    export_onnx,
    load_checkpoint,
    make_policy,
    save_checkpoint,
)
from stepnft_ros.policy import onnx_backend as ob

onnx = pytest.importorskip('onnx', reason='installed from requirements.txt')
ort = pytest.importorskip('onnxruntime', reason='installed from requirements.txt')

TOLERANCE = 1e-4  # float32 kernels differ (fused attention, layer norm); measured ~1e-6 on these configs

STATE_CFG = PolicyConfig(state_dim=6, action_dim=3, horizon=4, d_model=32, n_heads=2, prefix_layers=1,
                         expert_layers=2, num_steps=3, noise_level=0.5)
VL_CFG = PolicyConfig(state_dim=4, action_dim=2, horizon=4, d_model=32, n_heads=2, prefix_layers=1, expert_layers=1,
                      num_steps=3, noise_level=0.5, camera_names=('scene', 'wrist'), image_size=16, vision_patch=8,
                      use_language=True, text_layers=1, max_text_tokens=32)


def fitted_model(cfg: PolicyConfig, seed: int) -> FlowVLA:
    """Random weights and non-trivial normalization statistics (so normalization is exercised)."""
    torch.manual_seed(seed)
    model = FlowVLA(cfg).eval()
    rng = np.random.default_rng(seed)
    states = rng.normal(3.0, 2.0, (64, cfg.state_dim)) if cfg.state_dim else None
    model.normalizer.fit(states, rng.normal(-1.0, 0.5, (64, cfg.action_dim)))
    return model


@pytest.fixture(scope='module')
def state_case(tmp_path_factory):
    """A state policy checkpoint (weights version 7), exported through the CLI."""
    root = tmp_path_factory.mktemp('onnx_state')
    model = fitted_model(STATE_CFG, seed=1)
    save_checkpoint(root / 'ckpt', model, {'stage': 'test', 'weights_version': 7})
    assert cli.main(['export-onnx', '--checkpoint', str(root / 'ckpt'), '--out', str(root / 'export')]) == 0
    return root / 'ckpt', root / 'export', model


@pytest.fixture(scope='module')
def vl_case(tmp_path_factory):
    """A vision + language policy, exported from the in-memory model."""
    root = tmp_path_factory.mktemp('onnx_vl')
    model = fitted_model(VL_CFG, seed=2)
    export_onnx(model, root / 'export')
    return None, root / 'export', model


@pytest.fixture(params=['state_case', 'vl_case'], ids=['state', 'vision_language'])
def case(request):
    return request.getfixturevalue(request.param)  # only the case a test runs is built


def label(model: FlowVLA) -> str:
    return 'vision+language' if model.config.camera_names else 'state'


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_cli_export_is_checked_and_names_its_source(state_case, capsys):
    ckpt, export, _ = state_case
    assert sorted(p.name for p in export.iterdir()) == sorted([ob.MANIFEST_FILE, *ob.GRAPH_FILES])
    for name in ob.GRAPH_FILES:
        onnx.checker.check_model(str(export / name), full_check=True)
        session = ort.InferenceSession(str(export / name), providers=['CPUExecutionProvider'])
        assert all(isinstance(i.shape[0], str) for i in session.get_inputs()), 'batch axes are dynamic'
    with safetensors.safe_open(str(export / ob.MANIFEST_FILE), framework='pt') as f:
        header = f.metadata()
    assert header['source_checkpoint'] == str(ckpt.resolve()) and header['weights_version'] == '7'
    assert header['source_sha256'] == ob._sha256(ckpt / 'model.safetensors')
    assert PolicyConfig.from_dict(json.loads(header['config'])) == STATE_CFG

    # The CLI refuses to overwrite an export and names a missing checkpoint, exit code 2 both times.
    capsys.readouterr()
    assert cli.main(['export-onnx', '--checkpoint', str(ckpt), '--out', str(export)]) == 2
    assert 'already exists' in capsys.readouterr().err
    assert cli.main(['export-onnx', '--checkpoint', str(ckpt.parent / 'nope'), '--out', str(ckpt.parent / 'x')]) == 2
    assert 'no checkpoint at' in capsys.readouterr().err and not (ckpt.parent / 'x').exists()


@pytest.mark.parametrize('batch', [1, 4, 9])
def test_ode_chunks_agree_with_torch(case, batch):
    _, export, model = case
    obs = ob.probe_observations(model.config, batch, seed=batch)
    ref = FlowPolicy(model, mode='ode', seed=5).infer_batch(obs)
    out = OnnxFlowPolicy(export, mode='ode', seed=5).infer_batch(obs)
    diff = max_diff(out.chunks, ref.chunks)
    print(f'{label(model)} B={batch}: ODE max |torch - onnxruntime| = {diff:.2e}')
    assert out.chunks.shape == (batch, model.config.horizon, model.config.action_dim)
    assert diff < TOLERANCE
    assert torch.equal(out.trace.k, ref.trace.k) and torch.equal(out.trace.a, ref.trace.a)
    for name in ('x_k', 'x_next', 'v_old', 'x_final'):
        assert max_diff(getattr(out.trace, name), getattr(ref.trace, name)) < TOLERANCE, name


def test_sde_with_the_same_seed_agrees(case):
    _, export, model = case
    torch_policy = FlowPolicy(model, mode='sde', seed=11)
    onnx_policy = OnnxFlowPolicy(export, mode='sde', seed=11)
    assert onnx_policy.a == torch_policy.a == model.config.noise_level
    diffs = []
    for batch in (3, 5):  # consecutive batches: both generators advance in step
        obs = ob.probe_observations(model.config, batch, seed=batch)
        ref, out = torch_policy.infer_batch(obs), onnx_policy.infer_batch(obs)
        assert torch.equal(out.trace.k, ref.trace.k)
        diffs.append(max_diff(out.chunks, ref.chunks))
        assert max_diff(out.trace.x_next, ref.trace.x_next) < TOLERANCE
    print(f'{label(model)}: SDE max |torch - onnxruntime| = {max(diffs):.2e}')
    assert max(diffs) < TOLERANCE
    obs = ob.probe_observations(model.config, 2)
    onnx_policy.reset(3)
    first = onnx_policy.infer_batch(obs).chunks
    onnx_policy.reset(3)
    assert np.array_equal(onnx_policy.infer_batch(obs).chunks, first), 'reset(seed) replays the noise'
    assert max_diff(onnx_policy.infer_batch(obs).chunks, first) > 1e-3, 'fresh noise after that'


def test_bad_observation_is_refused_like_torch(state_case):
    from stepnft_ros.policy import Observation, ObservationError

    policy = OnnxFlowPolicy(state_case[1], mode='ode')
    with pytest.raises(ObservationError, match='non-finite'):
        policy.infer(Observation(state=np.array([0, np.nan, 0, 0, 0, 0], np.float32)))
    with pytest.raises(ObservationError, match=r'shape \(5,\)'):
        policy.infer(Observation(state=np.zeros(5, np.float32)))


def test_hot_swap_rebuilds_only_the_changed_graph(state_case, monkeypatch):
    _, _, model = state_case
    policy = make_policy(model, backend='onnxruntime', mode='ode', seed=0)
    assert isinstance(policy, OnnxFlowPolicy) and policy.provider == 'CPUExecutionProvider'
    prefix_graph = policy._graphs[ob.PREFIX_FILE]
    obs = ob.probe_observations(STATE_CFG, 3)

    new = fitted_model(STATE_CFG, seed=9)
    new.prefix_encoder.load_state_dict(model.prefix_encoder.state_dict())  # π-StepNFT trains the expert only
    new.normalizer.load_state_dict(model.normalizer.state_dict())
    start = time.perf_counter()
    policy.model = new
    swap_s = time.perf_counter() - start
    assert policy._graphs[ob.PREFIX_FILE] is prefix_graph, 'unchanged prefix weights: graph reused'
    policy.reset()
    diff = max_diff(policy.infer_batch(obs).chunks, FlowPolicy(new, mode='ode', seed=0).infer_batch(obs).chunks)
    print(f'hot swap (velocity graph rebuilt, no re-trace): {swap_s:.2f} s, max diff after it {diff:.2e}')
    assert diff < TOLERANCE

    before = policy.infer_batch(obs).chunks
    with pytest.raises(OnnxExportError, match='action_dim 2'):
        policy.model = FlowVLA(PolicyConfig(**{**json.loads(STATE_CFG.to_json()), 'action_dim': 2}))
    policy.reset()
    policy.infer_batch(obs)  # the old sessions still serve
    assert policy.model is new and before.shape == (3, STATE_CFG.horizon, STATE_CFG.action_dim)

    # Graphs that do not compute the new model (here: its weights never reach them) are refused.
    stale = ob._graph_weights(new)
    monkeypatch.setattr(ob, '_graph_weights', lambda model: stale)
    with pytest.raises(OnnxExportError, match='disagree with torch'):
        policy.model = fitted_model(STATE_CFG, seed=10)
    assert policy.model is new


def test_corrupt_or_missing_export_files_give_clear_errors(state_case, tmp_path):
    _, export, _ = state_case

    def broken(name: str):
        target = tmp_path / name
        shutil.copytree(export, target)
        return target

    d = broken('truncated')
    (d / ob.VELOCITY_FILE).write_bytes((d / ob.VELOCITY_FILE).read_bytes()[:1000])
    with pytest.raises(OnnxExportError, match=r'velocity\.onnx is corrupt'):
        OnnxFlowPolicy(d)
    d = broken('missing_graph')
    (d / ob.PREFIX_FILE).unlink()
    with pytest.raises(OnnxExportError, match=r'prefix\.onnx is missing'):
        make_policy(d, backend='onnxruntime')
    d = broken('missing_manifest')
    (d / ob.MANIFEST_FILE).unlink()
    with pytest.raises(OnnxExportError, match='no ONNX export at'):
        OnnxFlowPolicy(d)
    d = broken('garbage_manifest')
    (d / ob.MANIFEST_FILE).write_bytes(b'\x00garbage')
    with pytest.raises(OnnxExportError, match='not a readable safetensors'):
        OnnxFlowPolicy(d)
    # A garbage graph whose hash was recorded (a broken exporter): onnxruntime's refusal is reported.
    d = broken('garbage_graph')
    (d / ob.VELOCITY_FILE).write_bytes(b'not onnx at all')
    with safetensors.safe_open(str(d / ob.MANIFEST_FILE), framework='pt') as f:
        header, stats = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header['graphs'] = json.dumps({**json.loads(header['graphs']), ob.VELOCITY_FILE: ob._sha256(d / ob.VELOCITY_FILE)})
    safetensors.torch.save_file(stats, str(d / ob.MANIFEST_FILE), metadata=header)
    with pytest.raises(OnnxExportError, match=r'velocity\.onnx: onnxruntime cannot load it'):
        OnnxFlowPolicy(d)


def test_factory_backends_and_devices(state_case, caplog):
    ckpt, export, _ = state_case
    assert isinstance(make_policy(ckpt, backend='torch', mode='ode'), FlowPolicy)
    assert isinstance(make_policy(export, backend='onnxruntime'), OnnxFlowPolicy)
    with pytest.raises(ValueError, match='backend must be one of'):
        make_policy(ckpt, backend='tensorrt')
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda"):
        OnnxFlowPolicy(export, device='tpu')
    with caplog.at_level(logging.INFO, logger=ob.__name__):
        policy = OnnxFlowPolicy(export, device='cuda')
    if 'CUDAExecutionProvider' in ort.get_available_providers():
        assert policy.provider == 'CUDAExecutionProvider'
    else:  # the CPU wheel: falls back, and says so
        assert policy.provider == 'CPUExecutionProvider' and 'install onnxruntime-gpu' in caplog.text
    assert 'onnxruntime policy on' in caplog.text


def test_policy_server_answers_and_hot_swaps_on_onnxruntime(tmp_path, probe):
    """The policy server with backend onnxruntime, as its own process: answers, swaps weights, answers."""
    from ros_harness import Graph, spin_until, tiny_checkpoint

    from stepnft_ros import ros_io
    from stepnft_ros.policy import Observation

    node, executor = probe
    ckpt = tiny_checkpoint(tmp_path / 'v0', state_dim=5, action_dim=2)
    graph = Graph(tmp_path / 'logs')
    try:
        server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
            'checkpoint': str(ckpt), 'robots': ['arm'], 'mode': 'eval', 'backend': 'onnxruntime'})
        pubs = {'joints': node.create_publisher(ros_io.JointState, 'arm/joint_states', ros_io.SENSOR_QOS),
                'task': node.create_publisher(ros_io.JointState, 'arm/task_state', ros_io.SENSOR_QOS),
                'weights': node.create_publisher(ros_io.String, ros_io.POLICY_WEIGHTS, ros_io.LATCHED_QOS)}
        chunks = []
        node.create_subscription(ros_io.JointTrajectory, 'arm/action_chunk', chunks.append, ros_io.RELIABLE_QOS)
        server.wait_for('serving 1 robot', timeout=90)
        assert 'onnxruntime on CPUExecutionProvider' in server.output()
        spin_until(executor, lambda: all(p.get_subscription_count() > 0 for k, p in pubs.items() if k != 'weights'),
                   20, 'the server to subscribe')
        state = np.arange(5, dtype=np.float32)

        def answer(stamp_ns: int) -> np.ndarray:
            # Sensor-data QoS is best effort: re-send until the chunk for this stamp arrives.
            deadline = time.monotonic() + 30
            while not any(ros_io.stamp_to_ns(c.header.stamp) == stamp_ns for c in chunks):
                assert time.monotonic() < deadline, f'no chunk for {stamp_ns}:\n{server.output()[-3000:]}'
                pubs['task'].publish(ros_io.arrays_to_joint_state(['t0'], state[4:], None, stamp_ns))
                pubs['joints'].publish(ros_io.arrays_to_joint_state(['j0', 'j1'], state[:2], state[2:4], stamp_ns))
                for _ in range(5):
                    executor.spin_once(timeout_sec=0.05)
            msg = next(c for c in chunks if ros_io.stamp_to_ns(c.header.stamp) == stamp_ns)
            return np.array([p.positions for p in msg.points])

        # The same decisions on torch: eval mode is the ODE sampler from the robot's own noise stream
        # (server seed 0, robot 'arm', its first episode).
        from stepnft_ros.nodes.policy_server import robot_noise

        reference = FlowPolicy(load_checkpoint(ckpt)[0], mode='ode')
        noise = robot_noise(0, 'arm', 0)
        obs = Observation(state=state)

        def expected() -> np.ndarray:
            eps = torch.randn((1, 4, 2), generator=noise)
            return reference.infer_batch([obs], initial_noise=eps).chunks[0]

        assert max_diff(answer(1_000), expected()) < TOLERANCE

        v1 = tiny_checkpoint(tmp_path / 'v1', state_dim=5, action_dim=2, seed=1, weights_version=1)
        pubs['weights'].publish(ros_io.WeightsAnnouncement(1, str(v1)).to_msg())
        server.wait_for('hot-swapped to weights version 1', timeout=60)
        reference.model = load_checkpoint(v1)[0].eval()
        assert max_diff(answer(2_000), expected()) < TOLERANCE
        assert server.proc.poll() is None
    finally:
        graph.stop_all()


@pytest.mark.parametrize('bad, message', [
    ({'backend': 'tensorrt'}, "backend must be one of ('torch', 'onnxruntime')"),
    ({'sde_noise': 'some_steps'}, "sde_noise must be one of ('every_step', 'recorded_step')"),
    ({'step_selection': 'first'}, "step_selection must be 'uniform', 'last' or a step index, got 'first'"),
    ({'step_noise_correlation': 1.5}, 'step_noise_correlation must be in [0, 1], got 1.5'),
    ({'cuda_graph': True}, "cuda_graph needs mode 'ode' on a CUDA device, got mode 'ode' on cpu")])
def test_policy_server_refuses_an_unknown_backend_or_sampler(tmp_path, ros_domain, bad, message):
    from ros_harness import Graph, tiny_checkpoint

    graph = Graph(tmp_path / 'logs')
    try:
        server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
            'checkpoint': str(tiny_checkpoint(tmp_path / 'ckpt', state_dim=5, action_dim=2)), 'robots': ['arm'],
            'mode': 'eval', **bad})
        assert server.proc.wait(60) == 2
        assert (f"parameters 'backend' / 'device' / 'sde_noise' / 'step_selection' / 'step_noise_correlation' / "
                f"'cuda_graph': {message}") in server.output()
    finally:
        graph.stop_all()
