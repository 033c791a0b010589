"""Demos from LIBERO HDF5, ManiSkill3 trajectories and recorded rosbags -> DemoSet -> SFT checkpoints.

No real demo files are reachable offline: the tests write small files in exactly those formats.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from stepnft_ros import cli
from stepnft_ros.algo.sft import SFTConfig
from stepnft_ros.episodes.demo_formats import (
    DemoTopics,
    LiberoReadConfig,
    ManiSkillReadConfig,
    find_bags,
    read_demo_bags,
    read_libero_hdf5,
    read_maniskill_h5,
)
from stepnft_ros.episodes.demos import ChunkDataset, DemoSet
from stepnft_ros.policy import FlowVLA, PolicyConfig
from stepnft_ros.policy.checkpoint import load_checkpoint, read_header

REPO = Path(__file__).resolve().parents[1]
SMALL_SFT = ['--steps', '3', '--batch-size', '8', '--d-model', '32', '--n-heads', '2', '--horizon', '4']


def upright_frame(t: int, size: int) -> np.ndarray:
    """A frame whose orientation can be checked: red top rows, green left columns, blue = step."""
    frame = np.zeros((size, size, 3), np.uint8)
    frame[: size // 4, :, 0] = 255
    frame[:, : size // 4, 1] = 255
    frame[..., 2] = t
    return frame


def assert_upright(frame: np.ndarray, t: int) -> None:
    s = frame.shape[0]
    assert frame[0, s // 2, 0] == 255 and frame[-1, s // 2, 0] == 0, 'red marks the top rows'
    assert frame[s // 2, 0, 1] == 255 and frame[s // 2, -1, 1] == 0, 'green marks the left columns'
    assert (frame[..., 2] == t).all()


# ---------------------------------------------------------------------------------------------------- LIBERO


def write_libero(path: Path, instruction: str, lengths: list[int], seed: int, size: int = 32) -> list[dict]:
    """A LIBERO demo file (robomimic layout); returns what was written. The frames are stored as
    LIBERO's renderer gives them: the LIBERO bridge's view (upright_frame) turned 180°."""
    rng = np.random.default_rng(seed)
    written = []
    with h5py.File(path, 'w') as f:
        data = f.create_group('data')
        data.attrs['problem_info'] = json.dumps({'language_instruction': instruction, 'problem_name': 'x'})
        data.attrs['env_args'] = json.dumps({'env_name': 'x', 'env_kwargs': {'control_freq': 20}})
        data.attrs['macros_image_convention'] = 'opengl'
        for i, length in enumerate(lengths):
            demo = data.create_group(f'demo_{i}')
            d = {'actions': rng.uniform(-1, 1, (length, 7)), 'joint_states': rng.normal(size=(length, 7)),
                 'gripper_states': rng.normal(size=(length, 2)), 'ee_pos': rng.normal(size=(length, 3)),
                 'ee_ori': rng.normal(size=(length, 3)), 'robot_states': rng.normal(size=(length, 9))}
            demo.create_dataset('actions', data=d['actions'])
            demo.create_dataset('robot_states', data=d['robot_states'])
            demo.create_dataset('states', data=rng.normal(size=(length, 40)))
            demo.create_dataset('dones', data=np.eye(length, dtype=np.uint8)[-1])
            obs = demo.create_group('obs')
            for key in ('joint_states', 'gripper_states', 'ee_pos', 'ee_ori'):
                obs.create_dataset(key, data=d[key])
            obs.create_dataset('ee_states', data=np.concatenate([d['ee_pos'], d['ee_ori']], 1))
            frames = np.stack([upright_frame(t, size) for t in range(length)])
            obs.create_dataset('agentview_rgb', data=frames[:, ::-1, ::-1])
            obs.create_dataset('eye_in_hand_rgb', data=frames[:, ::-1, ::-1] // 2)
            demo.attrs['num_samples'] = length
            written.append(d)
    return written


def test_libero_reader_values_images_and_instructions(tmp_path):
    a = write_libero(tmp_path / 'pick_demo.hdf5', 'pick up the bowl', [5, 7], seed=1)
    b = write_libero(tmp_path / 'open_demo.hdf5', 'open the drawer', [6], seed=2)
    demos = read_libero_hdf5([tmp_path / 'pick_demo.hdf5', tmp_path / 'open_demo.hdf5'],
                             LiberoReadConfig(image_size=16))
    assert demos.episode_lengths.tolist() == [5, 7, 6]
    assert demos.instructions == ('pick up the bowl', 'pick up the bowl', 'open the drawer')
    assert demos.camera_names == ('agentview', 'wrist') and demos.image_size == 16
    assert demos.images['agentview'].shape == (18, 16, 16, 3) and demos.images['agentview'].dtype == np.uint8
    written = a + b
    np.testing.assert_allclose(demos.actions, np.concatenate([d['actions'] for d in written]), rtol=1e-6)
    # the bridge layout: [qpos (7 + 2), qvel (differences at 20 Hz), eef pos, eef quat]
    d = written[1]
    state = demos.states[5:12]
    qpos = np.concatenate([d['joint_states'], d['gripper_states']], 1)
    np.testing.assert_allclose(state[:, :9], qpos, rtol=1e-6)
    np.testing.assert_allclose(state[2:, 9:18], (qpos[2:] - qpos[1:-1]) * 20, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state[:, 18:21], d['ee_pos'], rtol=1e-6)
    np.testing.assert_allclose(state[:, 21:], d['robot_states'][:, -4:], rtol=1e-6)
    for row, t in ((0, 0), (4, 4), (5, 0), (17, 5)):
        assert_upright(demos.images['agentview'][row], t)
    assert demos.images['wrist'][3, 0, 8, 0] == 127  # the other camera, also upright
    vertical = read_libero_hdf5([tmp_path / 'open_demo.hdf5'], LiberoReadConfig(image_size=16, flip='vertical'))
    np.testing.assert_array_equal(vertical.images['agentview'], demos.images['agentview'][12:, :, ::-1])

    eef = read_libero_hdf5([tmp_path / 'open_demo.hdf5'], LiberoReadConfig(image_size=16, state='eef', cameras={}))
    assert eef.states.shape == (6, 8) and not eef.images
    np.testing.assert_allclose(eef.states[:, 6:], b[0]['gripper_states'], rtol=1e-6)


def corrupt_copies(good: Path, tmp_path: Path) -> dict[str, Path]:
    raw = good.read_bytes()
    cases = {'truncated': raw[: len(raw) // 2], 'garbage': b'\x89HDF\r\n' + bytes(range(256)) * 40}
    out = {}
    for name, content in cases.items():
        out[name] = tmp_path / f'{name}.hdf5'
        out[name].write_bytes(content)
    return out


def test_libero_reader_rejects_malformed_files(tmp_path):
    good = tmp_path / 'good.hdf5'
    write_libero(good, 'x', [4], seed=0)
    for path in corrupt_copies(good, tmp_path).values():
        with pytest.raises(ValueError, match=path.name):
            read_libero_hdf5([path])
    with pytest.raises(ValueError, match='no such file'):
        read_libero_hdf5([tmp_path / 'missing.hdf5'])
    no_problem = tmp_path / 'no_problem.hdf5'
    write_libero(no_problem, 'x', [4], seed=0)
    with h5py.File(no_problem, 'a') as f:
        del f['data'].attrs['problem_info']
    with pytest.raises(ValueError, match='problem_info'):
        read_libero_hdf5([no_problem])
    short_images = tmp_path / 'short.hdf5'
    write_libero(short_images, 'x', [4], seed=0)
    with h5py.File(short_images, 'a') as f:
        del f['data/demo_0/obs/agentview_rgb']
        f['data/demo_0/obs'].create_dataset('agentview_rgb', data=np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r'short.hdf5: data/demo_0: obs/agentview_rgb'):
        read_libero_hdf5([short_images])
    with pytest.raises(ValueError, match='unknown LIBERO state'):
        LiberoReadConfig(state=('qpos', 'nonsense'))


# ---------------------------------------------------------------------------------------------------- ManiSkill


def write_maniskill(path: Path, lengths: list[int], seed: int, rgb: bool, successes: list[bool] | None = None,
                    env_id: str = 'PickCube-v1', size: int = 24) -> list[dict]:
    """A ManiSkill3 trajectory file and its .json sidecar (RecordEpisode's layout): obs has T+1 steps."""
    rng = np.random.default_rng(seed)
    successes = successes or [True] * len(lengths)
    written, episodes = [], []
    with h5py.File(path, 'w') as f:
        for i, (length, success) in enumerate(zip(lengths, successes, strict=True)):
            g = f.create_group(f'traj_{i}', track_order=True)
            d = {'actions': rng.uniform(-1, 1, (length, 7)).astype(np.float32),
                 'qpos': rng.normal(size=(length + 1, 9)).astype(np.float32),
                 'qvel': rng.normal(size=(length + 1, 9)).astype(np.float32),
                 'tcp_pose': rng.normal(size=(length + 1, 7)).astype(np.float32),
                 'is_grasped': rng.integers(0, 2, length + 1).astype(bool)}
            d['state'] = np.concatenate([d['qpos'], d['qvel'], d['is_grasped'][:, None], d['tcp_pose']], 1)
            if rgb:  # obs_mode "rgb": agent/extra dicts (flattened in their order) + camera images
                obs = g.create_group('obs', track_order=True)
                agent = obs.create_group('agent', track_order=True)
                agent.create_dataset('qpos', data=d['qpos'])
                agent.create_dataset('qvel', data=d['qvel'])
                extra = obs.create_group('extra', track_order=True)
                extra.create_dataset('is_grasped', data=d['is_grasped'])  # not alphabetical: file order counts
                extra.create_dataset('tcp_pose', data=d['tcp_pose'])
                cam = obs.create_group('sensor_data', track_order=True).create_group('base_camera')
                d['rgb'] = np.stack([upright_frame(t, size) for t in range(length + 1)])
                cam.create_dataset('rgb', data=d['rgb'], compression='gzip')
                obs.create_group('sensor_param').create_group('base_camera').create_dataset(
                    'cam2world_gl', data=np.zeros((length + 1, 4, 4), np.float32))
            else:
                g.create_dataset('obs', data=d['state'])
            g.create_dataset('actions', data=d['actions'])
            g.create_dataset('terminated', data=np.zeros(length, bool))
            g.create_dataset('truncated', data=np.zeros(length, bool))
            g.create_dataset('success', data=np.full(length, success))
            g.create_group('env_states').create_group('actors').create_dataset(
                'cube', data=np.zeros((length + 1, 13), np.float32))
            episodes.append({'episode_id': i, 'episode_seed': i, 'control_mode': 'pd_ee_delta_pose',
                             'elapsed_steps': length, 'reset_kwargs': {'seed': i}, 'success': success})
            written.append(d)
    path.with_suffix('.json').write_text(json.dumps({
        'env_info': {'env_id': env_id, 'env_kwargs': {'obs_mode': 'rgb' if rgb else 'state',
                                                      'control_mode': 'pd_ee_delta_pose'}, 'max_episode_steps': 100},
        'episodes': episodes}))
    return written


def test_maniskill_reader_state_and_rgb(tmp_path):
    from sim_bridge.maniskill_env import TASK_INSTRUCTIONS

    written = write_maniskill(tmp_path / 'state.h5', [4, 6], seed=0, rgb=False)
    demos = read_maniskill_h5([tmp_path / 'state.h5'])
    assert demos.episode_lengths.tolist() == [4, 6] and not demos.images
    np.testing.assert_array_equal(demos.states, np.concatenate([d['state'][:-1] for d in written]))  # T of T+1
    np.testing.assert_array_equal(demos.actions, np.concatenate([d['actions'] for d in written]))
    assert demos.instructions == (TASK_INSTRUCTIONS['PickCube-v1'],) * 2

    written = write_maniskill(tmp_path / 'rgb.h5', [3, 5, 4], seed=1, rgb=True, successes=[True, False, True])
    demos = read_maniskill_h5([tmp_path / 'rgb.h5'], ManiSkillReadConfig(image_size=16, success_only=True))
    assert demos.episode_lengths.tolist() == [3, 4], 'the failed trajectory is skipped'
    kept = [written[0], written[2]]
    np.testing.assert_array_equal(demos.states, np.concatenate([d['state'][:-1] for d in kept]))
    assert demos.camera_names == ('base_camera',) and demos.images['base_camera'].shape == (7, 16, 16, 3)
    for row, t in ((0, 0), (2, 2), (3, 0), (6, 3)):
        assert_upright(demos.images['base_camera'][row], t)
    native = read_maniskill_h5([tmp_path / 'rgb.h5'], ManiSkillReadConfig(image_size=None, instruction='go'))
    assert native.image_size == 24 and native.num_episodes == 3 and set(native.instructions) == {'go'}
    np.testing.assert_array_equal(native.images['base_camera'][:3], written[0]['rgb'][:3])


def test_maniskill_reader_rejects_malformed_files(tmp_path):
    good = tmp_path / 'good.h5'
    write_maniskill(good, [4], seed=0, rgb=True)
    for path in corrupt_copies(good, tmp_path).values():
        with pytest.raises(ValueError, match=path.name):
            read_maniskill_h5([path], ManiSkillReadConfig(instruction='x'))
    sidecar = json.loads(good.with_suffix('.json').read_text())
    sidecar['episodes'][0]['elapsed_steps'] = 9
    good.with_suffix('.json').write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match='good.h5: traj_0: 4 actions, the sidecar says elapsed_steps 9'):
        read_maniskill_h5([good])
    bad_obs = tmp_path / 'bad_obs.h5'
    write_maniskill(bad_obs, [4], seed=0, rgb=False)
    with h5py.File(bad_obs, 'a') as f:
        del f['traj_0/obs']
        f['traj_0'].create_dataset('obs', data=np.zeros((9, 3), np.float32))
    with pytest.raises(ValueError, match='bad_obs.h5: traj_0: 9 observations for 4 actions'):
        read_maniskill_h5([bad_obs])
    (tmp_path / 'broken.json').write_text('{"episodes": [')
    write_maniskill(tmp_path / 'other.h5', [4], seed=0, rgb=False)
    (tmp_path / 'other.h5').rename(tmp_path / 'broken.h5')
    with pytest.raises(ValueError, match=r'broken.json: unreadable JSON'):
        read_maniskill_h5([tmp_path / 'broken.h5'])


