"""Demonstrations from standard formats as a DemoSet (no ROS needed).

- LIBERO HDF5 (robomimic layout): `data/demo_<i>/{actions, obs/...}`, `data` attrs with
  `problem_info` (JSON, `language_instruction`) and `env_args` (JSON).
- ManiSkill3 trajectories: `traj_<i>/{actions, obs, env_states, success, ...}` in an .h5 and a
  .json sidecar (`env_info`: env_id, env_kwargs; `episodes`: episode_id, elapsed_steps, success).
- rosbag2 demos recorded by `stepnft record` (or `ros2 bag record`): observations sampled at the
  teleop command stamps, configured by a DemoTopics YAML (config/demo_topics.yaml).

Every reader checks what it reads and raises ValueError naming the file and the problem.
Images are resized once, on read, into preallocated uint8 arrays (no per-episode copies).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stepnft_ros.episodes.demos import DemoSet
from stepnft_ros.image_codec import compressed_to_rgb, fit_image, is_compressed_topic, raw_to_rgb

log = logging.getLogger(__name__)

FORMATS = ('npz', 'libero-hdf5', 'maniskill-h5')


# ---------------------------------------------------------------------------------------------------- helpers


def _h5py():
    import h5py  # the HDF5 readers only

    return h5py


@contextmanager
def _open_h5(path: Path) -> Iterator[Any]:
    if not path.is_file():
        raise ValueError(f'{path}: no such file')
    try:
        f = _h5py().File(path, 'r')
    except OSError as err:  # truncated, garbage or not HDF5 at all
        raise ValueError(f'{path}: not a readable HDF5 file ({err})') from None
    try:
        yield f
    finally:
        f.close()


def _read(dataset: Any, where: str, rows: slice | None = None) -> np.ndarray:
    """A dataset's values; a damaged chunk (truncated/corrupt file) becomes a ValueError."""
    try:
        return dataset[()] if rows is None else dataset[rows]
    except Exception as err:  # h5py raises OSError/KeyError/RuntimeError for damaged data
        raise ValueError(f'{where}: unreadable data ({type(err).__name__}: {err})') from None


def resize_frames(frames: np.ndarray, size: int, out: np.ndarray) -> None:
    """(L, h, w, 3) uint8 -> `out` (L, size, size, 3): centre-cropped and resized like arm_bridge's frames."""
    if frames.shape[1:3] == (size, size):
        out[...] = frames
        return
    for i, frame in enumerate(frames):
        out[i] = fit_image(frame, size)


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 8 <= image_size <= 1024:
        raise ValueError(f'image_size must be an int in [8, 1024], got {image_size!r}')


@dataclass
class _Episode:
    """Where one episode's data lies and how many steps it has (pass 1 of a reader)."""

    path: Path
    key: str
    length: int
    instruction: str


