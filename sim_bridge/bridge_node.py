"""SimBridge: any simulated environment with the ManiSkillEnv API presented as a robot.

In its namespace the bridge publishes joint_states (arm and gripper joints: position,
velocity), task_state (the env's extra state features as a named JointState),
camera/<cam>/image_raw (when the env has cameras), instruction (latched) and, before each
reset, episode_seed (std_msgs/Int64, latched: the seed that reset uses); it executes the
first `actions_per_chunk` actions of each action_chunk whose stamp matches the observation it
is waiting on (fewer when the episode ends mid-chunk) and says how many on executed_chunk; it
reports each episode's outcome through the episode_outcome service (SetBool, true = success)
and on episode_summary (JSON), then resets. It publishes /clock (sim time)
when `publish_clock` is set, and offers reset (Trigger). Before its first observation it calls
episode_discard, so an episode a crashed predecessor left unfinished (this bridge respawned) is
dropped by the policy server rather than continued with this bridge's decisions.

A bridge runs a list of tasks one after another (one for training; several for an
evaluation sweep): each task's env is built when the task starts, and the instruction is
re-published then. Subclasses (maniskill_node, libero_node) only say which tasks to run.

Seeds: a task's episodes reset with first_seed, first_seed + 1, ..., each used for `group_size`
consecutive episodes (reset_seed), so that a group's episodes start from the same state (what
the learner's group_mean labels compare).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rclpy.duration import Duration as RclpyDuration
from rclpy.node import Node
from rosgraph_msgs.msg import Clock
from std_msgs.msg import String
from std_srvs.srv import SetBool, Trigger

from stepnft_ros import ros_io
from stepnft_ros.nodes.common import ConfigError, Params, finish
from stepnft_ros.policy.types import ObservationError

WAITING_CHUNK, WAITING_OUTCOME, FINISHED = 'waiting for a chunk', 'reporting the outcome', 'finished'
STARTING = 'dropping a predecessor\'s unfinished episode'


def reset_seed(first_seed: int, episode: int, group_size: int) -> int:
    """The reset seed of a task's `episode`-th episode (from 0): each seed serves `group_size` in a row."""
    return first_seed + episode // group_size


@dataclass(frozen=True)
class BridgeTask:
    """One task a bridge runs: how to build its env and how many episodes (0 = no limit)."""

    label: str           # episode_summary "task", e.g. "libero_spatial/3" or "PickCube-v1"
    suite: str           # episode_summary "suite", e.g. "libero_spatial" or the ManiSkill env id
    instruction: str     # published (latched) before the env is built
    make_env: Callable[[], Any]
    episodes: int = 0


