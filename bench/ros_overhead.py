"""What ROS 2 costs: per-decision latency over the policy's own time, and train_sim throughput vs the raw loop.

1. overhead: a policy_server process (train mode, recording) serves N robots that this process
   plays in lock-step: per robot it publishes task_state + joint_states (one stamp, as the
   ManiSkill bridge does) and waits for the action_chunk with that stamp. The time from building
   the messages to the decoded chunk, minus FlowPolicy.infer_batch on the same N observations
   (same model, timed in-process right after each round), is the ROS overhead per decision.
2. throughput: env steps/s of the ROS-free loop (rollout.run_episode on ManiSkillEnv) against
   the train_sim graph's policy_server + 1 and 2 maniskill_bridge processes, same settings and
   checkpoint, counted from the bridges' episode_summary messages. The learner is not running.

Prints one JSON document and writes it to bench/results/ros_overhead.json (or --out):

    python bench/ros_overhead.py                               # both parts, ~6 minutes
    python bench/ros_overhead.py --parts overhead --envs 1,4 --decisions 300
    python bench/ros_overhead.py --parts throughput --seconds 60 --checkpoint runs/learning_pickcube/sft
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from stepnft_ros import ros_io  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.launch_description import config_dir  # noqa: E402
from stepnft_ros.launcher import node_command, stop_processes  # noqa: E402
from stepnft_ros.policy import FlowPolicy, FlowVLA, Observation, PolicyConfig  # noqa: E402
from stepnft_ros.policy.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ManiSkill PickCube-v1 state observations: 9 joint positions + 9 velocities + 24 task features.
N_JOINTS, N_TASK, ACTION_DIM = 9, 24, 7
STATE_DIM = 2 * N_JOINTS + N_TASK
# The policy size of config/train_sim.yaml's embedded default (and of the learning benchmark).
DEFAULT_POLICY = dict(state_dim=STATE_DIM, action_dim=ACTION_DIM, horizon=8, d_model=64, n_heads=4,
                      prefix_layers=1, expert_layers=2, num_steps=4, noise_level=0.7)
FIRST_SEED, SEED_STRIDE = 1_000_000, 100_000  # launch_description.TrainSimArgs defaults


def log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def graph_params() -> dict:
    """config/train_sim.yaml, flattened per node: what the graph's nodes really run with."""
    raw = yaml.safe_load((config_dir() / 'train_sim.yaml').read_text())
    shared = {**raw['/**']['ros__parameters'], 'env_id': 'PickCube-v1'}  # the state sizes above are PickCube's
    return {'policy_server': {**shared, **raw['policy_server']['ros__parameters']},
            'maniskill_bridge': {**shared, **raw['/**/maniskill_bridge']['ros__parameters']}}