class _Builder:
    """Preallocated DemoSet arrays, filled one episode at a time."""

    def __init__(self, episodes: Sequence[_Episode], state_dim: int, action_dim: int,
                 cameras: Sequence[str], image_size: int) -> None:
        total = sum(e.length for e in episodes)
        self.lengths = np.array([e.length for e in episodes], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.states = np.empty((total, state_dim), np.float32)
        self.actions = np.empty((total, action_dim), np.float32)
        self.images = {c: np.empty((total, image_size, image_size, 3), np.uint8) for c in cameras}
        self.image_size = image_size
        self.instructions = tuple(e.instruction for e in episodes)

    def rows(self, i: int) -> slice:
        return slice(int(self.starts[i]), int(self.starts[i] + self.lengths[i]))

    def demo_set(self) -> DemoSet:
        return DemoSet(self.states, self.actions, self.lengths, images=self.images, instructions=self.instructions)


def _finite(array: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise ValueError(f'{where}: non-finite values')
    return array


def _numbered(keys: Sequence[str], prefix: str) -> list[str]:
    """`prefix<i>` keys in numeric order (demo_2 before demo_10)."""
    pattern = re.compile(re.escape(prefix) + r'(\d+)')
    return sorted((k for k in keys if pattern.fullmatch(k)), key=lambda k: int(k[len(prefix):]))


# ---------------------------------------------------------------------------------------------------- LIBERO

LIBERO_CAMERAS = {'agentview': 'agentview_rgb', 'wrist': 'eye_in_hand_rgb'}
"""Policy camera name -> LIBERO obs dataset; the names the LIBERO bridge publishes."""

LIBERO_STATE_LAYOUTS = {
    # sim_bridge/libero_env.py's 25-D state: [qpos (7 arm + 2 finger joints), qvel, eef pos, eef
    # quat (xyzw)]. The demo files hold no joint velocities: they are estimated from qpos differences.
    'bridge': ('qpos', 'qvel', 'ee_pos', 'ee_quat'),
    # The 8-D proprio many LIBERO policies use: eef pos, eef axis-angle, finger joints.
    'eef': ('ee_pos', 'ee_ori', 'gripper_states'),
}
_LIBERO_STATE_PARTS = ('qpos', 'qvel', 'joint_states', 'gripper_states', 'ee_pos', 'ee_ori', 'ee_states', 'ee_quat')


@dataclass(frozen=True)
class LiberoReadConfig:
    """How LIBERO demos become policy inputs."""

    image_size: int = 64
    """Side of the square images the policy gets (resized from LIBERO's 128 or 256)."""
    cameras: Mapping[str, str] = field(default_factory=lambda: dict(LIBERO_CAMERAS))
    """Policy camera name -> obs dataset; empty: a state-only policy."""
    state: str | tuple[str, ...] = 'bridge'
    """A LIBERO_STATE_LAYOUTS name or parts from: qpos (joint_states + gripper_states), qvel (estimated),
    joint_states, gripper_states, ee_pos, ee_ori (axis-angle), ee_states (pos + axis-angle), ee_quat."""
    flip: str = 'auto'
    """How stored frames are turned: 'rotate180', 'vertical' (the physical view), 'none'; 'auto' =
    'rotate180' for LIBERO's bottom-up (OpenGL) frames, as sim_bridge/libero_env.py turns its camera
    images (matching LIBERO's public data sets), and 'none' for files marked 'opencv'."""
    max_episodes: int | None = None
    """Use only the first N demos of each file."""

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)
        if self.flip not in ('auto', 'vertical', 'rotate180', 'none'):
            raise ValueError(f"flip must be 'auto', 'vertical', 'rotate180' or 'none', got {self.flip!r}")
        unknown = [p for p in self.state_parts if p not in _LIBERO_STATE_PARTS]
        if unknown:
            raise ValueError(f'unknown LIBERO state parts {unknown}; use a layout {sorted(LIBERO_STATE_LAYOUTS)} '
                             f'or parts from {_LIBERO_STATE_PARTS}')

    @property
    def state_parts(self) -> tuple[str, ...]:
        if isinstance(self.state, str):
            if self.state not in LIBERO_STATE_LAYOUTS:
                raise ValueError(f'unknown LIBERO state layout {self.state!r}; choose from '
                                 f'{sorted(LIBERO_STATE_LAYOUTS)} or give the parts')
            return LIBERO_STATE_LAYOUTS[self.state]
        return tuple(self.state)


def _libero_attrs(f: Any, path: Path) -> tuple[str, float, str]:
    """(instruction, control frequency, image convention) from the `data` group's attributes."""
    attrs = f['data'].attrs
    try:
        problem = json.loads(attrs['problem_info'])
        instruction = str(problem['language_instruction']).strip()
    except KeyError as err:
        raise ValueError(f'{path}: data attrs lack {err} (problem_info.language_instruction)') from None
    except (TypeError, ValueError) as err:
        raise ValueError(f'{path}: data attr problem_info is not JSON ({err})') from None
    control_freq = 20.0
    if 'env_args' in attrs:
        try:
            env_args = json.loads(attrs['env_args'])
            control_freq = float(env_args.get('env_kwargs', {}).get('control_freq', control_freq))
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f'{path}: data attr env_args is not JSON ({err})') from None
    convention = attrs.get('macros_image_convention', 'opengl')
    convention = convention.decode() if isinstance(convention, bytes) else str(convention)
    return instruction, control_freq, convention


def _libero_state(obs: Any, parts: Sequence[str], robot_states: Any, where: str, control_freq: float) -> np.ndarray:
    def get(name: str) -> np.ndarray:
        if name not in obs:
            raise ValueError(f'{where}: obs/{name} is missing (needed for the state)')
        values = _read(obs[name], f'{where}/obs/{name}').astype(np.float32)
        return values.reshape(len(values), -1)

    columns = []
    for part in parts:
        if part in ('qpos', 'qvel'):
            qpos = np.concatenate([get('joint_states'), get('gripper_states')], axis=1)
            if part == 'qpos':
                columns.append(qpos)
            else:  # backward differences at the control rate; the first step repeats the second's
                qvel = np.diff(qpos, axis=0, prepend=qpos[:1]) * control_freq
                if len(qvel) > 1:
                    qvel[0] = qvel[1]
                columns.append(qvel)
        elif part == 'ee_quat':  # robot_states = [gripper qpos (2), eef pos (3), eef quat (4)]
            if robot_states is None:
                raise ValueError(f'{where}: robot_states is missing (needed for ee_quat)')
            rs = _read(robot_states, f'{where}/robot_states').astype(np.float32)
            if rs.ndim != 2 or rs.shape[1] < 9:
                raise ValueError(f'{where}: robot_states has shape {rs.shape}, expected (T, 9) with the eef quat last')
            columns.append(rs[:, -4:])
        else:
            columns.append(get(part))
    lengths = {c.shape[0] for c in columns}
    if len(lengths) > 1:
        raise ValueError(f'{where}: state parts {list(parts)} have different lengths {sorted(lengths)}')
    return np.concatenate(columns, axis=1)


