"""The safety checks between any command source (policy, teleop) and the arm's controllers.

SafetyFilter is fed the measured joint state, the end-effector pose and the e-stop state, and
passes each proposed command through, modified (clipped) or not at all. It works on explicit
times (seconds, any monotonic clock), so it is unit-tested without ROS. Every change it makes
is an Intervention, which the safety_layer node logs and publishes as diagnostics.

Checks, in order:
- emergency stop: while engaged nothing passes; engaging it holds the arm.
- fresh data: a command needs a joint state (and, with a workspace box, a pose) younger than
  its timeout; stale data holds the arm.
- per-dimension limits: joint position limits; per-axis twist limits.
- joint speed: each trajectory point may move a joint at most max_velocity · Δt (and at most
  max_joint_step) from the previous point, the first point from the measured position.
- workspace box for the end effector (pose topic frame). Twists are clipped so the end effector
  stays in the box for `workspace_lookahead_s`, and never move further out along an axis where
  it is outside. Joint commands cannot be predicted in Cartesian space without the arm's
  kinematics, so the filter acts on the measured pose: leaving the box (or moving further out)
  holds the arm, and while outside only joint commands that move back toward the last
  configuration measured inside the box pass.
- rate limit on forwarded commands.
- watchdog (`watchdog()`, called periodically): no forwarded command for command_timeout_s, or
  stale joint state / pose, while the arm was being commanded -> hold.
A hold is one command: the measured position for joint control, a zero twist for servo control.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stepnft_ros.control.adapters import JointCommand, TwistCommand

OK, WARN, ERROR = 'ok', 'warn', 'error'


@dataclass(frozen=True)
class Intervention:
    kind: str      # e.g. position_limit, velocity_limit, workspace, watchdog, emergency_stop
    message: str
    level: str = WARN
    values: dict[str, str] = field(default_factory=dict)


@dataclass
class Verdict:
    """What to do with one input: forward `command` (None: drop it); publish a hold if `hold`."""

    command: JointCommand | TwistCommand | None = None
    interventions: list[Intervention] = field(default_factory=list)
    hold: bool = False


def _vector(value, n: int, fill: float, label: str) -> np.ndarray:
    if value is None or (hasattr(value, '__len__') and len(value) == 0):
        return np.full(n, fill)
    out = np.asarray(value, dtype=np.float64).reshape(-1)
    if out.size == 1:
        out = np.full(n, float(out[0]))
    if out.shape != (n,):
        raise ValueError(f'{label} must have {n} values (or one for all), got {out.size}')
    if np.isnan(out).any():
        raise ValueError(f'{label} contains NaN')
    return out


@dataclass(frozen=True)
class SafetyConfig:
    joint_names: tuple[str, ...] = ()
    """Joints the filter knows; joint commands may only name these. Empty: twist control only."""
    position_lower: Sequence[float] | None = None
    position_upper: Sequence[float] | None = None
    max_velocity: Sequence[float] | None = None
    """rad/s (or m/s for prismatic joints), per joint."""
    max_joint_step: float = float('inf')
    """Largest change of any joint between consecutive trajectory points."""
    max_linear: Sequence[float] | None = None
    """|twist.linear| per axis, m/s."""
    max_angular: Sequence[float] | None = None
    workspace_lower: Sequence[float] | None = None
    """End-effector box (x, y, z) in the pose topic's frame; None: no workspace check."""
    workspace_upper: Sequence[float] | None = None
    workspace_lookahead_s: float = 0.1
    command_timeout_s: float = 0.5
    joint_state_timeout_s: float = 0.5
    pose_timeout_s: float = 0.5
    max_rate_hz: float = 0.0
    """Largest rate of forwarded commands (0: no limit)."""
    hold_time_s: float = 0.1
    """time_from_start of a joint hold command."""

    def __post_init__(self) -> None:
        n = len(self.joint_names)
        if len(set(self.joint_names)) != n:
            raise ValueError(f'joint_names has duplicates: {list(self.joint_names)}')
        object.__setattr__(self, 'joint_names', tuple(self.joint_names))
        inf = float('inf')
        for label, fill, size in (('position_lower', -inf, n), ('position_upper', inf, n), ('max_velocity', inf, n),
                                  ('max_linear', inf, 3), ('max_angular', inf, 3)):
            object.__setattr__(self, label, _vector(getattr(self, label), size, fill, label))
        if np.any(self.position_lower > self.position_upper):
            raise ValueError('position_lower must not exceed position_upper')
        if np.any(self.max_velocity <= 0) or np.any(self.max_linear < 0) or np.any(self.max_angular < 0):
            raise ValueError('velocity limits must be positive')
        if self.max_joint_step <= 0:
            raise ValueError(f'max_joint_step must be > 0, got {self.max_joint_step}')
        box = [self.workspace_lower, self.workspace_upper]
        if any(b is not None and len(b) for b in box):
            lo = _vector(self.workspace_lower, 3, np.nan, 'workspace_lower')
            hi = _vector(self.workspace_upper, 3, np.nan, 'workspace_upper')
            if not np.all(lo < hi):
                raise ValueError(f'workspace box needs lower < upper on every axis, got {lo} / {hi}')
            object.__setattr__(self, 'workspace_lower', lo)
            object.__setattr__(self, 'workspace_upper', hi)
        else:
            object.__setattr__(self, 'workspace_lower', None)
            object.__setattr__(self, 'workspace_upper', None)
        for label in ('workspace_lookahead_s', 'command_timeout_s', 'joint_state_timeout_s', 'pose_timeout_s',
                      'hold_time_s'):
            if getattr(self, label) <= 0:
                raise ValueError(f'{label} must be > 0, got {getattr(self, label)}')
        if self.max_rate_hz < 0:
            raise ValueError(f'max_rate_hz must be >= 0, got {self.max_rate_hz}')

    @property
    def has_workspace(self) -> bool:
        return self.workspace_lower is not None