# ---------------------------------------------------------------------------------------------------- DemoSet


def test_demoset_npz_roundtrip_and_chunk_batches(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    demos = DemoSet(rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=(7, 2)).astype(np.float32),
                    np.array([3, 4]), images={'wrist': frames}, instructions=('a', 'b'))
    loaded = DemoSet.load(demos.save(tmp_path / 'd.npz'))
    assert loaded.instructions == ('a', 'b') and loaded.camera_names == ('wrist',)
    np.testing.assert_array_equal(loaded.images['wrist'], frames)
    cfg = PolicyConfig(state_dim=3, action_dim=2, horizon=2, d_model=32, n_heads=2, camera_names=('wrist',),
                       image_size=16)
    model = FlowVLA(cfg)
    data = ChunkDataset(loaded, model)
    obs, actions, mask = data.get_batch(torch.tensor([0, 2, 3, 6]))
    assert obs.images.shape == (4, 1, 3, 16, 16) and obs.images.dtype == torch.uint8
    assert obs.instructions == ('a', 'a', 'b', 'b')
    assert torch.equal(obs.images[3, 0].permute(1, 2, 0), torch.from_numpy(frames[6]))
    assert mask.tolist() == [[1, 1], [1, 0], [1, 1], [1, 0]] and actions.shape == (4, 2, 2)
    with pytest.raises(ValueError, match='2 instructions for 1 episodes'):
        DemoSet(demos.states, demos.actions, np.array([7]), instructions=('a', 'b'))
    with pytest.raises(ValueError, match="camera 'wrist'"):
        DemoSet(demos.states, demos.actions, np.array([7]), images={'wrist': frames[:5]})


