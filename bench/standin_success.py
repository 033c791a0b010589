"""Task success over ROS on the stand-in arm, against the same policy in the ROS-free loop on the same seeds.

The deploy_real graph (standin_arm, safety_layer, arm_bridge, policy_server: one process each, started
as `stepnft launch deploy_real --standin` starts them) runs a policy that acts the way a real arm's
policy would: from the arm's joint states and a perception topic, commanding absolute joint targets
through the joint trajectory controller. The stand-in arm (a ManiSkill Panda, PushCube by default) plays
the drivers and, with `task_state_topic`, the perception node: it publishes the task's object state
(cube pose, goal, and the features derived from them) as a named JointState, which the arm bridge
joins into each observation as a `task_state` source.

The policy is cloned from ManiSkill's motion-planner demos in pd_joint_pos with every action dim in
its joint's units (the finger in m, as a FR3's gripper controller takes it), so one checkpoint acts
in both loops unchanged:
- `sim`: the ROS-free loop, ODE sampling, 4 of 8 actions per chunk, 100 steps per episode; with
  `--obs-delay-steps` the policy sees observations that many steps old (what a graph's delay costs).
- `ros`: the graph. This process plays the operator: per episode it resets the stand-in's scene to the
  next seed (`/standin_arm/reset`), waits for fresh sensor data, holds episode_active (with the
  operator's heartbeats) until the stand-in reports the scene's end (`/standin_arm/scene_outcome`:
  success, or `max_scene_steps` simulation steps), then ends the episode and waits for the arm to hold
  (the safety layer's watchdog) before the next reset. The stand-in steps its scene
  in real time at the task's 20 Hz (or `--rate-scale` of it, with the bridge's control rate and the
  safety limits scaled alike, on a machine too loaded to keep up), and the scene's step budget runs from
  the reset, so the time the graph takes to plan its first chunk comes out of the episode's time as it
  would on a robot: `--max-scene-steps` allows for it.

    python bench/standin_success.py sft                     # demos + SFT of the joint-space start (first use)
    python bench/standin_success.py sim --episodes 200      # ROS-free: success on the held-out seeds
    python bench/standin_success.py ros --episodes 50 --max-scene-steps 200   # over ROS, the first seeds
    python bench/standin_success.py report                  # all runs, paired seed by seed -> results JSON

Writes bench/results/standin_success_<task>.json (docs/real-arm.md has the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.learning import FIRST_TEST_SEED, held_out_seeds, log, paired  # noqa: E402
from bench.ros_overhead import Graph, spin_until  # noqa: E402
from stepnft_ros import ros_io  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.launch_description import config_dir  # noqa: E402
from stepnft_ros.pipeline import DefaultSFT, ensure_sft_checkpoint  # noqa: E402
from stepnft_ros.progress import wilson  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'
ROBOT = 'arm'
CONFIG = 'deploy_real.yaml'
ACTIONS_PER_CHUNK = 4
EPISODE_STEPS = 100  # the ROS-free loop's episode, as every PickCube evaluation of the project
# The stand-in Panda mapped as an FR3 (config/deploy_real.yaml's names; the Panda has both fingers).
ARM_JOINTS = [f'fr3_joint{i}' for i in range(1, 8)]
JOINTS = ARM_JOINTS + ['fr3_finger_joint1', 'fr3_finger_joint2']
COMMAND_JOINTS = ARM_JOINTS + ['fr3_finger_joint1']
STATE_SOURCES = ['joint_position', 'joint_velocity', 'task_state']  # ManiSkill's flat state: qpos, qvel, extras
CONTROL_PERIOD = 0.05  # PickCube's 20 Hz
# Panda datasheet joint speed limits (rad/s) and 0.2 m/s for the finger; the ManiSkill Panda's box in its base frame
MAX_VELOCITY = [2.175] * 4 + [2.61] * 3 + [2.0]
WORKSPACE = ([0.2, -0.4, -0.01], [0.85, 0.4, 0.6])


def start_spec(args) -> DefaultSFT:
    return replace(DefaultSFT(), env_id=args.task, control_mode='pd_joint_pos', joint_units=True,
                   num_demos=args.num_demos, sft_steps=args.sft_steps, observation_lag=args.observation_lag)


def clone_tag(observation_lag: int) -> str:
    """Names the clone's result files: '' for the plain clone, '_lag<L>' for one cloned for older observations."""
    return f'_lag{observation_lag}' if observation_lag else ''


