"""LIBERO as a robot: the env adapter on a task of each suite, and the libero_bridge node graph.

CPU rendering through EGL (Mesa llvmpipe). Each env build takes 4-17 s and ~2 GB, so every
test builds as few as it can and closes what it builds.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from sim_bridge.libero_env import MAX_STEPS, SUITES, LiberoEnv, LiberoEnvConfig, prepare_libero, suite_tasks

# One task per suite (not the first ones, so a task-id mix-up would show).
TASKS = (('libero_spatial', 3), ('libero_object', 5), ('libero_goal', 1), ('libero_10', 7))
IMAGE = 48


def benchmark_init_states(suite: str, task_id: int) -> np.ndarray:
    """The benchmark's own init states, read through LIBERO's API (not through LiberoEnv)."""
    prepare_libero()  # LIBERO's config.yaml: without it the import asks on stdin
    from libero.libero import benchmark

    return np.asarray(benchmark.get_benchmark_dict()[suite]().get_task_init_states(task_id))


def physical_view(env: LiberoEnv, camera: str, size: int) -> np.ndarray:
    """The camera rendered by mujoco.Renderer, which returns images top row first."""
    import mujoco

    sim = env._env.env.sim
    with mujoco.Renderer(sim.model._model, size, size) as renderer:
        renderer.update_scene(sim.data._data, camera=camera)
        return renderer.render().copy()


def test_config_is_validated_and_defaults_to_each_suites_step_cap():
    assert {s: LiberoEnvConfig(suite=s).max_episode_steps for s in SUITES} == MAX_STEPS
    for field, value in (('suite', 'libero_90x'), ('task_id', 10), ('task_id', True), ('obs_mode', 'depth'),
                         ('image_size', 4), ('max_episode_steps', 0), ('settle_steps', -1), ('hard_reset', 1)):
        with pytest.raises(ValueError, match=field):
            LiberoEnvConfig(**{field: value})


def test_every_suite_lists_ten_tasks_with_instructions():
    for suite in SUITES:
        tasks = suite_tasks(suite)
        assert [t[0] for t in tasks] == list(range(10)), suite
        assert all(name and instruction and instruction.islower() for _, name, instruction in tasks)
    with pytest.raises(ValueError, match='suite'):
        suite_tasks('libero_100')


@pytest.mark.parametrize('suite,task_id', TASKS)
def test_a_task_of_each_suite_starts_from_its_benchmark_init_state(suite, task_id):
    init_states = benchmark_init_states(suite, task_id)
    seed = init_states.shape[0] + 2  # wraps around to init state 2
    cfg = LiberoEnvConfig(suite=suite, task_id=task_id, image_size=IMAGE, max_episode_steps=3, settle_steps=0)
    with LiberoEnv(cfg) as env:
        assert env.num_init_states == init_states.shape[0] == 50
        assert env.instruction == suite_tasks(suite)[task_id][2]
        obs = env.reset(seed)
        np.testing.assert_array_equal(env.sim_state(), init_states[2])  # time, qpos, qvel: all of it
        state = obs['state']
        assert state.shape == (env.state_dim,) == (25,) and state.dtype == np.float32
        qpos = env._env.env.sim.data.qpos
        np.testing.assert_allclose(state[:9], qpos[:9], atol=1e-6)  # arm and finger joints come first
        assert obs['instruction'] == env.instruction
        assert set(obs['images']) == {'agentview', 'wrist'}
        for image in obs['images'].values():
            assert image.shape == (IMAGE, IMAGE, 3) and image.dtype == np.uint8 and image.std() > 10
        # Upright: the physical view turned 180° (LIBERO's data-set convention), i.e. the reference
        # mirrored left-right, matches better than any other orientation. (The reference renders
        # other materials, so pixels differ: orientations are compared by correlation.)
        reference = physical_view(env, 'agentview', IMAGE).astype(float).ravel()
        ours = obs['images']['agentview'].astype(float)
        corr = {name: np.corrcoef(view.ravel(), reference)[0, 1] for name, view in (
            ('upright', ours[:, ::-1]), ('as rendered', ours[::-1, ::-1]), ('flipped', ours[::-1]),
            ('mirrored', ours))}
        assert max(corr, key=corr.get) == 'upright' and corr['upright'] > 0.3, corr

        for i in range(3):
            obs, success, done = env.step(np.zeros(7))
            assert not success and done == (i == 2)
        with pytest.raises(RuntimeError, match='reset'):
            env.step(np.zeros(7))
        with pytest.raises(ValueError, match='non-finite'):
            env.reset(seed)
            env.step(np.full(7, np.nan))


def test_state_mode_renders_nothing_settles_briefly_and_replays_bit_exact():
    init_states = benchmark_init_states('libero_goal', 4)
    with LiberoEnv(LiberoEnvConfig(suite='libero_goal', task_id=4, obs_mode='state')) as env:
        assert env.camera_names == () and env._env.env.has_offscreen_renderer is False
        first = env.reset(7)
        assert first['images'] == {} and first['state'].shape == (25,)
        settled = env.sim_state()
        # 10 no-op steps later: 0.5 s of sim time, the robot where the benchmark put it.
        assert settled[0] == pytest.approx(init_states[7][0] + 0.5)
        np.testing.assert_allclose(settled[1:10], init_states[7][1:10], atol=0.02)
        actions = np.random.default_rng(0).uniform(-1, 1, (6, 7))

        def rollout():
            start = env.reset(7)['state']
            return np.stack([start] + [env.step(a)[0]['state'] for a in actions])

        np.testing.assert_array_equal(rollout(), rollout())  # hard resets: same seed + actions, same states


# ---- the node graph --------------------------------------------------------------------------

from ros_harness import Graph, spin_until, tiny_checkpoint  # noqa: E402

from stepnft_ros import ros_io  # noqa: E402
from stepnft_ros.episodes.store import EpisodeStore  # noqa: E402


@pytest.fixture
def graph(tmp_path, ros_domain):
    g = Graph(tmp_path / 'logs')
    yield g
    g.stop_all()


@pytest.mark.slow
def test_bridge_streams_a_task_of_each_suite_through_the_policy_server(tmp_path, graph, probe):
    """One libero_bridge runs a task of each suite in turn (an evaluation sweep), cameras on."""
    node, executor = probe
    summaries, instructions = [], []
    node.create_subscription(ros_io.String, 'env0/episode_summary', lambda m: summaries.append(json.loads(m.data)),
                             ros_io.RELIABLE_QOS)
    node.create_subscription(ros_io.String, 'env0/instruction', lambda m: instructions.append(m.data),
                             ros_io.LATCHED_QOS)
    ckpt = tiny_checkpoint(tmp_path / 'ckpt', state_dim=25, action_dim=7, camera_names=('agentview', 'wrist'),
                           image_size=IMAGE)
    episodes = tmp_path / 'episodes'
    server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
        'checkpoint': str(ckpt), 'episode_dir': str(episodes), 'robots': ['env0'], 'mode': 'train'})
    bridge = graph.start('sim_bridge.libero_node', 'libero_bridge', {
        'task_ids': [f'{s}/{t}' for s, t in TASKS], 'episodes_per_task': 1, 'first_seed': 3,
        'image_size': IMAGE, 'max_episode_steps': 6, 'actions_per_chunk': 4, 'hard_reset': False},
        namespace='env0')
    bridge.wait_for(r'ran all 4 task\(s\)', timeout=170)
    assert bridge.proc.wait(30) == 0
    spin_until(executor, lambda: len(summaries) == 4, 10, 'four episode summaries')

    expected = [(f'{s}/{t}', s, suite_tasks(s)[t][2]) for s, t in TASKS]
    assert [(s['task'], s['suite'], s['instruction']) for s in summaries] == expected
    for s in summaries:
        assert s['split'] == 'id' and s['seed'] == 3 and s['success'] is False and s['env_steps'] == 6
        assert s['wall_s'] > 0
    assert instructions[-1] == expected[-1][2]

    server.wait_for(r'-> \S+_env0_', count=4)
    store = EpisodeStore(episodes)
    deadline = time.monotonic() + 10
    while len(store.episode_ids()) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    recorded = sorted((store.load(e) for e in store.episode_ids()), key=lambda e: e.decisions[0].stamp_ns)
    assert len(recorded) == 4
    for episode, (_, _, instruction) in zip(recorded, expected, strict=True):
        assert len(episode.decisions) == 2 and episode.success is False  # 6 steps = chunks of 4 and 2
        assert episode.seed == 3  # from <ns>/episode_seed: each task starts at first_seed
        for d in episode.decisions:  # each decision saw its own task's instruction and both cameras
            assert d.observation.instruction == instruction and d.observation.state.shape == (25,)
            for image in d.observation.images.values():
                assert image.shape == (IMAGE, IMAGE, 3) and image.std() > 10
            assert set(d.observation.images) == {'agentview', 'wrist'}


@pytest.mark.parametrize('params,message', [
    ({'suite': 'libero_90x'}, 'suite must be one of'),
    ({'task_ids': ['libero_goal/2', 'libero_goal/3']}, "'episodes_per_task' must be >= 1"),
    ({'task_ids': ['goal-two']}, "task_ids entry 'goal-two'"),
    ({'task_id': 12}, 'task_id must be an int in'),
])
def test_bad_parameters_stop_the_bridge_with_exit_2_and_one_line(tmp_path, graph, params, message):
    bridge = graph.start('sim_bridge.libero_node', 'libero_bridge', params)
    assert bridge.proc.wait(60) == 2
    out = bridge.output()
    assert message in out and 'Traceback' not in out
    assert len([line for line in out.splitlines() if 'FATAL' in line]) == 1, out


def test_train_sim_on_a_libero_task(tmp_path, ros_domain):
    """`stepnft launch train_sim --suite`: LIBERO bridges as the robots, camera episodes as bags, an update."""
    import yaml
    from ros_harness import REPO, run_launch

    from stepnft_ros.policy.checkpoint import read_header

    params = yaml.safe_load((REPO / 'config/train_sim.yaml').read_text())
    params['learner']['ros__parameters'].update(episodes_per_update=1, max_updates=1, scan_period_s=0.5)
    params['/**/libero_bridge']['ros__parameters'].update(max_episode_steps=4, settle_steps=2)
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(yaml.safe_dump(params))
    ckpt = tiny_checkpoint(tmp_path / 'sft', state_dim=25, action_dim=7, camera_names=('agentview', 'wrist'),
                           image_size=32)
    run = tmp_path / 'run'
    proc = run_launch(['train_sim', '--suite', 'libero_goal', '--tasks', '1', '--num-envs', '1', '--run-dir',
                       str(run), '--checkpoint', str(ckpt), '--params-file', str(params_file)],
                      240, tmp_path / 'launch.log')
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert '[train] update 1/1' in out, f'see {tmp_path / "launch.log"}'
    store = EpisodeStore(run / 'episodes')
    episode = store.load(store.episode_ids()[0])
    assert episode.robot == 'env0' and len(episode.decisions) == 1  # a 4-step cap: one chunk of 4 actions
    obs = episode.decisions[0].observation
    assert obs.state.shape == (25,) and {k: v.shape for k, v in obs.images.items()} == {
        'agentview': (32, 32, 3), 'wrist': (32, 32, 3)}
    assert obs.instruction == suite_tasks('libero_goal')[1][2]
    _, meta = read_header(run / 'learner/checkpoints/v000001')
    assert meta['weights_version'] == 1


def test_train_sim_on_libero_needs_a_checkpoint_and_no_maniskill_evaluator():
    from stepnft_ros.launch_description import TrainSimArgs

    with pytest.raises(ValueError, match='needs a checkpoint'):
        TrainSimArgs(suite='libero_goal', evaluate=False)
    with pytest.raises(ValueError, match='evaluator runs ManiSkill'):
        TrainSimArgs(suite='libero_goal', checkpoint='x')
    with pytest.raises(ValueError, match='suite must be one of'):
        TrainSimArgs(suite='libero_90', checkpoint='x', evaluate=False)
