"""The node graph as real processes on a private loopback DDS domain: training, images, faults."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

rclpy = pytest.importorskip('rclpy', reason='ROS 2 is installed by scripts/setup.sh')

from rclpy.serialization import deserialize_message  # noqa: E402
from ros_harness import REPO, Graph, run_launch, spin_until, tiny_checkpoint  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from stepnft_ros import ros_io  # noqa: E402
from stepnft_ros.episodes.store import EpisodeStore  # noqa: E402
from stepnft_ros.monitoring import read_scalars  # noqa: E402
from stepnft_ros.policy.checkpoint import read_header  # noqa: E402
from stepnft_ros.policy.sampler import recorded_noise, scheduled_noise_level  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def graph(tmp_path, ros_domain):
    g = Graph(tmp_path / 'logs')
    yield g
    g.stop_all()


def test_train_sim_records_bags_updates_and_hot_swaps(tmp_path, ros_domain):
    """`stepnft launch train_sim`: two bridges, a policy server, a learner and the evaluator, as launched by
    users; here with seed groups of 2 and group-relative labels. The console shows a line per update and a
    summary; the nodes' output goes to <run_dir>/logs."""
    params = yaml.safe_load((REPO / 'config/train_sim.yaml').read_text())
    params['learner']['ros__parameters'].update(episodes_per_update=2, max_updates=2, scan_period_s=0.5,
                                                labels='group_mean')
    params['/**']['ros__parameters'].update(max_episode_steps=12, env_id='PickCube-v1')  # the tiny policy's state
    params['/**/maniskill_bridge']['ros__parameters'].update(reconfigure_on_reset=False, group_size=2)
    params['maniskill_evaluator']['ros__parameters'].update(eval_episodes=2)
    # a falls with the learner's training env steps, 0.5 -> 0.3 (about two updates of 2 short episodes).
    params['policy_server']['ros__parameters'].update(noise_level=0.5, noise_level_final=0.3, noise_decay_env_steps=40)
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(yaml.safe_dump(params))
    ckpt = tiny_checkpoint(tmp_path / 'sft')
    run = tmp_path / 'run'
    proc = run_launch(['train_sim', '--run-dir', str(run), '--num-envs', '2', '--checkpoint', str(ckpt),
                       '--params-file', str(params_file)], 240, tmp_path / 'launch.log')
    out = proc.stdout + proc.stderr
    logs = {p.name: p.read_text() for p in (run / 'logs').glob('*.log')}
    assert proc.returncode == 0, out[-4000:] + ''.join(text[-2000:] for text in logs.values())
    assert sorted(logs) == ['env0_maniskill_bridge.log', 'env1_maniskill_bridge.log', 'learner.log',
                            'maniskill_evaluator.log', 'policy_server.log']
    assert 'update 2:' in logs['learner.log'] and 'hot-swapped to weights version' in logs['policy_server.log']
    assert re.search(r'episode 1 \(seed 1000000, PickCube-v1\)', logs['env0_maniskill_bridge.log'])
    # The console: a line per update, the summary; no node output.
    progress = re.findall(r'^\[train\] update (\d)/2, 2 episodes \(\d+ total\), train success [\d.]+, loss \S+, '
                          r'(?:eval [\d.]+(?: \(v\d\))?, )?[\d.]+ min, ETA [\d.]+ min$', proc.stdout, re.M)
    assert progress == ['1', '2'], out
    assert 'episode 1 (seed' not in out and 'hot-swapped' not in out
    summary = json.loads((run / 'summary.json').read_text())
    assert (summary['start_version'], summary['final_version'], summary['eval_episodes'], summary['updates']) \
        == (0, 2, 2, 2)
    assert 0 <= summary['start_interval'][0] <= summary['start'] <= summary['start_interval'][1] <= 1
    assert 0 <= summary['final_interval'][0] <= summary['final'] <= summary['final_interval'][1] <= 1
    assert summary['env_steps'] >= 4 and summary['wall_min'] > 0
    assert re.search(r'^\[summary\] held-out success [\d.]+ \[[\d.]+, [\d.]+\] -> [\d.]+ \[[\d.]+, [\d.]+\] '
                     r'\(v0 -> v2, 2 episodes, Wilson 95 %\), 2 updates', proc.stdout, re.M), out
    # The evaluator ends the graph by finishing, not by an exception in its callback.
    for text in (out, *logs.values()):
        assert 'FATAL' not in text and 'Exception in' not in text and 'Traceback' not in text, f'see {run}/logs'

    store = EpisodeStore(run / 'episodes')
    episodes = [store.load(e) for e in store.episode_ids()]
    assert len(episodes) >= 4 and {e.robot for e in episodes} == {'env0', 'env1'}
    # Seeds round-trip through the bags and come in pairs per robot (group_size 2), in start order.
    pairs = 0
    for robot, first_seed in (('env0', 1_000_000), ('env1', 1_100_000)):
        seeds = [e.seed for e in sorted(episodes, key=lambda e: e.episode_id) if e.robot == robot]
        assert seeds == [first_seed + i // 2 for i in range(len(seeds))], (robot, seeds)
        pairs += len(seeds) // 2
    assert pairs >= 1
    versions = {d.weights_version if d.weights_version is not None else e.weights_version
                for e in episodes for d in e.decisions}
    assert 0 in versions and max(versions) >= 1, 'the policy server acted with the learner\'s new weights'
    for e in episodes:  # each decision answers a distinct observation, in stamp order
        stamps = [d.stamp_ns for d in e.decisions]
        assert stamps == sorted(set(stamps)) and all(d.observation.state.shape == (42,) for d in e.decisions)
        executed = [d.executed for d in e.decisions]  # 4 per chunk; the last one up to the episode's end
        assert executed[:-1] == [4] * (len(executed) - 1) and 1 <= executed[-1] <= 4
        assert sum(executed) == e.env_steps
    _, meta = read_header(run / 'learner/checkpoints/v000002')
    assert meta['weights_version'] == 2 and len(meta['learner']['consumed']) == 4
    # Each version's decisions explored at a for the env steps the learner had trained on when it announced it.
    trained = np.cumsum([0] + [h['env_steps'] for h in meta['learner']['history']])
    used = {}
    for e in episodes:
        for d in e.decisions:
            version = d.weights_version if d.weights_version is not None else e.weights_version
            used.setdefault(version, set()).add(round(float(d.trace.a[0]), 5))
    expected = {v: {round(scheduled_noise_level(0.5, 0.3, 40, int(trained[v])), 5)} for v in used}
    assert used == expected and used[0] == {0.5} and min(min(a) for a in used.values()) < 0.5, used
    assert 'noise level a=' in logs['policy_server.log']
    assert (run / 'learner/success.png').read_bytes()[:4] == b'\x89PNG'
    evaluated = json.loads((run / 'eval_history.json').read_text())
    assert {0, 2} <= {h['weights_version'] for h in evaluated}, 'the SFT start and the final version are scored'
    assert all(h['episodes'] == 2 and 0 <= h['eval_success'] <= 1 for h in evaluated)
    assert all(len(h['outcomes']) == 2 and sum(h['outcomes']) / 2 == h['eval_success'] for h in evaluated)
    assert (run / 'success.png').read_bytes()[:4] == b'\x89PNG'
    assert 'final version 2 evaluated' in logs['maniskill_evaluator.log']
    # The live view: TensorBoard scalars of every update and every evaluation, by weights version.
    train = read_scalars(run / 'learner/tensorboard')
    assert [step for step, _ in train['train/train_success']] == [1, 2]
    assert [v for _, v in train['train/loss']] == pytest.approx([h['loss'] for h in meta['learner']['history']])
    scored = read_scalars(run / 'evaluator/tensorboard')
    assert {step for step, _ in scored['eval/eval_success']} == {h['weights_version'] for h in evaluated}
    assert all(low <= rate for (_, low), (_, rate) in zip(scored['eval/success_low95'], scored['eval/eval_success'],
                                                         strict=True))


@pytest.mark.parametrize('bad, message', [
    ({'mode': 'eval'}, "parameter 'noise_level_final' schedules train mode's noise; mode is eval"),
    ({'noise_decay_env_steps': 0}, 'noise_decay_env_steps >= 1, got 0.8, 0.3 and 0')])
def test_policy_server_refuses_a_noise_schedule_it_cannot_follow(tmp_path, graph, bad, message):
    server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
        'checkpoint': str(tiny_checkpoint(tmp_path / 'ckpt')), 'robots': ['env0'], 'mode': 'train',
        'episode_dir': str(tmp_path / 'episodes'), 'noise_level': 0.8, 'noise_level_final': 0.3,
        'noise_decay_env_steps': 1000, **bad})
    assert server.proc.wait(60) == 2
    assert message in server.output(), server.output()[-2000:]