def sft(args) -> Path:
    base = Path(args.work) / args.task / f'sft_joint_units_{args.num_demos}demos_{args.sft_steps}steps'
    out = base.with_name(base.name + clone_tag(args.observation_lag))
    if args.observation_lag and not (out / 'demos.npz').exists() and (base / 'demos.npz').exists():
        out.mkdir(parents=True, exist_ok=True)  # the same planner demos, paired differently
        (out / 'demos.npz').hardlink_to(base / 'demos.npz')
    return ensure_sft_checkpoint(out, start_spec(args), log=log)


def make_env(task: str, max_episode_steps: int):
    from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig

    return ManiSkillEnv(ManiSkillEnvConfig(env_id=task, control_mode='pd_joint_pos', joint_units=True,
                                           obs_mode='state', max_episode_steps=max_episode_steps))


class StaleObservations:
    """An env whose observations are `delay` steps old, as a graph's are when the joined state, the answer and the
    controller's next step each take part of a control period: the policy plans from where the arm was."""

    def __init__(self, env, delay: int) -> None:
        self.env, self.delay = env, delay
        self.action_low, self.action_high = env.action_low, env.action_high

    def reset(self, seed: int) -> dict:
        raw = self.env.reset(seed)
        self.past = deque([raw] * (self.delay + 1), maxlen=self.delay + 1)
        return raw

    def step(self, action):
        raw, success, done = self.env.step(action)
        self.past.append(raw)
        return self.past[0], success, done


def sim(args) -> dict:
    """The ROS-free loop on the first `episodes` held-out seeds (observations `obs_delay_steps` old)."""
    import torch

    from stepnft_ros.policy.checkpoint import load_checkpoint
    from stepnft_ros.policy.policy import FlowPolicy
    from stepnft_ros.rollout import evaluate

    torch.set_num_threads(1)
    model, _ = load_checkpoint(sft(args))
    seeds = held_out_seeds(args.episodes)
    started = time.perf_counter()
    with make_env(args.task, EPISODE_STEPS) as env:
        _, episodes = evaluate(StaleObservations(env, args.obs_delay_steps) if args.obs_delay_steps else env,
                               FlowPolicy(model, mode='ode'), seeds, ACTIONS_PER_CHUNK)
    out = {'seeds': seeds, 'success': [bool(e.success) for e in episodes],
           'env_steps': [int(e.env_steps) for e in episodes], 'wall_s': round(time.perf_counter() - started, 1)}
    log(f'ROS-free, observations {args.obs_delay_steps} steps old: {sum(out["success"])} / {len(seeds)} succeeded '
        f'in {out["wall_s"]} s')
    tag = clone_tag(args.observation_lag) + (f'_stale{args.obs_delay_steps}' if args.obs_delay_steps else '')
    atomic_write_text(Path(args.work) / args.task / f'standin_sim{tag}.json', json.dumps(out))
    return out


def graph_config(work: Path, args, checkpoint: Path) -> Path:
    """config/deploy_real.yaml with the FR3 mapping kept and what this run changes: the Panda's own limits
    (the stand-in is a Panda; the finger's from its controller, which squeezes by commanding -0.01 m),
    no cameras, the task state source, the rates. Written into `work`."""
    cfg = yaml.safe_load((config_dir() / CONFIG).read_text())
    bridge, safety = cfg['/**/arm_bridge']['ros__parameters'], cfg['/**/safety_layer']['ros__parameters']
    server, standin = cfg['policy_server']['ros__parameters'], cfg['standin_arm']['ros__parameters']
    hz = args.rate_scale / CONTROL_PERIOD
    with make_env(args.task, EPISODE_STEPS) as env:  # action bounds: the controller's joint ranges, joint units
        names, lower, upper = list(env.task_state_names), env.action_low, env.action_high
    for key in ('camera_names', 'camera_topics'):
        bridge.pop(key)
    bridge.update(joint_names=JOINTS, state_sources=STATE_SOURCES, task_state_topic='/task_state',
                  task_state_names=names, control_rate_hz=hz, command_joint_names=COMMAND_JOINTS,
                  latency_hiding=args.latency_hiding, blend_actions=2 if args.latency_hiding else 0,
                  min_lead_ticks=args.min_lead_ticks)
    safety.update(joint_names=COMMAND_JOINTS, position_lower=[float(v) for v in lower],
                  position_upper=[float(v) for v in upper],
                  max_velocity=[v * args.rate_scale for v in MAX_VELOCITY], max_joint_step=0.2,
                  workspace_lower=WORKSPACE[0], workspace_upper=WORKSPACE[1])
    server.update(state_sources=STATE_SOURCES, action_names=COMMAND_JOINTS, control_period=1.0 / hz,
                  checkpoint=str(checkpoint), robots=[ROBOT], mode='eval',
                  simulated_inference_ms=float(args.inference_delay_ms))
    standin.pop('camera_topics')
    standin.update(env_id=args.task, obs_mode='state', task_state_topic='/task_state', auto_reset=False, sim_rate_hz=hz,
                   seed=FIRST_TEST_SEED - 1, max_scene_steps=args.max_scene_steps, joint_state_rate_hz=2 * hz)
    path = work / 'deploy_standin.yaml'
    path.write_text(yaml.safe_dump(json.loads(json.dumps(cfg))))  # rcl refuses YAML aliases of shared lists
    return path


