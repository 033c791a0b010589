"""ROS-free adapter around one ManiSkill3 environment.

The rest of the project only sees plain numpy: a flat float32 state vector, uint8 camera
images and a language instruction. Episodes end at the first success (terminal-binary RL
labels) or when ``max_episode_steps`` is reached. ``split`` selects an evaluation split
(sim_bridge/maniskill_ood.py: unseen looks, phrasings or poses); ``render_size`` adds a
side-view camera for videos.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import numpy as np

from sim_bridge.env_base import SimEnv
from sim_bridge.maniskill_ood import OODHooks, check_split

# ManiSkill asks on stdin before downloading assets; a node or test must never block on that.
os.environ.setdefault('MS_SKIP_ASSET_DOWNLOAD_PROMPT', '1')

# Tasks whose assets ship inside the mani-skill wheel (no download needed) and a short
# instruction for each; unknown tasks fall back to a generic instruction.
TASK_INSTRUCTIONS = {
    'PickCube-v1': 'pick up the cube and lift it to the goal',
    'PushCube-v1': 'push the cube to the goal region',
    'PullCube-v1': 'pull the cube to the goal region',
    'StackCube-v1': 'stack the red cube on top of the green cube',
    'PegInsertionSide-v1': 'insert the peg into the hole in the box',
    'PlaceSphere-v1': 'place the sphere into the bin',
    'PokeCube-v1': 'use the peg to poke the cube to the goal',
    'PushT-v1': 'push the T-shaped block onto the target',
}
_GENERIC_INSTRUCTION = 'complete the task'

_CONTROL_MODES = (
    'pd_ee_delta_pose', 'pd_ee_delta_pos', 'pd_ee_target_delta_pose', 'pd_ee_pose',
    'pd_joint_pos', 'pd_joint_delta_pos', 'pd_joint_target_delta_pos', 'pd_joint_vel',
)
_OBS_MODES = ('state', 'rgb')
_SIM_BACKENDS = ('physx_cpu', 'physx_cuda', 'cpu', 'gpu', 'auto')


@dataclass(frozen=True)
class ManiSkillEnvConfig:
    """Settings of one ManiSkill environment (num_envs is always 1)."""

    env_id: str = 'PickCube-v1'
    """Registered ManiSkill task id, e.g. "PickCube-v1"."""
    control_mode: str = 'pd_ee_delta_pose'
    """Robot controller; pd_ee_delta_pose is a 7-D normalized [-1, 1] action (dpos, drot, gripper)."""
    obs_mode: str = 'state'
    """"state": flat privileged state only; "rgb": the same state plus camera images."""
    max_episode_steps: int = 100
    """Truncation horizon. PickCube's registered 50 is too short: expert demos take 47-93 steps."""
    sim_backend: str = 'physx_cpu'
    """Physics backend; physx_cpu needs no GPU (a Vulkan device is still required by SAPIEN)."""
    image_size: int = 64
    """Side in pixels of the square camera images (only used when obs_mode="rgb")."""
    instruction: str | None = None
    """Language instruction; None picks the task's entry in TASK_INSTRUCTIONS."""
    reconfigure_on_reset: bool = False
    """Rebuild the PhysX scene at every reset (~0.2 s each). PhysX CPU keeps hidden state
    across plain resets (stale contacts: is_grasped can read 1 at t=0; ~1 cm drift after a
    grasp), so only rebuilt scenes make seed -> trajectory bit-exact (demo generation)."""
    split: str = 'id'
    """Evaluation split (sim_bridge/maniskill_ood.py): 'id' (training distribution), 'vision',
    'semantic' or 'execution'."""
    render_size: int = 0
    """> 0: also render a side-view camera of this square size for videos (render_frame())."""
    joint_units: bool = False
    """pd_joint_pos only: every action dim is its joint's target in the joint's own units, as a real
    arm's joint trajectory controller takes it (the gripper's finger in m, not ManiSkill's [-1, 1])."""

    def __post_init__(self):
        if not isinstance(self.env_id, str) or not self.env_id:
            raise ValueError(f'env_id must be a non-empty string, got {self.env_id!r}')
        if self.control_mode not in _CONTROL_MODES:
            raise ValueError(f'control_mode must be one of {_CONTROL_MODES}, got {self.control_mode!r}')
        if self.obs_mode not in _OBS_MODES:
            raise ValueError(f'obs_mode must be one of {_OBS_MODES}, got {self.obs_mode!r}')
        if (not isinstance(self.max_episode_steps, int) or isinstance(self.max_episode_steps, bool)
                or self.max_episode_steps < 1):
            raise ValueError(f'max_episode_steps must be an int >= 1, got {self.max_episode_steps!r}')
        if self.sim_backend not in _SIM_BACKENDS:
            raise ValueError(f'sim_backend must be one of {_SIM_BACKENDS}, got {self.sim_backend!r}')
        if (not isinstance(self.image_size, int) or isinstance(self.image_size, bool)
                or not 8 <= self.image_size <= 1024):
            raise ValueError(f'image_size must be an int in [8, 1024], got {self.image_size!r}')
        if not isinstance(self.reconfigure_on_reset, bool):
            # ValueError (not TypeError) so callers catch one exception type for any bad field.
            raise ValueError(
                f'reconfigure_on_reset must be a bool, got {self.reconfigure_on_reset!r}')
        if (not isinstance(self.render_size, int) or isinstance(self.render_size, bool)
                or not (self.render_size == 0 or 16 <= self.render_size <= 1024)):
            raise ValueError(f'render_size must be 0 or an int in [16, 1024], got {self.render_size!r}')
        if self.joint_units is not False and (self.joint_units is not True or self.control_mode != 'pd_joint_pos'):
            raise ValueError(f'joint_units=True needs control_mode pd_joint_pos, got joint_units={self.joint_units!r} '
                             f'with {self.control_mode!r}')
        check_split(self.split, self.env_id)
        if self.instruction is None:
            # frozen dataclass: resolve the default once so cfg.instruction is always a str.
            object.__setattr__(self, 'instruction',
                               TASK_INSTRUCTIONS.get(self.env_id, _GENERIC_INSTRUCTION))
        elif not isinstance(self.instruction, str) or not self.instruction.strip():
            raise ValueError(f'instruction must be a non-empty string, got {self.instruction!r}')