def test_camera_images_flow_through_bridge_and_policy_server(tmp_path, graph):
    ckpt = tiny_checkpoint(tmp_path / 'vision', camera_names=('base_camera',), image_size=32)
    episodes = tmp_path / 'episodes'
    server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
        'checkpoint': str(ckpt), 'episode_dir': str(episodes), 'robots': ['env0'], 'mode': 'train',
        'sde_noise': 'recorded_step', 'step_noise_correlation': 1.0})
    bridge = graph.start('sim_bridge.maniskill_node', 'maniskill_bridge', {
        'obs_mode': 'rgb', 'image_size': 32, 'max_episode_steps': 6, 'max_episodes': 2,
        'reconfigure_on_reset': False}, namespace='env0')
    bridge.wait_for(r'episode 2 \(seed', timeout=120)
    assert bridge.proc.wait(30) == 0, 'max_episodes reached: the bridge ends cleanly'
    assert 'FATAL' not in bridge.output() and 'Exception in' not in bridge.output(), bridge.output()[-3000:]
    server.wait_for(r'-> \S+_env0_', count=2)
    store = EpisodeStore(episodes)
    deadline = time.monotonic() + 10
    while len(store.episode_ids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    leanings = []
    for episode_id in store.episode_ids():
        episode = store.load(episode_id)
        # step_noise_correlation 1: the server kept one step-noise direction for each episode
        xi = [recorded_noise(d.trace, 3) for d in episode.decisions]  # tiny_checkpoint: K = 3
        assert torch.allclose(xi[0], xi[1], atol=1e-4)
        leanings.append(xi[0])
        image = episode.decisions[0].observation.images['base_camera']
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.std() > 0  # a rendered scene
        assert len(episode.decisions) == 2 and episode.success is False  # 6 steps: chunks of 4 and 2; random policy
        assert [d.executed for d in episode.decisions] == [4, 2] and episode.env_steps == 6
        # The robot's own messages, as they arrived, replayable on its topics (standard types).
        first = {topic: (msgtype, data) for topic, msgtype, data in episode.decisions[0].robot_messages}
        assert set(first) == {'joint_states', 'task_state', 'camera/base_camera/image_raw', 'instruction'}
        msgtype, data = first['camera/base_camera/image_raw']
        frame = deserialize_message(data, ros_io.Image)
        assert msgtype == 'sensor_msgs/msg/Image' and ros_io.stamp_to_ns(frame.header.stamp) == \
            episode.decisions[0].stamp_ns
        assert np.array_equal(ros_io.image_to_numpy(frame, 32), image)
        assert deserialize_message(first['instruction'][1], String).data == episode.decisions[0].observation.instruction
        assert {t for t, _, _ in episode.decisions[1].robot_messages} == {
            'joint_states', 'task_state', 'camera/base_camera/image_raw'}  # the instruction once per episode
    assert not torch.allclose(leanings[0], leanings[1], atol=1e-2)  # a new direction per episode


def test_a_respawned_bridge_has_its_predecessors_unfinished_episode_dropped(tmp_path, graph, probe):
    """A bridge killed mid-episode and started again: the server writes no episode mixing the two."""
    node, executor = probe
    chunks = []
    node.create_subscription(ros_io.JointTrajectory, 'env0/action_chunk', chunks.append, ros_io.RELIABLE_QOS)
    ckpt = tiny_checkpoint(tmp_path / 'ckpt')
    episodes = tmp_path / 'episodes'
    server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
        'checkpoint': str(ckpt), 'episode_dir': str(episodes), 'robots': ['env0'], 'mode': 'train'})
    bridge = {'max_episode_steps': 100_000, 'reconfigure_on_reset': False}  # cannot end before the kill
    crashing = graph.start('sim_bridge.maniskill_node', 'maniskill_bridge', bridge, namespace='env0')
    spin_until(executor, lambda: len(chunks) >= 3, 120, 'three decisions of the first bridge\'s episode')
    crashing.stop(signal.SIGKILL)  # a simulator crash, mid-episode
    respawned = graph.start('sim_bridge.maniskill_node', 'maniskill_bridge',
                            {**bridge, 'max_episode_steps': 6, 'max_episodes': 1}, namespace='env0')
    respawned.wait_for(r'episode 1 \(seed', timeout=120)
    server.wait_for(r'discarded episode \S+ \((\d+) decisions, not written\)')
    assert int(re.search(r'discarded episode \S+ \((\d+) decisions', server.output())[1]) >= 3

    def written_after_the_discard():
        # On a fast machine the first bridge may finish whole episodes before the kill; those are
        # legitimate. Only what the server wrote after dropping the unfinished one is the respawn's.
        log = server.output()
        return re.findall(r'-> (\S+_env0_\S*)', log[log.index('discarded episode'):])
    deadline = time.monotonic() + 60
    while not written_after_the_discard() and time.monotonic() < deadline:
        time.sleep(0.1)
    [episode_id] = written_after_the_discard()
    store = EpisodeStore(episodes)
    deadline = time.monotonic() + 10
    while episode_id not in store.episode_ids() and time.monotonic() < deadline:
        time.sleep(0.1)
    episode = store.load(episode_id)  # the respawned bridge's episode only: 6 steps = chunks of 4 and 2
    assert [d.executed for d in episode.decisions] == [4, 2] and episode.env_steps == 6