def read_libero_hdf5(paths: Sequence[str | Path], cfg: LiberoReadConfig = LiberoReadConfig()) -> DemoSet:
    """All demos of LIBERO HDF5 files (one file per task), images upright and resized."""
    parts = cfg.state_parts
    episodes: list[_Episode] = []
    meta: dict[Path, tuple[float, str]] = {}
    action_dim = state_dim = None
    for raw_path in paths:
        path = Path(raw_path)
        with _open_h5(path) as f:
            if 'data' not in f:
                raise ValueError(f'{path}: no "data" group (not a LIBERO/robomimic demo file)')
            instruction, control_freq, convention = _libero_attrs(f, path)
            meta[path] = (control_freq, convention)
            keys = _numbered(list(f['data'].keys()), 'demo_')
            if not keys:
                raise ValueError(f'{path}: no data/demo_<i> groups')
            for key in keys[:cfg.max_episodes]:
                where = f'{path}: data/{key}'
                demo = f['data'][key]
                if 'actions' not in demo or 'obs' not in demo:
                    raise ValueError(f'{where}: needs "actions" and "obs"')
                shape = demo['actions'].shape
                if len(shape) != 2 or shape[0] < 1:
                    raise ValueError(f'{where}/actions has shape {shape}, expected (T, D) with T >= 1')
                if action_dim not in (None, shape[1]):
                    raise ValueError(f'{where}/actions has {shape[1]} dims, earlier demos have {action_dim}')
                action_dim = shape[1]
                for camera, dataset in cfg.cameras.items():
                    if dataset not in demo['obs']:
                        raise ValueError(f'{where}: obs/{dataset} (camera {camera!r}) is missing')
                    frames = demo['obs'][dataset]
                    if frames.shape[:1] != shape[:1] or len(frames.shape) != 4 or frames.shape[3] != 3 \
                            or frames.dtype != np.uint8:
                        raise ValueError(f'{where}: obs/{dataset} is {frames.dtype} {frames.shape}, expected '
                                         f'({shape[0]}, h, w, 3) uint8')
                episodes.append(_Episode(path, key, shape[0], instruction))
                if state_dim is None:  # the layout's size, from the first demo (checked for all in pass 2)
                    state_dim = _libero_state(demo['obs'], parts, demo.get('robot_states'), where,
                                              control_freq).shape[1] if parts else 0
    if not episodes:
        raise ValueError('no LIBERO demos given')

    out = _Builder(episodes, state_dim, action_dim, list(cfg.cameras), cfg.image_size)
    for path in dict.fromkeys(e.path for e in episodes):
        control_freq, convention = meta[path]
        flip = cfg.flip if cfg.flip != 'auto' else ('none' if convention == 'opencv' else 'rotate180')
        with _open_h5(path) as f:
            for i, episode in enumerate(episodes):
                if episode.path != path:
                    continue
                where = f'{path}: data/{episode.key}'
                demo = f['data'][episode.key]
                rows = out.rows(i)
                out.actions[rows] = _finite(_read(demo['actions'], f'{where}/actions'), f'{where}/actions')
                if parts:
                    state = _libero_state(demo['obs'], parts, demo.get('robot_states'), where, control_freq)
                    if state.shape != (episode.length, state_dim):
                        raise ValueError(f'{where}: state is {state.shape}, expected ({episode.length}, {state_dim})')
                    out.states[rows] = _finite(state, f'{where}: state')
                for camera, dataset in cfg.cameras.items():
                    frames = _read(demo['obs'][dataset], f'{where}/obs/{dataset}')
                    if flip == 'rotate180':
                        frames = frames[:, ::-1, ::-1]
                    elif flip == 'vertical':
                        frames = frames[:, ::-1]
                    resize_frames(frames, cfg.image_size, out.images[camera][rows])
    return out.demo_set()


# ---------------------------------------------------------------------------------------------------- ManiSkill


@dataclass(frozen=True)
class ManiSkillReadConfig:
    """How ManiSkill3 trajectories become policy inputs."""

    image_size: int | None = 64
    """Side of the square images the policy gets; None keeps the recorded size (must be square)."""
    cameras: tuple[str, ...] | None = None
    """Cameras (obs/sensor_data/<name>/rgb) to use; None: all the file has; (): state only."""
    instruction: str | None = None
    """None: the instruction the ManiSkill bridge publishes for the task (sim_bridge.maniskill_env)."""
    success_only: bool = False
    """Skip trajectories that the .json sidecar marks unsuccessful."""
    max_episodes: int | None = None
    """Use only the first N trajectories of each file."""

    def __post_init__(self) -> None:
        if self.image_size is not None:
            _check_image_size(self.image_size)


