"""The one place that converts ROS messages to and from numpy, and that names topics and QoS.

Nodes call these helpers and never touch message fields themselves. Conversions raise
ObservationError (a ValueError) with a message fit for a log line; nodes log it and carry on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from builtin_interfaces.msg import Duration, Time
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Int64, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from stepnft_ros import image_codec
from stepnft_ros.image_codec import is_compressed_topic  # noqa: F401  (nodes choose the message type)
from stepnft_ros.policy.types import Observation, ObservationError

# Topic names relative to a robot's namespace (the robot-facing contract, ARCHITECTURE.md).
JOINT_STATES = 'joint_states'
TASK_STATE = 'task_state'
INSTRUCTION = 'instruction'
ACTION_CHUNK = 'action_chunk'
# trajectory_msgs/JointTrajectory, optional: an answered chunk cut to the actions the robot executed
# (points keep their time_from_start), stamped like the chunk; the policy server records which ran.
EXECUTED_CHUNK = 'executed_chunk'
EPISODE_OUTCOME = 'episode_outcome'  # std_srvs/SetBool, true = success
RESET = 'reset'                      # std_srvs/Trigger
EPISODE_DISCARD = 'episode_discard'  # std_srvs/Trigger: drop the running episode's record (operator)
EPISODE_ACTIVE = 'episode_active'    # std_msgs/Bool, latched: the operator lets the arm act (real arms)
# std_msgs/Bool, latched: a person has taken the arm over (teleop into <ns>/safety/*); the arm bridge
# sends the policy nothing meanwhile, and the policy server records the span with the episode.
INTERVENTION_ACTIVE = 'intervention_active'
# While a person has the arm, the arm bridge sends what the person did as demonstrations, apart from
# the policy's topics (the policy is not asked): an observation (HUMAN_PREFIX + joint_states and
# camera/<cam>/image_raw, reliable QoS) and, stamped like it, HUMAN_ACTION_CHUNK (JointTrajectory):
# the person's next actions in the policy's action space. The policy server records the pairs.
HUMAN_PREFIX = 'human/'
HUMAN_ACTION_CHUNK = 'human/action_chunk'
# std_msgs/Int64, latched, optional (simulators): the reset seed of the episode about to start,
# published before every reset, also when it repeats; the policy server records it with that episode.
EPISODE_SEED = 'episode_seed'
EPISODE_SUMMARY = 'episode_summary'  # std_msgs/String JSON per finished sim episode (eval_recorder)
# The operator's controls and status (nodes/episode_operator.py), per robot namespace.
OPERATOR_START = 'operator/start'      # std_srvs/Trigger
OPERATOR_STOP = 'operator/stop'        # std_srvs/Trigger: the episode then awaits its label
OPERATOR_LABEL = 'operator/label'      # std_srvs/SetBool, true = success
OPERATOR_DISCARD = 'operator/discard'  # std_srvs/Trigger
OPERATOR_TAKEOVER = 'operator/takeover'    # std_srvs/Trigger: a person takes the arm over
OPERATOR_HAND_BACK = 'operator/hand_back'  # std_srvs/Trigger: ... and gives it back to the policy
OPERATOR_STATUS = 'operator/status'    # std_msgs/String JSON, latched: counts and success rate
# Real arms (nodes/arm_bridge.py -> nodes/safety_layer.py): proposed commands, checked before the arm.
SAFETY_JOINT_TRAJECTORY_IN = 'safety/joint_trajectory_in'  # trajectory_msgs/JointTrajectory
SAFETY_TWIST_IN = 'safety/twist_in'                        # geometry_msgs/TwistStamped
# Graph-wide topics.
EMERGENCY_STOP = '/emergency_stop'
POLICY_WEIGHTS = '/policy_weights'
EPISODE_WRITTEN = '/episode_written'
LEARNER_METRICS = '/learner/metrics'
LEARNER_SUCCESS_RATE = '/learner/success_rate'
DIAGNOSTICS = '/diagnostics'  # diagnostic_msgs/DiagnosticArray: the safety layer's interventions
CLOCK = '/clock'
EVALUATION_SUCCESS_RATE = '/evaluation/success_rate'  # std_msgs/Float32, per evaluated weights version
EVALUATION_RESULT = '/evaluation/result'              # std_msgs/String JSON, the eval_history.json record


def camera_topic(camera: str) -> str:
    return f'camera/{camera}/image_raw'


SENSOR_QOS = qos_profile_sensor_data  # best effort, shallow: a late camera frame is worthless
RELIABLE_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
HUMAN_QOS = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)  # a person's demonstrations: keep all
# Latched: late joiners get the last instruction / weights version / e-stop state.
LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST)
# Episode notifications must not be lost while the learner is busy updating.
EVENTS_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
# Episode summaries and scene outcomes: kept by the publisher, so a subscriber that discovers it late
# (a loaded machine, a recorder restarted) still receives every episode it has already reported.
SUMMARY_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST)
# The demo recorder: best effort matches reliable and best-effort publishers alike; deep, so a
# burst of camera frames waits rather than being dropped while a bag write is in progress.
RECORD_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT)

STATE_SOURCES = ('joint_position', 'joint_velocity', 'task_state')
"""Parts a policy's state vector can be assembled from, concatenated in the configured order."""