def publish_observation(node, pubs, stamp_ns, state):
    pubs['task'].publish(ros_io.arrays_to_joint_state(['t0'], state[4:], None, stamp_ns))
    pubs['joints'].publish(ros_io.arrays_to_joint_state(['j0', 'j1'], state[:2], state[2:4], stamp_ns))


def test_bad_input_is_logged_and_the_nodes_keep_serving(tmp_path, graph, probe):
    node, executor = probe
    ckpt = tiny_checkpoint(tmp_path / 'ckpt', state_dim=5, action_dim=2, camera_names=('wrist',), image_size=16)
    server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
        'checkpoint': str(ckpt), 'episode_dir': str(tmp_path / 'episodes'), 'robots': ['arm'], 'mode': 'train'})
    server.wait_for('serving 1 robot')
    pubs = {'joints': node.create_publisher(ros_io.JointState, 'arm/joint_states', ros_io.SENSOR_QOS),
            'task': node.create_publisher(ros_io.JointState, 'arm/task_state', ros_io.SENSOR_QOS),
            'image': node.create_publisher(ros_io.Image, 'arm/camera/wrist/image_raw', ros_io.SENSOR_QOS),
            'weights': node.create_publisher(ros_io.String, ros_io.POLICY_WEIGHTS, ros_io.LATCHED_QOS)}
    chunks = []
    node.create_subscription(ros_io.JointTrajectory, 'arm/action_chunk', chunks.append, ros_io.RELIABLE_QOS)
    spin_until(executor, lambda: all(p.get_subscription_count() > 0 for k, p in pubs.items() if k != 'weights'),
               20, 'the server to subscribe')
    state = np.arange(5, dtype=np.float32)
    good = np.full((16, 16, 3), 90, np.uint8)

    def send(stamp_ns, image_msg, st=state):
        pubs['image'].publish(image_msg)
        publish_observation(node, pubs, stamp_ns, st)
        executor.spin_once(timeout_sec=0.05)

    def send_until_logged(stamp_ns, image_msg, expected, st=state):
        # Sensor-data QoS is best effort: re-send until the server has seen (and logged) it.
        deadline = time.monotonic() + 30
        while expected not in server.output():
            assert time.monotonic() < deadline, f'server never logged {expected!r}:\n{server.output()[-3000:]}'
            send(stamp_ns, image_msg, st)
            time.sleep(0.2)

    mono = ros_io.Image(height=16, width=16, encoding='mono8', step=16, data=bytes(256))
    mono.header.stamp = ros_io.ns_to_stamp(1_000)
    send_until_logged(1_000, mono, "encoding 'mono8' unsupported")
    send_until_logged(2_000, ros_io.numpy_to_image(np.zeros((8, 8, 3), np.uint8), 2_000),
                      'is 8x8, the policy expects 16x16')
    send_until_logged(3_000, ros_io.numpy_to_image(good, 3_000), 'position is non-finite',
                      st=np.array([0, np.nan, 0, 0, 0], np.float32))
    assert not chunks, 'nothing is answered for a bad observation'

    def send_until_answered(stamp_ns):
        # Re-sending a stamp is idempotent: the server answers it once (or repeats the same chunk).
        deadline = time.monotonic() + 20
        while not any(ros_io.stamp_to_ns(c.header.stamp) == stamp_ns for c in chunks):
            assert time.monotonic() < deadline, f'no chunk for the observation stamped {stamp_ns}'
            send(stamp_ns, ros_io.numpy_to_image(good, stamp_ns))
            for _ in range(5):
                executor.spin_once(timeout_sec=0.05)

    send_until_answered(4_000)
    assert ros_io.stamp_to_ns(chunks[0].header.stamp) == 4_000 and len(chunks[0].points) == 4
    send_until_logged(3_500, ros_io.numpy_to_image(good, 3_500), 'stale')

    torn = tmp_path / 'torn'
    torn.mkdir()
    (torn / 'model.safetensors').write_bytes(b'not a checkpoint')
    pubs['weights'].publish(ros_io.WeightsAnnouncement(5, str(torn)).to_msg())
    server.wait_for('weights update ignored, keeping version 0')
    send_until_answered(5_000)
    assert server.proc.poll() is None


