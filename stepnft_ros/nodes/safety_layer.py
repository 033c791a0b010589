"""safety_layer: the last hop before the arm; every command, from the policy or teleop, passes here.

In its namespace <ns>:
  in   safety/joint_trajectory_in (trajectory_msgs/JointTrajectory), safety/twist_in
       (geometry_msgs/TwistStamped): proposed commands
       `joint_states_topic` (sensor_msgs/JointState), `ee_pose_topic` (geometry_msgs/PoseStamped,
       optional: needed for the workspace box), /emergency_stop (std_msgs/Bool, latched)
  out  `joint_trajectory_topic` and `twist_topic`: the controllers' command topics
       /diagnostics (diagnostic_msgs/DiagnosticArray): one status per intervention
The checks are stepnft_ros.control.safety.SafetyFilter (limits, workspace box, velocity, e-stop,
watchdog, rate limit). Freshness is judged by arrival time on this host's monotonic clock, so
a driver's clock offset cannot make stale data look fresh.
"""

from __future__ import annotations

import time

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, TwistStamped
from std_msgs.msg import Bool

from stepnft_ros import ros_io, ros_io_arm
from stepnft_ros.control import SafetyConfig, SafetyFilter
from stepnft_ros.control.safety import ERROR, OK, Verdict
from stepnft_ros.nodes.common import ConfigError, ManagedNode, Params, run_node
from stepnft_ros.policy.types import ObservationError


