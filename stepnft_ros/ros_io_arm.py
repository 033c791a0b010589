"""Message conversions of the real-arm path (arm_bridge, safety_layer, standin_arm).

A sibling of ros_io.py (topic names and QoS stay there): commands, end-effector poses and
diagnostics to and from the plain types of stepnft_ros.control.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped, TwistStamped
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from stepnft_ros.control import Intervention, JointCommand, TwistCommand
from stepnft_ros.control.safety import ERROR, OK, WARN
from stepnft_ros.policy.types import ObservationError
from stepnft_ros.ros_io import duration_to_seconds, ns_to_stamp, seconds_to_duration, stamp_to_ns


def joint_trajectory_to_command(msg: JointTrajectory) -> JointCommand:
    """JointTrajectory (positions only are used) -> JointCommand; ObservationError if unusable."""
    if not msg.joint_names:
        raise ObservationError('joint trajectory names no joints')
    if len(set(msg.joint_names)) != len(msg.joint_names):
        raise ObservationError(f'joint trajectory names a joint twice: {list(msg.joint_names)}')
    if not msg.points:
        raise ObservationError('joint trajectory has no points')
    n = len(msg.joint_names)
    if any(len(p.positions) != n for p in msg.points):
        raise ObservationError(f'every trajectory point needs {n} positions, got '
                               f'{sorted({len(p.positions) for p in msg.points})}')
    return JointCommand(tuple(msg.joint_names), np.array([list(p.positions) for p in msg.points], dtype=np.float64),
                        np.array([duration_to_seconds(p.time_from_start) for p in msg.points]))


def command_to_joint_trajectory(cmd: JointCommand, stamp_ns: int = 0) -> JointTrajectory:
    """stamp 0 (the default) tells joint_trajectory_controller to start on receipt."""
    msg = JointTrajectory(joint_names=list(cmd.names))
    msg.header.stamp = ns_to_stamp(stamp_ns)
    for positions, t in zip(cmd.positions, cmd.times, strict=True):
        msg.points.append(JointTrajectoryPoint(positions=[float(v) for v in positions],
                                               time_from_start=seconds_to_duration(float(t))))
    return msg


def twist_to_command(msg: TwistStamped) -> TwistCommand:
    lin, ang = msg.twist.linear, msg.twist.angular
    return TwistCommand(msg.header.frame_id, np.array([lin.x, lin.y, lin.z]), np.array([ang.x, ang.y, ang.z]))


def command_to_twist(cmd: TwistCommand, stamp_ns: int) -> TwistStamped:
    msg = TwistStamped()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = cmd.frame_id
    msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (float(v) for v in cmd.linear)
    msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = (float(v) for v in cmd.angular)
    return msg


def pose_to_position(msg: PoseStamped) -> tuple[np.ndarray, str, int]:
    """(position (3,), frame_id, stamp_ns) of a PoseStamped."""
    p = msg.pose.position
    return np.array([p.x, p.y, p.z], dtype=np.float64), msg.header.frame_id, stamp_to_ns(msg.header.stamp)


def position_to_pose(position: np.ndarray, quaternion_xyzw: np.ndarray, frame_id: str, stamp_ns: int) -> PoseStamped:
    msg = PoseStamped()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.header.frame_id = frame_id
    msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in position)
    o = msg.pose.orientation
    o.x, o.y, o.z, o.w = (float(v) for v in quaternion_xyzw)
    return msg


_LEVELS = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}


def interventions_to_diagnostics(source: str, interventions: Sequence[Intervention], stamp_ns: int,
                                 hardware_id: str = '') -> DiagnosticArray:
    """One DiagnosticStatus per intervention, named '<source>: <kind>'."""
    msg = DiagnosticArray()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    for i in interventions:
        msg.status.append(DiagnosticStatus(
            level=_LEVELS[i.level], name=f'{source}: {i.kind}', message=i.message[:500], hardware_id=hardware_id,
            values=[KeyValue(key=k, value=str(v)) for k, v in i.values.items()]))
    return msg