def test_warm_up_leaves_the_chunks_as_they_were_and_a_simulated_inference_time_delays_answers(tmp_path, graph, probe):
    """Two train-mode servers of one checkpoint and seed, one warmed up and padding its inference to 0.5 s: both
    answer the same observation with the same Flow-SDE chunk (the warm-up re-seeds the sampler), the slow one
    no sooner than 0.5 s after the observation was first sent."""
    node, executor = probe
    ckpt = tiny_checkpoint(tmp_path / 'ckpt', state_dim=5, action_dim=2)
    servers, pubs, chunks = {}, {}, {}
    for ns, params in (('plain', {'warm_up': False}), ('slow', {'warm_up': True, 'simulated_inference_ms': 500.0})):
        servers[ns] = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
            'checkpoint': str(ckpt), 'episode_dir': str(tmp_path / ns), 'robots': ['arm'], 'mode': 'train', **params},
            namespace=ns)
        pubs[ns] = {'joints': node.create_publisher(ros_io.JointState, f'{ns}/arm/joint_states', ros_io.SENSOR_QOS),
                    'task': node.create_publisher(ros_io.JointState, f'{ns}/arm/task_state', ros_io.SENSOR_QOS)}
        chunks[ns] = []
        node.create_subscription(ros_io.JointTrajectory, f'{ns}/arm/action_chunk', chunks[ns].append,
                                 ros_io.RELIABLE_QOS)
    servers['slow'].wait_for(r'warm-up inference \d+ ms')
    servers['plain'].wait_for('serving 1 robot')
    assert 'warm-up' not in servers['plain'].output()
    spin_until(executor, lambda: all(p.get_subscription_count() > 0 for ps in pubs.values() for p in ps.values()),
               20, 'the servers to subscribe')
    state = np.arange(5, dtype=np.float32)
    first_sent = time.monotonic()
    arrived = {}
    deadline = first_sent + 30
    while len(arrived) < 2:
        assert time.monotonic() < deadline, f'answers from {sorted(arrived)} only'
        for ns in pubs:
            if ns not in arrived:
                publish_observation(node, pubs[ns], 7_000, state)
        until = time.monotonic() + 1.0
        while time.monotonic() < until and len(arrived) < 2:
            executor.spin_once(timeout_sec=0.02)
            arrived.update({ns: time.monotonic() for ns in chunks if chunks[ns] and ns not in arrived})
    plain, slow = (np.array([p.positions for p in chunks[ns][0].points]) for ns in ('plain', 'slow'))
    np.testing.assert_allclose(slow, plain, rtol=1e-5, atol=1e-6)
    assert arrived['slow'] - first_sent >= 0.5


