"""Command adapters: one policy action -> one controller command (plain numpy; ros_io_arm makes messages).

- JointTrajectoryAdapter: joint-space actions for ros2_control's joint_trajectory_controller.
  Each action dim is one joint (`joint_names`, in action order); `targets='absolute'` takes
  the action as joint positions, `'delta'` adds it to the measured positions (joints listed in
  `absolute_joints`, e.g. a gripper, stay absolute). The point is due one control period later.
- TwistAdapter: end-effector delta actions (dx, dy, dz, droll, dpitch, dyaw, ...) for
  servo-style controllers: twist = scale · action in `frame_id`. Dims past the sixth (a
  gripper) are not part of a twist and are returned separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class JointCommand:
    """A joint trajectory: positions (P, N) for `names`, reached at `times` (P,) s after receipt."""

    names: tuple[str, ...]
    positions: np.ndarray
    times: np.ndarray

    def __post_init__(self) -> None:
        positions = np.atleast_2d(np.asarray(self.positions, dtype=np.float64))
        times = np.atleast_1d(np.asarray(self.times, dtype=np.float64))
        if positions.shape[1:] != (len(self.names),) or times.shape != (positions.shape[0],):
            raise ValueError(f'joint command: {len(self.names)} names, positions {positions.shape}, '
                             f'times {times.shape} do not fit together')
        object.__setattr__(self, 'positions', positions)
        object.__setattr__(self, 'times', times)


@dataclass(frozen=True)
class TwistCommand:
    frame_id: str
    linear: np.ndarray   # (3,) m/s
    angular: np.ndarray  # (3,) rad/s

    def __post_init__(self) -> None:
        for label in ('linear', 'angular'):
            value = np.asarray(getattr(self, label), dtype=np.float64).reshape(-1)
            if value.shape != (3,):
                raise ValueError(f'twist {label} must have 3 components, got {value.shape}')
            object.__setattr__(self, label, value)


def _check_action(action: np.ndarray, dim: int) -> np.ndarray:
    action = np.asarray(action, dtype=np.float64).reshape(-1)
    if action.shape != (dim,):
        raise ValueError(f'action has {action.size} dims, the adapter expects {dim}')
    if not np.all(np.isfinite(action)):
        raise ValueError(f'action contains non-finite values: {action}')
    return action


class JointTrajectoryAdapter:
    def __init__(self, joint_names: Sequence[str], control_period: float, targets: str = 'absolute',
                 absolute_joints: Sequence[str] = ()) -> None:
        if not joint_names or len(set(joint_names)) != len(joint_names):
            raise ValueError(f'joint_names must list distinct joints, got {list(joint_names)}')
        if targets not in ('absolute', 'delta'):
            raise ValueError(f"joint targets must be 'absolute' or 'delta', got {targets!r}")
        unknown = sorted(set(absolute_joints) - set(joint_names))
        if unknown:
            raise ValueError(f'absolute_joints {unknown} are not in joint_names')
        if control_period <= 0:
            raise ValueError(f'control_period must be > 0, got {control_period}')
        self.joint_names = tuple(joint_names)
        self.control_period = float(control_period)
        self.targets = targets
        self._delta = np.array([targets == 'delta' and n not in absolute_joints for n in joint_names])

    @property
    def action_dim(self) -> int:
        return len(self.joint_names)

    def command(self, action: np.ndarray, measured: np.ndarray | None = None) -> JointCommand:
        """`measured`: the joints' positions in `joint_names` order (needed for delta targets)."""
        target = _check_action(action, self.action_dim)
        if self._delta.any():
            if measured is None:
                raise ValueError('delta joint targets need the measured joint positions')
            target = np.where(self._delta, np.asarray(measured, dtype=np.float64) + target, target)
        return JointCommand(self.joint_names, target[None], np.array([self.control_period]))

    def action_of(self, target: np.ndarray, measured: np.ndarray | None = None) -> np.ndarray:
        """The inverse of `command`: joint targets (in `joint_names` order, e.g. a person's teleop
        command) -> the action that would have commanded them (delta dims: target − measured)."""
        action = _check_action(target, self.action_dim)
        if self._delta.any():
            if measured is None:
                raise ValueError('delta joint targets need the measured joint positions')
            action = np.where(self._delta, action - np.asarray(measured, dtype=np.float64), action)
        return action


class TwistAdapter:
    def __init__(self, action_dim: int, frame_id: str, linear_scale: float = 1.0, angular_scale: float = 1.0) -> None:
        if action_dim < 6:
            raise ValueError(f'an end-effector twist needs 6 action dims (dx dy dz droll dpitch dyaw), '
                             f'got {action_dim}')
        if not frame_id:
            raise ValueError('a twist needs a frame_id (the frame the deltas are expressed in)')
        self.action_dim = action_dim
        self.frame_id = frame_id
        self.linear_scale = float(linear_scale)
        self.angular_scale = float(angular_scale)

    def command(self, action: np.ndarray) -> tuple[TwistCommand, np.ndarray]:
        """(twist, the remaining dims after the sixth, e.g. the gripper)."""
        action = _check_action(action, self.action_dim)
        return (TwistCommand(self.frame_id, action[:3] * self.linear_scale, action[3:6] * self.angular_scale),
                action[6:].copy())

    def action_of(self, twist: np.ndarray) -> np.ndarray:
        """The inverse of `command`: a twist (linear, angular; 6 values) -> the action that would have
        commanded it. Dims past the sixth are not part of a twist: 0 (this adapter never sends them)."""
        twist = _check_action(twist, 6)
        if not (self.linear_scale and self.angular_scale):
            raise ValueError('a twist scale of 0 has no inverse')
        action = np.zeros(self.action_dim)
        action[:3] = twist[:3] / self.linear_scale
        action[3:6] = twist[3:6] / self.angular_scale
        return action
