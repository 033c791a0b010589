"""Episode bags: bit-exact round trips, standard-tool readability, atomic writes, corrupt bags, bags of an
older format, `stepnft train`."""

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from toy_env import PointReach

import stepnft_ros.atomic
from stepnft_ros.algo.stepnft import StepNFTConfig
from stepnft_ros.cli import main
from stepnft_ros.episodes import Decision, Episode
from stepnft_ros.episodes.store import (
    BAG_VERSION,
    FORMAT_KEY,
    MSG_DIR,
    TRACE_TYPE,
    EpisodeFileError,
    EpisodeStore,
    episode_typestore,
    read_episode,
    write_episode,
)
from stepnft_ros.offline import train_from_bags
from stepnft_ros.policy import FlowPolicy, FlowVLA, Observation, PolicyConfig, Trace, load_checkpoint, save_checkpoint
from stepnft_ros.rollout import run_episode

H, D = 3, 2
ROS_STAMP = 1_700_000_000_123_456_789  # a realistic ROS time: needs both sec and nanosec


def make_decision(rng: np.random.Generator, stamp_ns=0, cameras=(), valid=True, weights_version=None,
                  executed=None, executed_from=0, led_to_intervention=False) -> Decision:
    def tensor(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    trace = Trace(x_k=tensor(1, H, D), x_next=tensor(1, H, D), v_old=tensor(1, H, D),
                  k=torch.tensor([int(rng.integers(4))]), a=torch.tensor([0.3]), x_final=tensor(1, H, D))
    images = {c: rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for c in cameras}
    obs = Observation(state=rng.standard_normal(4).astype(np.float32), images=images, instruction='pick the cube ✓')
    return Decision(observation=obs, chunk=rng.standard_normal((H, D)).astype(np.float32), trace=trace,
                    valid=valid, stamp_ns=stamp_ns, weights_version=weights_version, executed=executed,
                    executed_from=executed_from, led_to_intervention=led_to_intervention)


def state_episode(episode_id='ep-state', seed=0) -> Episode:
    rng = np.random.default_rng(seed)
    decisions = [make_decision(rng, executed=H), make_decision(rng, valid=False, led_to_intervention=True),
                 make_decision(rng, weights_version=4, executed=1, executed_from=2)]  # a late chunk
    return Episode(episode_id, weights_version=3, decisions=decisions, success=False, env_steps=11, seed=None,
                   interventions=[(ROS_STAMP, ROS_STAMP + 2_000_000_000), (ROS_STAMP + 5_000_000_000, -1)])


def joint_state_cdr(stamp_ns: int, positions) -> bytes:
    """A robot's sensor_msgs/JointState as it arrives (CDR), made without rclpy."""
    ts = get_typestore(Stores.ROS2_KILTED)
    T = ts.types
    sec, nanosec = divmod(stamp_ns, 1_000_000_000)
    msg = T['sensor_msgs/msg/JointState'](
        header=T['std_msgs/msg/Header'](stamp=T['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec), frame_id=''),
        name=['j1', 'j2'], position=np.asarray(positions, np.float64), velocity=np.zeros(0), effort=np.zeros(0))
    return bytes(ts.serialize_cdr(msg, 'sensor_msgs/msg/JointState'))


def image_episode(episode_id='ep.images_1') -> Episode:
    rng = np.random.default_rng(1)
    decisions = [make_decision(rng, stamp_ns=ROS_STAMP + i * 50_000_000, cameras=('wrist', 'scene'), executed=e)
                 for i, e in enumerate([2, 2, 0])]
    decisions = [dataclasses.replace(d, robot_messages=(
        ('joint_states', 'sensor_msgs/msg/JointState', joint_state_cdr(d.stamp_ns, [i, -i])),)) for i, d in
        enumerate(decisions)]
    return Episode(episode_id, weights_version=0, decisions=decisions, success=True, env_steps=9, seed=42,
                   robot='/arm1')


def assert_same_episode(got: Episode, want: Episode) -> None:
    for field in ('episode_id', 'weights_version', 'success', 'env_steps', 'seed', 'robot', 'interventions'):
        assert getattr(got, field) == getattr(want, field), field
    assert len(got.decisions) == len(want.decisions)
    for g, w in zip(got.decisions, want.decisions, strict=True):
        assert (g.valid, g.stamp_ns, g.weights_version, g.executed, g.executed_from, g.led_to_intervention,
                g.robot_messages) == \
            (w.valid, w.stamp_ns, w.weights_version, w.executed, w.executed_from, w.led_to_intervention,
             w.robot_messages)
        assert g.observation.instruction == w.observation.instruction
        for got_array, want_array in [(g.chunk, w.chunk), (g.observation.state, w.observation.state)]:
            assert got_array.dtype == want_array.dtype and np.array_equal(got_array, want_array)
        assert list(g.observation.images) == list(w.observation.images)
        for camera, image in w.observation.images.items():
            assert g.observation.images[camera].dtype == np.uint8
            assert np.array_equal(g.observation.images[camera], image)
        for got_t, want_t in zip(g.trace.as_tuple(), w.trace.as_tuple(), strict=True):
            assert got_t.dtype == want_t.dtype and torch.equal(got_t, want_t)  # bit-exact, same dtype


@pytest.mark.parametrize('make', [state_episode, image_episode])
def test_round_trip_is_bit_exact(tmp_path, make):
    episode = make()
    path = write_episode(episode, tmp_path)
    assert path == tmp_path / episode.episode_id
    assert {p.name for p in path.iterdir()} == {'metadata.yaml', f'{episode.episode_id}.mcap'}
    assert_same_episode(read_episode(path), episode)


def test_the_robots_own_messages_replay_on_its_topics_with_standard_types_only(tmp_path):
    path = write_episode(image_episode(), tmp_path)
    standard = get_typestore(Stores.ROS2_KILTED)  # no stepnft types: what ros2 bag play / Foxglove have
    with Reader(path) as reader:
        [conn] = [c for c in reader.connections if c.topic == '/arm1/joint_states']
        assert conn.msgtype == 'sensor_msgs/msg/JointState'
        msgs = [standard.deserialize_cdr(raw, conn.msgtype) for _, _, raw in reader.messages(connections=[conn])]
    assert [m.position.tolist() for m in msgs] == [[0.0, 0.0], [1.0, -1.0], [2.0, -2.0]]
    assert [m.header.stamp.nanosec for m in msgs] == [(ROS_STAMP + i * 50_000_000) % 10**9 for i in range(3)]
    bad = dataclasses.replace(image_episode('bad').decisions[0], robot_messages=(('/abs', 'nope/msg/X', b''),))
    with pytest.raises(ValueError, match='needs a relative topic name, a standard ROS 2 type and CDR bytes'):
        write_episode(Episode('bad', 0, [bad], success=True), tmp_path)


def test_bag_is_readable_with_standard_tools(tmp_path):
    episode = image_episode()
    path = write_episode(episode, tmp_path, action_names=['x', 'y'], control_period=0.1)
    with Reader(path) as reader:  # rosbags sees a plain rosbag2/MCAP bag
        assert reader.message_count == 3 * 6 + 1  # per decision: 5 records + the robot's joint state
    with open(path / f'{episode.episode_id}.mcap', 'rb') as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        summary = reader.get_summary()
        schemas = {summary.schemas[c.schema_id].name: summary.schemas[c.schema_id] for c in summary.channels.values()}
        assert {c.topic for c in summary.channels.values()} == {
            '/episode/observation', '/episode/images/wrist', '/episode/images/scene', '/episode/action_chunk',
            '/episode/trace', '/episode/info', '/arm1/joint_states'}
        assert {s.encoding for s in schemas.values()} == {'ros2msg'}
        assert 'float32[] x_k' in schemas[TRACE_TYPE].data.decode()
        decoded = {}
        for _, channel, message, msg in reader.iter_decoded_messages():
            decoded.setdefault(channel.topic, []).append((message.log_time, msg))
    first = episode.decisions[0]
    stamp, trace = decoded['/episode/trace'][0]
    assert stamp == first.stamp_ns == trace.header.stamp.sec * 10**9 + trace.header.stamp.nanosec
    assert np.array_equal(np.asarray(trace.x_k, np.float32), first.trace.x_k.numpy().ravel())
    assert (trace.horizon, trace.action_dim, trace.valid) == (H, D, True)
    _, chunk = decoded['/episode/action_chunk'][0]
    assert list(chunk.joint_names) == ['x', 'y'] and len(chunk.points) == H
    assert [(p.time_from_start.sec, p.time_from_start.nanosec) for p in chunk.points] == \
        [(0, 100_000_000), (0, 200_000_000), (0, 300_000_000)]
    _, image = decoded['/episode/images/scene'][2]
    assert (image.encoding, image.height, image.width) == ('rgb8', 6, 5)
    assert bytes(image.data) == episode.decisions[2].observation.images['scene'].tobytes()
    [(info_stamp, info)] = decoded['/episode/info']
    assert info_stamp > episode.decisions[-1].stamp_ns  # written last
    assert (info.episode_id, info.success, info.seed, info.num_decisions, info.robot) == \
        (episode.episode_id, True, 42, 3, '/arm1')
    assert list(info.camera_names) == ['wrist', 'scene']


def test_rollout_episodes_get_synthetic_stamps_and_read_back_as_zero(tmp_path):
    episode = state_episode()
    path = write_episode(episode, tmp_path)
    with Reader(path) as reader:
        assert [t for c, t, _ in reader.messages() if c.topic == '/episode/trace'] == [1_000_000, 2_000_000, 3_000_000]
    back = read_episode(path)
    assert [d.stamp_ns for d in back.decisions] == [0, 0, 0]
    assert [back.decision_version(d) for d in back.decisions] == [3, 3, 4] and back.seed is None


def test_writes_are_atomic_and_once_only(tmp_path, monkeypatch):
    store = EpisodeStore(tmp_path / 'episodes')
    store.write(state_episode('a'))
    with pytest.raises(FileExistsError, match='already written'):
        store.write(state_episode('a'))
    assert os.listdir(store.root) == ['a']  # no temp dir left behind

    def crash(path):
        raise OSError('disk full')
    monkeypatch.setattr(stepnft_ros.atomic, 'fsync_path', crash)
    with pytest.raises(OSError, match='disk full'):
        store.write(state_episode('b'))
    assert os.listdir(store.root) == ['a']


def test_stale_temp_dirs_are_removed_on_open_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', ''])
    dead.wait()
    stale = tmp_path / f'.tmp-x-{dead.pid}-0123abcd' / 'x'
    live = tmp_path / f'.tmp-y-{os.getpid()}-0123abcd' / 'y'
    for path in (stale, live):
        path.mkdir(parents=True)
    (tmp_path / 'notes.txt').write_text('not an episode')
    store = EpisodeStore(tmp_path)
    assert store.removed_temp_dirs == [stale.parent.name]
    assert live.exists() and not stale.parent.exists()
    assert store.episode_ids() == []


@pytest.mark.parametrize('episode_id', ['', 'a b', '../x', 'x/y', '.hidden', '..', 'é'])
def test_bad_episode_ids_are_rejected(tmp_path, episode_id):
    with pytest.raises(ValueError, match='must match'):
        write_episode(state_episode(episode_id), tmp_path)
    assert os.listdir(tmp_path) == []


def test_unfinished_and_malformed_episodes_are_rejected(tmp_path):
    unfinished = state_episode()
    unfinished.success = None
    with pytest.raises(ValueError, match='no outcome yet'):
        write_episode(unfinished, tmp_path)
    rng = np.random.default_rng(0)
    backwards = Episode('b', 0, [make_decision(rng, stamp_ns=5), make_decision(rng, stamp_ns=5)], success=True)
    with pytest.raises(ValueError, match='increase strictly'):
        write_episode(backwards, tmp_path)
    with pytest.raises(ValueError, match='3 action names for action_dim 2'):
        write_episode(state_episode(), tmp_path, action_names=['a', 'b', 'c'])
    with pytest.raises(ValueError, match='not valid ROS topic name tokens'):
        write_episode(Episode('c', 0, [make_decision(rng, cameras=('wrist cam',))], success=True), tmp_path)
    with pytest.raises(ValueError, match=r'executed must be an integer in \[0, 3\], got 4'):
        write_episode(Episode('d', 0, [make_decision(rng, executed=H + 1)], success=True), tmp_path)
    with pytest.raises(ValueError, match=r'executed_from must be an integer in \[0, 1\], got 2'):
        write_episode(Episode('d', 0, [make_decision(rng, executed=2, executed_from=2)], success=True), tmp_path)
    assert os.listdir(tmp_path) == []


def rewrite_bag(src, dst, edit):
    """Copy a bag message by message through `edit(topic, msg) -> msg | None` (None drops it)."""
    ts = episode_typestore()
    with Reader(src) as reader, Writer(dst, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=ts) for c in reader.connections}
        for conn, stamp, raw in reader.messages():
            msg = edit(conn.topic, ts.deserialize_cdr(raw, conn.msgtype))
            if msg is not None:
                writer.write(conns[conn.id], stamp, ts.serialize_cdr(msg, conn.msgtype))


def drop_info(topic, msg):
    return None if topic == '/episode/info' else msg


def drop_first_scene_image(topic, msg):
    first = topic == '/episode/images/scene' and msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == ROS_STAMP
    return None if first else msg


def nan_trace(topic, msg):
    if topic == '/episode/trace':
        msg.v_old = np.where(np.arange(msg.v_old.size) == 1, np.nan, msg.v_old).astype(np.float32)
    return msg


def overlong_executed(topic, msg):
    if topic == '/episode/trace':
        msg.executed = H + 4
    return msg


def executed_past_the_end(topic, msg):
    if topic == '/episode/trace':
        msg.executed, msg.executed_from = 2, 2
    return msg


def short_trace(topic, msg):
    if topic == '/episode/trace':
        msg.x_next = msg.x_next[:-1]
    return msg


def truncate(path):
    mcap = next(path.glob('*.mcap'))
    mcap.write_bytes(mcap.read_bytes()[:-200])


def garble(path):
    mcap = next(path.glob('*.mcap'))
    mcap.write_bytes(np.random.default_rng(0).bytes(mcap.stat().st_size))


# name -> (damage to the files, or an edit of the messages; what the error must say)
CORRUPTIONS = {
    'truncated': (truncate, 'unreadable bag'),
    'garbage': (garble, 'unreadable bag'),
    'no_metadata': (lambda path: (path / 'metadata.yaml').unlink(), 'metadata.yaml is missing'),
    'empty_dir': (lambda path: [p.unlink() for p in path.iterdir()], 'metadata.yaml is missing'),
    'no_info': (drop_info, r'0 /episode/info records, expected 1'),
    'missing_part': (drop_first_scene_image, f'decision at stamp {ROS_STAMP} has no /episode/images/scene record'),
    'nan_trace': (nan_trace, 'trace v_old has non-finite values'),
    'size_mismatch': (short_trace, r'trace x_next has 5 values, expected 3x2'),
    'bad_executed': (overlong_executed, 'trace says 7 actions executed from action 0 of a chunk of 3'),
    'bad_executed_from': (executed_past_the_end, 'trace says 2 actions executed from action 2 of a chunk of 3'),
}
MESSAGE_EDITS = {'no_info', 'missing_part', 'nan_trace', 'size_mismatch', 'bad_executed', 'bad_executed_from'}


def make_corrupt(root, name):
    """A bag at `root/name` broken the way CORRUPTIONS[name] says."""
    damage, _ = CORRUPTIONS[name]
    if name not in MESSAGE_EDITS:
        path = write_episode(image_episode(name), root)
        damage(path)
        return path
    scratch = root.parent / f'{root.name}-scratch'
    rewrite_bag(write_episode(image_episode(name), scratch), root / name, damage)
    shutil.rmtree(scratch)
    return root / name


@pytest.mark.parametrize('name', sorted(CORRUPTIONS))
def test_corrupt_bags_raise_a_clear_error(tmp_path, name):
    path = make_corrupt(tmp_path, name)
    with pytest.raises(EpisodeFileError, match=CORRUPTIONS[name][1]) as err:
        read_episode(path)
    assert str(path) in str(err.value)


def test_missing_episode_is_a_clear_error(tmp_path):
    with pytest.raises(EpisodeFileError, match='not a directory'):
        EpisodeStore(tmp_path).load('nope')


def test_load_new_reports_corrupt_bags_once_and_keeps_going(tmp_path):
    store = EpisodeStore(tmp_path)
    store.write(state_episode('a'))
    for name in ('truncated', 'no_info'):
        make_corrupt(tmp_path, name)
    store.write(image_episode('z'))
    errors, seen = [], set()
    loaded = store.load_new(seen, on_error=lambda episode_id, err: errors.append((episode_id, str(err))))
    assert [e.episode_id for e in loaded] == ['a', 'z']
    assert [episode_id for episode_id, _ in errors] == ['no_info', 'truncated']
    assert seen == {'a', 'no_info', 'truncated', 'z'}
    store.write(state_episode('b'))
    assert [e.episode_id for e in store.load_new(seen, on_error=lambda *a: errors.append(a))] == ['b']
    assert len(errors) == 2  # reported once
    assert store.episode_ids() == ['a', 'b', 'no_info', 'truncated', 'z']  # never deleted


# Bags before format 5 named our types stepnft_ros/msg/* (format 5: stepnft_ros_msgs/msg/*, the interface package's).
LEGACY_TRACE_TYPE = 'stepnft_ros/msg/DecisionTrace'

# stepnft_ros/msg/DecisionTrace as episode format 1 defined it: before `executed`.
DECISION_TRACE_FORMAT_1 = """
std_msgs/Header header
uint32 weights_version
bool valid
int32 k
float32 a
uint32 horizon
uint32 action_dim
float32[] x_k
float32[] x_next
float32[] v_old
float32[] x_final
"""


def write_legacy(episode: Episode, root, trace_definition: str, episode_format: str) -> None:
    """`episode` as a writer before format 5 stored it: our types named stepnft_ros/msg/*, the trace type
    `trace_definition`, embedded in the bag."""
    old = get_typestore(Stores.ROS2_KILTED)
    old.register(get_types_from_msg(trace_definition, LEGACY_TRACE_TYPE))
    for name in ('ObservationState', 'EpisodeInfo'):
        old.register(get_types_from_msg((MSG_DIR / f'{name}.msg').read_text(), f'stepnft_ros/msg/{name}'))
    fields = [name for name, _ in old.fielddefs[LEGACY_TRACE_TYPE][1]]
    new = episode_typestore()
    source = write_episode(episode, root.parent / f'{root.name}-scratch')
    writer = Writer(root / episode.episode_id, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
    writer.set_custom_data(FORMAT_KEY, episode_format)
    with Reader(source) as reader, writer:
        def legacy(msgtype):
            return msgtype.replace('stepnft_ros_msgs/', 'stepnft_ros/')
        conns = {c.id: writer.add_connection(c.topic, legacy(c.msgtype), typestore=old) for c in reader.connections}
        for conn, stamp, raw in reader.messages():
            msg = new.deserialize_cdr(raw, conn.msgtype)
            msgtype = legacy(conn.msgtype)
            if msgtype == LEGACY_TRACE_TYPE:
                msg = old.types[msgtype](**{f: getattr(msg, f) for f in fields})
            writer.write(conns[conn.id], stamp, old.serialize_cdr(msg, msgtype))
    shutil.rmtree(source.parent)


def write_format_1(episode: Episode, root) -> None:
    """`episode` as a format-1 writer stored it: the trace type of that time, embedded in the bag."""
    write_legacy(episode, root, DECISION_TRACE_FORMAT_1, '1')


def test_bags_of_format_1_load_with_executed_unknown_and_one_warning(tmp_path, caplog):
    store = EpisodeStore(tmp_path / 'episodes')
    old = image_episode('old')
    write_format_1(old, store.root)
    with Reader(store.path('old')) as reader:  # the bag really holds the old layout
        [trace_conn] = [c for c in reader.connections if c.msgtype == LEGACY_TRACE_TYPE]
        assert 'executed' not in trace_conn.msgdef.data and 'float32[] x_final' in trace_conn.msgdef.data
    store.write(image_episode('new'))
    with caplog.at_level(logging.WARNING, logger='stepnft_ros.episodes.store'):
        loaded = store.load_new(set(), on_error=lambda episode_id, err: pytest.fail(f'{episode_id}: {err}'))
    assert [e.episode_id for e in loaded] == ['new', 'old']
    new_back, old_back = loaded
    assert_same_episode(new_back, image_episode('new'))
    assert [d.executed for d in new_back.decisions] == [2, 2, 0]
    for decision in old.decisions:  # what format 1 knew, nothing else
        object.__setattr__(decision, 'executed', None)
    assert_same_episode(old_back, old)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and 'old' in warnings[0] and 'lacks executed' in warnings[0], warnings


def test_bags_of_format_4_with_the_old_type_names_load_as_written(tmp_path, caplog):
    store = EpisodeStore(tmp_path / 'episodes')
    episode = image_episode('four')
    write_legacy(episode, store.root, (MSG_DIR / 'DecisionTrace.msg').read_text(), '4')
    with Reader(store.path('four')) as reader:
        assert {c.msgtype for c in reader.connections if 'stepnft' in c.msgtype} == {
            LEGACY_TRACE_TYPE, 'stepnft_ros/msg/ObservationState', 'stepnft_ros/msg/EpisodeInfo'}
    with caplog.at_level(logging.WARNING, logger='stepnft_ros.episodes.store'):
        assert_same_episode(read_episode(store.path('four')), episode)
    assert caplog.records == []  # same layout: nothing is unknown


TOY = PolicyConfig(state_dim=4, action_dim=2, horizon=4, d_model=16, n_heads=2, prefix_layers=0, expert_layers=1,
                   num_steps=4, noise_level=0.5)


def rollout_store(root, model, seeds, weights_version=0):
    store = EpisodeStore(root)
    policy = FlowPolicy(model, mode='sde', seed=0)
    for seed in seeds:
        store.write(run_episode(PointReach(), policy, seed, actions_per_chunk=4, weights_version=weights_version))
    return store


def test_stepnft_train_from_bags(tmp_path, capsys):
    model = FlowVLA(TOY)
    save_checkpoint(tmp_path / 'sft', model, {'stage': 'sft', 'weights_version': 0})
    store = rollout_store(tmp_path / 'bags', model, seeds=range(4))
    make_corrupt(store.root, 'garbage')
    args = ['train', '--bags', str(store.root), '--checkpoint', str(tmp_path / 'sft'), '--epochs', '1',
            '--lr', '1e-3']
    assert main([*args, '--out', str(tmp_path / 'v1')]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report['weights_version'], report['episodes'], report['corrupt'], report['dropped_stale']) == (1, 4, 1, 0)
    assert report['metrics']['gradient_steps'] >= 1 and np.isfinite(report['metrics']['loss'])
    trained, meta = load_checkpoint(tmp_path / 'v1', expected=TOY)
    assert meta == {'stage': 'offline_stepnft', 'weights_version': 1, 'episodes': 4, 'ranks': 1}
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values(),
                                                     strict=True))

    # from version 1 with no lag allowed, only episodes acted by version 1 count
    rollout_store(store.root, trained, seeds=[100], weights_version=1)
    result = train_from_bags(store.root, tmp_path / 'v1', tmp_path / 'v2', StepNFTConfig(epochs=1), max_version_lag=0)
    assert (result['weights_version'], result['episodes'], result['dropped_stale']) == (2, 1, 4)


@pytest.mark.parametrize('sharding', [[], ['--fsdp']], ids=['ddp', 'fsdp'])
def test_stepnft_train_under_torchrun_splits_the_update_over_ranks_and_rank_0_writes(tmp_path, sharding):
    model = FlowVLA(TOY)
    save_checkpoint(tmp_path / 'sft', model, {'stage': 'sft', 'weights_version': 0})
    store = rollout_store(tmp_path / 'bags', model, seeds=range(4))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
                           '-m', 'stepnft_ros.cli', 'train', '--bags', str(store.root), '--checkpoint',
                           str(tmp_path / 'sft'), '--epochs', '1', '--lr', '1e-3', '--out', str(tmp_path / 'v1'),
                           *sharding],
                          capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # printed once, by rank 0
    assert report['episodes'] == 4 and report['metrics']['gradient_steps'] >= 1
    trained, meta = load_checkpoint(tmp_path / 'v1', expected=TOY)
    assert meta['ranks'] == 2 and meta['weights_version'] == 1
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values(),
                                                     strict=True))


def test_stepnft_train_fsdp_needs_torchrun(tmp_path, monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    with pytest.raises(SystemExit, match='--fsdp shards over the processes torchrun starts'):
        main(['train', '--bags', str(tmp_path), '--checkpoint', str(tmp_path), '--out', str(tmp_path / 'o'),
              '--fsdp'])


def test_stepnft_train_fails_clearly_without_episodes(tmp_path, capsys):
    save_checkpoint(tmp_path / 'sft', FlowVLA(TOY), {'weights_version': 0})
    base = ['train', '--checkpoint', str(tmp_path / 'sft'), '--out', str(tmp_path / 'out')]
    assert main([*base, '--bags', str(tmp_path / 'missing')]) == 2
    assert 'no episode bags directory' in capsys.readouterr().err
    (tmp_path / 'empty').mkdir()
    assert main([*base, '--bags', str(tmp_path / 'empty')]) == 2
    assert 'no episodes to train on (0 readable, 0 corrupt' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()
