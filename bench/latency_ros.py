"""Latency hiding over ROS: the arm bridge driving the stand-in arm for a slow policy, as separate processes.

`bench/latency_hiding.py` measures the ChunkScheduler alone and `bench/latency_success.py` closes the
loop on a task in one process. Here the real nodes run as `stepnft launch deploy_real --standin`
starts them, with config/deploy_real.yaml unchanged (an FR3 mapped onto the ManiSkill stand-in arm,
10 Hz, 4 actions per chunk, two 64 px cameras): standin_arm, safety_layer and arm_bridge, one
process each. This process plays the other two parts of the graph:
- the operator: episode_active, repeated every 0.5 s as episode_operator does;
- the policy server: it answers each observation the bridge sends (<ns>/joint_states, stamped) with
  an 8-action chunk that follows a smooth reference motion (two joints on slow sines, the rest
  still) from the observation's time on, published `delay` ms (± 20 % jitter) after the
  observation arrived, as a policy that thinks that long would.

Per schedule (synchronous, latency hiding, latency hiding with a 2-action blend) and injected
delay, after a warm-up:
- held ticks per minute: control ticks at which the bridge commanded nothing (the arm holds its
  last target), from the gaps between the bridge's commands on <ns>/safety/joint_trajectory_in;
- p99 / max jerk of the commanded joint targets (third difference over control ticks / period³,
  a held tick repeating the last target), the arm joints only;
- RMS error of the measured arm joints (/joint_states) against the reference at their stamps: what
  a pause costs in tracking (the PD controller's lag is in every row alike);
- actions executed per chunk and the first executed action, from <ns>/executed_chunk.

No task success here: the scripted policy does not solve the stand-in's task (bench/latency_success.py
measures success against delay in the simulator loop, bench/standin_success.py success over ROS).
Prints JSON and writes bench/results/latency_ros.json:

    python bench/latency_ros.py                        # 3 schedules x 4 delays x 60 s, ~15 minutes
    python bench/latency_ros.py --seconds 20 --delays-ms 0,200 --schedules synchronous,latency_hiding
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.ros_overhead import Graph, spin_until  # noqa: E402
from stepnft_ros import ros_io  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.launch_description import config_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'
ROBOT = 'arm'
CONFIG = 'deploy_real.yaml'
HORIZON = 8
SCHEDULES = {
    'synchronous': dict(latency_hiding=False, blend_actions=0),
    'latency_hiding': dict(latency_hiding=True, blend_actions=0),
    'latency_hiding_blend2': dict(latency_hiding=True, blend_actions=2),
}
SWING = {0: (0.25, 5.0), 3: (0.2, 7.0)}  # arm joint -> (amplitude rad, period s): well under 0.5 rad/s
JITTER = 0.2


def reference(t: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(len(t), D) joint targets of the scripted policy at wall-clock times t (s)."""
    q = np.repeat(centre[None], len(t), axis=0)
    for joint, (amplitude, period) in SWING.items():
        q[:, joint] += amplitude * np.sin(2 * np.pi * t / period)
    return q


def schedule_metrics(commands: list[tuple[float, np.ndarray]], joints: list[tuple[float, np.ndarray]],
                     executed: list[tuple[int, int]], period: float, seconds: float, centre: np.ndarray,
                     arm_joints: int = 7) -> dict:
    """The row of one schedule and delay: `commands` (arrival time, targets) as the bridge sent them,
    `joints` (stamp, measured positions), `executed` (first action, actions run) per answered chunk."""
    if len(commands) < 4:
        raise RuntimeError(f'the bridge sent {len(commands)} commands in {seconds:g} s')
    arm = slice(0, arm_joints)
    arrivals = np.array([t for t, _ in commands])
    ticks = np.maximum(np.rint(np.diff(arrivals) / period), 1).astype(int)  # control ticks from one to the next
    # each target holds until the next command arrives: a held tick repeats the last target
    commanded = np.repeat(np.stack([q for _, q in commands]), np.append(ticks, 1), axis=0)[:, arm]
    jerk = np.abs(np.diff(commanded, 3, axis=0)).max(axis=1) / period ** 3
    stamps = np.array([t for t, _ in joints])
    error = np.stack([q for _, q in joints])[:, arm] - reference(stamps, centre)[:, arm]
    ran = [(f, n) for f, n in executed if n]
    return {'held_ticks_per_min': round(float(np.sum(ticks - 1)) * 60.0 / seconds, 1),
            'commands': len(commands),
            'p99_jerk_rad_s3': round(float(np.percentile(jerk, 99)), 1),
            'max_jerk_rad_s3': round(float(jerk.max()), 1),
            'rms_tracking_error_rad': round(float(np.sqrt(np.mean(error ** 2))), 4),
            'executed_per_chunk': round(float(np.mean([n for _, n in ran])), 2) if ran else 0.0,
            'first_executed_action': round(float(np.mean([f for f, _ in ran])), 2) if ran else 0.0,
            'chunks_without_executed_actions': len(executed) - len(ran)}