def test_bridge_ignores_chunks_for_stale_observations(tmp_path, graph, probe):
    node, executor = probe
    bridge = graph.start('sim_bridge.maniskill_node', 'maniskill_bridge', {
        'max_episode_steps': 20, 'reconfigure_on_reset': False, 'request_timeout_s': 0.5}, namespace='env0')
    states = []
    node.create_subscription(ros_io.JointState, 'env0/joint_states', states.append, ros_io.SENSOR_QOS)
    chunk_pub = node.create_publisher(ros_io.JointTrajectory, 'env0/action_chunk', ros_io.RELIABLE_QOS)
    spin_until(executor, lambda: states, 60, 'the bridge\'s first observation (re-sent every 0.5 s)')
    first = ros_io.stamp_to_ns(states[-1].header.stamp)
    zero = np.zeros((4, 7), np.float32)
    chunk_pub.publish(ros_io.chunk_to_trajectory(zero, [f'a{i}' for i in range(7)], first - 50_000_000, 0.05))
    bridge.wait_for('ignored a chunk for a stale observation')
    chunk_pub.publish(ros_io.chunk_to_trajectory(np.full((4, 3), np.nan), ['a', 'b', 'c'], first, 0.05))
    bridge.wait_for('rejected action chunk, holding still')
    chunk_pub.publish(ros_io.chunk_to_trajectory(zero, [f'a{i}' for i in range(7)], first, 0.05))
    spin_until(executor, lambda: ros_io.stamp_to_ns(states[-1].header.stamp) > first, 20,
               'a new observation after the matching chunk ran')
    assert ros_io.stamp_to_ns(states[-1].header.stamp) - first == 4 * 50_000_000  # 4 actions at 20 Hz


