"""policy_server: answers robots' observations with action chunks and records episodes.

Per robot namespace <ns> (parameter `robots`):
  in   <ns>/joint_states, <ns>/task_state (sensor_msgs/JointState), <ns>/camera/<cam>/image_raw
       (sensor_msgs/Image, sensor-data QoS), <ns>/instruction (std_msgs/String, latched),
       <ns>/executed_chunk (trajectory_msgs/JointTrajectory, optional: the points of a chunk the
       robot executed, their time_from_start saying which; recorded with the decision),
       <ns>/episode_seed (std_msgs/Int64, latched, optional: the reset seed of the episode the robot
       is about to start; sims only), <ns>/intervention_active (std_msgs/Bool, latched: a person
       took the arm over; decisions of the last `intervention_window_s` are marked as having led
       into it, and the span is recorded with the episode), <ns>/human/joint_states,
       <ns>/human/camera/<cam>/image_raw and <ns>/human/action_chunk (train mode: the person's
       demonstrations during a takeover, from the arm bridge: an observation and, stamped like it,
       the actions the person executed from it; recorded with the episode as human chunks)
  out  <ns>/action_chunk (trajectory_msgs/JointTrajectory, header.stamp = the observation's)
  srv  <ns>/episode_outcome (std_srvs/SetBool, true = success): ends and writes the episode
       <ns>/episode_discard (std_srvs/Trigger): drops the running episode unwritten (operator)
Graph-wide: /policy_weights (in, latched: hot swap; with noise_level_final also the noise
schedule's clock, the learner's training env steps), /emergency_stop (in, latched: stop
answering), /episode_written (out: episode id, after its bag is on disk).

Modes: `train` samples with Flow-SDE and records every decision with its trace; `eval` and
`deploy` use the deterministic ODE sampler and record nothing. There each robot has its own
noise stream, re-seeded from (seed, namespace, episode number) at every outcome, so a robot's
chunks do not depend on which other robots share its batches (up to float rounding, which
differs between batch sizes): an evaluation graph repeats its scores.

Episode seeds: each seed heard labels one episode, the next one this robot starts (Episode.seed,
stored in its bag); robots that publish none (real arms) record seed-less episodes, and so does
a robot whose seed for this episode did not come, rather than reusing an older one: a wrong seed
would put the episode in the wrong group-relative baseline. A seed that arrives after its
episode's first decision (topics are not ordered) still goes to that episode.

A robot that restarts (a respawned sim bridge) calls episode_discard before its first
observation: its predecessor's unfinished episode is dropped, never written or trained on, and
its stamps may start over (a restarted sim's clock can be behind the old one's).
"""

from __future__ import annotations

import dataclasses
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from std_msgs.msg import Bool, String
from std_srvs.srv import SetBool, Trigger

from stepnft_ros import ros_io
from stepnft_ros.episodes.schema import Decision, Episode, HumanChunk
from stepnft_ros.episodes.store import EpisodeStore
from stepnft_ros.nodes.common import ConfigError, ManagedNode, Params, run_node
from stepnft_ros.policy import CheckpointError, load_checkpoint, make_policy
from stepnft_ros.policy.onnx_backend import describe_backend, probe_observations
from stepnft_ros.policy.sampler import CorrelatedStepNoise, recorded_step, scheduled_noise_level
from stepnft_ros.policy.types import Observation, ObservationError, validate_observation

MODES = {'train': 'sde', 'eval': 'ode', 'deploy': 'ode'}
RAW_STAMPS_KEPT = 8  # observations whose parts are kept as they arrived until their decision is recorded
HUMAN_PENDING = 32  # human observations (or action chunks) kept while waiting for their other half


def robot_noise(seed: int, namespace: str, episode: int, stream: str = '') -> torch.Generator:
    """A noise stream of one robot's episode (stable across runs): the ODE noise in eval / deploy mode,
    or stream 'step' for the correlated SDE step noise in train mode."""
    return torch.Generator().manual_seed(zlib.crc32(f'{seed}/{namespace}/{episode}{stream}'.encode()))