def bridge_config() -> dict:
    return yaml.safe_load((config_dir() / CONFIG).read_text())['/**/arm_bridge']['ros__parameters']


class ScriptedPolicy:
    """Answers the bridge's observations with chunks along the reference, after the injected delay."""

    def __init__(self, node, names: list[str], period: float, centre: np.ndarray, seed: int) -> None:
        self.names, self.period, self.centre = names, period, centre
        self.rng = np.random.default_rng(seed)
        self.delay_s = 0.0
        self.due: list[tuple[float, int, object]] = []  # (publish at, tie-break, chunk message)
        self.answered = 0
        self.pub = node.create_publisher(ros_io.JointTrajectory, f'/{ROBOT}/{ros_io.ACTION_CHUNK}',
                                         ros_io.RELIABLE_QOS)
        node.create_subscription(ros_io.JointState, f'/{ROBOT}/{ros_io.JOINT_STATES}', self._on_observation,
                                 ros_io.SENSOR_QOS)

    def _on_observation(self, msg) -> None:
        stamp_ns = ros_io.stamp_to_ns(msg.header.stamp)
        # action i runs at the request tick + i + 1 (ChunkScheduler), one period apart
        times = stamp_ns * 1e-9 + self.period * np.arange(1, HORIZON + 1)
        chunk = ros_io.chunk_to_trajectory(reference(times, self.centre), self.names, stamp_ns, self.period)
        delay = max(0.0, self.delay_s * (1.0 + JITTER * self.rng.standard_normal())) if self.delay_s else 0.0
        heapq.heappush(self.due, (time.monotonic() + delay, self.answered, chunk))
        self.answered += 1

    def publish_due(self) -> None:
        now = time.monotonic()
        while self.due and self.due[0][0] <= now:
            self.pub.publish(heapq.heappop(self.due)[2])


class Recorder:
    """What the arm got: the bridge's commands, the measured joints, the executed-chunk reports."""

    def __init__(self, node, names: list[str], period: float) -> None:
        self.names, self.period = names, period
        self.commands: list[tuple[float, np.ndarray]] = []
        self.joints: list[tuple[float, np.ndarray]] = []
        self.executed: list[tuple[int, int]] = []
        node.create_subscription(ros_io.JointTrajectory, f'/{ROBOT}/{ros_io.SAFETY_JOINT_TRAJECTORY_IN}',
                                 self._on_command, ros_io.RELIABLE_QOS)
        node.create_subscription(ros_io.JointState, '/joint_states', self._on_joints, ros_io.RELIABLE_QOS)
        node.create_subscription(ros_io.JointTrajectory, f'/{ROBOT}/{ros_io.EXECUTED_CHUNK}', self._on_executed,
                                 ros_io.RELIABLE_QOS)
        self.recording = False

    def clear(self) -> None:
        self.commands.clear()
        self.joints.clear()
        self.executed.clear()

    def _on_command(self, msg) -> None:
        if self.recording and msg.points:
            order = [list(msg.joint_names).index(n) for n in self.names]
            self.commands.append((time.monotonic(), np.asarray(msg.points[0].positions)[order]))

    def _on_joints(self, msg) -> None:
        if self.recording:
            order = [list(msg.name).index(n) for n in self.names]
            self.joints.append((ros_io.stamp_to_ns(msg.header.stamp) * 1e-9, np.asarray(msg.position)[order]))

    def _on_executed(self, msg) -> None:
        if self.recording:
            _, first, executed = ros_io.executed_range(msg, self.period)
            self.executed.append((first, executed))