# ---- time ---------------------------------------------------------------------------------

def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def seconds_to_duration(seconds: float) -> Duration:
    """E.g. a trajectory point's time_from_start; rounded to whole nanoseconds."""
    sec, nanosec = divmod(int(round(seconds * 1e9)), 1_000_000_000)
    return Duration(sec=sec, nanosec=nanosec)


def duration_to_seconds(duration: Duration) -> float:
    return int(duration.sec) + int(duration.nanosec) * 1e-9


# ---- images -------------------------------------------------------------------------------

def image_to_numpy(msg: Image, expected_size: int | None) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8 or bgra8) -> (size, size, 3) uint8 RGB (any size if None)."""
    return image_codec.raw_to_rgb(msg, expected_size)


def compressed_image_to_numpy(msg: CompressedImage) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png) -> (h, w, 3) uint8 RGB."""
    return image_codec.compressed_to_rgb(msg)


def numpy_to_image(rgb: np.ndarray, stamp_ns: int, frame_id: str = '') -> Image:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'expected an (h, w, 3) RGB image, got shape {rgb.shape}')
    msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding='rgb8', is_bigendian=0,
                step=rgb.shape[1] * 3, data=rgb.tobytes())
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    return msg


# ---- joint states -------------------------------------------------------------------------

def joint_state_to_arrays(msg: JointState) -> tuple[np.ndarray, np.ndarray]:
    """JointState -> (position, velocity) float32; velocity is empty when not sent."""
    position = np.asarray(msg.position, dtype=np.float32)
    velocity = np.asarray(msg.velocity, dtype=np.float32)
    if msg.name and len(msg.name) != position.size:
        raise ObservationError(f'joint state names {len(msg.name)} joints but carries {position.size} positions')
    if velocity.size not in (0, position.size):
        raise ObservationError(f'joint state has {position.size} positions but {velocity.size} velocities')
    for label, values in (('position', position), ('velocity', velocity)):
        if not np.all(np.isfinite(values)):
            bad = [msg.name[i] if i < len(msg.name) else str(i) for i in np.flatnonzero(~np.isfinite(values))]
            raise ObservationError(f'joint state {label} is non-finite for {bad[:8]}')
    return position, velocity


def arrays_to_joint_state(names: Sequence[str], position: np.ndarray, velocity: np.ndarray | None,
                          stamp_ns: int) -> JointState:
    msg = JointState(name=list(names), position=np.asarray(position, dtype=np.float64).tolist(),
                     velocity=[] if velocity is None else np.asarray(velocity, dtype=np.float64).tolist())
    msg.header.stamp = ns_to_stamp(stamp_ns)
    return msg


# ---- action chunks ------------------------------------------------------------------------