def schedule_name(latency_hiding: bool, inference_delay_ms: float = 0.0, min_lead_ticks: int = 0) -> str:
    name = 'latency_hiding_blend2' if latency_hiding else 'synchronous'
    name += f'_min_lead{min_lead_ticks}' if min_lead_ticks else ''
    return f'{name}_inference{inference_delay_ms:g}ms' if inference_delay_ms else name


def ros(args) -> dict:
    """The deploy_real graph on the stand-in arm, one episode per held-out seed, this process the operator."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import Bool, String
    from std_srvs.srv import Trigger

    checkpoint = Path(args.checkpoint) if args.checkpoint else sft(args)
    seeds = held_out_seeds(args.episodes)
    work = Path(tempfile.mkdtemp(prefix='standin_success_'))
    hz = args.rate_scale / CONTROL_PERIOD
    rclpy.init()
    node = rclpy.create_node('standin_success_bench')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    outcomes: list[dict] = []
    task_stamps: list[int] = []
    node.create_subscription(String, '/standin_arm/scene_outcome', lambda m: outcomes.append(json.loads(m.data)),
                             ros_io.RELIABLE_QOS)
    node.create_subscription(ros_io.JointState, '/task_state',
                             lambda m: task_stamps.append(ros_io.stamp_to_ns(m.header.stamp)), ros_io.RELIABLE_QOS)
    active = node.create_publisher(Bool, f'/{ROBOT}/{ros_io.EPISODE_ACTIVE}', ros_io.LATCHED_QOS)
    reset = node.create_client(Trigger, '/standin_arm/reset')
    rows, started = [], time.perf_counter()
    settle_s = yaml.safe_load((config_dir() / CONFIG).read_text())['/**/safety_layer']['ros__parameters'][
        'command_timeout_s'] + 0.5
    try:
        with Graph(work, config=str(graph_config(work, args, checkpoint))) as graph:
            graph.start('sim_bridge.standin_arm', 'standin_arm', {})
            graph.start('stepnft_ros.nodes.safety_layer', 'safety_layer', {}, namespace=ROBOT)
            graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {})
            bridge = graph.start('stepnft_ros.nodes.arm_bridge', 'arm_bridge', {}, namespace=ROBOT)
            spin_until(executor, graph, lambda: reset.service_is_ready() and 'bridging' in bridge.tail(20000), 240,
                       'the stand-in arm and the arm bridge')
            for seed in seeds:
                future = reset.call_async(Trigger.Request())
                spin_until(executor, graph, future.done, 30, f'the reset to seed {seed}')
                if future.result().message != f'scene of seed {seed}':
                    raise RuntimeError(f'expected the scene of seed {seed}, the stand-in says '
                                       f'{future.result().message!r}')
                reset_ns, began = time.time_ns(), time.monotonic()
                outcomes.clear()
                spin_until(executor, graph, lambda after=reset_ns: task_stamps and task_stamps[-1] > after, 30,
                           'fresh sensor data')
                beat = 0.0
                timeout = 5.0 * args.max_scene_steps / hz + 30.0
                while not outcomes:  # the operator: episode_active with heartbeats until the scene ends
                    graph.check(f'seed {seed}')
                    if time.monotonic() > beat:
                        active.publish(Bool(data=True))
                        beat = time.monotonic() + 0.5
                    if time.monotonic() - began > timeout:
                        raise RuntimeError(f'seed {seed}: no scene outcome after {timeout:.0f} s')
                    executor.spin_once(timeout_sec=0.01)
                wall = time.monotonic() - began
                active.publish(Bool(data=False))
                # The cell is reset once the arm holds: the safety layer's watchdog sends one hold command (the
                # measured position) command_timeout_s after the last command, which would drag a fresh scene's arm
                # back to where this episode left it.
                end = time.monotonic() + settle_s
                while time.monotonic() < end:
                    executor.spin_once(timeout_sec=0.01)
                outcome = outcomes[0]
                if outcome['seed'] != seed:
                    raise RuntimeError(f'outcome of seed {outcome["seed"]} while running seed {seed}')
                rows.append({**outcome, 'wall_s': round(wall, 2)})
                log(f'ROS seed {seed}: {"success" if outcome["success"] else "failure"} after {outcome["steps"]} '
                    f'scene steps, {wall:.1f} s ({sum(r["success"] for r in rows)} / {len(rows)})')
            logs = {n.name: n.tail(4000) for n in graph.nodes}
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    out = {'seeds': seeds, 'success': [r['success'] for r in rows], 'scene_steps': [r['steps'] for r in rows],
           'episode_wall_s': [r['wall_s'] for r in rows], 'wall_s': round(time.perf_counter() - started, 1),
           'rate_scale': args.rate_scale, 'latency_hiding': args.latency_hiding,
           'inference_delay_ms': args.inference_delay_ms, 'observation_lag': args.observation_lag,
           'min_lead_ticks': args.min_lead_ticks,
           'max_scene_steps': args.max_scene_steps, 'node_log_tails': logs}
    log(f'over ROS: {sum(out["success"])} / {len(seeds)} succeeded in {out["wall_s"]} s')
    name = schedule_name(args.latency_hiding, args.inference_delay_ms, args.min_lead_ticks)
    atomic_write_text(Path(args.work) / args.task / f'standin_ros{clone_tag(args.observation_lag)}_{name}.json',
                      json.dumps(out))
    return out


def rate(outcomes: list[bool]) -> dict:
    lo, hi = wilson(sum(outcomes), len(outcomes))
    return {'success': round(sum(outcomes) / len(outcomes), 4), 'wilson95': [round(lo, 4), round(hi, 4)],
            'episodes': len(outcomes)}


def clone_report(work: Path, tag: str) -> dict | None:
    """One clone's runs: the ROS-free loop (fresh and stale observations) and every graph run, paired seed by seed
    with the fresh ROS-free loop on the same seeds; None if the clone has no ROS-free run."""
    path = work / f'standin_sim{tag}.json'
    if not path.exists():
        return None
    loop = json.loads(path.read_text())
    loop_steps = np.array(loop['env_steps'])[np.array(loop['success'])]
    out = {'ros_free': {**rate(loop['success']), 'max_episode_steps': EPISODE_STEPS,
                        'steps_of_successes_median': float(np.median(loop_steps)) if len(loop_steps) else None,
                        'seeds': loop['seeds'], 'outcomes': loop['success']},
           'over_ros': {}}
    for stale in sorted(work.glob(f'standin_sim{tag}_stale*.json')):
        run = json.loads(stale.read_text())
        out[f'ros_free_observations_{stale.stem.removeprefix(f"standin_sim{tag}_stale")}_steps_old'] = {
            **rate(run['success']), 'vs_ros_free': paired(loop['success'], run['success']), 'outcomes': run['success']}
    prefix = f'standin_ros{tag}_'
    for path in sorted(work.glob(f'{prefix}*.json'), key=lambda p: (len(p.stem), p.stem)):
        schedule = path.stem.removeprefix(prefix)
        if not schedule.startswith(('latency_hiding', 'synchronous')):
            continue  # another clone's (its tag continues this one's)
        graph = json.loads(path.read_text())
        n = len(graph['seeds'])
        if loop['seeds'][:n] != graph['seeds']:
            raise SystemExit(f'{path}: its seeds are not the first of the ROS-free run\'s: run `sim` on more episodes')
        steps = np.array(graph['scene_steps'])
        solved = np.array(graph['success'])
        out['over_ros'][schedule] = {
            **rate(graph['success']), 'max_scene_steps': graph['max_scene_steps'],
            'inference_delay_ms': graph.get('inference_delay_ms', 0.0),
            'min_lead_ticks': graph.get('min_lead_ticks', 0),
            'within_scene_steps': {str(k): rate(list(solved & (steps <= k))) for k in (100, 120, 150)
                                   if k < graph['max_scene_steps']},
            'scene_steps_of_successes_median': float(np.median(steps[solved])) if solved.any() else None,
            'rate_scale': graph['rate_scale'], 'wall_s': graph['wall_s'],
            'ros_free_on_these_seeds': rate(loop['success'][:n]),
            'vs_ros_free': paired(loop['success'][:n], graph['success']), 'outcomes': graph['success'],
            'scene_steps': graph['scene_steps']}
    return out


def report(args) -> dict:
    """Every clone's runs (clone_report), and each lagged clone against the plain one on the same seeds."""
    work = Path(args.work) / args.task
    lags = sorted({0} | {int(p.stem.split('_lag')[1].split('_')[0]) for p in work.glob('standin_sim_lag*.json')})
    out = {'task': args.task, 'checkpoint_spec': asdict(replace(start_spec(args), observation_lag=0)),
           'actions_per_chunk': ACTIONS_PER_CHUNK, 'clones': {}}
    for lag in lags:
        clone = clone_report(work, clone_tag(lag))
        if clone is not None:
            out['clones'][f'observation_lag_{lag}'] = clone
    plain = out['clones'].get('observation_lag_0')
    for clone in out['clones'].values():
        if plain is None or clone is plain:
            continue
        clone['vs_plain_clone'] = {'ros_free': paired(plain['ros_free']['outcomes'], clone['ros_free']['outcomes'])}
        for key, run in clone.items():
            if key.startswith('ros_free_observations_') and key in plain:
                clone['vs_plain_clone'][key] = paired(plain[key]['outcomes'], run['outcomes'])
        for schedule, run in clone['over_ros'].items():
            other = plain['over_ros'].get(schedule)
            if other is not None and len(other['outcomes']) == len(run['outcomes']):
                clone['vs_plain_clone'][f'over_ros_{schedule}'] = paired(other['outcomes'], run['outcomes'])
    out_path = RESULTS / f'standin_success_{args.task}.json'
    atomic_write_text(out_path, json.dumps(out, indent=1) + '\n')
    print(json.dumps(out, indent=1)[:4000])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('stage', choices=['sft', 'sim', 'ros', 'report'])
    p.add_argument('--task', default='PushCube-v1', help='a ManiSkill task with a motion-planning solution')
    p.add_argument('--num-demos', type=int, default=100, help='planner demos behind the joint-space start')
    p.add_argument('--sft-steps', type=int, default=3000)
    p.add_argument('--work', default='runs/standin', help='SFT starts and per-stage results (reused)')
    p.add_argument('--episodes', type=int, default=50, help='held-out seeds, from the first')
    p.add_argument('--obs-delay-steps', type=int, default=0, help='sim: the policy sees observations this old')
    p.add_argument('--checkpoint', default='', help='ros: another joint-space policy (default: the SFT start)')
    p.add_argument('--rate-scale', type=float, default=1.0, help='real-time factor of the stand-in and the bridge')
    p.add_argument('--max-scene-steps', type=int, default=120,
                   help='simulation steps per scene, from the reset (the first chunk takes some)')
    p.add_argument('--no-latency-hiding', dest='latency_hiding', action='store_false',
                   help='synchronous chunks (deploy_real.yaml hides latency, blending 2 actions)')
    p.add_argument('--inference-delay-ms', type=float, default=0.0,
                   help="ros: the policy server's inference padded to this long (a bigger model's latency)")
    p.add_argument('--min-lead-ticks', type=int, default=0,
                   help="ros: the arm bridge observes at least this many ticks before a chunk's last action")
    p.add_argument('--observation-lag', type=int, default=0,
                   help='the clone: each chunk paired with the observation this many steps before it')
    args = p.parse_args(argv)
    if args.stage == 'sft':
        log(f'joint-space start: {sft(args)} ({json.dumps(asdict(start_spec(args)))})')
    elif args.stage == 'sim':
        sim(args)
    elif args.stage == 'ros':
        ros(args)
    else:
        report(args)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
