"""standin_arm: a ManiSkill arm that speaks exactly a real arm's topics, for dry runs of deploy_real.

It knows nothing about policies. Like a ros2_control arm with cameras it
  publishes  `joint_states_topic` (sensor_msgs/JointState, every joint incl. the fingers, at
             `joint_state_rate_hz`, wall-clock stamps), `ee_pose_topic` (geometry_msgs/PoseStamped
             of the tool centre point in `ee_frame_id`, the robot base), and camera images
             (sensor_msgs/Image rgb8, at `camera_rate_hz`) on `camera_topics` ('sim_camera=topic')
             with `task_state_topic`, it also plays a perception node: the task's object state (e.g.
             the cube's pose and the goal) as a named sensor_msgs/JointState (names = the features,
             positions = their values), stamped like the joint states
  accepts    trajectory_msgs/JointTrajectory on `command_topic` (absolute joint targets in the joints'
             units, the finger in m; any subset of `command_joint_names`) and holds the last target
             between commands, like a joint_trajectory_controller; the point due next is the current target.
The simulation steps on its own timer at `sim_rate_hz` whether or not commands arrive
(ManiSkill control mode pd_joint_pos). When the task's episode ends (success or
`max_scene_steps`) it says so on `~/scene_outcome` (std_msgs/String, JSON: seed, success, steps; transient
local, so a subscriber that joins late still gets the outcomes so far) and,
with `auto_reset`, resets the scene (a real cell would be tidied by a person instead); without it the
scene stays as it ended, frozen, until `~/reset` (std_srvs/Trigger: the next seed's scene, now).
"""

from __future__ import annotations

import json
import time

import numpy as np
from geometry_msgs.msg import PoseStamped
from rclpy.node import Node
from std_msgs.msg import String
from std_srvs.srv import Trigger

from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig
from stepnft_ros import ros_io, ros_io_arm
from stepnft_ros.nodes.common import ConfigError, Params, run_node
from stepnft_ros.policy.types import ObservationError