def test_a_missing_parameter_stops_only_that_node_with_a_clear_message(tmp_path, graph):
    server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {'mode': 'train'})
    assert server.proc.wait(60) == 2
    assert "missing parameter 'checkpoint'" in server.output()


def _running(pid: int) -> bool:
    try:
        return Path(f'/proc/{pid}/stat').read_text().split(')')[-1].split()[0] != 'Z'
    except OSError:
        return False


@pytest.mark.parametrize('ranks', [1, 2])
def test_learner_killed_mid_run_resumes_without_losing_or_repeating_episodes(tmp_path, graph, ranks):
    from toy_env import PointReach

    from stepnft_ros.policy import FlowPolicy, load_checkpoint
    from stepnft_ros.rollout import run_episode

    ckpt = tiny_checkpoint(tmp_path / 'sft', state_dim=4, action_dim=2)
    store = EpisodeStore(tmp_path / 'episodes')
    policy = FlowPolicy(load_checkpoint(ckpt)[0], mode='sde')
    env = PointReach()

    def add(first, n):
        for i in range(first, first + n):
            store.write(run_episode(env, policy, seed=i, actions_per_chunk=2, episode_id=f'ep{i:04d}'))

    params = {'checkpoint': str(ckpt), 'episode_dir': str(store.root), 'work_dir': str(tmp_path / 'learner'),
              'episodes_per_update': 3, 'max_version_lag': 100, 'scan_period_s': 0.2, 'max_updates': 6,
              'ranks': ranks}
    add(0, 8)
    learner = graph.start('stepnft_ros.nodes.learner', 'learner', params)
    learner.wait_for(r'update 2:')
    workers = [int(pid) for pid in re.findall(r'worker pids ([\d ]+)\)', learner.output())[0].split()] \
        if ranks > 1 else []
    assert len(workers) == ranks - 1
    learner.stop(signal.SIGKILL)  # no chance to clean up: 2 episodes read but not consumed
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(pid) for pid in workers), 'workers whose learner died exit on their own'
    add(8, 4)
    restarted = graph.start('stepnft_ros.nodes.learner', 'learner', params)
    restarted.wait_for('resumed at weights version 2')
    add(12, 6)
    assert restarted.proc.wait(120) == 0, restarted.output()[-3000:]  # stops at max_updates = 6
    _, meta = read_header(tmp_path / 'learner/checkpoints/v000006')
    history = meta['learner']['history']
    assert [h['weights_version'] for h in history] == [1, 2, 3, 4, 5, 6]
    assert sum(h['episodes'] for h in history) == 18 == len(meta['learner']['consumed'])
    assert sorted(meta['learner']['consumed']) == store.episode_ids()
    assert json.loads((tmp_path / 'learner/history.json').read_text()) == history