def chunk_to_trajectory(chunk: np.ndarray, action_names: Sequence[str], stamp_ns: int,
                        control_period: float) -> JointTrajectory:
    """(H, D) chunk -> JointTrajectory: one point per action, stamped with the answered observation."""
    chunk = np.asarray(chunk, dtype=np.float64)
    if chunk.ndim != 2 or chunk.shape[1] != len(action_names):
        raise ValueError(f'chunk of shape {chunk.shape} does not match {len(action_names)} action names')
    msg = JointTrajectory(joint_names=list(action_names))
    msg.header.stamp = ns_to_stamp(stamp_ns)
    for i, action in enumerate(chunk):
        msg.points.append(JointTrajectoryPoint(positions=action.tolist(),
                                               time_from_start=seconds_to_duration((i + 1) * control_period)))
    return msg


def trajectory_to_chunk(msg: JointTrajectory, action_dim: int) -> tuple[int, np.ndarray]:
    """JointTrajectory -> (stamp_ns, (H, D) float32 chunk); ObservationError if unusable."""
    if not msg.points:
        raise ObservationError('action chunk has no points')
    rows = [np.asarray(p.positions, dtype=np.float32) for p in msg.points]
    if any(r.shape != (action_dim,) for r in rows):
        raise ObservationError(f'action chunk points must have {action_dim} positions, got '
                               f'{sorted({r.size for r in rows})}')
    chunk = np.stack(rows)
    if not np.all(np.isfinite(chunk)):
        raise ObservationError('action chunk contains non-finite values')
    return stamp_to_ns(msg.header.stamp), chunk


def executed_report(chunk: JointTrajectory, executed: int, first: int = 0) -> JointTrajectory:
    """What EXECUTED_CHUNK carries: the received chunk message cut to the `executed` points the robot ran,
    from point `first` on (0 points allowed). The points keep their time_from_start, which says where
    in the chunk they were."""
    if not (0 <= first and 0 <= executed and first + executed <= len(chunk.points)):
        raise ValueError(f'{executed} actions executed from action {first} of a chunk of {len(chunk.points)}')
    return JointTrajectory(header=chunk.header, joint_names=list(chunk.joint_names),
                           points=list(chunk.points[first:first + executed]))


def executed_range(msg: JointTrajectory, control_period: float) -> tuple[int, int, int]:
    """An EXECUTED_CHUNK report -> (stamp_ns of the answered observation, first executed action, actions
    executed). The first point's time_from_start, (i + 1)·control_period as chunk_to_trajectory wrote
    it, gives its index i."""
    first = 0
    if msg.points:
        first = max(0, round(duration_to_seconds(msg.points[0].time_from_start) / control_period) - 1)
    return stamp_to_ns(msg.header.stamp), first, len(msg.points)


# ---- messages as bytes ---------------------------------------------------------------------

def serialized(msg) -> tuple[str, bytes]:
    """(ROS type name, CDR bytes) of a message, as rosbag2 stores it: e.g. the robot's own messages
    that the policy server puts into episode bags."""
    from rclpy.serialization import serialize_message

    cls = type(msg)
    return f'{cls.__module__.split(".")[0]}/msg/{cls.__name__}', serialize_message(msg)


# ---- episode seeds ------------------------------------------------------------------------

def seed_to_msg(seed: int) -> Int64:
    return Int64(data=int(seed))


def msg_to_seed(msg: Int64) -> int:
    """An EPISODE_SEED message -> the seed; ObservationError if negative (episode bags store -1 as 'none')."""
    if msg.data < 0:
        raise ObservationError(f'episode seed must be >= 0, got {msg.data}')
    return int(msg.data)


# ---- weights announcements ----------------------------------------------------------------

@dataclass(frozen=True)
class WeightsAnnouncement:
    """What the learner publishes (latched) after writing a checkpoint."""

    version: int
    checkpoint: str
    final: bool = False
    """The learner stops after this version (max_updates reached)."""
    env_steps: int = 0
    """Env steps of the episodes the learner has trained on so far: a noise schedule's clock."""

    def to_msg(self) -> String:
        return String(data=json.dumps({'version': self.version, 'checkpoint': self.checkpoint, 'final': self.final,
                                       'env_steps': self.env_steps}))

    @staticmethod
    def from_msg(msg: String) -> WeightsAnnouncement:
        try:
            body = json.loads(msg.data)
            env_steps = int(body.get('env_steps', 0))  # absent from older learners' messages
            if env_steps < 0:
                raise ValueError(f'env_steps must be >= 0, got {env_steps}')
            return WeightsAnnouncement(version=int(body['version']), checkpoint=str(body['checkpoint']),
                                       final=bool(body.get('final', False)), env_steps=env_steps)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f'bad weights announcement {msg.data[:200]!r}: {err}') from None


