"""arm_bridge: a real arm's drivers presented to the policy server, and its chunks executed on the arm.

In its namespace <ns> (which must not be the root):
  in   `joint_states_topic` (the driver's sensor_msgs/JointState, any joint order, may be split
       over several publishers), with the `task_state` state source `task_state_topic` (a perception
       node's named features as a sensor_msgs/JointState: names = `task_state_names`, positions =
       their values, e.g. an object's pose), `camera_topics` (sensor_msgs/Image, or CompressedImage (jpeg/png)
       for topics ending in /compressed; any size: centre-cropped and
       resized to `image_size`), <ns>/episode_active (std_msgs/Bool, latched; the operator, whose
       repeats must keep coming when `active_timeout_s` > 0), <ns>/intervention_active
       (std_msgs/Bool, latched: a person has taken the arm over; nothing is sent or commanded),
       <ns>/action_chunk (the policy server's answer)
  out  the policy contract: <ns>/joint_states (`joint_names` in order), <ns>/task_state
       (`task_state_names` in order), <ns>/camera/<cam>/image_raw, <ns>/instruction (latched), all
       parts of one observation with one stamp;
       proposed commands on <ns>/safety/joint_trajectory_in or <ns>/safety/twist_in;
       <ns>/executed_chunk: each answered chunk cut to the actions that ran, once it is out of use
       (ChunkScheduler says how they are counted: actions skipped because their tick had passed
       are not among them)
       while taken over (`record_interventions`): the person's demonstrations, see "Interventions"
At `control_rate_hz` it executes the chunks (stepnft_ros.control.ChunkScheduler: chunked, with
or without `latency_hiding`, or temporally ensembled) through a command adapter (joint
trajectory or end-effector twist). With latency hiding it observes early by the measured
observation -> chunk latency, so a slow policy does not pause the arm between chunks.
While the episode is not active it sends no observation and commands nothing; an observation
with a missing, stale or bad part is not sent (the arm then gets no new command and holds).

Interventions: while a person has the arm, the person's commands arrive on the very topic this
node commands (<ns>/safety/joint_trajectory_in or twist_in, where teleop publishes into the safety
layer). The bridge records them as demonstrations: every `actions_per_chunk` ticks (the policy's
decision rate) it publishes an observation on <ns>/human/joint_states and
<ns>/human/camera/<cam>/image_raw, and once the next `human_chunk_length` ticks have passed,
<ns>/human/action_chunk (stamped like the observation): the person's command of each tick (the
latest one, sampled at the control rate) turned into the policy's action space by the inverse of
this node's own command adapter, after the same command reading as `stepnft sft --bags`
(episodes/demo_formats.command_values). A chunk ends early (shorter) at the hand-back, at the end
of the episode, and when no fresh human command came for `human_command_timeout_s`. The policy
server pairs them and records them with the episode; the learner can clone them.
This lives here because only the bridge has both halves with no new plumbing: the observation
join and the command adapter that defines the action space.
"""

from __future__ import annotations

import itertools
import time
from collections import deque

import numpy as np
from geometry_msgs.msg import TwistStamped
from std_msgs.msg import Bool, String

from stepnft_ros import ros_io, ros_io_arm
from stepnft_ros.control import ChunkScheduler, JointTrajectoryAdapter, ObservationJoiner, TwistAdapter
from stepnft_ros.episodes.demo_formats import command_values
from stepnft_ros.nodes.common import ConfigError, ManagedNode, Params, run_node
from stepnft_ros.policy.types import ObservationError

COMMAND_TYPES = ('joint_trajectory', 'twist')
LATENCY_WINDOW = 20  # recent chunks whose latency (90th percentile) sets how early latency hiding observes