def _maniskill_sidecar(path: Path) -> dict[str, Any]:
    sidecar = path.with_suffix('.json')
    if not sidecar.is_file():
        log.warning('%s: no %s sidecar; using every traj_<i> and a generic instruction', path, sidecar.name)
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f'{sidecar}: unreadable JSON ({err})') from None
    if not isinstance(data, dict) or not isinstance(data.get('episodes', []), list):
        raise ValueError(f'{sidecar}: expected an object with an "episodes" list')
    return data


def _maniskill_instruction(env_id: str, override: str | None) -> str:
    if override is not None:
        return override
    # the exact text the ManiSkill bridge publishes, so training and rollouts see the same instruction
    from sim_bridge.maniskill_env import _GENERIC_INSTRUCTION, TASK_INSTRUCTIONS

    return TASK_INSTRUCTIONS.get(env_id, _GENERIC_INSTRUCTION)


def _maniskill_state(obs: Any, where: str, rows: slice) -> np.ndarray:
    """The flat state the ManiSkill bridge publishes: obs itself (obs_mode state), obs/state
    (rgb+state), or obs/agent then obs/extra flattened in the file's order."""
    h5py = _h5py()
    if isinstance(obs, h5py.Dataset):
        values = _read(obs, f'{where}/obs', rows)
        return values.reshape(len(values), -1).astype(np.float32)
    if 'state' in obs:
        values = _read(obs['state'], f'{where}/obs/state', rows)
        return values.reshape(len(values), -1).astype(np.float32)
    columns = []

    def flatten(node: Any, name: str) -> None:
        if isinstance(node, h5py.Dataset):
            values = _read(node, f'{where}/{name}', rows)
            columns.append(values.reshape(len(values), -1).astype(np.float32))
        else:
            for key in node:
                flatten(node[key], f'{name}/{key}')

    for part in ('agent', 'extra'):
        if part in obs:
            flatten(obs[part], f'obs/{part}')
    if not columns:
        return np.empty((rows.stop - rows.start, 0), np.float32)
    return np.concatenate(columns, axis=1)