def test_executed_reports_that_come_after_the_outcome_still_count(tmp_path, graph, probe):
    """Topics and services are not ordered: the server waits `executed_wait_s` for the last chunk's
    report after the outcome, then writes the episode without it (unknown, with a warning)."""
    from std_srvs.srv import SetBool

    node, executor = probe
    ckpt = tiny_checkpoint(tmp_path / 'ckpt', state_dim=5, action_dim=2)
    server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
        'checkpoint': str(ckpt), 'episode_dir': str(tmp_path / 'episodes'), 'robots': ['arm'], 'mode': 'train',
        'executed_wait_s': 1.0})
    server.wait_for('serving 1 robot')
    pubs = {'joints': node.create_publisher(ros_io.JointState, 'arm/joint_states', ros_io.SENSOR_QOS),
            'task': node.create_publisher(ros_io.JointState, 'arm/task_state', ros_io.SENSOR_QOS)}
    executed_pub = node.create_publisher(ros_io.JointTrajectory, 'arm/' + ros_io.EXECUTED_CHUNK, ros_io.RELIABLE_QOS)
    outcome = node.create_client(SetBool, 'arm/' + ros_io.EPISODE_OUTCOME)
    chunks = {}
    node.create_subscription(ros_io.JointTrajectory, 'arm/action_chunk',
                             lambda m: chunks.setdefault(ros_io.stamp_to_ns(m.header.stamp), m), ros_io.RELIABLE_QOS)
    spin_until(executor, lambda: executed_pub.get_subscription_count() > 0 and outcome.service_is_ready(), 20,
               'the server to subscribe')

    def decide(stamp_ns):
        deadline = time.monotonic() + 20
        while stamp_ns not in chunks:  # best-effort sensor QoS: re-send until answered
            assert time.monotonic() < deadline, f'no chunk for {stamp_ns}'
            publish_observation(node, pubs, stamp_ns, np.arange(5, dtype=np.float32))
            for _ in range(4):
                executor.spin_once(timeout_sec=0.05)
        return chunks[stamp_ns]

    def end(success):
        future = outcome.call_async(SetBool.Request(data=success))
        spin_until(executor, future.done, 10, 'the outcome answer')
        return future.result().message  # the episode id

    # Episode 1: the last report arrives after the outcome, within the wait.
    executed_pub.publish(ros_io.executed_report(decide(1_000), 4))
    last = decide(2_000)
    first_id = end(True)
    executed_pub.publish(ros_io.executed_report(last, 1))
    # Episode 2: a chunk that took over late (its first action's tick had passed); the last report never comes.
    executed_pub.publish(ros_io.executed_report(decide(3_000), 3, first=1))
    decide(4_000)
    second_id = end(False)
    server.wait_for(f'no executed_chunk report for the last decision of {second_id} within 1 s')
    store = EpisodeStore(tmp_path / 'episodes')
    deadline = time.monotonic() + 10
    while len(store.episode_ids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    first, second = store.load(first_id), store.load(second_id)
    assert [d.executed for d in first.decisions] == [4, 1] and first.env_steps == 5
    assert [d.executed for d in second.decisions] == [3, None] and second.env_steps == 3 + 4  # None: actions_per_chunk
    assert [d.executed_from for d in first.decisions + second.decisions] == [0, 0, 1, 0]


def test_each_episode_seed_heard_labels_one_episode_and_its_bag(tmp_path, graph, probe):
    """<ns>/episode_seed: the seed heard before an episode (or during it, when it comes late) is that
    episode's; an episode without one of its own stays seed-less rather than reusing an older seed."""
    from std_srvs.srv import SetBool

    node, executor = probe
    ckpt = tiny_checkpoint(tmp_path / 'ckpt', state_dim=5, action_dim=2)
    server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
        'checkpoint': str(ckpt), 'episode_dir': str(tmp_path / 'episodes'), 'robots': ['arm'], 'mode': 'train'})
    server.wait_for('serving 1 robot')
    pubs = {'joints': node.create_publisher(ros_io.JointState, 'arm/joint_states', ros_io.SENSOR_QOS),
            'task': node.create_publisher(ros_io.JointState, 'arm/task_state', ros_io.SENSOR_QOS)}
    seed_pub = node.create_publisher(ros_io.Int64, 'arm/' + ros_io.EPISODE_SEED, ros_io.LATCHED_QOS)
    outcome = node.create_client(SetBool, 'arm/' + ros_io.EPISODE_OUTCOME)
    answered = set()
    node.create_subscription(ros_io.JointTrajectory, 'arm/action_chunk',
                             lambda m: answered.add(ros_io.stamp_to_ns(m.header.stamp)), ros_io.RELIABLE_QOS)
    spin_until(executor, lambda: seed_pub.get_subscription_count() > 0 and outcome.service_is_ready(), 20,
               'the server to subscribe')

    def decide(stamp_ns):
        deadline = time.monotonic() + 20
        while stamp_ns not in answered:
            assert time.monotonic() < deadline, f'no chunk for {stamp_ns}'
            publish_observation(node, pubs, stamp_ns, np.arange(5, dtype=np.float32))
            for _ in range(4):
                executor.spin_once(timeout_sec=0.05)

    def end():
        future = outcome.call_async(SetBool.Request(data=False))
        spin_until(executor, future.done, 10, 'the outcome answer')
        return future.result().message

    ids = []
    seed_pub.publish(ros_io.seed_to_msg(7))  # before the reset, as bridges do
    decide(1_000)
    decide(2_000)
    ids.append(end())
    decide(3_000)  # no seed of its own
    ids.append(end())
    decide(4_000)
    seed_pub.publish(ros_io.seed_to_msg(9))  # late: after the episode's first decision
    server.wait_for('seed 9 came after the first decision')
    ids.append(end())
    seed_pub.publish(ros_io.Int64(data=-3))
    server.wait_for('episode_seed: ignored: episode seed must be >= 0')
    decide(5_000)
    ids.append(end())
    store = EpisodeStore(tmp_path / 'episodes')
    deadline = time.monotonic() + 10
    while len(store.episode_ids()) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [store.load(i).seed for i in ids] == [7, None, 9, None]  # round trip through the bags