class SafetyLayer(ManagedNode):
    def __init__(self) -> None:
        super().__init__('safety_layer')
        p = Params(self)
        max_step = p.get('max_joint_step', 0.0)
        try:
            self.cfg = SafetyConfig(
                joint_names=tuple(p.get('joint_names', [])),
                position_lower=p.number_list('position_lower'),
                position_upper=p.number_list('position_upper'),
                max_velocity=p.number_list('max_velocity'),
                max_joint_step=max_step if max_step > 0 else float('inf'),
                max_linear=p.number_list('max_linear'), max_angular=p.number_list('max_angular'),
                workspace_lower=p.number_list('workspace_lower'),
                workspace_upper=p.number_list('workspace_upper'),
                workspace_lookahead_s=p.get('workspace_lookahead_s', 0.1),
                command_timeout_s=p.get('command_timeout_s', 0.5),
                joint_state_timeout_s=p.get('joint_state_timeout_s', 0.5),
                pose_timeout_s=p.get('pose_timeout_s', 0.5), max_rate_hz=p.get('max_rate_hz', 100.0),
                hold_time_s=p.get('hold_time_s', 0.1))
        except ValueError as err:
            raise ConfigError(f'safety limits: {err}') from None
        joint_states_topic = p.get('joint_states_topic', '/joint_states')
        ee_pose_topic = p.get('ee_pose_topic', '')
        self.log_throttle_s = p.get('log_throttle_s', 1.0)
        if self.cfg.has_workspace and not ee_pose_topic:
            raise ConfigError("parameter 'ee_pose_topic' is required with a workspace box (workspace_lower/upper)")
        self.filter = SafetyFilter(self.cfg)
        self.joint_out = self.create_publisher(ros_io.JointTrajectory, p.get(
            'joint_trajectory_topic', '/joint_trajectory_controller/joint_trajectory'), ros_io.RELIABLE_QOS)
        self.twist_out = self.create_publisher(TwistStamped, p.get('twist_topic', '/servo_node/delta_twist_cmds'),
                                               ros_io.RELIABLE_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, ros_io.DIAGNOSTICS, ros_io.RELIABLE_QOS)
        self.create_subscription(ros_io.JointTrajectory, ros_io.SAFETY_JOINT_TRAJECTORY_IN, self._on_joint_cmd,
                                 ros_io.RELIABLE_QOS)
        self.create_subscription(TwistStamped, ros_io.SAFETY_TWIST_IN, self._on_twist_cmd, ros_io.RELIABLE_QOS)
        self.create_subscription(ros_io.JointState, joint_states_topic, self._on_joint_state, ros_io.SENSOR_QOS)
        if ee_pose_topic:
            self.create_subscription(PoseStamped, ee_pose_topic, self._on_pose, ros_io.SENSOR_QOS)
        self.create_subscription(Bool, ros_io.EMERGENCY_STOP, self._on_estop, ros_io.LATCHED_QOS)
        self.create_timer(p.get('watchdog_period_s', 0.05), self._on_watchdog)
        self.forwarded = 0
        self._logged: dict[tuple[str, str], float] = {}
        self.get_logger().info(
            f'guarding {len(self.cfg.joint_names)} joints {list(self.cfg.joint_names)}, '
            f'workspace {self._box()}; '
            f'out: {self.joint_out.topic_name}, {self.twist_out.topic_name}')
        self.start_lifecycle(p.get('managed', False))

    def _box(self) -> str:
        if not self.cfg.has_workspace:
            return 'off'
        return f'{self.cfg.workspace_lower.tolist()} .. {self.cfg.workspace_upper.tolist()}'

    @staticmethod
    def _now() -> float:
        return time.monotonic()

    def _on_joint_state(self, msg: ros_io.JointState) -> None:
        self._apply(Verdict(interventions=self.filter.update_joint_state(msg.name, msg.position, self._now())))

    def _on_pose(self, msg: PoseStamped) -> None:
        position, frame_id, _ = ros_io_arm.pose_to_position(msg)
        self._apply(self.filter.update_pose(position, frame_id, self._now()))

    def _on_estop(self, msg: Bool) -> None:
        self._apply(self.filter.set_estop(bool(msg.data), self._now()))

    def _on_watchdog(self) -> None:
        if self.acting:
            self._apply(self.filter.watchdog(self._now()))

    def on_hold(self) -> None:
        self._publish_hold(self.get_clock().now().nanoseconds)

    def _inactive(self, what: str) -> bool:
        if not self.acting:
            self.get_logger().warning(f'inactive: {what} dropped', throttle_duration_sec=self.log_throttle_s)
        return not self.acting

    def _on_joint_cmd(self, msg: ros_io.JointTrajectory) -> None:
        if self._inactive('joint command'):
            return
        try:
            cmd = ros_io_arm.joint_trajectory_to_command(msg)
        except (ObservationError, ValueError) as err:
            self.get_logger().error(f'rejected joint command: {err}', throttle_duration_sec=self.log_throttle_s)
            return
        self._apply(self.filter.filter_joint(cmd, self._now()))

    def _on_twist_cmd(self, msg: TwistStamped) -> None:
        if self._inactive('twist command'):
            return
        self._apply(self.filter.filter_twist(ros_io_arm.twist_to_command(msg), self._now()))

    def _apply(self, verdict: Verdict) -> None:
        stamp_ns = self.get_clock().now().nanoseconds
        if verdict.interventions:
            self.diag_pub.publish(ros_io_arm.interventions_to_diagnostics(self.get_name(), verdict.interventions,
                                                                         stamp_ns, self.get_namespace()))
            for i in verdict.interventions:
                # Throttled per kind and level: a 20 Hz stream of clipped commands must not flood the
                # log, and must not hide a different intervention either.
                key, now = (i.kind, i.level), time.monotonic()
                if now - self._logged.get(key, -1e9) < self.log_throttle_s:
                    continue
                self._logged[key] = now
                # One call site per severity: rclpy refuses to change a call site's severity.
                if i.level == ERROR:
                    self.get_logger().error(f'[{i.kind}] {i.message}')
                elif i.level == OK:
                    self.get_logger().info(f'[{i.kind}] {i.message}')
                else:
                    self.get_logger().warning(f'[{i.kind}] {i.message}')
        if verdict.hold:
            self._publish_hold(stamp_ns)
        if verdict.command is not None:
            if isinstance(verdict.command, ros_io_arm.JointCommand):
                self.joint_out.publish(ros_io_arm.command_to_joint_trajectory(verdict.command))
            else:
                self.twist_out.publish(ros_io_arm.command_to_twist(verdict.command, stamp_ns))
            self.forwarded += 1

    def _publish_hold(self, stamp_ns: int) -> None:
        if self.filter.active_kind == 'twist':
            self.twist_out.publish(ros_io_arm.command_to_twist(self.filter.hold_twist(), stamp_ns))
            return
        hold = self.filter.hold_joint()
        if hold is None:
            self.get_logger().error('cannot hold: no joint state measured yet', throttle_duration_sec=1.0)
            return
        self.joint_out.publish(ros_io_arm.command_to_joint_trajectory(hold))
        self.get_logger().warning(f'HOLD at the measured position {[round(v, 4) for v in hold.positions[0]]}',
                                  throttle_duration_sec=self.log_throttle_s)


def main(args: list[str] | None = None) -> int:
    return run_node(SafetyLayer, args)


if __name__ == '__main__':
    raise SystemExit(main())