class StandinArm(Node):
    def __init__(self) -> None:
        super().__init__('standin_arm')
        p = Params(self)
        obs_mode = p.get('obs_mode', 'rgb')
        try:
            self.env = ManiSkillEnv(ManiSkillEnvConfig(
                env_id=p.get('env_id', 'PickCube-v1'), control_mode='pd_joint_pos', joint_units=True,
                obs_mode=obs_mode,
                image_size=p.get('image_size', 64), max_episode_steps=p.get('max_scene_steps', 100_000)))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        sim_names = list(self.env.joint_names)
        self.joint_names = p.get('joint_names', []) or sim_names
        if len(self.joint_names) != len(sim_names):
            raise ConfigError(f"parameter 'joint_names' renames the sim's {len(sim_names)} joints {sim_names}; "
                              f'got {len(self.joint_names)} names')
        rename = dict(zip(sim_names, self.joint_names, strict=True))
        self.action_joints = self.env.action_joints()
        self.command_joint_names = [rename[name] for name, _, _ in self.action_joints]
        cameras = list(self.env.camera_names)
        # 'sim_camera=topic' pairs; one sim camera may feed several topics (a dry run of an arm with
        # a wrist and a scene camera on a task that only renders a scene view).
        pairs = p.get('camera_topics', []) or [f'{c}=/camera/{c}/image_raw' for c in cameras]
        camera_topics = [tuple(pair.split('=', 1)) for pair in pairs]
        bad = [pair for pair, split in zip(pairs, camera_topics, strict=True)
               if len(split) != 2 or split[0] not in cameras or not split[1]]
        if bad:
            raise ConfigError(f"parameter 'camera_topics': entries must be 'sim_camera=topic' with a sim camera "
                              f'of {cameras}; bad: {bad}')
        self.ee_frame_id = p.get('ee_frame_id', 'base')
        self.seed = p.get('seed', 0)
        self.auto_reset = p.get('auto_reset', True)
        task_state_topic = p.get('task_state_topic', '')  # '': no perception, as on a bare arm
        sim_rate_hz = p.get('sim_rate_hz', 1.0 / self.env.control_period)
        joint_state_rate_hz = p.get('joint_state_rate_hz', 50.0)
        camera_rate_hz = p.get('camera_rate_hz', 10.0)
        if min(sim_rate_hz, joint_state_rate_hz, camera_rate_hz) <= 0:
            raise ConfigError('sim_rate_hz, joint_state_rate_hz and camera_rate_hz must be > 0')

        self.joint_pub = self.create_publisher(ros_io.JointState, p.get('joint_states_topic', '/joint_states'),
                                               ros_io.RELIABLE_QOS)
        self.pose_pub = self.create_publisher(PoseStamped, p.get('ee_pose_topic', '/ee_pose'), ros_io.RELIABLE_QOS)
        self.image_pubs = [(c, self.create_publisher(ros_io.Image, t, ros_io.SENSOR_QOS)) for c, t in camera_topics]
        self.task_pub = (self.create_publisher(ros_io.JointState, task_state_topic, ros_io.RELIABLE_QOS)
                         if task_state_topic else None)
        # Kept by the publisher: a scene can end before a late-discovered operator or test subscribes.
        self.outcome_pub = self.create_publisher(String, '~/scene_outcome', ros_io.SUMMARY_QOS)
        self.create_service(Trigger, '~/reset', self._on_reset)
        command_topic = p.get('command_topic', '/joint_trajectory_controller/joint_trajectory')
        self.create_subscription(ros_io.JointTrajectory, command_topic, self._on_command, ros_io.RELIABLE_QOS)

        self._reset_scene()
        self.steps = self.commands = 0
        self.create_timer(1.0 / sim_rate_hz, self._on_sim_step)
        self.create_timer(1.0 / joint_state_rate_hz, self._publish_state)
        self.create_timer(1.0 / camera_rate_hz, self._publish_images)
        self.get_logger().info(
            f'stand-in arm {self.env.cfg.env_id}: joints {self.joint_names}, commands on {command_topic} for '
            f'{self.command_joint_names}, cameras {pairs}, '
            f'task state {task_state_topic or "not published"}, sim at {sim_rate_hz:g} Hz')

    # ---- simulation ------------------------------------------------------------------------

    def _reset_scene(self) -> None:
        self.obs = self.env.reset(self.seed)
        self.frame_ns = time.time_ns()
        self.scene_seed, self.scene_steps, self.scene_over = self.seed, 0, False
        self.seed += 1
        n = len(self.joint_names)
        qpos = dict(zip(self.joint_names, self.obs['state'][:n], strict=True))
        self.target = np.array([qpos[name] for name in self.command_joint_names], dtype=np.float64)
        self.trajectory: tuple[float, ros_io_arm.JointCommand] | None = None

    def _on_command(self, msg: ros_io.JointTrajectory) -> None:
        try:
            cmd = ros_io_arm.joint_trajectory_to_command(msg)
            unknown = [name for name in cmd.names if name not in self.command_joint_names]
            if unknown:
                raise ObservationError(f'unknown joints {unknown}; this arm takes {self.command_joint_names}')
            if not np.all(np.isfinite(cmd.positions)):
                raise ObservationError('non-finite joint targets')
        except ObservationError as err:
            self.get_logger().error(f'rejected joint trajectory, holding the last target: {err}',
                                    throttle_duration_sec=1.0)
            return
        self.trajectory = (time.monotonic(), cmd)
        self.commands += 1

    def _current_target(self) -> np.ndarray:
        if self.trajectory is not None:
            received, cmd = self.trajectory
            due = np.flatnonzero(cmd.times >= time.monotonic() - received)
            point = cmd.positions[due[0] if due.size else -1]
            for name, value in zip(cmd.names, point, strict=True):
                self.target[self.command_joint_names.index(name)] = value
        return self.target

    def _on_reset(self, _request, response):
        self._reset_scene()
        response.success, response.message = True, f'scene of seed {self.scene_seed}'
        return response

    def _on_sim_step(self) -> None:
        if self.scene_over:
            return
        self.obs, success, done = self.env.step(self._current_target())
        self.frame_ns = time.time_ns()
        self.steps += 1
        self.scene_steps += 1
        if done:
            self.outcome_pub.publish(String(data=json.dumps(
                {'seed': self.scene_seed, 'success': bool(success), 'steps': self.scene_steps})))
            self.get_logger().info(f'scene of seed {self.scene_seed} {"solved" if success else "timed out"} after '
                                   f'{self.scene_steps} steps{": resetting" if self.auto_reset else ""}')
            if self.auto_reset:
                self._reset_scene()
            else:
                self.scene_over = True

    # ---- sensors ---------------------------------------------------------------------------

    def _publish_state(self) -> None:
        stamp = time.time_ns()
        n = len(self.joint_names)
        state = self.obs['state']
        self.joint_pub.publish(ros_io.arrays_to_joint_state(self.joint_names, state[:n], state[n:2 * n], stamp))
        position, quaternion = self.env.tcp_pose()
        self.pose_pub.publish(ros_io_arm.position_to_pose(position, quaternion, self.ee_frame_id, stamp))
        if self.task_pub is not None:
            self.task_pub.publish(ros_io.arrays_to_joint_state(self.env.task_state_names, state[2 * n:], None, stamp))

    def _publish_images(self) -> None:
        for cam, pub in self.image_pubs:
            pub.publish(ros_io.numpy_to_image(self.obs['images'][cam], self.frame_ns, frame_id=cam))

    def close(self) -> None:
        self.env.close()


def main(args: list[str] | None = None) -> int:
    return run_node(StandinArm, args)


if __name__ == '__main__':
    raise SystemExit(main())