def _fmt(values: np.ndarray) -> str:
    return '[' + ', '.join(f'{v:.4g}' for v in np.asarray(values).reshape(-1)) + ']'


class SafetyFilter:
    def __init__(self, cfg: SafetyConfig) -> None:
        self.cfg = cfg
        self._index = {n: i for i, n in enumerate(cfg.joint_names)}
        n = len(cfg.joint_names)
        self.q = np.full(n, np.nan)            # measured joint positions (NaN: never heard)
        self.q_time = np.full(n, -np.inf)
        self.pose: np.ndarray | None = None    # measured end-effector position
        self.pose_frame = ''
        self.pose_time = -np.inf
        self.outside = 0.0                     # distance of the end effector outside the box
        self.q_inside: np.ndarray | None = None  # last joint configuration measured inside the box
        self.estop = False
        self.holding = True                    # no command forwarded since start or the last hold
        self.last_forward = -np.inf
        self.active_kind: str | None = None    # 'joint' or 'twist': what the last forwarded command was
        self.twist_frame = ''

    # ---- measurements ----------------------------------------------------------------------

    def update_joint_state(self, names: Sequence[str], positions: np.ndarray, now: float) -> list[Intervention]:
        positions = np.asarray(positions, dtype=np.float64).reshape(-1)
        if len(names) != positions.size:
            return [Intervention('bad_joint_state', f'{len(names)} names but {positions.size} positions')]
        known = [(self._index[name], float(p)) for name, p in zip(names, positions, strict=True) if name in self._index]
        if not all(np.isfinite(p) for _, p in known):
            return [Intervention('bad_joint_state', 'joint state with non-finite positions ignored')]
        for i, p in known:
            self.q[i], self.q_time[i] = p, now
        return []

    def update_pose(self, position: np.ndarray, frame_id: str, now: float) -> Verdict:
        position = np.asarray(position, dtype=np.float64).reshape(-1)
        if position.shape != (3,) or not np.all(np.isfinite(position)):
            return Verdict(interventions=[Intervention('bad_pose', f'end-effector pose {position} ignored')])
        self.pose, self.pose_frame, self.pose_time = position, frame_id, now
        if not self.cfg.has_workspace:
            return Verdict()
        before, self.outside = self.outside, self._outside(position)
        if self.outside <= 0:
            if self._q_fresh(now):
                self.q_inside = self.q.copy()
            return Verdict()
        if self.holding or self.outside <= before + 1e-4:
            return Verdict()
        what = 'left' if before <= 0 else 'moved further outside'
        return self._hold(Intervention('workspace', f'end effector {what} the workspace box: at {_fmt(position)}, '
                                       f'{self.outside:.3f} m outside; holding', ERROR,
                                       {'position': _fmt(position), 'outside_m': f'{self.outside:.4f}'}))

    def set_estop(self, engaged: bool, now: float) -> Verdict:
        if engaged == self.estop:
            return Verdict()
        self.estop = engaged
        if engaged:
            return self._hold(Intervention('emergency_stop', 'emergency stop ENGAGED: holding, nothing moves '
                                           'until it is cleared', ERROR))
        return Verdict(interventions=[Intervention('emergency_stop', 'emergency stop cleared', OK)])

    # ---- commands --------------------------------------------------------------------------

    def filter_joint(self, cmd: JointCommand, now: float) -> Verdict:
        early = self._common_checks(now, needs_joints=True)
        if early is not None:
            return early
        unknown = [n for n in cmd.names if n not in self._index]
        if unknown:
            return self._reject('unknown_joint', f'command names joints the safety layer does not know: {unknown[:8]}')
        idx = np.array([self._index[n] for n in cmd.names])
        if not np.all(np.isfinite(cmd.positions)) or not np.all(np.isfinite(cmd.times)):
            return self._reject('non_finite', 'command contains non-finite values')
        if cmd.times[0] <= 0 or np.any(np.diff(cmd.times) <= 0):
            return self._reject('bad_timing', f'time_from_start must increase from > 0, got {_fmt(cmd.times)}')
        if np.any(np.isnan(self.q[idx])) or np.any(now - self.q_time[idx] > self.cfg.joint_state_timeout_s):
            return self._stale_hold('joint_state', f'no fresh joint state for {list(cmd.names)}')
        interventions = []
        targets = cmd.positions.copy()
        lo, hi = self.cfg.position_lower[idx], self.cfg.position_upper[idx]
        clipped = np.clip(targets, lo, hi)
        if not np.array_equal(clipped, targets):
            bad = sorted({cmd.names[j] for j in np.flatnonzero(np.any(clipped != targets, axis=0))})
            interventions.append(Intervention('position_limit', f'joint targets clipped to position limits: {bad}',
                                              values={'joints': ','.join(bad)}))
            targets = clipped
        previous, t_prev, limited = self.q[idx].copy(), 0.0, set()
        for p in range(targets.shape[0]):
            step = np.minimum(self.cfg.max_velocity[idx] * (cmd.times[p] - t_prev), self.cfg.max_joint_step)
            limited_target = np.clip(targets[p], previous - step, previous + step)
            limited.update(cmd.names[j] for j in np.flatnonzero(limited_target != targets[p]))
            targets[p], previous, t_prev = limited_target, limited_target, cmd.times[p]
        if limited:
            interventions.append(Intervention('velocity_limit', f'joint motion slowed to the velocity/step limits: '
                                              f'{sorted(limited)}', values={'joints': ','.join(sorted(limited))}))
        if self.cfg.has_workspace and self.outside > 0:
            home = None if self.q_inside is None else self.q_inside[idx]
            if home is None or np.linalg.norm(targets[-1] - home) >= np.linalg.norm(self.q[idx] - home):
                return self._hold(Intervention('workspace', f'end effector {self.outside:.3f} m outside the workspace '
                                               'box; only commands back toward the last pose inside it pass', ERROR),
                                  interventions)
        return self._forward(JointCommand(cmd.names, targets, cmd.times), 'joint', now, interventions)

    def filter_twist(self, cmd: TwistCommand, now: float) -> Verdict:
        early = self._common_checks(now, needs_joints=len(self.cfg.joint_names) > 0)
        if early is not None:
            return early
        if not (np.all(np.isfinite(cmd.linear)) and np.all(np.isfinite(cmd.angular))):
            return self._reject('non_finite', 'twist contains non-finite values')
        interventions = []
        linear = np.clip(cmd.linear, -self.cfg.max_linear, self.cfg.max_linear)
        angular = np.clip(cmd.angular, -self.cfg.max_angular, self.cfg.max_angular)
        if not (np.array_equal(linear, cmd.linear) and np.array_equal(angular, cmd.angular)):
            interventions.append(Intervention('twist_limit', f'twist clipped: linear {_fmt(cmd.linear)} -> '
                                              f'{_fmt(linear)}, angular {_fmt(cmd.angular)} -> {_fmt(angular)}'))
        if self.cfg.has_workspace:
            if self.pose_frame and cmd.frame_id != self.pose_frame:
                return self._reject('frame_mismatch', f'twist in frame {cmd.frame_id!r} but the workspace box is in '
                                    f'{self.pose_frame!r}: cannot check it', interventions)
            lo, hi, p = self.cfg.workspace_lower, self.cfg.workspace_upper, self.pose
            dt = self.cfg.workspace_lookahead_s
            # Per axis: never further out; from inside, at most up to the wall within the lookahead.
            bounded = np.where(p < lo, np.maximum(linear, 0.0), np.where(p > hi, np.minimum(linear, 0.0), linear))
            inside = (p >= lo) & (p <= hi)
            bounded = np.where(inside, np.clip(bounded, (lo - p) / dt, (hi - p) / dt), bounded)
            if not np.array_equal(bounded, linear):
                interventions.append(Intervention('workspace', f'twist limited at the workspace box: linear '
                                                  f'{_fmt(linear)} -> {_fmt(bounded)} at {_fmt(p)}'))
                linear = bounded
        return self._forward(TwistCommand(cmd.frame_id, linear, angular), 'twist', now, interventions)

    def watchdog(self, now: float) -> Verdict:
        """Call periodically: holds an arm whose commands or measurements stopped arriving."""
        if self.holding or self.estop:
            return Verdict()
        if now - self.last_forward > self.cfg.command_timeout_s:
            return self._hold(Intervention('watchdog', f'no command for {self.cfg.command_timeout_s:g} s: holding'))
        if self.active_kind == 'joint' or len(self.cfg.joint_names):
            if np.any(now - self.q_time > self.cfg.joint_state_timeout_s):
                return self._stale_hold('joint_state', 'joint states stopped arriving')
        if self.cfg.has_workspace and now - self.pose_time > self.cfg.pose_timeout_s:
            return self._stale_hold('pose', 'end-effector poses stopped arriving')
        return Verdict()

    # ---- holds -----------------------------------------------------------------------------

    def hold_joint(self) -> JointCommand | None:
        """The measured position of every known joint (None until all have been measured)."""
        if not len(self.cfg.joint_names) or np.any(np.isnan(self.q)):
            return None
        return JointCommand(self.cfg.joint_names, self.q[None].copy(), np.array([self.cfg.hold_time_s]))

    def hold_twist(self) -> TwistCommand:
        return TwistCommand(self.twist_frame, np.zeros(3), np.zeros(3))

    # ---- internals -------------------------------------------------------------------------

    def _common_checks(self, now: float, needs_joints: bool) -> Verdict | None:
        if self.estop:
            return self._reject('emergency_stop', 'command dropped: emergency stop engaged', level=ERROR)
        if needs_joints and (np.any(np.isnan(self.q)) or np.any(now - self.q_time > self.cfg.joint_state_timeout_s)):
            return self._stale_hold('joint_state', 'no fresh joint state')
        if self.cfg.has_workspace and (self.pose is None or now - self.pose_time > self.cfg.pose_timeout_s):
            return self._stale_hold('pose', 'no fresh end-effector pose')
        if self.cfg.max_rate_hz > 0 and now - self.last_forward < 1.0 / self.cfg.max_rate_hz:
            return self._reject('rate_limit', f'command dropped: more than max_rate_hz={self.cfg.max_rate_hz:g}')
        return None

    def _stale_hold(self, what: str, message: str) -> Verdict:
        timeout = self.cfg.pose_timeout_s if what == 'pose' else self.cfg.joint_state_timeout_s
        intervention = Intervention('stale_' + what, f'{message} (timeout {timeout:g} s): holding', ERROR)
        if self.holding:
            return Verdict(interventions=[intervention])
        return self._hold(intervention)

    def _hold(self, intervention: Intervention, earlier: list[Intervention] | None = None) -> Verdict:
        self.holding = True
        return Verdict(interventions=[*(earlier or []), intervention], hold=self.active_kind is not None)

    @staticmethod
    def _reject(kind: str, message: str, earlier: list[Intervention] | None = None, level: str = WARN) -> Verdict:
        return Verdict(interventions=[*(earlier or []), Intervention(kind, message, level)])

    def _forward(self, command, kind: str, now: float, interventions: list[Intervention]) -> Verdict:
        self.holding = False
        self.last_forward = now
        self.active_kind = kind
        if kind == 'twist':
            self.twist_frame = command.frame_id
        return Verdict(command=command, interventions=interventions)

    def _q_fresh(self, now: float) -> bool:
        return bool(np.all(now - self.q_time <= self.cfg.joint_state_timeout_s))

    def _outside(self, p: np.ndarray) -> float:
        below = np.maximum(self.cfg.workspace_lower - p, 0.0)
        above = np.maximum(p - self.cfg.workspace_upper, 0.0)
        return float(np.linalg.norm(below + above))