def read_maniskill_h5(paths: Sequence[str | Path], cfg: ManiSkillReadConfig = ManiSkillReadConfig()) -> DemoSet:
    """ManiSkill3 trajectory files (+ .json sidecars). Observations hold T+1 steps for T actions
    (the last one follows the final action): the first T pair with the actions."""
    episodes: list[_Episode] = []
    action_dim = state_dim = None
    cameras: tuple[str, ...] | None = cfg.cameras
    native_size = None
    for raw_path in paths:
        path = Path(raw_path)
        sidecar = _maniskill_sidecar(path)
        env_id = str((sidecar.get('env_info') or {}).get('env_id', ''))
        instruction = _maniskill_instruction(env_id, cfg.instruction)
        listed = {int(e['episode_id']): e for e in sidecar.get('episodes', []) if 'episode_id' in e}
        with _open_h5(path) as f:
            keys = _numbered(list(f.keys()), 'traj_')
            if not keys:
                raise ValueError(f'{path}: no traj_<i> groups (not a ManiSkill trajectory file)')
            if listed and len(listed) != len(keys):
                raise ValueError(f'{path}: {len(keys)} trajectories, the .json sidecar lists {len(listed)}')
            used = 0
            for key in keys:
                if cfg.max_episodes is not None and used >= cfg.max_episodes:
                    break
                where = f'{path}: {key}'
                info = listed.get(int(key[len('traj_'):]), {})
                if listed and not info:
                    raise ValueError(f'{where}: not listed in the .json sidecar')
                if cfg.success_only and info.get('success') is False:
                    continue
                traj = f[key]
                if 'actions' not in traj or 'obs' not in traj:
                    raise ValueError(f'{where}: needs "actions" and "obs" (trajectories recorded without '
                                     'observations: replay them with mani_skill.trajectory.replay_trajectory '
                                     '-o state or -o rgb+state first)')
                if not isinstance(traj['actions'], _h5py().Dataset):
                    raise ValueError(f'{where}: actions is a group (multi-agent); only flat action vectors are read')
                shape = traj['actions'].shape
                if len(shape) != 2 or shape[0] < 1:
                    raise ValueError(f'{where}/actions has shape {shape}, expected (T, D) with T >= 1')
                if 'elapsed_steps' in info and int(info['elapsed_steps']) != shape[0]:
                    raise ValueError(f'{where}: {shape[0]} actions, the sidecar says elapsed_steps '
                                     f'{info["elapsed_steps"]} (truncated file?)')
                if action_dim not in (None, shape[1]):
                    raise ValueError(f'{where}/actions has {shape[1]} dims, earlier trajectories have {action_dim}')
                action_dim = shape[1]
                obs = traj['obs']
                obs_len = _maniskill_obs_length(obs, where)
                if obs_len not in (shape[0], shape[0] + 1):
                    raise ValueError(f'{where}: {obs_len} observations for {shape[0]} actions, expected T+1 (or T)')
                sensors = obs['sensor_data'] if isinstance(obs, _h5py().Group) and 'sensor_data' in obs else {}
                have = tuple(c for c in sensors if 'rgb' in sensors[c])
                if cameras is None:
                    cameras = have
                missing = [c for c in cameras if c not in have]
                if missing:
                    raise ValueError(f'{where}: no rgb images for cameras {missing} (has {list(have)})')
                for camera in cameras:
                    frames = sensors[camera]['rgb']
                    if len(frames.shape) != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
                        raise ValueError(f'{where}: sensor_data/{camera}/rgb is {frames.dtype} {frames.shape}, '
                                         'expected (T+1, h, w, 3) uint8')
                    native_size = native_size or frames.shape[1:3]
                if state_dim is None:
                    state_dim = _maniskill_state(obs, where, slice(0, 1)).shape[1]
                episodes.append(_Episode(path, key, shape[0], instruction))
                used += 1
    if not episodes:
        raise ValueError('no ManiSkill trajectories to read' + (' (none successful)' if cfg.success_only else ''))
    cameras = cameras or ()
    size = cfg.image_size
    if size is None and cameras:
        if native_size[0] != native_size[1]:
            raise ValueError(f'recorded images are {native_size[1]}x{native_size[0]}: give image_size to make '
                             'them square')
        size = int(native_size[0])

    out = _Builder(episodes, state_dim, action_dim, cameras, size or 8)
    for path in dict.fromkeys(e.path for e in episodes):
        with _open_h5(path) as f:
            for i, episode in enumerate(episodes):
                if episode.path != path:
                    continue
                where = f'{path}: {episode.key}'
                traj, rows, steps = f[episode.key], out.rows(i), slice(0, episode.length)
                out.actions[rows] = _finite(_read(traj['actions'], f'{where}/actions'), f'{where}/actions')
                state = _maniskill_state(traj['obs'], where, steps)
                if state.shape != (episode.length, state_dim):
                    raise ValueError(f'{where}: state is {state.shape}, expected ({episode.length}, {state_dim})')
                out.states[rows] = _finite(state, f'{where}: state')
                for camera in cameras:
                    frames = _read(traj['obs']['sensor_data'][camera]['rgb'],
                                   f'{where}/obs/sensor_data/{camera}/rgb', steps)
                    resize_frames(frames, size, out.images[camera][rows])
    return out.demo_set()


def _maniskill_obs_length(obs: Any, where: str) -> int:
    h5py = _h5py()
    if isinstance(obs, h5py.Dataset):
        return obs.shape[0]
    lengths = set()
    obs.visit(lambda name: lengths.add(obs[name].shape[0]) if isinstance(obs[name], h5py.Dataset)
              and not name.startswith('sensor_param') else None)
    if len(lengths) != 1:
        raise ValueError(f'{where}: obs datasets have lengths {sorted(lengths)}, expected one')
    return lengths.pop()


# ---------------------------------------------------------------------------------------------------- rosbag demos

COMMAND_TYPES = ('trajectory_msgs/msg/JointTrajectory', 'sensor_msgs/msg/JointState',
                 'geometry_msgs/msg/TwistStamped')
JOINT_STATE_TYPE = 'sensor_msgs/msg/JointState'
IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE_TYPE = 'sensor_msgs/msg/CompressedImage'  # cameras recorded from <topic>/compressed
STRING_TYPE = 'std_msgs/msg/String'
STATE_SOURCES = ('joint_position', 'joint_velocity')
INSTRUCTION_KEY = 'stepnft_ros.instruction'
"""Bag custom_data key: the instruction given to `stepnft record --instruction`."""
TWIST_NAMES = ('linear.x', 'linear.y', 'linear.z', 'angular.x', 'angular.y', 'angular.z')