def test_an_observation_lag_pairs_each_chunk_with_an_older_observation_of_its_own_episode():
    states = np.arange(7, dtype=np.float32)[:, None]  # the state is the row
    demos = DemoSet(states, np.arange(7, dtype=np.float32)[:, None], np.array([3, 4]))
    model = FlowVLA(PolicyConfig(state_dim=1, action_dim=1, horizon=2, d_model=32, n_heads=2))
    rows = torch.arange(7)
    assert ChunkDataset(demos, model).get_batch(rows)[0].state[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    lagged = ChunkDataset(demos, model, observation_lag=2)
    obs, actions, mask = lagged.get_batch(rows)
    # the first steps of each episode see its first observation; never the previous episode's
    assert obs.state[:, 0].tolist() == [0, 0, 0, 3, 3, 3, 4]
    assert torch.equal(actions, ChunkDataset(demos, model).get_batch(rows)[1]), 'the chunks stay where they were'
    with pytest.raises(ValueError, match='observation_lag must be >= 0'):
        ChunkDataset(demos, model, observation_lag=-1)
    with pytest.raises(ValueError, match='observation_lag must be >= 0'):
        SFTConfig(observation_lag=-1)


def test_state_dropout_zeroes_the_named_dims_of_a_share_of_the_samples():
    states = np.tile(np.array([[1.0, 2.0, 3.0]], dtype=np.float32), (400, 1))
    demos = DemoSet(states, np.zeros((400, 1), dtype=np.float32), np.array([400]))
    model = FlowVLA(PolicyConfig(state_dim=3, action_dim=1, horizon=2, d_model=32, n_heads=2))
    rows = torch.arange(400)
    data = ChunkDataset(demos, model, state_dropout=0.5, state_dropout_dims=(1, 2), seed=0)
    obs, actions, _ = data.get_batch(rows)
    dropped = obs.state[:, 1] == 0
    assert 150 < dropped.sum() < 250  # about half
    assert torch.all(obs.state[dropped, 1:] == 0) and torch.all(obs.state[~dropped, 1:] == torch.tensor([2.0, 3.0]))
    assert torch.all(obs.state[:, 0] == 1.0), 'the other dims stay'
    assert torch.equal(data.states, torch.from_numpy(states)), 'the demos themselves are untouched'
    assert torch.equal(actions, ChunkDataset(demos, model).get_batch(rows)[1])
    again = ChunkDataset(demos, model, state_dropout=0.5, state_dropout_dims=(1, 2), seed=0).get_batch(rows)[0]
    assert torch.equal(again.state, obs.state), 'seeded'
    with pytest.raises(ValueError, match='are not all dims of the 3-dim state'):
        ChunkDataset(demos, model, state_dropout=0.5, state_dropout_dims=(3,))
    for bad in (dict(state_dropout=0.5), dict(state_dropout_dims=(1,)),
                dict(state_dropout=1.0, state_dropout_dims=(1,))):
        with pytest.raises(ValueError, match='state_dropout must be in'):
            SFTConfig(**bad)


def test_sft_from_each_format_gives_a_loadable_checkpoint(tmp_path, capsys):
    write_libero(tmp_path / 'a_demo.hdf5', 'pick up the bowl', [5, 6], seed=1)
    write_libero(tmp_path / 'b_demo.hdf5', 'open the drawer', [6], seed=2)
    assert cli.main(['sft', '--format', 'libero-hdf5', '--demos', str(tmp_path / 'a_demo.hdf5'),
                     str(tmp_path / 'b_demo.hdf5'), '--image-size', '16', '--out', str(tmp_path / 'libero'),
                     *SMALL_SFT]) == 0
    cfg, meta = read_header(tmp_path / 'libero')
    assert (cfg.state_dim, cfg.action_dim, cfg.camera_names, cfg.image_size) == (25, 7, ('agentview', 'wrist'), 16)
    assert cfg.use_language, 'two tasks: the instruction tells them apart'
    assert meta['format'] == 'libero-hdf5' and meta['instructions'] == ['open the drawer', 'pick up the bowl']
    model, _ = load_checkpoint(tmp_path / 'libero')
    assert model.config == cfg

    write_maniskill(tmp_path / 'ms.h5', [4, 5], seed=0, rgb=True)
    assert cli.main(['sft', '--format', 'maniskill-h5', '--demos', str(tmp_path / 'ms.h5'), '--image-size', '16',
                     '--out', str(tmp_path / 'maniskill'), *SMALL_SFT]) == 0
    cfg, _ = read_header(tmp_path / 'maniskill')
    assert (cfg.state_dim, cfg.action_dim, cfg.camera_names, cfg.use_language) == (26, 7, ('base_camera',), False)
    load_checkpoint(tmp_path / 'maniskill')

    (tmp_path / 'bad.h5').write_bytes(b'not hdf5 at all')
    assert cli.main(['sft', '--format', 'maniskill-h5', '--demos', str(tmp_path / 'bad.h5'),
                     '--out', str(tmp_path / 'x'), *SMALL_SFT]) == 2
    assert 'bad.h5: not a readable HDF5 file' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- rosbags

TOPICS = {
    'state': {'topic': '/arm/joint_states', 'joint_names': ['j0', 'j1', 'j2', 'grip'], 'sources': ['joint_position']},
    'cameras': {'wrist': '/arm/camera/wrist/image_raw', 'scene': '/arm/camera/scene/image_raw'},
    'image_size': 16,
    'command': {'topic': '/arm/teleop/joint_command', 'type': 'trajectory_msgs/msg/JointTrajectory',
                'names': ['j0', 'j1', 'j2', 'grip']},
    'instruction': {'topic': '/arm/instruction', 'default': 'fallback'},
    'max_obs_age_s': 0.5,
}
PUBLISHED_JOINTS = ['grip', 'j2', 'extra', 'j1', 'j0']  # another order, and a joint the policy ignores


def joint_values(i: int) -> list[float]:
    """Joint state i in PUBLISHED_JOINTS order; in policy order it is [i, i+.1, i+.2, i+.3]."""
    by_name = {'j0': i, 'j1': i + 0.1, 'j2': i + 0.2, 'grip': i + 0.3, 'extra': -1.0}
    return [by_name[n] for n in PUBLISHED_JOINTS]


def command_values(k: int) -> tuple[list[str], list[float]]:
    return ['grip', 'j0', 'j1', 'j2'], [100 * k + 3, 100 * k, 100 * k + 1, 100 * k + 2]


def write_bag_with_rosbags(path: Path, events: list[tuple[float, str, object]], spec: dict = TOPICS) -> None:
    """A demo bag written directly (controlled log times) with rosbags' CDR serialization."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    types = DemoTopics.from_dict(spec).topics()
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conns = {topic: writer.add_connection(topic, msgtype, typestore=ts) for topic, msgtype in types.items()}
        for t, topic, msg in events:
            writer.write(conns[topic], int(t * 1e9), ts.serialize_cdr(msg, msg.__msgtype__))


def test_demo_bags_with_a_compressed_camera(tmp_path):
    # A camera recorded from image_transport's <topic>/compressed stream (png here: lossless).
    import copy

    import cv2
    from rosbags.typesys import Stores, get_typestore

    T = get_typestore(Stores.ROS2_KILTED).types
    header = T['std_msgs/msg/Header'](stamp=T['builtin_interfaces/msg/Time'](sec=0, nanosec=0), frame_id='')
    empty = np.empty(0, np.float64)
    spec = copy.deepcopy(TOPICS)
    spec['cameras']['scene'] = spec['cameras']['scene'] + '/compressed'
    topics = DemoTopics.from_dict(spec)
    assert topics.topics()[spec['cameras']['scene']] == 'sensor_msgs/msg/CompressedImage'

    def png(t):
        data = cv2.imencode('.png', upright_frame(t, 32)[:, :, ::-1])[1].reshape(-1)
        return T['sensor_msgs/msg/CompressedImage'](header=header, format='png', data=data)

    raw = upright_frame(1, 32)
    wrist = T['sensor_msgs/msg/Image'](header=header, height=32, width=32, encoding='rgb8', is_bigendian=0,
                                       step=96, data=np.ascontiguousarray(raw).reshape(-1))
    names, values = command_values(1)
    point = T['trajectory_msgs/msg/JointTrajectoryPoint'](
        positions=np.array(values, np.float64), velocities=empty, accelerations=empty, effort=empty,
        time_from_start=T['builtin_interfaces/msg/Duration'](sec=0, nanosec=0))
    events = [(0.10, spec['state']['topic'], T['sensor_msgs/msg/JointState'](
                  header=header, name=PUBLISHED_JOINTS, position=np.array(joint_values(1)), velocity=empty,
                  effort=empty)),
              (0.11, spec['cameras']['wrist'], wrist), (0.12, spec['cameras']['scene'], png(2)),
              (0.20, spec['command']['topic'], T['trajectory_msgs/msg/JointTrajectory'](
                  header=header, joint_names=names, points=[point]))]
    write_bag_with_rosbags(tmp_path / 'bags' / 'demo_0000', events, spec)
    demos, reports = read_demo_bags(tmp_path / 'bags', topics)
    assert reports[0].samples == 1
    assert_upright(demos.images['scene'][0], 2)  # decoded from png, RGB order, resized


def test_demo_bag_sampling_takes_the_latest_observation_at_or_before_each_command(tmp_path):
    from rosbags.typesys import Stores, get_typestore

    T = get_typestore(Stores.ROS2_KILTED).types
    header = T['std_msgs/msg/Header'](stamp=T['builtin_interfaces/msg/Time'](sec=0, nanosec=0), frame_id='')
    empty = np.empty(0, np.float64)

    def joint_state(i):
        return T['sensor_msgs/msg/JointState'](header=header, name=PUBLISHED_JOINTS,
                                               position=np.array(joint_values(i)), velocity=empty, effort=empty)

    def image(t, encoding='rgb8'):
        rgb = upright_frame(t, 32)
        data = rgb[..., ::-1] if encoding == 'bgr8' else rgb
        return T['sensor_msgs/msg/Image'](header=header, height=32, width=32, encoding=encoding, is_bigendian=0,
                                          step=96, data=np.ascontiguousarray(data).reshape(-1))

    def command(k):
        names, values = command_values(k)
        point = T['trajectory_msgs/msg/JointTrajectoryPoint'](
            positions=np.array(values, np.float64), velocities=empty, accelerations=empty, effort=empty,
            time_from_start=T['builtin_interfaces/msg/Duration'](sec=0, nanosec=0))
        return T['trajectory_msgs/msg/JointTrajectory'](header=header, joint_names=names, points=[point])

    wrist, scene = TOPICS['cameras']['wrist'], TOPICS['cameras']['scene']
    js, cmd = TOPICS['state']['topic'], TOPICS['command']['topic']
    events = [(0.05, cmd, command(0)),                 # no observation yet: skipped
              (0.10, js, joint_state(1)), (0.11, wrist, image(1)), (0.12, scene, image(2, 'bgr8')),
              (0.20, cmd, command(1)),                 # -> joint state 1, images 1 and 2
              (0.30, js, joint_state(2)), (0.30, cmd, command(2)),   # same log time: state 2 is at-or-before
              (0.40, wrist, image(3)),
              (0.45, js, joint_state(3)),
              (0.50, cmd, command(3)),
              (1.20, js, joint_state(4)),
              (1.25, cmd, command(4)),                 # images are 0.8 s old: stale, skipped
              (1.30, '/arm/instruction', T['std_msgs/msg/String'](data='stack the cups'))]
    write_bag_with_rosbags(tmp_path / 'bags' / 'demo_0000', events)
    topics = DemoTopics.from_dict(TOPICS)
    demos, reports = read_demo_bags(tmp_path / 'bags', topics)
    assert reports[0].samples == 3 and reports[0].commands == 5
    assert reports[0].skipped == {'no observation yet': 1, 'stale observation': 1}
    np.testing.assert_allclose(demos.actions, [[100 * k, 100 * k + 1, 100 * k + 2, 100 * k + 3] for k in (1, 2, 3)])
    np.testing.assert_allclose(demos.states, [[i, i + 0.1, i + 0.2, i + 0.3] for i in (1, 2, 3)], rtol=1e-6)
    assert [int(demos.images['wrist'][r, 0, 0, 2]) for r in range(3)] == [1, 1, 3]
    assert [int(demos.images['scene'][r, 0, 0, 2]) for r in range(3)] == [2, 2, 2]
    assert demos.images['wrist'].shape == (3, 16, 16, 3)
    for r, t in ((0, 2), (2, 2)):
        assert_upright(demos.images['scene'][r], t)  # bgr8 converted to RGB, resized
    assert demos.instructions == ('stack the cups',)

    with pytest.raises(ValueError, match='no rosbag2 directories'):
        find_bags(tmp_path)
    torn = tmp_path / 'torn' / 'demo_0000'
    torn.parent.mkdir()
    import shutil

    shutil.copytree(tmp_path / 'bags' / 'demo_0000', torn)
    mcap = next(torn.glob('*.mcap'))
    mcap.write_bytes(mcap.read_bytes()[:300])
    with pytest.raises(ValueError, match='demo_0000: unreadable bag'):
        read_demo_bags(tmp_path / 'torn', topics)
    with pytest.raises(ValueError, match=r"unknown keys \['joint_name'\] in state"):
        DemoTopics.from_dict({**TOPICS, 'state': {'topic': '/js', 'joint_name': ['a']}})
    with pytest.raises(ValueError, match='command.type must be one of'):
        DemoTopics.from_dict({**TOPICS, 'command': {'topic': '/c', 'type': 'std_msgs/msg/String'}})


def test_stepnft_record_then_sft_from_the_bags(tmp_path, probe):
    """`stepnft record` as a real process: Enter starts a demo, ~/stop ends it; the bag trains a policy."""
    from rclpy.qos import qos_profile_sensor_data
    from ros_harness import spin_until
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    from stepnft_ros import ros_io

    node, executor = probe
    config = tmp_path / 'topics.yaml'
    config.write_text(yaml.safe_dump(TOPICS, sort_keys=False))
    out = tmp_path / 'demos'
    log_path = tmp_path / 'recorder.log'
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, '-m', 'stepnft_ros.cli', 'record', '--out', str(out), '--config',
                                 str(config), '--instruction', 'from the command line'],
                                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, text=True)

    def wait_log(pattern: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while pattern not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            executor.spin_once(timeout_sec=0.05)

    try:
        pubs = {'js': node.create_publisher(JointState, TOPICS['state']['topic'], qos_profile_sensor_data),
                'wrist': node.create_publisher(Image, TOPICS['cameras']['wrist'], qos_profile_sensor_data),
                'scene': node.create_publisher(Image, TOPICS['cameras']['scene'], qos_profile_sensor_data),
                'cmd': node.create_publisher(JointTrajectory, TOPICS['command']['topic'], ros_io.RELIABLE_QOS)}
        instruction = node.create_publisher(String, TOPICS['instruction']['topic'], ros_io.LATCHED_QOS)
        instruction.publish(String(data='stack the cups'))  # latched, before the demo starts
        wait_log('ready:')
        spin_until(executor, lambda: all(p.get_subscription_count() for p in pubs.values())
                   and instruction.get_subscription_count(), 20, 'the recorder to subscribe')
        proc.stdin.write('\n')
        proc.stdin.flush()
        wait_log('recording demo_0000')
        now = lambda: node.get_clock().now().nanoseconds  # noqa: E731
        commands = 0
        for i in range(60):  # 50 Hz joint states, 25 Hz images, 10 Hz commands
            pubs['js'].publish(ros_io.arrays_to_joint_state(PUBLISHED_JOINTS, np.array(joint_values(i)), None, now()))
            if i % 2 == 0:
                for cam, scale in (('wrist', 1), ('scene', 2)):
                    frame = upright_frame(i, 24)
                    frame[..., 2] = (i * scale) % 256
                    pubs[cam].publish(ros_io.numpy_to_image(frame, now(), cam))
            if i % 5 == 4:
                names, values = command_values(i)
                msg = JointTrajectory(joint_names=names, points=[JointTrajectoryPoint(positions=values)])
                pubs['cmd'].publish(msg)
                commands += 1
            executor.spin_once(timeout_sec=0.02)
        time.sleep(0.3)
        client = node.create_client(Trigger, '/demo_recorder/stop')
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(Trigger.Request())
        spin_until(executor, future.done, 20, 'the stop service')
        assert future.result().success, future.result().message
        wait_log('wrote ')
        start = node.create_client(Trigger, '/demo_recorder/start')
        for expected in (True, False):  # the second start is refused: already recording
            future = start.call_async(Trigger.Request())
            spin_until(executor, future.done, 20, 'the start service')
            assert future.result().success is expected, future.result().message
        wait_log('recording demo_0001')
        proc.send_signal(signal.SIGINT)  # Ctrl-C keeps the running demo
        assert proc.wait(timeout=20) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    bags = find_bags(out)
    assert [b.name for b in bags] == ['demo_0000', 'demo_0001'] and not list(out.glob('.tmp-*'))
    from mcap_ros2.reader import read_ros2_messages  # an independent reader: ros2msg schemas + the messages' CDR

    decoded = {}
    for m in read_ros2_messages(next(bags[0].glob('*.mcap'))):
        decoded.setdefault(m.channel.topic, m.ros_msg)
    assert list(decoded['/arm/joint_states'].name) == PUBLISHED_JOINTS
    assert decoded['/arm/instruction'].data == 'stack the cups' and decoded['/arm/camera/wrist/image_raw'].width == 24
    demos, reports = read_demo_bags(out, DemoTopics.load(config))
    assert demos.instructions == ('stack the cups',), 'the latched instruction is replayed into the demo'
    assert reports[0].commands >= commands - 2 and reports[1].commands == 0 and demos.num_episodes == 1
    published = {i: [100 * i, 100 * i + 1, 100 * i + 2, 100 * i + 3] for i in range(4, 60, 5)}
    ticks = []
    for action, state, wrist in zip(demos.actions, demos.states, demos.images['wrist'], strict=True):
        tick = int(action[0]) // 100
        assert action.tolist() == published[tick], 'actions are the commands, in policy order'
        ticks.append(tick)
        j = round(float(state[0]))
        np.testing.assert_allclose(state, [j, j + 0.1, j + 0.2, j + 0.3], rtol=1e-6)
        assert tick - 10 <= j <= tick + 2, 'the state is the latest joint state around the command'
        assert wrist[0, 0, 2] % 2 == 0 and wrist.shape == (16, 16, 3)
    assert ticks == sorted(ticks) and len(ticks) >= commands - 3

    ckpt = tmp_path / 'sft'
    assert cli.main(['sft', '--bags', str(out), '--config', str(config), '--out', str(ckpt), *SMALL_SFT]) == 0
    cfg, meta = read_header(ckpt)
    assert (cfg.state_dim, cfg.action_dim, cfg.camera_names, cfg.image_size) == (4, 4, ('wrist', 'scene'), 16)
    assert meta['action_names'] == ['j0', 'j1', 'j2', 'grip'] and meta['format'] == 'rosbag'
    load_checkpoint(ckpt)


def test_stepnft_record_duration_demo_next_name_and_foreign_readers(tmp_path, ros_domain):
    """--duration records one demo and exits; names continue after existing demos; bad config: exit 2."""
    config = tmp_path / 'topics.yaml'
    config.write_text(yaml.safe_dump(TOPICS, sort_keys=False))
    out = tmp_path / 'demos'
    (out / 'demo_0003').mkdir(parents=True)
    proc = subprocess.run([sys.executable, '-m', 'stepnft_ros.cli', 'record', '--out', str(out), '--config',
                           str(config), '--duration', '1.0', '--instruction', 'wave'],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, 'ROS_LOG_DIR': str(tmp_path / 'ros_log')})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bag = out / 'demo_0004'
    assert bag.is_dir() and 'nothing received on' in proc.stderr  # nobody published: the operator is told
    with pytest.raises(ValueError, match='no usable demo samples'):
        read_demo_bags(out / 'demo_0004', DemoTopics.load(config))
    metadata = yaml.safe_load((bag / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    assert metadata['custom_data']['stepnft_ros.instruction'] == 'wave'
    assert {t['topic_metadata']['name'] for t in metadata['topics_with_message_count']} == \
        set(DemoTopics.load(config).topics())

    bad = tmp_path / 'bad.yaml'
    bad.write_text('state: {topic: joint_states}\n')
    proc = subprocess.run([sys.executable, '-m', 'stepnft_ros.cli', 'record', '--out', str(out), '--config', str(bad)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and 'state.topic must be an absolute topic name' in proc.stderr


def test_wide_demo_frames_are_centre_cropped_like_the_arm_bridge_does():
    # A policy must be trained on the same view it acts on: arm_bridge crops its cameras to the
    # centre square, so the demo readers do too (no stretching of a 4:3 or 16:9 camera).
    from stepnft_ros.episodes.demo_formats import resize_frames
    from stepnft_ros.image_codec import fit_image

    frame = np.zeros((20, 40, 3), np.uint8)
    frame[:, :10] = (255, 0, 0)
    frame[:, 10:30] = (0, 255, 0)
    frame[:, 30:] = (0, 0, 255)
    out = np.empty((1, 8, 8, 3), np.uint8)
    resize_frames(frame[None], 8, out)
    assert np.all(out[0] == (0, 255, 0)), 'only the centre square is kept'
    np.testing.assert_array_equal(out[0], fit_image(frame, 8))