def summarize(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1e3
    return {'n': int(ms.size), 'p50_ms': round(float(np.percentile(ms, 50)), 3),
            'p90_ms': round(float(np.percentile(ms, 90)), 3), 'p99_ms': round(float(np.percentile(ms, 99)), 3),
            'mean_ms': round(float(ms.mean()), 3)}


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used (Linux /proc/stat): others' share is noise."""
    fields = [int(x) for x in Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf('SC_CLK_TCK')  # minus idle and iowait


def wait_quiet(max_wait_s: float, threshold: float = 0.3) -> float:
    """Wait (up to max_wait_s) until other work uses under `threshold` cores: the machine is shared."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, t0 = machine_busy_s(), time.perf_counter()
        time.sleep(1.0)
        load = (machine_busy_s() - b0) / (time.perf_counter() - t0)
        if load < threshold or time.monotonic() > deadline:
            if load >= threshold:
                log(f'machine still busy ({load:.2f} cores used by others); measuring anyway')
            return round(load, 3)


# ---- child processes ----------------------------------------------------------------------

class NodeProc:
    """One node as `python -m <module> --ros-args ...`, exactly as stepnft_ros.launcher starts it."""

    def __init__(self, module: str, name: str, params: dict, work: Path, namespace: str = '',
                 config: str = 'train_sim.yaml') -> None:
        tag = f'{namespace}_{name}'.strip('_')
        self.name = f'/{namespace}/{name}' if namespace else f'/{name}'
        params_file = work / f'{tag}.params.yaml'
        # Per-instance values only; the static ones come from the same config file the launcher passes.
        params_file.write_text(yaml.safe_dump({self.name: {'ros__parameters': params}}))
        cmd = node_command(module, name, namespace, [config_dir() / config, params_file])
        self.log_path = work / f'{tag}.log'
        self._log = open(self.log_path, 'w')
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors='replace')[-chars:]

    def check(self, doing: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f'{self.name} exited with code {self.proc.returncode} while {doing}; '
                               f'log {self.log_path}, tail:\n{self.tail()}')

    def cpu_s(self) -> float:
        """user + system CPU seconds so far (Linux /proc; fields after the command name)."""
        try:
            fields = Path(f'/proc/{self.proc.pid}/stat').read_text().rsplit(')', 1)[1].split()
        except OSError:
            return float('nan')
        return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGINT (the policy server finishes writing episodes), escalating if it hangs."""
        stop_processes([self.proc], timeout_s)
        self._log.close()


class Graph:
    """Started nodes; stop() ends all of them (bridges first, so the server sees no new work)."""

    def __init__(self, work: Path, config: str = 'train_sim.yaml') -> None:
        self.work = work
        self.config = config  # the graph's params file in config/, as the launcher passes it
        self.nodes: list[NodeProc] = []

    def start(self, module: str, name: str, params: dict, namespace: str = '') -> NodeProc:
        self.nodes.append(NodeProc(module, name, params, self.work, namespace, self.config))
        return self.nodes[-1]

    def check(self, doing: str) -> None:
        for node in self.nodes:
            node.check(doing)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(graph: Graph, checkpoint: Path, robots: list[str], episode_dir: Path,
                 device: str = 'cpu') -> NodeProc:
    return graph.start('stepnft_ros.nodes.policy_server', 'policy_server',
                       {'checkpoint': str(checkpoint), 'episode_dir': str(episode_dir), 'robots': robots,
                        'mode': 'train', 'device': device})


def spin_until(executor, graph: Graph, condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        graph.check(f'waiting for {what}')
        if time.monotonic() > deadline:
            tails = '\n'.join(f'--- {n.name} ({n.log_path}):\n{n.tail(1500)}' for n in graph.nodes)
            raise RuntimeError(f'timed out after {timeout_s:g} s waiting for {what}\n{tails}')
        executor.spin_once(timeout_sec=0.05)


# ---- part 1: latency per decision ---------------------------------------------------------

JOINT_NAMES = tuple(f'joint{i}' for i in range(N_JOINTS))
TASK_NAMES = tuple(f'task{i}' for i in range(N_TASK))


def publish_observation(pubs: tuple, state: np.ndarray, stamp_ns: int) -> None:
    """What the bridge publishes per decision: task_state, then joint_states (it completes the observation)."""
    task, joint = pubs
    task.publish(ros_io.arrays_to_joint_state(TASK_NAMES, state[2 * N_JOINTS:], None, stamp_ns))
    joint.publish(ros_io.arrays_to_joint_state(JOINT_NAMES, state[:N_JOINTS], state[N_JOINTS:2 * N_JOINTS], stamp_ns))


def measure_overhead(n_envs: int, args, checkpoint: Path, model: FlowVLA, work: Path) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String
    from std_srvs.srv import SetBool

    robots = [f'env{i}' for i in range(n_envs)]
    noise_level = graph_params()['policy_server']['noise_level']
    policy = FlowPolicy(model, mode='sde', noise_level=noise_level, seed=1, device=args.device)
    rng = np.random.default_rng(0)
    with Graph(work) as graph:
        server = start_server(graph, checkpoint, robots, work / f'episodes_overhead_{n_envs}', args.device)
        node = rclpy.create_node(f'overhead_bench_{n_envs}')
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        received: dict[str, tuple[int, float]] = {}

        def on_chunk(msg, ns):
            stamp_ns, _ = ros_io.trajectory_to_chunk(msg, ACTION_DIM)  # the bridge decodes every chunk too
            received[ns] = (stamp_ns, time.perf_counter())

        pubs, outcome = {}, {}
        for ns in robots:
            pubs[ns] = (node.create_publisher(ros_io.JointState, f'/{ns}/{ros_io.TASK_STATE}', ros_io.SENSOR_QOS),
                        node.create_publisher(ros_io.JointState, f'/{ns}/{ros_io.JOINT_STATES}', ros_io.SENSOR_QOS))
            node.create_subscription(ros_io.JointTrajectory, f'/{ns}/{ros_io.ACTION_CHUNK}',
                                     lambda m, ns=ns: on_chunk(m, ns), ros_io.RELIABLE_QOS)
            outcome[ns] = node.create_client(SetBool, f'/{ns}/{ros_io.EPISODE_OUTCOME}')
        written = []  # episode ids on disk: rounds while one is still being written are told apart
        node.create_subscription(String, ros_io.EPISODE_WRITTEN, lambda m: written.append(m.data),
                                 ros_io.EVENTS_QOS)
        try:
            spin_until(executor, graph, lambda: all(
                task.get_subscription_count() and joint.get_subscription_count() and outcome[ns].service_is_ready()
                for ns, (task, joint) in pubs.items()), 120.0, 'the policy server to subscribe')
            # An idle server still runs its batch timer: its CPU share then is pure overhead.
            cpu0, t0 = server.cpu_s(), time.perf_counter()
            end = t0 + 2.0
            while time.perf_counter() < end:
                executor.spin_once(timeout_sec=0.1)
            idle_cpu = (server.cpu_s() - cpu0) / (time.perf_counter() - t0)

            stamp_ns = time.time_ns()
            latencies, rounds, raw, resends, closed = [], [], [], 0, 0
            by_writing: dict[bool, list[float]] = {False: [], True: []}
            total = args.warmup + args.decisions
            cpu0 = None
            for r in range(total):
                if r == args.warmup:
                    cpu0, t_measure = server.cpu_s(), time.perf_counter()
                    own0, busy0 = time.process_time(), machine_busy_s()
                stamp_ns = max(stamp_ns + 1, time.time_ns())
                states = (rng.standard_normal((n_envs, STATE_DIM)) * 0.5).astype(np.float32)
                sent: dict[str, float] = {}
                received.clear()

                writing = len(written) < closed
                for i, ns in enumerate(robots):
                    sent[ns] = time.perf_counter()
                    publish_observation(pubs[ns], states[i], stamp_ns)
                retried, timeouts = False, 0
                deadline = time.perf_counter() + args.request_timeout
                while any(received.get(ns, (None,))[0] != stamp_ns for ns in robots):
                    executor.spin_once(timeout_sec=0.01)
                    if time.perf_counter() > deadline:  # best-effort input lost: re-request, like the bridge
                        server.check('answering observations')
                        timeouts += 1
                        if timeouts > 30:
                            raise RuntimeError(f'no action chunk for {timeouts} re-sends in round {r}; server '
                                               f'log {server.log_path}, tail:\n{server.tail()}')
                        for i, ns in enumerate(robots):
                            if received.get(ns, (None,))[0] != stamp_ns:
                                publish_observation(pubs[ns], states[i], stamp_ns)
                        retried, deadline = True, time.perf_counter() + args.request_timeout
                        resends += r >= args.warmup
                obs = [Observation(state=s) for s in states]
                t = time.perf_counter()
                policy.infer_batch(obs)
                raw_s = time.perf_counter() - t
                if r >= args.warmup and not retried:
                    latencies += [received[ns][1] - sent[ns] for ns in robots]
                    by_writing[writing or len(written) < closed] += latencies[-n_envs:]
                    rounds.append(max(received[ns][1] for ns in robots) - sent[robots[0]])
                    raw.append(raw_s)
                if (r + 1) % args.episode_decisions == 0:
                    # Close the episodes: the server writes them in its writer thread during the next
                    # decisions, as in training (not timed here).
                    futures = [outcome[ns].call_async(SetBool.Request(data=False)) for ns in robots]
                    closed += n_envs
                    spin_until(executor, graph, lambda fs=futures: all(f.done() for f in fs), 30.0,
                               'episode outcomes')
            measure_s = time.perf_counter() - t_measure
            server_cpu = server.cpu_s() - cpu0
            others = machine_busy_s() - busy0 - server_cpu - (time.process_time() - own0)
        finally:
            executor.shutdown()
            node.destroy_node()
    lat, rawst = summarize(latencies), summarize(raw)
    return {
        'envs': n_envs, 'decisions_per_robot': len(rounds), 'rounds_with_resend': resends,
        'ros_latency': lat, 'round_latency': summarize(rounds), 'raw_policy_batch': rawst,
        'ros_latency_while_writing_episodes': summarize(by_writing[True]) if by_writing[True] else None,
        'ros_latency_not_writing': summarize(by_writing[False]) if by_writing[False] else None,
        'overhead_p50_ms': round(lat['p50_ms'] - rawst['p50_ms'], 3),
        'overhead_mean_ms': round(lat['mean_ms'] - rawst['mean_ms'], 3),
        # over the measured rounds, including the server's idle time while this process times the raw policy
        'server_cpu_ms_per_decision': round(1e3 * server_cpu / max(1, len(rounds) * n_envs), 3),
        'server_cpu_share_measuring': round(server_cpu / measure_s, 3),
        'server_cpu_share_idle': round(idle_cpu, 3),
        'others_cpu_share': round(others / measure_s, 3),
    }


def message_costs(repeats: int = 2000) -> dict:
    """In-process µs per call of the ros_io helpers each decision goes through (no DDS)."""
    from rclpy.serialization import deserialize_message, serialize_message

    rng = np.random.default_rng(0)
    s = rng.standard_normal(STATE_DIM).astype(np.float32)
    chunk = rng.standard_normal((DEFAULT_POLICY['horizon'], ACTION_DIM)).astype(np.float32)
    names = [f'a{i}' for i in range(ACTION_DIM)]
    jn, tn = list(JOINT_NAMES), list(TASK_NAMES)
    traj = ros_io.chunk_to_trajectory(chunk, names, 1, 0.05)
    traj_bytes = serialize_message(traj)

    def assemble():
        asm = ros_io.ObservationAssembler(ros_io.STATE_SOURCES, (), 64)
        asm.add_task_state(ros_io.arrays_to_joint_state(tn, s[2 * N_JOINTS:], None, 5))
        asm.add_joint_state(joint5)

    joint5 = ros_io.arrays_to_joint_state(jn, s[:N_JOINTS], s[N_JOINTS:2 * N_JOINTS], 5)
    cases = {
        'arrays_to_joint_state': lambda: ros_io.arrays_to_joint_state(jn, s[:N_JOINTS], s[N_JOINTS:2 * N_JOINTS], 1),
        'assemble_observation': assemble,
        'chunk_to_trajectory': lambda: ros_io.chunk_to_trajectory(chunk, names, 1, 0.05),
        'trajectory_to_chunk': lambda: ros_io.trajectory_to_chunk(traj, ACTION_DIM),
        'serialize_trajectory': lambda: serialize_message(traj),
        'deserialize_trajectory': lambda: deserialize_message(traj_bytes, ros_io.JointTrajectory),
    }
    out = {}
    for name, fn in cases.items():
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = round(1e6 * (time.perf_counter() - t) / repeats, 1)
    return out


# ---- part 2: throughput -------------------------------------------------------------------

def env_config():
    from sim_bridge.maniskill_env import ManiSkillEnvConfig

    p = graph_params()['maniskill_bridge']
    return ManiSkillEnvConfig(env_id=p['env_id'], control_mode=p['control_mode'], obs_mode='state',
                              max_episode_steps=p['max_episode_steps'], image_size=p['image_size'],
                              reconfigure_on_reset=p['reconfigure_on_reset'])


class Timed:
    """Wraps an env or a policy and times the calls run_episode makes (so the loop itself stays untouched)."""

    def __init__(self, inner, methods: tuple[str, ...]) -> None:
        self.inner = inner
        self.times: dict[str, list[float]] = {m: [] for m in methods}

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in self.times:
            return attr

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return attr(*a, **kw)
            finally:
                self.times[name].append(time.perf_counter() - t)
        return timed


def throughput_raw(seconds: float, model: FlowVLA) -> dict:
    from sim_bridge.maniskill_env import ManiSkillEnv
    from stepnft_ros.rollout import run_episode

    params = graph_params()
    policy = Timed(FlowPolicy(model, mode='sde', noise_level=params['policy_server']['noise_level'], seed=0),
                   ('infer',))
    steps = episodes = successes = 0
    with ManiSkillEnv(env_config()) as raw_env:
        env = Timed(raw_env, ('reset', 'step'))
        start = time.perf_counter()
        cpu0, busy0 = time.process_time(), machine_busy_s()
        while time.perf_counter() - start < seconds:
            ep = run_episode(env, policy, FIRST_SEED + episodes, params['maniskill_bridge']['actions_per_chunk'])
            steps, episodes, successes = steps + ep.env_steps, episodes + 1, successes + ep.success
        wall = time.perf_counter() - start
        cpu, busy = time.process_time() - cpu0, machine_busy_s() - busy0
    return {'env_steps': steps, 'episodes': episodes, 'successes': successes, 'window_s': round(wall, 2),
            'env_steps_per_s': round(steps / wall, 2), 'cpu_share': round(cpu / wall, 3),
            'others_cpu_share': round((busy - cpu) / wall, 3),
            'policy_infer': summarize(policy.times['infer']), 'env_step': summarize(env.times['step']),
            'env_reset': summarize(env.times['reset'])}


def decompose(events: list[tuple[str, float, object]]) -> dict:
    """One robot's timeline as this process saw it -> where a decision's and an episode's time goes."""
    parts = {'obs_to_chunk': [], 'chunk_to_next_obs': [], 'summary_to_next_obs': []}
    for (a, ta, sa), (b, tb, sb) in itertools.pairwise(events):
        if a == 'obs' and b == 'chunk' and sa == sb:
            parts['obs_to_chunk'].append(tb - ta)
        elif a == 'chunk' and b == 'obs':
            parts['chunk_to_next_obs'].append(tb - ta)
        elif a == 'summary' and b == 'obs':
            parts['summary_to_next_obs'].append(tb - ta)
    return {k: summarize(v) for k, v in parts.items() if v}


def throughput_ros(n_envs: int, seconds: float, checkpoint: Path, work: Path) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String

    robots = [f'env{i}' for i in range(n_envs)]
    summaries: dict[str, list[tuple[float, dict]]] = {ns: [] for ns in robots}
    events: dict[str, list[tuple[str, float, object]]] = {ns: [] for ns in robots}
    written = []
    with Graph(work) as graph:
        server = start_server(graph, checkpoint, robots, work / f'episodes_throughput_{n_envs}')
        bridges = [graph.start('sim_bridge.maniskill_node', 'maniskill_bridge',
                               {'first_seed': FIRST_SEED + i * SEED_STRIDE, 'publish_clock': i == 0,
                                'obs_mode': 'state'}, namespace=ns) for i, ns in enumerate(robots)]
        node = rclpy.create_node(f'throughput_bench_{n_envs}')
        executor = SingleThreadedExecutor()
        executor.add_node(node)

        def on_summary(msg, ns):
            t = time.perf_counter()
            summaries[ns].append((t, json.loads(msg.data)))
            events[ns].append(('summary', t, None))

        def on_stamped(msg, ns, kind):
            events[ns].append((kind, time.perf_counter(), ros_io.stamp_to_ns(msg.header.stamp)))

        for ns in robots:
            node.create_subscription(String, f'/{ns}/episode_summary', lambda m, ns=ns: on_summary(m, ns),
                                     ros_io.RELIABLE_QOS)
            # One more reader of what the bridge and the server send anyway: the timeline of each decision.
            node.create_subscription(ros_io.JointState, f'/{ns}/{ros_io.JOINT_STATES}',
                                     lambda m, ns=ns: on_stamped(m, ns, 'obs'), ros_io.SENSOR_QOS)
            node.create_subscription(ros_io.JointTrajectory, f'/{ns}/{ros_io.ACTION_CHUNK}',
                                     lambda m, ns=ns: on_stamped(m, ns, 'chunk'), ros_io.RELIABLE_QOS)
        node.create_subscription(String, ros_io.EPISODE_WRITTEN, lambda m: written.append(m.data),
                                 ros_io.EVENTS_QOS)
        try:
            # The first summary of every bridge opens the window: start-up and discovery stay outside it.
            spin_until(executor, graph, lambda: all(summaries.values()), 300.0, 'the first episode of every bridge')
            procs = [server, *bridges]
            cpu0, own0, busy0 = [p.cpu_s() for p in procs], time.process_time(), machine_busy_s()
            t0 = time.perf_counter()
            spin_until(executor, graph, lambda: time.perf_counter() - t0 >= seconds, seconds + 10, 'the window')
            # ... and each bridge's window closes at its first summary after `seconds`.
            spin_until(executor, graph, lambda: all(s[-1][0] >= t0 + seconds for s in summaries.values()),
                       120.0, 'the last episode of every bridge')
            wall = time.perf_counter() - t0
            used = {p.name: p.cpu_s() - c for p, c in zip(procs, cpu0, strict=True)}
            used['bench'] = time.process_time() - own0
            others = machine_busy_s() - busy0 - sum(used.values())
            cpu = {k: round(v / wall, 3) for k, v in used.items()}
        finally:
            executor.shutdown()
            node.destroy_node()
    per_env = {}
    for ns, s in summaries.items():
        first, last = s[0][0], s[-1][0]
        window = [body for t, body in s if t > first]  # episodes that ended after the first one
        per_env[ns] = {'env_steps': sum(b['env_steps'] for b in window), 'episodes': len(window),
                       'successes': sum(b['success'] for b in window), 'window_s': round(last - first, 2),
                       'timeline': decompose([e for e in events[ns] if first <= e[1] <= last])}
    return {'envs': n_envs, 'per_env': per_env, 'episodes_written': len(written), 'cpu_share': cpu,
            'others_cpu_share': round(others / wall, 3)}


def env_rate(runs: list[dict]) -> float:
    """Env steps/s over several windows of one robot: total steps / total time."""
    return sum(r['env_steps'] for r in runs) / sum(r['window_s'] for r in runs)


def measure_throughput(args, checkpoint: Path, model: FlowVLA, work: Path) -> dict:
    # Alternated rounds of raw and ROS, so a busy spell of the (shared) machine hits all alike.
    seconds = args.seconds / args.repeats
    rounds = []
    for i in range(args.repeats):
        wait_quiet(args.quiet_wait)
        log(f'throughput round {i + 1}/{args.repeats}: raw loop, {seconds:g} s')
        entry = {'raw': throughput_raw(seconds, model)}
        for n in (1, 2):
            wait_quiet(args.quiet_wait)
            log(f'throughput round {i + 1}/{args.repeats}: ROS graph with {n} bridge(s), {seconds:g} s')
            entry[f'ros_{n}env'] = throughput_ros(n, seconds, checkpoint, work)
        rounds.append(entry)
        log(json.dumps({'raw': entry['raw']['env_steps_per_s'],
                        **{k: {ns: round(env_rate([e]), 2) for ns, e in entry[k]['per_env'].items()}
                           for k in ('ros_1env', 'ros_2env')}}))
    raw = env_rate([r['raw'] for r in rounds])
    ros = {n: sum(env_rate([r[f'ros_{n}env']['per_env'][f'env{i}'] for r in rounds]) for i in range(n))
           for n in (1, 2)}
    return {'raw_env_steps_per_s': round(raw, 2), 'ros_1env_env_steps_per_s': round(ros[1], 2),
            'ros_2env_env_steps_per_s': round(ros[2], 2), 'ratio_ros_1env_over_raw': round(ros[1] / raw, 3),
            'ratio_ros_2env_over_raw': round(ros[2] / raw, 3), 'target_ratio_1env': 0.8,
            'meets_target': ros[1] / raw >= 0.8, 'seconds_per_config': args.seconds, 'rounds': rounds}


# ---- main ---------------------------------------------------------------------------------

def cpu_model() -> str:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
            return line.split(':', 1)[1].strip()
    return 'unknown'


def make_checkpoint(given: str, work: Path) -> tuple[Path, str]:
    if given:
        path = Path(given)
        if not (path / 'model.safetensors').exists():
            raise SystemExit(f'--checkpoint {given}: no model.safetensors there')
        return path.resolve(), str(path)
    torch.manual_seed(0)
    path = work / 'checkpoint'
    save_checkpoint(path, FlowVLA(PolicyConfig(**DEFAULT_POLICY)), {'stage': 'bench', 'weights_version': 0})
    return path, 'untrained, default size'


def run(args, work: Path) -> dict:
    import rclpy
    from domain_coordinator import domain_id

    checkpoint, origin = make_checkpoint(args.checkpoint, work)
    model, _ = load_checkpoint(checkpoint)
    cfg = model.config
    if (cfg.state_dim, cfg.action_dim, cfg.camera_names) != (STATE_DIM, ACTION_DIM, ()):
        raise SystemExit(f'{checkpoint}: state {cfg.state_dim}, action {cfg.action_dim}, cameras {cfg.camera_names}; '
                         f'this benchmark needs PickCube state observations ({STATE_DIM}, {ACTION_DIM}, no cameras)')
    parts = {p.strip() for p in args.parts.split(',') if p.strip()}
    report = {
        'benchmark': 'ros_overhead',
        'machine': {'cpus': os.cpu_count(), 'cpu_model': cpu_model(), 'torch': torch.__version__,
                    'torch_threads': torch.get_num_threads(),
                    'rmw': os.environ.get('RMW_IMPLEMENTATION', 'default (rmw_fastrtps_cpp)')},
        'args': vars(args),
        'checkpoint': {'path': origin, 'config': {k: getattr(cfg, k) for k in DEFAULT_POLICY}},
        'settings': {'server': graph_params()['policy_server'], 'bridge': graph_params()['maniskill_bridge']},
    }
    with domain_id() as did:
        os.environ.update(ROS_DOMAIN_ID=str(did), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
                          ROS_LOG_DIR=str(work / 'ros_log'))
        rclpy.init(domain_id=did)
        try:
            if 'overhead' in parts:
                report['message_costs_us'] = message_costs()
                report['overhead'] = []
                for n in [int(x) for x in args.envs.split(',')]:
                    wait_quiet(args.quiet_wait)
                    log(f'overhead: {n} env(s), {args.decisions} decisions after {args.warmup} warm-up')
                    report['overhead'].append(measure_overhead(n, args, checkpoint, model, work))
                    log(json.dumps(report['overhead'][-1]))
            if 'throughput' in parts:
                report['throughput'] = measure_throughput(args, checkpoint, model, work)
        finally:
            rclpy.shutdown()
    summary = {f'overhead_{o["envs"]}env_ms': {'p50': o['overhead_p50_ms'], 'mean': o['overhead_mean_ms'],
                                               'ros_p50': o['ros_latency']['p50_ms'],
                                               'raw_p50': o['raw_policy_batch']['p50_ms']}
               for o in report.get('overhead', [])}
    if 'throughput' in report:
        summary.update({k: v for k, v in report['throughput'].items() if k != 'rounds'})
    report = {'summary': summary, **report}
    report['notes'] = [
        'ros_latency: per robot, from building its task_state + joint_states messages (one stamp) to its '
        'action_chunk with that stamp decoded by trajectory_to_chunk, all robots requesting at once per round; '
        'rounds that needed a re-send are excluded (rounds_with_resend).',
        'raw_policy_batch: FlowPolicy(mode=sde).infer_batch on the same N observations in this process, one torch '
        'thread, timed right after each round; overhead = ros_latency - raw_policy_batch (p50 and mean).',
        'The policy server runs in train mode from config/train_sim.yaml (recording; every '
        f'{args.episode_decisions} decisions the bench closes the episodes, so bag writes run during later rounds).',
        'throughput: raw = rollout.run_episode on ManiSkillEnv in this process; ROS = policy_server (train, '
        'recording) + maniskill_bridge processes, steps of episodes that ended after each bridge\'s first '
        'episode_summary, over the time up to its last one. The learner is not part of this measurement.',
        'cpu_share: CPU seconds per wall second of each process over the window (2 cores = 2.0 total); '
        'others_cpu_share: the same for everything else on the machine (noise: other jobs share it).',
        'timeline (ROS): per robot as this process saw it: obs_to_chunk = joint_states -> action_chunk of that '
        'stamp (server side), chunk_to_next_obs = the bridge executing actions_per_chunk steps, '
        'summary_to_next_obs = outcome service + reset; raw: policy_infer, env_step, env_reset of run_episode.',
    ]
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--parts', default='overhead,throughput', help='comma list of overhead, throughput')
    p.add_argument('--envs', default='1,4', help='robot counts for the overhead part')
    p.add_argument('--decisions', type=int, default=300, help='measured lock-step rounds per robot count')
    p.add_argument('--warmup', type=int, default=30, help='rounds before measuring (discovery, first calls)')
    p.add_argument('--episode-decisions', type=int, default=25,
                   help='rounds per recorded episode in the overhead part (25 = 100 steps / 4 actions)')
    p.add_argument('--request-timeout', type=float, default=1.0, help='s before a lost observation is re-sent')
    p.add_argument('--seconds', type=float, default=60.0,
                   help='measured seconds of each throughput configuration (raw, ROS 1 env, ROS 2 envs)')
    p.add_argument('--repeats', type=int, default=2,
                   help='alternated raw/ROS rounds the seconds are split into')
    p.add_argument('--quiet-wait', type=float, default=30.0,
                   help='max s to wait before each measurement for other work on the machine to calm down')
    p.add_argument('--checkpoint', default='',
                   help='policy checkpoint (e.g. runs/learning_pickcube/sft); default: an untrained one of the '
                        'default size')
    p.add_argument('--device', default='cpu', help="the policy server's and the in-process reference's device")
    p.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'ros_overhead.json'))
    p.add_argument('--keep-work', action='store_true', help='keep node logs and recorded episodes')
    args = p.parse_args(argv)
    unknown = {x.strip() for x in args.parts.split(',')} - {'overhead', 'throughput', ''}
    if unknown:
        p.error(f'unknown parts {sorted(unknown)}')
    if args.decisions < 1 or args.warmup < 0 or args.repeats < 1 or args.seconds <= 0:
        p.error('--decisions, --repeats and --seconds must be positive, --warmup >= 0')
    torch.set_num_threads(1)  # as the policy server (torch_threads: 1): the raw numbers compare like for like

    def terminate(signum, _frame):
        raise KeyboardInterrupt(f'signal {signum}')

    signal.signal(signal.SIGTERM, terminate)  # so the finally blocks stop every child process
    work = Path(tempfile.mkdtemp(prefix='ros_overhead_'))
    ok = False
    try:
        report = run(args, work)
        atomic_write_text(args.out, json.dumps(report, indent=2) + '\n')
        print(json.dumps(report, indent=2))
        ok = True
    except RuntimeError as err:
        log(f'FAILED: {err}')
        return 1
    finally:
        if ok and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f'node logs and episodes kept in {work}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