class ArmBridge(ManagedNode):
    def __init__(self) -> None:
        super().__init__('arm_bridge')
        if self.get_namespace() == '/':
            raise ConfigError('arm_bridge needs a robot namespace (e.g. -r __ns:=/arm): its policy topics '
                              '<ns>/joint_states would otherwise collide with the driver\'s /joint_states')
        p = Params(self)
        joint_states_topic = p.get('joint_states_topic', '/joint_states')
        self.joint_names = p.required('joint_names', list)
        state_sources = p.get('state_sources', ['joint_position'])
        camera_names = p.get('camera_names', [])
        camera_topics = p.get('camera_topics', [])
        image_size = p.get('image_size', 224)
        instruction = p.get('instruction', '')
        rate_hz = p.get('control_rate_hz', 10.0)
        actions_per_chunk = p.get('actions_per_chunk', 4)
        temporal_ensemble = p.get('temporal_ensemble', False)
        ensemble_decay = p.get('ensemble_decay', 0.01)
        # Observe early by the measured inference latency and keep the running chunk going while the
        # answer is late, cross-fading the new chunk's first actions in (stepnft_ros.control.scheduler).
        latency_hiding = p.get('latency_hiding', False)
        blend_actions = p.get('blend_actions', 2 if latency_hiding else 0)
        # latency hiding: observe at least this many ticks before the running chunk's last action
        min_lead_ticks = p.get('min_lead_ticks', 0)
        request_timeout_s = p.get('request_timeout_s', 1.0)
        self.command_type = p.get('command_type', 'joint_trajectory')
        command_joint_names = p.get('command_joint_names', []) or list(self.joint_names)
        joint_targets = p.get('joint_targets', 'absolute')
        absolute_joints = p.get('absolute_joints', [])
        max_age_s = p.get('max_observation_age_s', 0.25)
        self.require_active = p.get('require_active', True)
        # > 0: episode_active must be repeated at least this often (the operator's heartbeat), or
        # the episode counts as stopped: an operator that dies cannot leave the arm acting.
        self.active_timeout_s = p.get('active_timeout_s', 0.0)
        self.log_throttle_s = p.get('log_throttle_s', 1.0)
        # While taken over, send the person's commands as demonstrations (observation + action chunk).
        self.record_interventions = p.get('record_interventions', True)
        # Actions per demonstration chunk; 0: as many as the policy's chunks have (actions_per_chunk
        # until the first chunk arrives). The learner cuts or pads them to the policy's horizon.
        self.human_chunk_length = p.get('human_chunk_length', 0)
        # An older human command does not count as what the person is doing: open chunks end.
        self.human_command_timeout_s = p.get('human_command_timeout_s', 0.5)

        bad_sources = sorted(set(state_sources) - set(ros_io.STATE_SOURCES))
        if bad_sources:
            raise ConfigError(f"parameter 'state_sources': an arm offers {list(ros_io.STATE_SOURCES)}, "
                              f'not {bad_sources}')
        task_state_names: list[str] = []
        if 'task_state' in state_sources:
            task_state_topic = p.get('task_state_topic', '/task_state')
            task_state_names = p.required('task_state_names', list)
            if not task_state_names:
                raise ConfigError("parameter 'task_state_names' must list the features the policy's state uses")
        camera_topics = camera_topics or [f'/camera/{c}/image_raw' for c in camera_names]
        if len(camera_topics) != len(camera_names):
            raise ConfigError(f"parameters 'camera_names' ({len(camera_names)}) and 'camera_topics' "
                              f'({len(camera_topics)}) must pair up')
        if rate_hz <= 0 or request_timeout_s <= 0 or image_size < 8 or self.active_timeout_s < 0:
            raise ConfigError('control_rate_hz and request_timeout_s must be > 0, image_size >= 8, '
                              'active_timeout_s >= 0')
        if self.human_chunk_length < 0 or self.human_command_timeout_s <= 0:
            raise ConfigError('human_chunk_length must be >= 0 and human_command_timeout_s > 0')
        if self.command_type not in COMMAND_TYPES:
            raise ConfigError(f"parameter 'command_type' must be one of {COMMAND_TYPES}, got {self.command_type!r}")
        self.period = 1.0 / rate_hz
        try:
            self.joiner = ObservationJoiner(self.joint_names, camera_names, image_size, max_age_s,
                                            require_velocity='joint_velocity' in state_sources,
                                            task_state_names=task_state_names)
            self.scheduler = ChunkScheduler(actions_per_chunk, temporal_ensemble, ensemble_decay,
                                            request_timeout_ticks=max(1, round(request_timeout_s * rate_hz)),
                                            latency_hiding=latency_hiding, blend_actions=blend_actions,
                                            min_lead=min_lead_ticks)
            if self.command_type == 'joint_trajectory':
                if joint_targets == 'delta' and set(command_joint_names) - set(self.joint_names):
                    raise ValueError('delta joint targets need every command joint among joint_names (measured)')
                self.adapter = JointTrajectoryAdapter(command_joint_names, self.period, joint_targets, absolute_joints)
                self.action_dim = self.adapter.action_dim
            else:
                self.action_dim = p.get('action_dim', 7)
                self.adapter = TwistAdapter(self.action_dim, p.get('twist_frame_id', 'base'),
                                            p.get('linear_scale', 0.1), p.get('angular_scale', 0.2))
        except ValueError as err:
            raise ConfigError(str(err)) from None

        # Policy side (relative names: inside the robot namespace).
        self.joint_pub = self.create_publisher(ros_io.JointState, ros_io.JOINT_STATES, ros_io.SENSOR_QOS)
        self.task_pub = (self.create_publisher(ros_io.JointState, ros_io.TASK_STATE, ros_io.SENSOR_QOS)
                         if task_state_names else None)
        self.image_pubs = {c: self.create_publisher(ros_io.Image, ros_io.camera_topic(c), ros_io.SENSOR_QOS)
                           for c in camera_names}
        if instruction:
            self.create_publisher(String, ros_io.INSTRUCTION, ros_io.LATCHED_QOS).publish(String(data=instruction))
        self.create_subscription(ros_io.JointTrajectory, ros_io.ACTION_CHUNK, self._on_chunk, ros_io.RELIABLE_QOS)
        self.executed_pub = self.create_publisher(ros_io.JointTrajectory, ros_io.EXECUTED_CHUNK, ros_io.RELIABLE_QOS)
        self.create_subscription(Bool, ros_io.EPISODE_ACTIVE, self._on_active, ros_io.LATCHED_QOS)
        self.create_subscription(Bool, ros_io.INTERVENTION_ACTIVE, self._on_intervention, ros_io.LATCHED_QOS)
        # Arm side.
        self.create_subscription(ros_io.JointState, joint_states_topic, self._on_joint_state, ros_io.SENSOR_QOS)
        if task_state_names:
            self.create_subscription(ros_io.JointState, task_state_topic, self._on_task_state, ros_io.SENSOR_QOS)
        for cam, topic in zip(camera_names, camera_topics, strict=True):
            if ros_io.is_compressed_topic(topic):  # e.g. a camera on another host, over the network
                self.create_subscription(ros_io.CompressedImage, topic, lambda m, c=cam: self._on_image(
                    c, m, ros_io.compressed_image_to_numpy), ros_io.SENSOR_QOS)
            else:
                self.create_subscription(ros_io.Image, topic, lambda m, c=cam: self._on_image(
                    c, m, lambda msg: ros_io.image_to_numpy(msg, None)), ros_io.SENSOR_QOS)
        if self.command_type == 'joint_trajectory':
            self.command_pub = self.create_publisher(ros_io.JointTrajectory, ros_io.SAFETY_JOINT_TRAJECTORY_IN,
                                                     ros_io.RELIABLE_QOS)
        else:
            self.command_pub = self.create_publisher(TwistStamped, ros_io.SAFETY_TWIST_IN, ros_io.RELIABLE_QOS)
        # Interventions: the person's commands (into the same safety input) and the demonstrations made of them.
        self.human_horizon = self.human_chunk_length or actions_per_chunk
        self.human_command: tuple[float, object] | None = None  # (monotonic receipt time, message)
        self.last_command_msg = None  # our own last command, not to be mistaken for the person's
        self.human_open: list[tuple[int, list[np.ndarray]]] = []  # (observation stamp, actions so far)
        self.human_next_tick = 0  # the tick of the next demonstration observation
        self.human_chunks = 0
        if self.record_interventions:
            if self.command_type == 'joint_trajectory':
                self.create_subscription(ros_io.JointTrajectory, ros_io.SAFETY_JOINT_TRAJECTORY_IN,
                                         self._on_human_command, ros_io.RELIABLE_QOS)
                self.action_names = list(self.adapter.joint_names)
            else:
                self.create_subscription(TwistStamped, ros_io.SAFETY_TWIST_IN, self._on_human_command,
                                         ros_io.RELIABLE_QOS)
                self.action_names = [f'a{i}' for i in range(self.action_dim)]
            prefix = ros_io.HUMAN_PREFIX
            self.human_joint_pub = self.create_publisher(ros_io.JointState, prefix + ros_io.JOINT_STATES,
                                                         ros_io.HUMAN_QOS)
            self.human_task_pub = (self.create_publisher(ros_io.JointState, prefix + ros_io.TASK_STATE,
                                                         ros_io.HUMAN_QOS) if task_state_names else None)
            self.human_image_pubs = {c: self.create_publisher(ros_io.Image, prefix + ros_io.camera_topic(c),
                                                              ros_io.HUMAN_QOS) for c in camera_names}
            self.human_chunk_pub = self.create_publisher(ros_io.JointTrajectory, ros_io.HUMAN_ACTION_CHUNK,
                                                         ros_io.HUMAN_QOS)

        if self.command_type == 'twist' and self.action_dim > 6:
            self.get_logger().warning(f'twist control: action dims 7..{self.action_dim} (e.g. the gripper) are not '
                                      'part of a twist and are not sent')
        self.active = not self.require_active
        self.intervening = False  # a person has the arm: the policy is neither asked nor obeyed
        self.active_heard = time.monotonic()
        self.tick = 0
        self.stamp_to_tick: dict[int, int] = {}
        self.answers: dict[int, ros_io.JointTrajectory] = {}  # observation tick -> its chunk, while scheduled
        self.sent_at: dict[int, float] = {}       # stamp -> monotonic send time
        self.latencies: deque[float] = deque(maxlen=10_000)
        self.last_stamp_ns = 0
        self.observations = self.commands = 0
        self.create_timer(self.period, self._on_tick)
        cameras = dict(zip(camera_names, camera_topics, strict=True))
        schedule = 'temporal ensembling' if temporal_ensemble else f'{actions_per_chunk} actions per chunk'
        if latency_hiding:
            schedule += f', latency hiding (blending {blend_actions} actions)'
        self.get_logger().info(
            f'bridging {joint_states_topic} ({len(self.joint_names)} joints) and cameras {cameras} at '
            f'{rate_hz:g} Hz; {self.command_type} commands ({schedule}); '
            f'{"waiting for episode_active" if self.require_active else "active without an operator"}')
        self.start_lifecycle(p.get('managed', False))

    # ---- sensors ---------------------------------------------------------------------------

    def _on_joint_state(self, msg: ros_io.JointState) -> None:
        try:
            position, velocity = ros_io.joint_state_to_arrays(msg)
            self.joiner.update_joints(list(msg.name), position, velocity, ros_io.stamp_to_ns(msg.header.stamp))
        except ObservationError as err:
            self.get_logger().warning(f'dropped joint state: {err}', throttle_duration_sec=self.log_throttle_s)

    def _on_task_state(self, msg: ros_io.JointState) -> None:
        try:
            values, _ = ros_io.joint_state_to_arrays(msg)
            self.joiner.update_task_state(list(msg.name), values, ros_io.stamp_to_ns(msg.header.stamp))
        except ObservationError as err:
            self.get_logger().warning(f'dropped task state: {err}', throttle_duration_sec=self.log_throttle_s)

    def _on_image(self, camera: str, msg, decode) -> None:
        try:
            self.joiner.update_image(camera, decode(msg), ros_io.stamp_to_ns(msg.header.stamp))
        except ObservationError as err:
            self.get_logger().warning(f'dropped frame of camera {camera!r}: {err}',
                                      throttle_duration_sec=self.log_throttle_s)

    def _on_active(self, msg: Bool) -> None:
        self.active_heard = time.monotonic()
        if bool(msg.data) != self.active:
            self._set_active(bool(msg.data))
            self.get_logger().info(f'episode {"ACTIVE: acting" if self.active else "inactive: holding"}')

    def _on_intervention(self, msg: Bool) -> None:
        if bool(msg.data) == self.intervening:
            return
        self.intervening = bool(msg.data)
        self._drop_schedule()  # after a hand-back the policy plans from a fresh observation
        self._end_human_chunks()
        self.human_command = None  # only commands that come during this takeover are the person's
        self.human_next_tick = self.tick + 1
        self.get_logger().info('TAKEN OVER: no policy commands until handed back' if self.intervening
                               else 'handed back: the policy acts again')

    def _set_active(self, active: bool) -> None:
        self.active = active
        self._drop_schedule()
        self._end_human_chunks()  # before the operator's label closes the episode

    def on_hold(self) -> None:  # deactivated (lifecycle): nothing planned survives
        self._drop_schedule()
        self._end_human_chunks()

    def _drop_schedule(self) -> None:
        self.scheduler.reset()  # a new episode never executes the last one's chunks
        self._report_executed()  # before the operator's label closes the episode
        self.answers.clear()
        self.stamp_to_tick.clear()
        self.sent_at.clear()

    def _report_executed(self) -> None:
        for tick, first, executed in self.scheduler.finished():
            answer = self.answers.pop(tick, None)
            if answer is not None:
                self.executed_pub.publish(ros_io.executed_report(answer, executed, first))

    # ---- control loop ----------------------------------------------------------------------

    def _on_tick(self) -> None:
        self.tick += 1
        if not self.acting:  # lifecycle: not activated (yet), or deactivated
            return
        if (self.active and self.require_active and self.active_timeout_s > 0
                and time.monotonic() - self.active_heard > self.active_timeout_s):
            self._set_active(False)
            self.get_logger().error(f'no episode_active from the operator for {self.active_timeout_s:g} s: '
                                    'episode stopped, holding')
        if not self.active:
            return
        if self.intervening:
            if self.record_interventions:
                self._record_human()
            return
        stale = self.scheduler.stale_chunks
        action = self.scheduler.action(self.tick)
        if self.scheduler.stale_chunks > stale:
            self.get_logger().warning('a chunk arrived after its whole horizon had passed: skipped (the policy is '
                                      'slower than the chunk is long)', throttle_duration_sec=self.log_throttle_s)
        self._report_executed()
        if action is not None:
            self._command(action)
        if self.scheduler.should_request(self.tick):
            self._send_observation()

    def _command(self, action) -> None:
        try:
            if self.command_type == 'joint_trajectory':
                measured = (self.joiner.latest_positions(self.adapter.joint_names)
                            if self.adapter.targets == 'delta' else None)
                msg = ros_io_arm.command_to_joint_trajectory(self.adapter.command(action, measured))
            else:
                twist, _rest = self.adapter.command(action)
                msg = ros_io_arm.command_to_twist(twist, self.get_clock().now().nanoseconds)
        except (ValueError, ObservationError) as err:
            self.get_logger().error(f'action not executed, holding: {err}', throttle_duration_sec=self.log_throttle_s)
            return
        self.command_pub.publish(msg)
        self.last_command_msg = msg
        self.commands += 1

    def _publish_observation(self, image_pubs: dict, joint_pub, task_pub, what: str) -> int | None:
        """Join and publish one observation; its stamp, or None (logged) when a part is missing or bad."""
        now_ns = time.time_ns()
        try:
            obs = self.joiner.join(now_ns)
        except ObservationError as err:
            self.get_logger().warning(f'{what}: {err}', throttle_duration_sec=self.log_throttle_s)
            return None
        stamp = max(now_ns, self.last_stamp_ns + 1)  # the policy server needs strictly newer stamps
        self.last_stamp_ns = stamp
        for cam, pub in image_pubs.items():
            pub.publish(ros_io.numpy_to_image(obs.images[cam], stamp, frame_id=cam))
        if task_pub is not None:
            task_pub.publish(ros_io.arrays_to_joint_state(self.joiner.task_state_names, obs.task_state, None, stamp))
        # joint_states last: the policy server answers once every part of a stamp has arrived.
        joint_pub.publish(ros_io.arrays_to_joint_state(self.joint_names, obs.position, obs.velocity, stamp))
        return stamp

    def _send_observation(self) -> None:
        stamp = self._publish_observation(self.image_pubs, self.joint_pub, self.task_pub,
                                          'no observation sent, holding')
        if stamp is None:
            return
        self.scheduler.requested(self.tick)
        self.stamp_to_tick[stamp] = self.tick
        self.sent_at[stamp] = time.monotonic()
        if len(self.stamp_to_tick) > 256:
            oldest = min(self.stamp_to_tick)
            del self.stamp_to_tick[oldest]
            self.sent_at.pop(oldest, None)
        self.observations += 1

    def _on_chunk(self, msg: ros_io.JointTrajectory) -> None:
        try:
            stamp_ns, chunk = ros_io.trajectory_to_chunk(msg, self.action_dim)
        except ObservationError as err:
            self.get_logger().error(f'rejected action chunk, holding: {err}', throttle_duration_sec=self.log_throttle_s)
            return
        tick = self.stamp_to_tick.get(stamp_ns)
        if not self.active or tick is None or not self.scheduler.add_chunk(tick, chunk):
            self.get_logger().debug(f'ignored a chunk for an observation no longer awaited ({stamp_ns} ns)')
            return
        self.answers[tick] = msg
        if not self.human_chunk_length:
            self.human_horizon = len(chunk)  # demonstrations as long as the policy's own chunks
        self._report_executed()  # chunked: the chunk this one replaced
        self.latencies.append(time.monotonic() - self.sent_at.pop(stamp_ns))
        if self.scheduler.latency_hiding:  # the newest LATENCY_WINDOW, not a copy of the whole record
            recent = list(itertools.islice(reversed(self.latencies), LATENCY_WINDOW))
            self.scheduler.set_latency(float(np.percentile(recent, 90)) / self.period)

    # ---- interventions: the person's commands as demonstrations -----------------------------

    def _on_human_command(self, msg) -> None:
        if not self.intervening or msg == self.last_command_msg:  # ours, delivered after the takeover
            return
        self.human_command = (time.monotonic(), msg)

    def _human_action(self) -> np.ndarray | None:
        """The person's latest command as a policy action, None if there is no fresh usable one."""
        if self.human_command is None or time.monotonic() - self.human_command[0] > self.human_command_timeout_s:
            return None
        msg = self.human_command[1]
        try:
            if self.command_type == 'joint_trajectory':
                target = command_values(msg, 'trajectory_msgs/msg/JointTrajectory', self.adapter.joint_names)
                measured = (self.joiner.latest_positions(self.adapter.joint_names)
                            if self.adapter.targets == 'delta' else None)
                action = self.adapter.action_of(target, measured)
            else:
                action = self.adapter.action_of(command_values(msg, 'geometry_msgs/msg/TwistStamped'))
        except (ValueError, ObservationError) as err:
            self.get_logger().warning(f'human command not recorded as a demonstration: {err}',
                                      throttle_duration_sec=self.log_throttle_s)
            return None
        return action

    def _record_human(self) -> None:
        """One control tick of a takeover: the tick's action joins the open chunks; at the decision
        rate a new observation opens one."""
        action = self._human_action()
        if action is None:
            self._end_human_chunks()  # what the person does now is unknown: no chunk spans it
            self.human_next_tick = self.tick + 1
            return
        for _, actions in self.human_open:
            actions.append(action)
        while self.human_open and len(self.human_open[0][1]) >= self.human_horizon:
            self._publish_human_chunk(*self.human_open.pop(0))
        if self.tick >= self.human_next_tick:
            stamp = self._publish_observation(self.human_image_pubs, self.human_joint_pub, self.human_task_pub,
                                              'no demonstration observation sent')
            if stamp is None:
                self.human_next_tick = self.tick + 1
            else:
                self.human_open.append((stamp, []))
                self.human_next_tick = self.tick + self.scheduler.actions_per_chunk

    def _end_human_chunks(self) -> None:
        for stamp, actions in self.human_open:
            if actions:
                self._publish_human_chunk(stamp, actions)
        self.human_open = []

    def _publish_human_chunk(self, stamp: int, actions: list[np.ndarray]) -> None:
        self.human_chunk_pub.publish(ros_io.chunk_to_trajectory(np.stack(actions), self.action_names, stamp,
                                                                self.period))
        self.human_chunks += 1

    def close(self) -> None:
        """Log what the run did; the policy latency tells whether the control rate is realistic."""
        summary = f'{self.observations} observations sent, {self.commands} commands proposed'
        if self.human_chunks:
            summary += f', {self.human_chunks} demonstration chunks of a person recorded'
        if self.latencies:
            p50, p95 = np.percentile(np.array(self.latencies) * 1e3, [50, 95])
            summary += (f'; observation -> chunk latency p50 {p50:.1f} ms, p95 {p95:.1f} ms '
                        f'({len(self.latencies)} chunks)')
        self.get_logger().info(summary)


def main(args: list[str] | None = None) -> int:
    return run_node(ArmBridge, args)


if __name__ == '__main__':
    raise SystemExit(main())