def test_group_mean_labels_are_refused_where_robots_have_no_seeds(tmp_path, graph):
    ckpt = tiny_checkpoint(tmp_path / 'ckpt')
    learner = graph.start('stepnft_ros.nodes.learner', 'learner', {
        'checkpoint': str(ckpt), 'episode_dir': str(tmp_path / 'episodes'), 'work_dir': str(tmp_path / 'learner'),
        'labels': 'group_mean', 'seeded_resets': False})  # what deploy_real sets
    assert learner.proc.wait(60) == 2
    assert "labels 'group_mean' groups episodes by their reset seed" in learner.output()


def test_an_evaluator_that_starts_late_scores_the_versions_it_missed_from_disk(tmp_path):
    """The latched /policy_weights holds only the newest version: the start and every due version
    before it come from the learner's checkpoints, those already scored or not on disk excepted."""
    from types import SimpleNamespace

    from sim_bridge.maniskill_evaluator import ManiSkillEvaluator
    from stepnft_ros.learner import version_dir
    from stepnft_ros.ros_io import WeightsAnnouncement

    checkpoints = tmp_path / 'learner' / 'checkpoints'
    for version in (2, 4, 8):  # 6 was pruned
        version_dir(checkpoints, version).mkdir(parents=True)
    (tmp_path / 'sft').mkdir()
    evaluator = SimpleNamespace(every=2, done_versions={2}, initial_checkpoint=str(tmp_path / 'sft'))
    announced = WeightsAnnouncement(version=10, checkpoint=str(version_dir(checkpoints, 10)))
    missed = ManiSkillEvaluator._missed(evaluator, announced)
    assert [(m.version, m.checkpoint) for m in missed] == [
        (0, str(tmp_path / 'sft')), (4, str(version_dir(checkpoints, 4))), (8, str(version_dir(checkpoints, 8)))]
    evaluator.initial_checkpoint = ''  # not given: the start cannot be scored
    assert [m.version for m in ManiSkillEvaluator._missed(evaluator, announced)] == [4, 8]