@dataclass(frozen=True)
class DemoTopics:
    """What a demo bag holds and how it becomes (observation, action) pairs. YAML layout:

        state: {topic: /arm/joint_states, joint_names: [...], sources: [joint_position]}
        cameras: {wrist: /arm/camera/wrist/image_raw, scene: /arm/camera/scene/image_raw}
        image_size: 64
        command: {topic: /arm/teleop/command, type: trajectory_msgs/msg/JointTrajectory, names: [...]}
        instruction: {topic: /arm/instruction, default: "pick up the cube"}
        max_obs_age_s: 0.5
    """

    state_topic: str
    command_topic: str
    command_type: str
    cameras: Mapping[str, str] = field(default_factory=dict)
    """Policy camera name -> sensor_msgs/Image topic."""
    joint_names: tuple[str, ...] = ()
    """State joints in policy order (a subset of the JointState's names); empty: as published."""
    state_sources: tuple[str, ...] = ('joint_position',)
    """joint_position and/or joint_velocity, concatenated in this order."""
    command_names: tuple[str, ...] = ()
    """Action dims in policy order (joint names of a JointTrajectory/JointState command); empty: as published."""
    image_size: int = 64
    instruction_topic: str = ''
    """std_msgs/String topic of the task instruction (latched); '' = none."""
    instruction: str = ''
    """Instruction for bags that carry none."""
    max_obs_age_s: float = 0.5
    """A command whose latest joint state or image is older than this is skipped (the observation is stale)."""

    def __post_init__(self) -> None:
        for what, topic in (('state.topic', self.state_topic), ('command.topic', self.command_topic),
                            *((f'cameras.{c}', t) for c, t in self.cameras.items())):
            if not isinstance(topic, str) or not topic.startswith('/'):
                raise ValueError(f'{what} must be an absolute topic name, got {topic!r}')
        if self.instruction_topic and not self.instruction_topic.startswith('/'):
            raise ValueError(f'instruction.topic must be an absolute topic name, got {self.instruction_topic!r}')
        if self.command_type not in COMMAND_TYPES:
            raise ValueError(f'command.type must be one of {COMMAND_TYPES}, got {self.command_type!r}')
        if self.command_type.endswith('TwistStamped') and self.command_names:
            raise ValueError(f'a TwistStamped command is always {TWIST_NAMES}; leave command.names empty')
        bad = [s for s in self.state_sources if s not in STATE_SOURCES]
        if bad or not self.state_sources:
            raise ValueError(f'state.sources must be a non-empty list from {STATE_SOURCES}, got {self.state_sources}')
        bad = [c for c in self.cameras if not re.fullmatch(r'[A-Za-z][A-Za-z0-9_]*', c)]
        if bad:
            raise ValueError(f'camera names {bad} must be [A-Za-z][A-Za-z0-9_]*')
        _check_image_size(self.image_size)
        if not (self.max_obs_age_s > 0):
            raise ValueError(f'max_obs_age_s must be > 0, got {self.max_obs_age_s}')
        topics = self.topics()
        if len(set(topics)) != len(topics):
            raise ValueError(f'each role needs its own topic, got {topics}')

    def topics(self) -> dict[str, str]:
        """topic -> message type, for every recorded topic."""
        out = {self.state_topic: JOINT_STATE_TYPE, self.command_topic: self.command_type}
        out.update({topic: COMPRESSED_IMAGE_TYPE if is_compressed_topic(topic) else IMAGE_TYPE
                    for topic in self.cameras.values()})
        if self.instruction_topic:
            out[self.instruction_topic] = STRING_TYPE
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = 'demo topics') -> DemoTopics:
        def section(name: str, keys: tuple[str, ...] | None = None) -> dict:
            value = data.get(name) or {}
            if not isinstance(value, dict):
                raise ValueError(f'{source}: {name} must be a mapping')
            unknown = sorted(set(value) - set(keys)) if keys else []
            if unknown:
                raise ValueError(f'{source}: unknown keys {unknown} in {name}; known: {list(keys)}')
            return value

        if not isinstance(data, dict):
            raise ValueError(f'{source}: expected a mapping at the top level')
        known = {'state', 'cameras', 'image_size', 'command', 'instruction', 'max_obs_age_s'}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f'{source}: unknown keys {unknown}; known: {sorted(known)}')
        state = section('state', ('topic', 'joint_names', 'sources'))
        command = section('command', ('topic', 'type', 'names'))
        instruction = section('instruction', ('topic', 'default'))
        try:
            return cls(state_topic=state.get('topic', ''), command_topic=command.get('topic', ''),
                       command_type=command.get('type', ''),
                       cameras={str(k): v for k, v in section('cameras').items()},
                       joint_names=tuple(state.get('joint_names') or ()),
                       state_sources=tuple(state.get('sources') or ('joint_position',)),
                       command_names=tuple(command.get('names') or ()),
                       image_size=data.get('image_size', 64), instruction_topic=instruction.get('topic', ''),
                       instruction=str(instruction.get('default', '')),
                       max_obs_age_s=float(data.get('max_obs_age_s', 0.5)))
        except (TypeError, ValueError) as err:
            raise ValueError(f'{source}: {err}') from None

    @classmethod
    def load(cls, path: str | Path) -> DemoTopics:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f'{path}: no such demo topics file') from None
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f'{path}: unreadable YAML ({err})') from None
        return cls.from_dict(data, str(path))