@dataclass
class Robot:
    """What the server keeps per robot namespace."""

    namespace: str
    assembler: ros_io.ObservationAssembler
    publisher: object
    pending: tuple[int, Observation] | None = None
    last_answer: tuple[int, object] | None = None  # (stamp_ns, JointTrajectory) for re-requests
    episode: Episode | None = None
    episodes_done: int = 0
    successes: int = 0
    subscriptions: list = field(default_factory=list)
    noise: torch.Generator | None = None  # eval / deploy: this robot's own ODE noise stream
    step_noise: CorrelatedStepNoise | None = None  # train with step_noise_correlation > 0: this episode's ξ
    reports_executed: bool = False  # it publishes executed_chunk: its episodes wait for the last report
    next_seed: int | None = None  # the reset seed heard for the episode the robot starts next
    intervening: bool = False  # a person has the arm (the operator's takeover)
    # The robot's own messages by observation stamp, as they arrived (recorded with the decision),
    # and its latest instruction message (recorded with each episode's first decision).
    raw: dict[int, list[tuple[str, str, bytes]]] = field(default_factory=dict)
    instruction_raw: tuple[str, str, bytes] | None = None
    # The person's demonstrations while taken over: observations by stamp (with the episode they
    # belong to) waiting for their action chunk, and chunks that came before their observation.
    human_assembler: ros_io.ObservationAssembler | None = None
    human_obs: dict[int, tuple[Observation, Episode]] = field(default_factory=dict)
    human_actions: dict[int, np.ndarray] = field(default_factory=dict)