class SimBridge(Node):
    """Subclasses implement `tasks(p)`; everything robot-facing is here."""

    default_first_seed = 0
    split = 'id'  # episode_summary "split": the tasks' training distribution

    def __init__(self, node_name: str) -> None:
        super().__init__(node_name)
        p = Params(self)
        try:
            self.tasks = self.read_tasks(p)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.actions_per_chunk = p.get('actions_per_chunk', 4)
        self.first_seed = p.get('first_seed', self.default_first_seed)
        self.group_size = p.get('group_size', 1)
        self.max_episodes = p.get('max_episodes', 0)
        self.request_timeout_s = p.get('request_timeout_s', 2.0)
        publish_clock = p.get('publish_clock', False)
        if self.actions_per_chunk < 1:
            raise ConfigError(f"parameter 'actions_per_chunk' must be >= 1, got {self.actions_per_chunk}")
        if self.first_seed < 0:
            raise ConfigError(f"parameter 'first_seed' must be >= 0, got {self.first_seed}")
        if self.group_size < 1:
            raise ConfigError(f"parameter 'group_size' must be >= 1, got {self.group_size}")
        if self.max_episodes < 0:
            raise ConfigError(f"parameter 'max_episodes' must be >= 0, got {self.max_episodes}")
        if not self.tasks:
            raise ConfigError('no task to run')

        self.instruction_pub = self.create_publisher(String, ros_io.INSTRUCTION, ros_io.LATCHED_QOS)
        self.seed_pub = self.create_publisher(ros_io.Int64, ros_io.EPISODE_SEED, ros_io.LATCHED_QOS)
        # Before the (slow) env build: the policy server's service is discovered meanwhile.
        self.discard_client = self.create_client(Trigger, ros_io.EPISODE_DISCARD)
        self.instruction: str | None = None  # the last one published
        self.task_index = -1
        self.env = None
        self._next_task()
        self.period_ns = int(round(self.env.control_period * 1e9))
        # Sim time starts at the wall clock so stamps keep increasing across bridge restarts.
        self.sim_ns = time.time_ns() // self.period_ns * self.period_ns
        self.joint_pub = self.create_publisher(ros_io.JointState, ros_io.JOINT_STATES, ros_io.SENSOR_QOS)
        self.task_pub = self.create_publisher(ros_io.JointState, ros_io.TASK_STATE, ros_io.SENSOR_QOS)
        self.image_pubs = {cam: self.create_publisher(ros_io.Image, ros_io.camera_topic(cam), ros_io.SENSOR_QOS)
                           for cam in self.env.camera_names}
        self.summary_pub = self.create_publisher(String, ros_io.EPISODE_SUMMARY, ros_io.SUMMARY_QOS)
        self.clock_pub = self.create_publisher(Clock, ros_io.CLOCK, 10) if publish_clock else None
        self.create_subscription(ros_io.JointTrajectory, ros_io.ACTION_CHUNK, self._on_chunk, ros_io.RELIABLE_QOS)
        self.executed_pub = self.create_publisher(ros_io.JointTrajectory, ros_io.EXECUTED_CHUNK, ros_io.RELIABLE_QOS)
        self.outcome_client = self.create_client(SetBool, ros_io.EPISODE_OUTCOME)
        self.create_service(Trigger, ros_io.RESET, self._on_reset)
        self.create_timer(0.1, self._watchdog)

        self.episodes = self.successes = self.total_steps = 0
        self.exit_code = 0
        self.obs_stamp_ns = 0
        self.state, self.requested_at, self.discard_sent = STARTING, time.monotonic(), False
        self._drop_unfinished()

    def read_tasks(self, p: Params) -> list[BridgeTask]:
        """The tasks to run, from the node's parameters (ValueError -> exit 2)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One log line about the env, printed when a task starts."""
        return self.task.label

    # ---- tasks -----------------------------------------------------------------------------

    def _next_task(self) -> None:
        """Close the current env, publish the next task's instruction, build its env."""
        previous = self.env
        if previous is not None:
            previous.close()
            self.env = None
        self.task_index += 1
        self.task = self.tasks[self.task_index]
        self.task_episodes = 0
        # Before the (slow) build, so the policy server has it before the first observation.
        self._publish_instruction(self.task.instruction)
        env = self.task.make_env()
        if previous is not None and (env.camera_names, env.joint_names, env.task_state_names, env.action_dim) != (
                previous.camera_names, previous.joint_names, previous.task_state_names, previous.action_dim):
            env.close()
            raise RuntimeError(f'task {self.task.label} has other cameras, joints, state or actions than the '
                               'task before it: one bridge runs tasks of one robot layout')
        self.env = env  # its first episode publishes the instruction it starts with (_start_episode)
        self.get_logger().info(f'task {self.task_index + 1}/{len(self.tasks)}: {self.describe()} as a robot: '
                               f'{len(env.joint_names)} joints, {len(env.task_state_names)} task features, '
                               f'cameras {list(env.camera_names)}; "{env.instruction}"')

    def _publish_instruction(self, text: str) -> None:
        """Latched; re-published only when it changes (a new task, or an env that varies it per episode)."""
        if text != self.instruction:
            self.instruction = text
            self.instruction_pub.publish(String(data=text))

    # ---- episode flow ----------------------------------------------------------------------

    def _drop_unfinished(self) -> None:
        """Have the policy server drop this namespace's unfinished episode, then start; the first
        observation waits for the answer, so it can never be dropped with that episode."""
        if not self.discard_sent and self.discard_client.service_is_ready():
            self.discard_sent = True
            self.discard_client.call_async(Trigger.Request()).add_done_callback(self._dropped)
        elif time.monotonic() - self.requested_at >= self.request_timeout_s:
            self.get_logger().info(f'no answer on {ros_io.EPISODE_DISCARD} within {self.request_timeout_s:g} s '
                                   '(no policy server yet): starting')
            self._start_episode()

    def _dropped(self, future) -> None:
        if self.state != STARTING:
            return
        response = future.result()
        if response is not None:  # 'dropped N decisions': N > 0 when a bridge before this one died mid-episode
            self.get_logger().info(f'policy server asked to drop an unfinished episode of this namespace: '
                                   f'{response.message}')
        self._start_episode()

    def _start_episode(self) -> None:
        self.seed = reset_seed(self.first_seed, self.task_episodes, self.group_size)
        self.episode_steps = 0
        self.episode_start = time.perf_counter()
        self.sim_ns += self.period_ns  # the reset takes a tick: the first stamp differs from the last one
        # Seed and instruction go out before the reset: topics are not ordered against each other, and
        # the reset's time lets them arrive before the first observation does. The seed goes out for
        # every episode, repeats included: the policy server uses each one for one episode only.
        self.seed_pub.publish(ros_io.seed_to_msg(self.seed))
        self._publish_instruction(self.env.instruction_for(self.seed))
        raw = self.env.reset(self.seed)
        self._publish_observation(raw, new_stamp=True)

    def _publish_observation(self, raw: dict, new_stamp: bool) -> None:
        """Stamped with the current sim time; a re-send (new_stamp=False) repeats the last stamp."""
        if new_stamp:
            self.obs_stamp_ns, self.raw_obs = self.sim_ns, raw
        state, n = raw['state'], len(self.env.joint_names)
        stamp = self.obs_stamp_ns
        for cam, pub in self.image_pubs.items():
            pub.publish(ros_io.numpy_to_image(raw['images'][cam], stamp, frame_id=cam))
        self.task_pub.publish(ros_io.arrays_to_joint_state(self.env.task_state_names, state[2 * n:], None, stamp))
        # joint_states last: the policy server answers once every part of a stamp has arrived.
        self.joint_pub.publish(ros_io.arrays_to_joint_state(self.env.joint_names, state[:n], state[n:2 * n], stamp))
        if self.clock_pub is not None:
            self.clock_pub.publish(Clock(clock=ros_io.ns_to_stamp(self.sim_ns)))
        self.state = WAITING_CHUNK
        self.requested_at = time.monotonic()

    def _on_chunk(self, msg: ros_io.JointTrajectory) -> None:
        try:
            stamp_ns, chunk = ros_io.trajectory_to_chunk(msg, self.env.action_dim)
        except ObservationError as err:
            self.get_logger().error(f'rejected action chunk, holding still: {err}')
            return
        if self.state != WAITING_CHUNK or stamp_ns != self.obs_stamp_ns:
            self.get_logger().warning(f'ignored a chunk for a stale observation (stamp {stamp_ns} ns; '
                                      f'waiting on {self.obs_stamp_ns} ns, {self.state})', throttle_duration_sec=1.0)
            return
        success = done = False
        raw = self.raw_obs
        executed = 0
        for action in chunk[:self.actions_per_chunk]:
            raw, success, done = self.env.step(np.clip(action, self.env.action_low, self.env.action_high))
            self.sim_ns += self.period_ns
            self.episode_steps += 1
            self.total_steps += 1
            executed += 1
            if done:
                break
        # Before the outcome or the next observation, so the server usually has it when that arrives.
        self.executed_pub.publish(ros_io.executed_report(msg, executed))
        if done:
            self._report(success)
        else:
            self._publish_observation(raw, new_stamp=True)

    def _report(self, success: bool) -> None:
        self.state = WAITING_OUTCOME
        self.outcome = success
        self.summary_pub.publish(String(data=json.dumps({
            'task': self.task.label, 'suite': self.task.suite, 'split': self.split, 'seed': self.seed,
            'success': success, 'env_steps': self.episode_steps,
            'wall_s': round(time.perf_counter() - self.episode_start, 3), 'instruction': self.env.instruction})))
        self._call_outcome()

    def _call_outcome(self) -> None:
        if not self.outcome_client.service_is_ready():
            return  # the watchdog retries until the policy server's service is up
        self.requested_at = time.monotonic()
        self.outcome_client.call_async(SetBool.Request(data=self.outcome)).add_done_callback(self._outcome_done)

    def _outcome_done(self, future) -> None:
        if self.state != WAITING_OUTCOME:
            return
        response = future.result()
        if response is not None and not response.success:
            self.get_logger().warning(f'outcome not recorded by the policy server: {response.message}')
        self.episodes += 1
        self.task_episodes += 1
        self.successes += self.outcome
        self.get_logger().info(f'episode {self.episodes} (seed {self.seed}, {self.task.label}): '
                               f'{"success" if self.outcome else "failure"} after {self.episode_steps} steps; '
                               f'{self.successes}/{self.episodes} successful')
        if self.max_episodes and self.episodes >= self.max_episodes:
            return self._finish(f'ran max_episodes={self.max_episodes}')
        if self.task.episodes and self.task_episodes >= self.task.episodes:
            if self.task_index + 1 == len(self.tasks):
                return self._finish(f'ran all {len(self.tasks)} task(s)')
            self.state = FINISHED  # the watchdog stays quiet while the next env builds
            self._next_task()
        self._start_episode()

    def _finish(self, why: str) -> None:
        self.state = FINISHED
        self.get_logger().info(f'{why}; {self.total_steps} env steps')
        self._flush_summaries()
        finish(self)

    def _flush_summaries(self, match_timeout_s: float = 3.0, ack_timeout_s: float = 10.0) -> None:
        """Before exiting: the summaries live only in this process, so give a recorder still being
        discovered a moment to match, then wait until every matched one has acknowledged them."""
        deadline = time.monotonic() + match_timeout_s
        while self.summary_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.summary_pub.get_subscription_count() and not self.summary_pub.wait_for_all_acked(
                RclpyDuration(seconds=ack_timeout_s)):
            self.get_logger().warning(f'episode summaries not acknowledged within {ack_timeout_s:g} s: '
                                      'a recorder may miss some')

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if self.state == WAITING_CHUNK:
            self.get_logger().info('reset requested: the running episode ends as a failure')
            self._report(False)
            response.success, response.message = True, 'episode ended as a failure; a new one starts'
        else:
            response.success, response.message = False, f'not running an episode ({self.state})'
        return response

    def _watchdog(self) -> None:
        if self.state == STARTING:
            self._drop_unfinished()
            return
        if time.monotonic() - self.requested_at < self.request_timeout_s:
            return
        if self.state == WAITING_CHUNK:
            # Sensor-data QoS may drop a message; the same stamp re-requests the same decision.
            self.get_logger().info(f'no chunk for {self.request_timeout_s:g} s: re-sending the observation',
                                   throttle_duration_sec=10.0)
            self._publish_observation(self.raw_obs, new_stamp=False)
        elif self.state == WAITING_OUTCOME:
            self._call_outcome()

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