def _select(names: Sequence[str], values: np.ndarray, wanted: Sequence[str], what: str) -> np.ndarray:
    if not wanted:
        return values
    if len(names) != len(values):
        raise ValueError(f'{what}: {len(names)} names for {len(values)} values')
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise ValueError(f'{what}: no {missing} among {list(names)}')
    return values[[index[n] for n in wanted]]


def _joint_state(msg: Any, topics: DemoTopics) -> np.ndarray:
    names = list(msg.name)
    parts = []
    for source in topics.state_sources:
        values = np.asarray(msg.position if source == 'joint_position' else msg.velocity, np.float64)
        if source == 'joint_velocity' and values.size == 0:
            raise ValueError('joint state has no velocities but state.sources asks for them')
        parts.append(_select(names, values, topics.joint_names, f'joint state {source}'))
    return np.concatenate(parts).astype(np.float32)


def _command(msg: Any, topics: DemoTopics) -> np.ndarray:
    return command_values(msg, topics.command_type, topics.command_names)


def command_values(msg: Any, command_type: str, names: Sequence[str] = ()) -> np.ndarray:
    """A teleop command's values as one action (float32), the dims in `names` order (empty: as published).

    msg: a JointTrajectory (its first point), JointState (positions) or TwistStamped (linear, angular),
    deserialized by rosbags or rclpy (the same fields). ValueError if it is unusable. Shared by demo bags
    (`stepnft sft --bags`) and the arm bridge's interventions (human commands as demonstrations).
    """
    if command_type.endswith('JointTrajectory'):
        if not len(msg.points):
            raise ValueError('JointTrajectory command without points')
        # a teleop command is one target: the first point (later points, if any, are the operator's plan)
        values = np.asarray(msg.points[0].positions, np.float64)
        cmd_names = list(msg.joint_names)
    elif command_type.endswith('JointState'):
        values, cmd_names = np.asarray(msg.position, np.float64), list(msg.name)
    elif command_type.endswith('TwistStamped'):
        t = msg.twist
        values, cmd_names = np.array([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z]), []
    else:
        raise ValueError(f'command type must be one of {COMMAND_TYPES}, got {command_type!r}')
    return _select(cmd_names, values, names, 'command').astype(np.float32)


def image_msg_to_rgb(msg: Any, compressed: bool = False) -> np.ndarray:
    """A recorded camera message (Image: rgb8, bgr8, rgba8, bgra8 or mono8; or CompressedImage) -> RGB."""
    if compressed:
        return compressed_to_rgb(msg)
    return raw_to_rgb(msg, allow_mono=True)


@dataclass
class BagReport:
    """What reading one demo bag gave."""

    bag: str
    samples: int = 0
    commands: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    instruction: str = ''

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def find_bags(root: str | Path) -> list[Path]:
    """`root` itself if it is a rosbag2 directory, else its rosbag2 subdirectories (hidden temp dirs skipped)."""
    root = Path(root)
    if (root / 'metadata.yaml').is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(f'{root}: no such directory of bags')
    bags = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.')
                  and (p / 'metadata.yaml').is_file())
    if not bags:
        raise ValueError(f'{root}: no rosbag2 directories (with metadata.yaml) in it')
    return bags