# ---- observation assembly -----------------------------------------------------------------

@dataclass
class _Partial:
    state_parts: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)


class ObservationAssembler:
    """Joins one robot's observation messages that share a header stamp into an Observation.

    The state is the concatenation of `state_sources` (joint positions, joint velocities, task
    state); images come from `camera_names`. The instruction is latched and applies to every
    observation. A part with a bad payload raises ObservationError; partial observations older
    than the newest completed one are discarded.
    """

    def __init__(self, state_sources: Sequence[str], camera_names: Sequence[str], image_size: int,
                 require_instruction: bool = False, max_pending: int = 8) -> None:
        unknown = [s for s in state_sources if s not in STATE_SOURCES]
        if unknown:
            raise ValueError(f'unknown state sources {unknown}; choose from {STATE_SOURCES}')
        self.state_sources = tuple(state_sources)
        self.camera_names = tuple(camera_names)
        self.image_size = image_size
        self.require_instruction = require_instruction
        self.max_pending = max_pending
        self.instruction: str | None = None
        self._pending: dict[int, _Partial] = {}
        self.newest_complete_ns = -1

    def set_instruction(self, text: str) -> None:
        self.instruction = text

    def restart(self) -> None:
        """Forget partial observations and the stamp order: the robot restarted (its clock may start over)."""
        self._pending.clear()
        self.newest_complete_ns = -1

    def add_joint_state(self, msg: JointState) -> tuple[int, Observation] | None:
        position, velocity = joint_state_to_arrays(msg)
        parts = {}
        if 'joint_position' in self.state_sources:
            parts['joint_position'] = position
        if 'joint_velocity' in self.state_sources:
            if velocity.size == 0:
                raise ObservationError('joint state has no velocities but the policy state uses them')
            parts['joint_velocity'] = velocity
        return self._add(stamp_to_ns(msg.header.stamp), parts, {})

    def add_task_state(self, msg: JointState) -> tuple[int, Observation] | None:
        values, _ = joint_state_to_arrays(msg)
        return self._add(stamp_to_ns(msg.header.stamp), {'task_state': values}, {})

    def add_image(self, camera: str, msg: Image) -> tuple[int, Observation] | None:
        try:
            rgb = image_to_numpy(msg, self.image_size)
        except ObservationError as err:
            raise ObservationError(f'camera {camera!r}: {err}') from None
        return self._add(stamp_to_ns(msg.header.stamp), {}, {camera: rgb})

    def _add(self, stamp_ns: int, state_parts: Mapping[str, np.ndarray],
             images: Mapping[str, np.ndarray]) -> tuple[int, Observation] | None:
        if stamp_ns <= self.newest_complete_ns:
            raise ObservationError(f'observation part stamped {stamp_ns} ns is not newer than the last '
                                   f'complete observation ({self.newest_complete_ns} ns): stale')
        partial = self._pending.setdefault(stamp_ns, _Partial())
        partial.state_parts.update(state_parts)
        partial.images.update(images)
        if len(self._pending) > self.max_pending:  # parts that never completed (e.g. a dropped frame)
            del self._pending[min(self._pending)]
        if (all(s in partial.state_parts for s in self.state_sources)
                and all(c in partial.images for c in self.camera_names)):
            if self.require_instruction and self.instruction is None:
                raise ObservationError(f'no instruction received yet on {INSTRUCTION!r}: the policy needs one')
            del self._pending[stamp_ns]
            for older in [s for s in self._pending if s < stamp_ns]:
                del self._pending[older]
            self.newest_complete_ns = stamp_ns
            state = (np.concatenate([partial.state_parts[s] for s in self.state_sources])
                     if self.state_sources else None)
            return stamp_ns, Observation(state=state, images=dict(partial.images),
                                         instruction=self.instruction or '')
        return None