def run(args) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import Bool

    bridge = bridge_config()
    names, period = list(bridge['joint_names']), 1.0 / bridge['control_rate_hz']
    rows = []
    rclpy.init()
    node = rclpy.create_node('latency_ros_bench')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    work = Path(tempfile.mkdtemp(prefix='latency_ros_'))
    try:
        with Graph(work, config=CONFIG) as graph:
            arm = graph.start('sim_bridge.standin_arm', 'standin_arm', {'seed': args.seed})
            graph.start('stepnft_ros.nodes.safety_layer', 'safety_layer', {}, namespace=ROBOT)
            arm_joints: deque = deque(maxlen=1)  # the latest only
            node.create_subscription(ros_io.JointState, '/joint_states', arm_joints.append, ros_io.RELIABLE_QOS)
            spin_until(executor, graph, lambda: arm_joints, 180, 'joint states from the stand-in arm')
            first = arm_joints[-1]
            centre = np.asarray(first.position)[[list(first.name).index(n) for n in names]]
            policy = ScriptedPolicy(node, names, period, centre, args.seed)
            recorder = Recorder(node, names, period)
            active = node.create_publisher(Bool, f'/{ROBOT}/{ros_io.EPISODE_ACTIVE}', ros_io.LATCHED_QOS)

            def spin_for(seconds: float, episode: bool) -> None:
                end, beat = time.monotonic() + seconds, 0.0
                while time.monotonic() < end:
                    graph.check('measuring')
                    if time.monotonic() > beat:  # the operator's heartbeat
                        active.publish(Bool(data=episode))
                        beat = time.monotonic() + 0.5
                    executor.spin_once(timeout_sec=0.002)
                    policy.publish_due()

            for schedule in args.schedules:
                bridge_node = graph.start('stepnft_ros.nodes.arm_bridge', 'arm_bridge', dict(SCHEDULES[schedule]),
                                          namespace=ROBOT)
                ready_by = time.monotonic() + 120
                while 'bridging' not in bridge_node.tail(20000):  # its start-up line
                    if time.monotonic() > ready_by:
                        raise RuntimeError(f'arm_bridge did not come up:\n{bridge_node.tail()}')
                    spin_for(0.2, False)
                for delay_ms in args.delays_ms:
                    policy.delay_s = delay_ms / 1000.0
                    spin_for(args.warmup, True)  # the first chunk's wait; latency hiding learns the delay
                    recorder.clear()
                    recorder.recording = True
                    spin_for(args.seconds, True)
                    recorder.recording = False
                    row = {'schedule': schedule, 'delay_ms': delay_ms, 'seconds': args.seconds,
                           **schedule_metrics(recorder.commands, recorder.joints, recorder.executed, period,
                                              args.seconds, centre)}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    spin_for(1.5, False)  # episode over: the bridge drops its schedule, the arm holds
                bridge_node.stop()
                graph.nodes.remove(bridge_node)
            arm.check('finishing')
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return {'config': f'config/{CONFIG}', 'control_rate_hz': 1.0 / period,
            'actions_per_chunk': bridge['actions_per_chunk'], 'horizon': HORIZON, 'jitter': JITTER,
            'warmup_s': args.warmup, 'reference': {str(j): {'amplitude_rad': a, 'period_s': p}
                                                  for j, (a, p) in SWING.items()},
            'rows': rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--delays-ms', type=lambda s: [int(x) for x in s.split(',')], default=[0, 50, 100, 200])
    p.add_argument('--schedules', type=lambda s: s.split(','), default=list(SCHEDULES))
    p.add_argument('--seconds', type=float, default=60.0, help='measured per schedule and delay')
    p.add_argument('--warmup', type=float, default=8.0, help='s per row before measuring: the bridge learns the delay')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=str(RESULTS / 'latency_ros.json'))
    args = p.parse_args(argv)
    unknown = [s for s in args.schedules if s not in SCHEDULES]
    if unknown:
        p.error(f'unknown schedules {unknown}; choose from {list(SCHEDULES)}')
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    atomic_write_text(Path(args.out), text)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