def _bag_custom_data(path: Path) -> dict[str, str]:
    try:
        info = yaml.safe_load((path / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
        custom = info.get('custom_data') or {}
    except (OSError, yaml.YAMLError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f'{path}: metadata.yaml is unreadable ({type(err).__name__}: {err})') from None
    return custom if isinstance(custom, dict) else {}


def _read_bag(path: Path, topics: DemoTopics) -> tuple[list[tuple[np.ndarray, dict, np.ndarray]], BagReport]:
    """(state, images, action) samples of one bag, observations taken at or before each command."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    report = BagReport(str(path), instruction=_bag_custom_data(path).get(INSTRUCTION_KEY, ''))
    wanted = topics.topics()
    camera_of = {topic: camera for camera, topic in topics.cameras.items()}
    max_age = round(topics.max_obs_age_s * 1e9)
    samples = []
    latest_state: tuple[int, Any] | None = None
    latest_image: dict[str, tuple[int, Any]] = {}
    converted: dict[int, np.ndarray] = {}  # id(msg) -> resized image: a frame reused by several commands
    try:
        with AnyReader([path], default_typestore=get_typestore(Stores.ROS2_KILTED)) as reader:
            for conn in reader.connections:
                if conn.topic in wanted and conn.msgtype != wanted[conn.topic]:
                    raise ValueError(f'{path}: topic {conn.topic} has type {conn.msgtype}, the demo topics say '
                                     f'{wanted[conn.topic]}')
            connections = [c for c in reader.connections if c.topic in wanted]
            for conn, stamp, raw in reader.messages(connections=connections):
                msg = reader.deserialize(raw, conn.msgtype)
                if conn.topic == topics.instruction_topic:
                    report.instruction = str(msg.data).strip()
                elif conn.topic == topics.state_topic:
                    latest_state = (stamp, msg)
                elif conn.topic in camera_of:
                    latest_image[camera_of[conn.topic]] = (stamp, msg)
                else:
                    report.commands += 1
                    sample = _sample(stamp, msg, latest_state, latest_image, topics, max_age, converted, report)
                    if sample is not None:
                        samples.append(sample)
                        report.samples += 1
    except ValueError:
        raise
    except Exception as err:  # rosbags/mcap/zstd errors of torn or garbled bags have no common base
        raise ValueError(f'{path}: unreadable bag ({type(err).__name__}: {err})') from None
    return samples, report


def _sample(stamp: int, msg: Any, latest_state: tuple[int, Any] | None, latest_image: dict[str, tuple[int, Any]],
            topics: DemoTopics, max_age: int, converted: dict[int, np.ndarray],
            report: BagReport) -> tuple[np.ndarray, dict, np.ndarray] | None:
    if latest_state is None or any(c not in latest_image for c in topics.cameras):
        report.skip('no observation yet')
        return None
    if stamp - latest_state[0] > max_age or any(stamp - latest_image[c][0] > max_age for c in topics.cameras):
        report.skip('stale observation')
        return None
    try:
        action = _command(msg, topics)
        state = _joint_state(latest_state[1], topics)
        images = {}
        for camera in topics.cameras:
            image_msg = latest_image[camera][1]
            if id(image_msg) not in converted:
                converted.clear()  # only the newest frame per camera can be reused
                rgb = image_msg_to_rgb(image_msg, compressed=is_compressed_topic(topics.cameras[camera]))
                out = np.empty((1, topics.image_size, topics.image_size, 3), np.uint8)
                resize_frames(rgb[None], topics.image_size, out)
                converted[id(image_msg)] = out[0]
            images[camera] = converted[id(image_msg)]
    except ValueError as err:
        report.skip(f'bad message: {err}')
        return None
    if not (np.isfinite(action).all() and np.isfinite(state).all()):
        report.skip('non-finite values')
        return None
    return state, images, action


def read_demo_bags(bags: str | Path | Sequence[str | Path], topics: DemoTopics,
                   on_bag: Callable[[BagReport], None] | None = None) -> tuple[DemoSet, list[BagReport]]:
    """One demo episode per bag: for each command, the latest joint state and image of every
    camera at or before it (by the bag's log time) and the command's values as the action."""
    paths = find_bags(bags) if isinstance(bags, (str, Path)) else [Path(b) for b in bags]
    states, actions, lengths, instructions = [], [], [], []
    frames: dict[str, list[np.ndarray]] = {c: [] for c in topics.cameras}
    reports = []
    dims: tuple[int, int] | None = None
    for path in paths:
        samples, report = _read_bag(path, topics)
        reports.append(report)
        if on_bag is not None:
            on_bag(report)
        if not samples:
            log.warning('%s: no usable samples (%d commands; skipped %s)', path, report.commands, report.skipped)
            continue
        bag_dims = (samples[0][0].size, samples[0][2].size)
        sizes = {(s.size, a.size) for s, _, a in samples}
        if len(sizes) > 1 or (dims is not None and bag_dims != dims):
            raise ValueError(f'{path}: state/action sizes {sorted(sizes)} differ from {dims} (set state.joint_names '
                             'and command.names to fix the order and size)')
        dims = bag_dims
        for state, images, action in samples:
            states.append(state)
            actions.append(action)
            for camera, image in images.items():
                frames[camera].append(image)
        lengths.append(len(samples))
        instructions.append(report.instruction or topics.instruction)
    if not lengths:
        raise ValueError(f'no usable demo samples in {len(paths)} bag(s): '
                         + '; '.join(f'{r.bag}: {r.commands} commands, skipped {r.skipped}' for r in reports))
    demos = DemoSet(np.stack(states), np.stack(actions), np.array(lengths, np.int64),
                    images={c: np.stack(f) for c, f in frames.items()}, instructions=tuple(instructions))
    return demos, reports


def demo_action_names(topics: DemoTopics, demos: DemoSet) -> list[str]:
    """Names of the action dims (for the policy's JointTrajectory joint_names)."""
    if topics.command_type.endswith('TwistStamped'):
        return list(TWIST_NAMES)
    return list(topics.command_names) or [f'a{i}' for i in range(demos.actions.shape[1])]