def _info_to_python(info: dict) -> dict:
    """Batched torch info values -> plain Python scalars (or arrays if not scalar)."""
    out = {}
    for k, v in info.items():
        v = _to_numpy(v)
        out[k] = v.item() if isinstance(v, np.ndarray) and v.size == 1 else v
    return out


def _to_numpy(x) -> np.ndarray:
    """ManiSkill returns batched torch tensors (also on CPU); drop the batch dim of 1."""
    if hasattr(x, 'detach'):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x[0] if x.ndim > 0 and x.shape[0] == 1 else x


class ManiSkillEnv(SimEnv):
    """One ManiSkill environment behind a numpy reset/step API.

    ``reset(seed)`` always gives the same initial state for a seed. Whole trajectories are
    bit-exact for a seed and action sequence only with ``reconfigure_on_reset=True``; with
    plain resets open-loop demo replays drift by up to ~1 cm after the grasp (see
    sim_bridge/maniskill_demos.py). Stepping after ``done`` raises until the next reset.
    """

    def __init__(self, cfg: ManiSkillEnvConfig = ManiSkillEnvConfig()):
        # Imported here so that importing this module (e.g. for the config) stays cheap.
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401  (registers the tasks with gymnasium)

        self.cfg = cfg
        kwargs = {}
        if cfg.obs_mode == 'rgb':
            # "rgb+state" keeps the exact flat state layout of obs_mode="state" (the task adds
            # privileged object poses only when "state" is in the mode) and adds images.
            ms_obs_mode = 'rgb+state'
            kwargs['sensor_configs'] = {'width': cfg.image_size, 'height': cfg.image_size}
        else:
            ms_obs_mode = 'state'
        if cfg.render_size:
            kwargs['human_render_camera_configs'] = {'width': cfg.render_size, 'height': cfg.render_size}
        self._env = gym.make(
            cfg.env_id,
            num_envs=1,
            obs_mode=ms_obs_mode,
            control_mode=cfg.control_mode,
            sim_backend=cfg.sim_backend,
            render_mode='rgb_array' if cfg.render_size else None,
            reward_mode='none',  # success comes from info["success"]; skip reward math
            max_episode_steps=cfg.max_episode_steps,
            **kwargs,
        )
        base = self._env.unwrapped
        space = base.single_action_space
        if len(space.shape) != 1:
            raise ValueError(f'{cfg.env_id}/{cfg.control_mode}: expected a flat Box action space, '
                             f'got {space}')
        self.action_dim = int(space.shape[0])
        self.action_low = np.asarray(space.low, dtype=np.float32).copy()
        self.action_high = np.asarray(space.high, dtype=np.float32).copy()
        # (dim, lower, upper) of the dims ManiSkill normalizes onto [-1, 1] that joint_units gives in joint units
        self._unit_dims = [(i, lower, upper) for i, (_, lower, upper) in enumerate(self.action_joints())
                           if lower is not None] if cfg.joint_units else []
        for i, lower, upper in self._unit_dims:
            self.action_low[i], self.action_high[i] = lower, upper
        self.camera_names = tuple(base.scene.sensors.keys()) if cfg.obs_mode == 'rgb' else ()
        self.joint_names = tuple(j.name for j in base.agent.robot.get_active_joints())
        # The flat state is [qpos, qvel, task extras] (ManiSkill flattens agent before extra), so a
        # bridge can publish the first 2·n_joints as a JointState and the rest as task state.
        self.task_state_names = self._task_state_names(base)
        self.control_period = float(base.control_timestep)
        self.instruction = cfg.instruction
        self._ood = OODHooks(cfg.split, cfg.env_id, cfg.max_episode_steps)
        self._steps = 0
        self.last_info: dict = {}  # ManiSkill's info of the last reset/step, e.g. is_grasped
        self._done = True
        self.state_dim = int(self.reset(seed=0)['state'].shape[0])
        # ManiSkill runs gc.collect() on every reconfiguring reset; without this it re-scans the
        # ~300k objects of the start-up each time (150-240 ms of a 200 ms reset).
        gc.freeze()
        if self.state_dim != 2 * len(self.joint_names) + len(self.task_state_names):
            raise ValueError(f'{cfg.env_id}: state of size {self.state_dim} is not [qpos, qvel, extras] '
                             f'({len(self.joint_names)} joints, {len(self.task_state_names)} extras)')
        self._done = True  # the probe reset above is not an episode the caller started

    @staticmethod
    def _task_state_names(base) -> tuple[str, ...]:
        names = []
        for key, value in base._get_obs_extra(base.get_info()).items():
            size = int(np.prod(_to_numpy(value).shape)) if np.ndim(_to_numpy(value)) else 1
            names += [key] if size == 1 else [f'{key}.{i}' for i in range(size)]
        return tuple(names)

    def _convert_obs(self, raw) -> dict:
        if self.cfg.obs_mode == 'rgb':
            state = raw['state']
            images = {name: np.ascontiguousarray(_to_numpy(raw['sensor_data'][name]['rgb']),
                                                 dtype=np.uint8)
                      for name in self.camera_names}
        else:
            state, images = raw, {}
        return {
            'state': np.ascontiguousarray(_to_numpy(state), dtype=np.float32),
            'images': images,
            'instruction': self.instruction,
        }

    def instruction_for(self, seed: int) -> str:
        """The instruction of the episode `seed` starts (the semantic split rephrases it per seed)."""
        return self._ood.instruction(int(seed), self.cfg.instruction)

    def reset(self, seed: int) -> dict:
        """Start an episode; the seed fixes robot init noise, object pose, goal and the split's changes."""
        options = {'reconfigure': True} if self.cfg.reconfigure_on_reset else None
        raw, info = self._env.reset(seed=int(seed), options=options)
        self.instruction = self.instruction_for(seed)
        base = self._env.unwrapped
        if self._ood.on_reset(base, int(seed)):
            info = base.get_info()
            raw = base.get_obs(info)
        self.last_info = _info_to_python(info)
        self._done = False
        self._steps = 0
        return self._convert_obs(raw)

    def step(self, action: np.ndarray) -> tuple[dict, bool, bool]:
        """Apply one action (clipped to bounds); returns (obs, success, done)."""
        a = self._checked_action(action)
        a = np.clip(a, self.action_low, self.action_high)
        for i, lower, upper in self._unit_dims:
            a[i] = 2.0 * (a[i] - lower) / (upper - lower) - 1.0
        # ManiSkill wants a batch dim even for one env.
        raw, _, terminated, truncated, info = self._env.step(a[None])
        self.last_info = _info_to_python(info)
        self._steps += 1
        success = bool(self.last_info['success'])
        # terminated = success (or a task's fail flag); truncated = max_episode_steps reached.
        self._done = bool(_to_numpy(terminated)) or bool(_to_numpy(truncated)) or success
        if not self._done and self._ood.after_step(self._env.unwrapped, self._steps):
            # A disturbance moved something: the policy must see the scene as it is now.
            raw = self._env.unwrapped.get_obs()
        return self._convert_obs(raw), success, self._done

    def render_frame(self) -> np.ndarray:
        """(render_size, render_size, 3) uint8 RGB of the side-view camera (needs render_size > 0)."""
        if not self.cfg.render_size:
            raise RuntimeError('render_frame() needs ManiSkillEnvConfig(render_size=...) > 0')
        return np.ascontiguousarray(_to_numpy(self._env.render()), dtype=np.uint8)

    def tcp_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """The tool centre point in the robot's base frame: position (3,) in m, quaternion (x, y, z, w)."""
        base = self._env.unwrapped
        pose = base.agent.robot.pose.inv() * base.agent.tcp.pose
        q = _to_numpy(pose.q).astype(np.float64)  # SAPIEN orders quaternions (w, x, y, z)
        return _to_numpy(pose.p).astype(np.float64), np.array([q[1], q[2], q[3], q[0]])

    def to_joint_units(self, actions: np.ndarray) -> np.ndarray:
        """ManiSkill pd_joint_pos actions (..., action_dim) with [-1, 1] dims as this env's joint_units
        actions take them (e.g. planner demos for a joint-units policy)."""
        out = np.array(actions, dtype=np.float32, copy=True)
        for i, lower, upper in self._unit_dims:
            out[..., i] = lower + (np.clip(out[..., i], -1.0, 1.0) + 1.0) * 0.5 * (upper - lower)
        return out

    def action_joints(self) -> list[tuple[str, float | None, float | None]]:
        """Per action dim of a joint-position control mode: (the joint it drives, and the joint range
        mapped onto [-1, 1] if the controller normalizes its action, else None, None). A mimic
        controller (the gripper's fingers) is one dim, named after its first joint."""
        out = []
        for controller in self._env.unwrapped.agent.controller.controllers.values():
            cfg, dims = controller.config, int(controller.single_action_space.shape[0])
            normalized = bool(getattr(cfg, 'normalize_action', False))
            for name in list(cfg.joint_names)[:dims]:
                out.append((name, float(cfg.lower), float(cfg.upper)) if normalized else (name, None, None))
        if len(out) != self.action_dim:
            raise ValueError(f'{self.cfg.control_mode}: {len(out)} controller joints for {self.action_dim} action dims')
        return out