class PolicyServer(ManagedNode):
    def __init__(self) -> None:
        super().__init__('policy_server')
        p = Params(self)
        self.mode = p.get('mode', 'train')
        if self.mode not in MODES:
            raise ConfigError(f"parameter 'mode' must be one of {sorted(MODES)}, got {self.mode!r}")
        checkpoint = p.required('checkpoint', str)
        robots = p.get('robots', ['env0'])
        state_sources = p.get('state_sources', list(ros_io.STATE_SOURCES))
        action_names = p.get('action_names', [])
        self.control_period = p.get('control_period', 0.05)
        self.actions_per_chunk = p.get('actions_per_chunk', 4)
        episode_dir = p.get('episode_dir', '')
        self.max_batch = p.get('max_batch', 16)
        batch_window_s = p.get('batch_window_ms', 2.0) / 1000.0
        noise_level = p.get('noise_level', -1.0)
        # Train mode: a falls linearly with the learner's training env steps (its weights announcements)
        # from noise_level to noise_level_final, reached at noise_decay_env_steps. < 0: a stays fixed.
        noise_level_final = p.get('noise_level_final', -1.0)
        noise_decay_env_steps = p.get('noise_decay_env_steps', 0)
        sde_noise = p.get('sde_noise', 'every_step')  # or 'recorded_step': noise only at the traced step
        # ρ of each episode's AR(1) stream of step noise over its decisions (0: independent draws)
        step_noise_correlation = p.get('step_noise_correlation', 0.0)
        step_selection = p.get('step_selection', 'uniform')  # the traced step k*: or 'last', or an index
        self.seed = seed = p.get('seed', 0)
        device = p.get('device', 'cpu')
        backend = p.get('backend', 'torch')  # or 'onnxruntime' (device: cpu / cuda / auto = its provider)
        # ODE modes on device cuda: each chunk's K solver steps replayed from a CUDA graph (large backends
        # at batch 1 are launch-bound: full-size SmolVLA's chunk on an H200, bench/results/gpu_check.json)
        cuda_graph = p.get('cuda_graph', False)
        self.max_observation_age_s = p.get('max_observation_age_s', 0.0)
        # Topics and services are not ordered: the last chunk's executed report may follow the outcome.
        self.executed_wait_s = p.get('executed_wait_s', 1.0)
        # The robot's own messages go into each episode bag too (replayable with ros2 bag play).
        self.record_robot_topics = p.get('record_robot_topics', True) and self.mode == 'train'
        # Decisions answered this long before a person takes the arm over led into the takeover.
        self.intervention_window_s = p.get('intervention_window_s', 2.0)
        # Benchmarks: each batch's inference padded to this long, as a bigger model's would take (the server
        # is busy meanwhile, as it would be). 0: off.
        simulated_inference_ms = p.get('simulated_inference_ms', 0.0)
        if not simulated_inference_ms >= 0:
            raise ConfigError(f"parameter 'simulated_inference_ms' must be >= 0, got {simulated_inference_ms}")
        self.simulated_inference_s = simulated_inference_ms / 1000.0
        if self.executed_wait_s < 0:
            raise ConfigError(f"parameter 'executed_wait_s' must be >= 0, got {self.executed_wait_s}")
        torch.set_num_threads(max(1, p.get('torch_threads', 1)))
        if not robots or len(set(robots)) != len(robots):
            raise ConfigError(f"parameter 'robots' must list distinct namespaces, got {robots}")
        self.recording = self.mode == 'train'
        if self.recording and not episode_dir:
            raise ConfigError("missing parameter 'episode_dir' (string): train mode records episodes there")

        try:
            model, meta = load_checkpoint(checkpoint, device=device if backend == 'torch' else 'cpu')
        except CheckpointError as err:
            raise ConfigError(f"parameter 'checkpoint': {err}") from None
        self.version = int(meta.get('weights_version', 0))
        cfg = model.config
        try:
            self.policy = make_policy(model, backend=backend, mode=MODES[self.mode], seed=seed, device=device,
                                      noise_level=None if noise_level < 0 else noise_level, sde_noise=sde_noise,
                                      fixed_step=recorded_step(step_selection, cfg.num_steps),
                                      threads=torch.get_num_threads(), step_noise_correlation=step_noise_correlation,
                                      cuda_graph=cuda_graph)
        except (ValueError, CheckpointError) as err:
            raise ConfigError(f"parameters 'backend' / 'device' / 'sde_noise' / 'step_selection' / "
                              f"'step_noise_correlation' / 'cuda_graph': {err}") from None
        self.noise_schedule: tuple[float, float, int] | None = None
        if noise_level_final >= 0:
            if self.mode != 'train':
                raise ConfigError(f"parameter 'noise_level_final' schedules train mode's noise; mode is {self.mode}")
            self.noise_schedule = (self.policy.noise_level, noise_level_final, noise_decay_env_steps)
            try:
                scheduled_noise_level(*self.noise_schedule, 0)
            except ValueError as err:
                raise ConfigError(f"parameters 'noise_level' / 'noise_level_final' / 'noise_decay_env_steps': "
                                  f'{err}') from None
        self.action_names = action_names or [f'a{i}' for i in range(cfg.action_dim)]
        if len(self.action_names) != cfg.action_dim:
            raise ConfigError(f"parameter 'action_names' has {len(self.action_names)} names, "
                              f'the policy outputs {cfg.action_dim} dims')
        if not cfg.state_dim:
            state_sources = []
        self.store = EpisodeStore(episode_dir) if self.recording else None
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix='episode_writer')

        self.robots: dict[str, Robot] = {}
        for ns in robots:
            robot = Robot(ns, ros_io.ObservationAssembler(state_sources, cfg.camera_names, cfg.image_size,
                                                          require_instruction=cfg.use_language),
                          self.create_publisher(ros_io.JointTrajectory, f'{ns}/{ros_io.ACTION_CHUNK}',
                                                ros_io.RELIABLE_QOS))
            self._subscribe(robot, state_sources, cfg.camera_names)
            self.create_service(SetBool, f'{ns}/{ros_io.EPISODE_OUTCOME}',
                                lambda req, resp, r=robot: self._on_outcome(r, req, resp))
            self.create_service(Trigger, f'{ns}/{ros_io.EPISODE_DISCARD}',
                                lambda req, resp, r=robot: self._on_discard(r, req, resp))
            self._reseed(robot)
            self.robots[ns] = robot
        self.estopped = False
        self.create_subscription(Bool, ros_io.EMERGENCY_STOP, self._on_estop, ros_io.LATCHED_QOS)
        self.create_subscription(String, ros_io.POLICY_WEIGHTS, self._on_weights, ros_io.LATCHED_QOS)
        self.written_pub = self.create_publisher(String, ros_io.EPISODE_WRITTEN, ros_io.EVENTS_QOS)
        # One-shot batching window, armed by the first waiting observation (an idle periodic
        # timer would cost 10-20 % of a core that the bridges need).
        self.flush_timer = self.create_timer(max(batch_window_s, 1e-3), self._on_flush_timer)
        self.flush_timer.cancel()
        # Episodes with an outcome, waiting (until their deadline) for their last decision's executed report.
        self.closing: list[tuple[float, Robot, Episode]] = []
        self.close_timer = self.create_timer(0.05, self._on_close_timer)
        self.close_timer.cancel()
        self.decisions = 0
        warm_up_s = self._warm_up() if p.get('warm_up', True) else None
        self.get_logger().info(
            f'serving {len(robots)} robot(s) {robots} in {self.mode} mode ({MODES[self.mode]} sampler, '
            f'a={self.policy.a:g}, {describe_backend(self.policy)}), weights version {self.version} from {checkpoint}'
            + (f' (warm-up inference {warm_up_s * 1e3:.0f} ms)' if warm_up_s is not None else ''))
        self.start_lifecycle(p.get('managed', False))

    def _warm_up(self) -> float:
        """One inference on a probe observation before serving, so the robot's first chunk does not pay for
        lazy initialization (allocator, kernels, CUDA graphs: hundreds of ms, longer than a chunk). The
        sampler is re-seeded after: what the robots get does not depend on it."""
        started = time.perf_counter()
        self.policy.infer_batch(probe_observations(self.policy.model.config, 1))
        self.policy.reset()
        return time.perf_counter() - started

    # ---- inputs ----------------------------------------------------------------------------

    def _subscribe(self, robot: Robot, state_sources: list[str], cameras: tuple[str, ...]) -> None:
        ns, asm = robot.namespace, robot.assembler
        parts = []
        if 'joint_position' in state_sources or 'joint_velocity' in state_sources:
            parts.append((ros_io.JointState, ros_io.JOINT_STATES, asm.add_joint_state, ros_io.SENSOR_QOS))
        if 'task_state' in state_sources:
            parts.append((ros_io.JointState, ros_io.TASK_STATE, asm.add_task_state, ros_io.SENSOR_QOS))
        for cam in cameras:
            parts.append((ros_io.Image, ros_io.camera_topic(cam), lambda m, c=cam: asm.add_image(c, m),
                          ros_io.SENSOR_QOS))
        for i, (msg_type, topic, add, qos) in enumerate(parts):
            robot.subscriptions.append(self.create_subscription(
                msg_type, f'{ns}/{topic}', lambda m, add=add, t=topic, first=(i == 0): self._on_part(
                    robot, t, add, m, resend=first), qos))
        robot.subscriptions.append(self.create_subscription(
            String, f'{ns}/{ros_io.INSTRUCTION}', lambda m: self._on_instruction(robot, m), ros_io.LATCHED_QOS))
        if self.recording:
            robot.subscriptions.append(self.create_subscription(
                ros_io.JointTrajectory, f'{ns}/{ros_io.EXECUTED_CHUNK}', lambda m: self._on_executed(robot, m),
                ros_io.RELIABLE_QOS))
            robot.subscriptions.append(self.create_subscription(
                ros_io.Int64, f'{ns}/{ros_io.EPISODE_SEED}', lambda m: self._on_seed(robot, m), ros_io.LATCHED_QOS))
            robot.subscriptions.append(self.create_subscription(
                Bool, f'{ns}/{ros_io.INTERVENTION_ACTIVE}', lambda m: self._on_intervention(robot, m),
                ros_io.LATCHED_QOS))
            self._subscribe_human(robot, parts)

    def _subscribe_human(self, robot: Robot, parts: list) -> None:
        """The same observation parts under <ns>/human/, assembled apart from the policy's (never answered)."""
        ns, old = robot.namespace, robot.assembler
        asm = robot.human_assembler = ros_io.ObservationAssembler(old.state_sources, old.camera_names,
                                                                  old.image_size, old.require_instruction)
        adders = {ros_io.JOINT_STATES: asm.add_joint_state, ros_io.TASK_STATE: asm.add_task_state}
        for msg_type, topic, _add, _qos in parts:
            camera = topic.split('/')[1] if topic.startswith('camera/') else None
            add = adders[topic] if camera is None else (lambda m, c=camera: asm.add_image(c, m))
            robot.subscriptions.append(self.create_subscription(
                msg_type, f'{ns}/{ros_io.HUMAN_PREFIX}{topic}', lambda m, add=add, t=topic: self._on_human_part(
                    robot, t, add, m), ros_io.HUMAN_QOS))
        robot.subscriptions.append(self.create_subscription(
            ros_io.JointTrajectory, f'{ns}/{ros_io.HUMAN_ACTION_CHUNK}', lambda m: self._on_human_chunk(robot, m),
            ros_io.HUMAN_QOS))

    def _on_instruction(self, robot: Robot, msg: String) -> None:
        robot.assembler.set_instruction(msg.data)
        if robot.human_assembler is not None:
            robot.human_assembler.set_instruction(msg.data)
        if self.record_robot_topics:
            robot.instruction_raw = (ros_io.INSTRUCTION, *ros_io.serialized(msg))

    def _keep_raw(self, robot: Robot, topic: str, msg) -> None:
        """The message as it arrived, for the episode bag's replayable robot topics."""
        robot.raw.setdefault(ros_io.stamp_to_ns(msg.header.stamp), []).append((topic, *ros_io.serialized(msg)))
        while len(robot.raw) > RAW_STAMPS_KEPT:  # parts of observations that never completed
            del robot.raw[min(robot.raw)]

    def _on_intervention(self, robot: Robot, msg: Bool) -> None:
        """A takeover marks the decisions of the last `intervention_window_s` as having led into it
        and opens a span in the episode; the hand-back closes it."""
        take = bool(msg.data)
        if take == robot.intervening:
            return
        robot.intervening, episode = take, robot.episode
        now_ns = self.get_clock().now().nanoseconds
        if episode is None:
            return  # no decision recorded yet: nothing led into it
        if take:
            since = now_ns - int(self.intervention_window_s * 1e9)
            marked = 0
            for i, d in enumerate(episode.decisions):
                if d.stamp_ns >= since:
                    episode.decisions[i] = dataclasses.replace(d, led_to_intervention=True)
                    marked += 1
            episode.interventions.append((now_ns, -1))
            self.get_logger().info(f'{robot.namespace}: taken over in {episode.episode_id}: {marked} decision(s) '
                                   f'of the last {self.intervention_window_s:g} s count as failures')
        elif episode.interventions and episode.interventions[-1][1] == -1:
            episode.interventions[-1] = (episode.interventions[-1][0], now_ns)
            self.get_logger().info(f'{robot.namespace}: handed back in {episode.episode_id}')

    def _on_human_part(self, robot: Robot, topic: str, add, msg) -> None:
        try:
            done = add(msg)
            if done is None:
                return
            stamp_ns, obs = done
            validate_observation(obs, self.policy.model.config)
        except ObservationError as err:
            self.get_logger().warning(f'{robot.namespace}/{ros_io.HUMAN_PREFIX}{topic}: dropped bad demonstration '
                                      f'observation: {err}', throttle_duration_sec=1.0)
            return
        if robot.episode is None:  # every written episode has a decision of the policy (what π-StepNFT trains on)
            self.get_logger().warning(f'{robot.namespace}: demonstration before the policy\'s first decision of the '
                                      'episode: not recorded', throttle_duration_sec=1.0)
            return
        robot.human_obs[stamp_ns] = (obs, robot.episode)
        while len(robot.human_obs) > HUMAN_PENDING:
            lost = min(robot.human_obs)
            del robot.human_obs[lost]
            self.get_logger().warning(f'{robot.namespace}: demonstration observation {lost} got no action chunk: '
                                      'dropped')
        if stamp_ns in robot.human_actions:
            self._record_human(robot, stamp_ns, robot.human_actions.pop(stamp_ns))

    def _on_human_chunk(self, robot: Robot, msg: ros_io.JointTrajectory) -> None:
        try:
            stamp_ns, actions = ros_io.trajectory_to_chunk(msg, self.policy.model.config.action_dim)
        except ObservationError as err:
            self.get_logger().warning(f'{robot.namespace}/{ros_io.HUMAN_ACTION_CHUNK}: dropped bad demonstration: '
                                      f'{err}', throttle_duration_sec=1.0)
            return
        if stamp_ns in robot.human_obs:
            self._record_human(robot, stamp_ns, actions)
            return
        robot.human_actions[stamp_ns] = actions  # topics are not ordered: its observation may follow
        while len(robot.human_actions) > HUMAN_PENDING:
            del robot.human_actions[min(robot.human_actions)]

    def _record_human(self, robot: Robot, stamp_ns: int, actions: np.ndarray) -> None:
        obs, episode = robot.human_obs.pop(stamp_ns)
        episode.human_chunks.append(HumanChunk(observation=obs, actions=actions, stamp_ns=stamp_ns))
        episode.human_chunks.sort(key=lambda c: c.stamp_ns)
        if episode is not robot.episode:  # closing: it may have waited for this one
            self._write_closing(lambda _deadline, e: e is episode and self._complete(robot, e))

    def _complete(self, robot: Robot, episode: Episode) -> bool:
        """Nothing more is expected for a closed episode: its last decision's executed report (from
        robots that send them) and the action chunks of its demonstration observations."""
        if robot.reports_executed and episode.decisions and episode.decisions[-1].executed is None:
            return False
        return not any(e is episode for _, e in robot.human_obs.values())

    def _on_seed(self, robot: Robot, msg: ros_io.Int64) -> None:
        try:
            seed = ros_io.msg_to_seed(msg)
        except ObservationError as err:
            self.get_logger().warning(f'{robot.namespace}/{ros_io.EPISODE_SEED}: ignored: {err}')
            return
        if robot.episode is not None and robot.episode.seed is None:
            # Came after its episode's first decision (an outcome always precedes the next seed).
            robot.episode.seed = seed
            self.get_logger().info(f'{robot.namespace}: seed {seed} came after the first decision of '
                                   f'{robot.episode.episode_id}: recorded with it')
        else:
            robot.next_seed = seed

    def _on_executed(self, robot: Robot, msg: ros_io.JointTrajectory) -> None:
        stamp_ns, first, executed = ros_io.executed_range(msg, self.control_period)
        robot.reports_executed = True
        episodes = [robot.episode] + [e for _, r, e in self.closing if r is robot]
        for episode in (e for e in episodes if e is not None):
            for i in range(len(episode.decisions) - 1, -1, -1):  # usually the last decision
                decision = episode.decisions[i]
                if decision.stamp_ns != stamp_ns:
                    continue
                horizon = len(decision.chunk)
                if first + executed > horizon:
                    self.get_logger().warning(f'{robot.namespace}: executed_chunk reports {executed} actions from '
                                              f'action {first} of a chunk of {horizon}: ignored',
                                              throttle_duration_sec=1.0)
                    return
                episode.decisions[i] = dataclasses.replace(decision, executed=executed, executed_from=first)
                if episode is not robot.episode and i == len(episode.decisions) - 1:
                    self._write_closing(lambda _deadline, e, done=episode: e is done and self._complete(robot, e))
                return
        # e.g. the answer to an episode discarded in the meantime
        self.get_logger().debug(f'{robot.namespace}: executed report for no recorded decision ({stamp_ns} ns)')

    def _on_part(self, robot: Robot, topic: str, add, msg, resend: bool) -> None:
        if not self.acting:  # lifecycle: inactive servers answer nothing (the robots hold)
            return
        stamp_ns = ros_io.stamp_to_ns(msg.header.stamp)
        if robot.last_answer is not None and stamp_ns == robot.last_answer[0]:
            if resend and not self.estopped:  # the robot re-requests: same chunk, no new sample or record
                robot.publisher.publish(robot.last_answer[1])
            return
        if self.record_robot_topics:
            self._keep_raw(robot, topic, msg)
        try:
            done = add(msg)
            if done is None:
                return
            stamp_ns, obs = done
            age = self.get_clock().now().nanoseconds - stamp_ns
            if self.max_observation_age_s > 0 and age > self.max_observation_age_s * 1e9:
                raise ObservationError(f'observation is {age / 1e9:.3f} s old (> max_observation_age_s '
                                       f'{self.max_observation_age_s}): stale')
            validate_observation(obs, self.policy.model.config)
        except ObservationError as err:
            self.get_logger().warning(f'{robot.namespace}/{topic}: dropped bad observation: {err}',
                                      throttle_duration_sec=1.0)
            return
        robot.pending = (stamp_ns, obs)
        if sum(r.pending is not None for r in self.robots.values()) >= min(len(self.robots), self.max_batch):
            self._flush()
        elif self.flush_timer.is_canceled():
            self.flush_timer.reset()

    def _on_flush_timer(self) -> None:
        self.flush_timer.cancel()
        self._flush()

    def _on_estop(self, msg: Bool) -> None:
        if bool(msg.data) != self.estopped:
            self.estopped = bool(msg.data)
            # One call site per severity: rclpy refuses to change a call site's severity.
            if self.estopped:
                self.get_logger().error('emergency stop ENGAGED: no actions will be published')
            else:
                self.get_logger().warning('emergency stop cleared')

    def _on_weights(self, msg: String) -> None:
        try:
            announced = ros_io.WeightsAnnouncement.from_msg(msg)
            if announced.version < self.version:
                return
            if announced.version > self.version:
                model, meta = load_checkpoint(announced.checkpoint, expected=self.policy.model.config,
                                              device=self.policy.device)
                # Single-threaded executor: no batch is in flight, so no decision mixes two versions.
                # (onnxruntime backend: the assignment rebuilds the graphs; on failure the old ones stay.)
                self.policy.model = model.eval()
                self.version = announced.version
                self.get_logger().info(f'hot-swapped to weights version {self.version} ({announced.checkpoint})')
        except (ValueError, CheckpointError) as err:
            self.get_logger().error(f'weights update ignored, keeping version {self.version}: {err}')
            return
        if self.noise_schedule is not None:  # also for the current version: a restarted server catches up
            a = scheduled_noise_level(*self.noise_schedule, announced.env_steps)
            if a != self.policy.noise_level:
                self.policy.noise_level = a
                self.get_logger().info(f'noise level a={a:.4g} after {announced.env_steps} training env steps '
                                       f'(weights version {self.version})')

    # ---- inference -------------------------------------------------------------------------

    def _flush(self) -> None:
        ready = [r for r in self.robots.values() if r.pending is not None]
        if not ready:
            return
        if self.estopped:
            for r in ready:
                r.pending = None
            return
        cfg = self.policy.model.config
        for start in range(0, len(ready), self.max_batch):
            batch = ready[start:start + self.max_batch]
            shape = (cfg.horizon, cfg.action_dim)
            noise = None if self.recording else torch.stack([torch.randn(shape, generator=r.noise) for r in batch])
            step_noise = (torch.stack([r.step_noise.next(shape) for r in batch])
                          if self.policy.correlates_step_noise else None)
            started = time.perf_counter()
            out = self.policy.infer_batch([r.pending[1] for r in batch], initial_noise=noise, step_noise=step_noise)
            if self.simulated_inference_s:
                time.sleep(max(0.0, self.simulated_inference_s - (time.perf_counter() - started)))
            for i, robot in enumerate(batch):
                stamp_ns, obs = robot.pending
                robot.pending = None
                msg = ros_io.chunk_to_trajectory(out.chunks[i], self.action_names, stamp_ns, self.control_period)
                robot.publisher.publish(msg)
                robot.last_answer = (stamp_ns, msg)
                self.decisions += 1
                if self.recording:
                    if robot.episode is None:
                        robot.episode = self._new_episode(robot, stamp_ns)
                    messages = robot.raw.pop(stamp_ns, [])
                    if not robot.episode.decisions and robot.instruction_raw is not None:
                        messages.append(robot.instruction_raw)
                    for older in [s for s in robot.raw if s < stamp_ns]:
                        del robot.raw[older]
                    robot.episode.decisions.append(Decision(
                        observation=obs, chunk=out.chunks[i], trace=out.trace.index(torch.tensor([i])),
                        stamp_ns=stamp_ns, weights_version=self.version, robot_messages=tuple(messages)))

    def _new_episode(self, robot: Robot, stamp_ns: int) -> Episode:
        episode = Episode(episode_id=self._episode_id(robot, stamp_ns), weights_version=self.version,
                          robot=robot.namespace, seed=robot.next_seed)
        robot.next_seed = None
        return episode

    @staticmethod
    def _episode_id(robot: Robot, stamp_ns: int) -> str:
        # Wall-clock first: ids sort by start time and stay unique across server restarts.
        return f'{time.time_ns()}_{re.sub(r"[^A-Za-z0-9_.-]", "_", robot.namespace.strip("/"))}_{stamp_ns}'

    def _reseed(self, robot: Robot) -> None:
        """New noise streams for the robot's next episode."""
        if not self.recording:
            robot.noise = robot_noise(self.seed, robot.namespace, robot.episodes_done)
        elif self.policy.correlates_step_noise:
            robot.step_noise = CorrelatedStepNoise(self.policy.step_noise_correlation, robot_noise(
                self.seed, robot.namespace, robot.episodes_done, stream='step'))

    # ---- outcomes --------------------------------------------------------------------------

    def _on_outcome(self, robot: Robot, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        success = bool(request.data)
        robot.episodes_done += 1
        robot.successes += success
        self._reseed(robot)
        robot.last_answer = None
        robot.pending = None
        episode, robot.episode = robot.episode, None
        summary = (f'{robot.namespace}: episode {"SUCCESS" if success else "failure"} '
                   f'({robot.successes}/{robot.episodes_done} successful, weights version {self.version})')
        if not self.recording:
            self.get_logger().info(summary)
            response.success, response.message = True, 'outcome noted (not recording in this mode)'
            return response
        if episode is None or not episode.decisions:
            response.success, response.message = False, 'no decisions recorded since the last outcome'
            self.get_logger().warning(f'{robot.namespace}: outcome without an episode to close, ignored')
            return response
        episode.success = success
        if not self._complete(robot, episode):
            self.closing.append((time.monotonic() + self.executed_wait_s, robot, episode))
            if self.close_timer.is_canceled():
                self.close_timer.reset()
        else:
            self._submit(episode)
        human = len(episode.human_chunks) + self._pending_human(robot, episode)
        self.get_logger().info(f'{summary}: {len(episode.decisions)} decisions'
                               f'{f", {human} human chunks" if human else ""} -> {episode.episode_id}')
        response.success, response.message = True, episode.episode_id
        return response

    @staticmethod
    def _pending_human(robot: Robot, episode: Episode) -> int:
        return sum(e is episode for _, e in robot.human_obs.values())

    def _on_close_timer(self) -> None:
        now = time.monotonic()
        for deadline, robot, episode in self.closing:
            if deadline <= now:
                if self._pending_human(robot, episode):
                    self.get_logger().warning(f'{robot.namespace}: {self._pending_human(robot, episode)} demonstration '
                                              f'observation(s) of {episode.episode_id} got no action chunk within '
                                              f'{self.executed_wait_s:g} s: written without them')
                    for stamp in [s for s, (_, e) in robot.human_obs.items() if e is episode]:
                        del robot.human_obs[stamp]
                if robot.reports_executed and episode.decisions and episode.decisions[-1].executed is None:
                    self.get_logger().warning(f'{robot.namespace}: no executed_chunk report for the last decision '
                                              f'of {episode.episode_id} within {self.executed_wait_s:g} s: recorded '
                                              'as unknown')
        self._write_closing(lambda deadline, _episode: deadline <= now)

    def _write_closing(self, done) -> None:
        """Write the closing episodes for which done(deadline, episode) holds."""
        keep = []
        for entry in self.closing:
            if done(entry[0], entry[2]):
                self._submit(entry[2])
            else:
                keep.append(entry)
        self.closing = keep
        if not self.closing:
            self.close_timer.cancel()

    def _submit(self, episode: Episode) -> None:
        # Unreported counts (robots that do not say) as actions_per_chunk: an estimate then.
        episode.env_steps = sum(self.actions_per_chunk if d.executed is None else d.executed
                                for d in episode.decisions)
        self.writer.submit(self._write, episode)

    def _on_discard(self, robot: Robot, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        # The operator threw the episode away (a person stepped in, a bad reset), or a restarted
        # bridge drops the episode its predecessor left unfinished: no outcome, no bag.
        episode, robot.episode = robot.episode, None
        robot.last_answer = None
        robot.pending = None
        robot.next_seed = None  # a restarted bridge publishes its own
        if self.recording:  # the step-noise stream restarts (from the same seed: discards are not outcomes)
            self._reseed(robot)
        robot.assembler.restart()  # what follows is a new start: a restarted sim's clock may be behind
        if robot.human_assembler is not None:
            robot.human_assembler.restart()
        robot.human_obs = {s: (o, e) for s, (o, e) in robot.human_obs.items() if e is not episode}
        robot.human_actions.clear()
        dropped = len(episode.decisions) if episode is not None else 0
        if dropped:
            self.get_logger().info(f'{robot.namespace}: discarded episode {episode.episode_id} '
                                   f'({dropped} decisions, not written)')
        response.success, response.message = True, f'dropped {dropped} decisions'
        return response

    def _write(self, episode: Episode) -> None:
        try:
            self.store.write(episode, action_names=self.action_names, control_period=self.control_period)
            self.written_pub.publish(String(data=episode.episode_id))
        except Exception as err:  # disk full, permissions: say so loudly, keep serving
            self.get_logger().error(f'could not write episode {episode.episode_id}: {err!r}')

    def close(self) -> None:
        """Finish writing episodes that already have an outcome (called on shutdown)."""
        self._write_closing(lambda _deadline, _episode: True)
        self.writer.shutdown(wait=True)


def main(args: list[str] | None = None) -> int:
    return run_node(PolicyServer, args)


if __name__ == '__main__':
    raise SystemExit(main())
