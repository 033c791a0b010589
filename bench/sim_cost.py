"""What simulation costs: env steps/s of LIBERO and ManiSkill PickCube, cameras off and on.

For each case (LIBERO one task, ManiSkill PickCube-v1; obs state and rgb):
- raw: the ROS-free env in this process, a constant (zero) action, episodes of the same step cap
  as below, resets included; plus the time of one step and of one reset alone.
- ros: a libero_bridge / maniskill_bridge process and a policy_server process (a tiny untrained
  policy with the env's state size and cameras, train mode: Flow-SDE and episode recording) on a
  private loopback DDS domain; env steps/s counted from the bridge's episode_summary messages
  over a window that opens at the first summary; decisions/s = that / actions_per_chunk.

Prints one JSON document and writes it to bench/results/sim_cost.json (or --out):

    python bench/sim_cost.py                        # all cases, ~6 minutes on 2 cores
    python bench/sim_cost.py --cases libero_rgb --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ros_overhead import Graph, cpu_model, spin_until, wait_quiet  # noqa: E402

from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.policy import FlowVLA, PolicyConfig, save_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ACTIONS_PER_CHUNK = 4
LIBERO_TASK = ('libero_spatial', 0)
IMAGE_SIZE = {'libero': 128, 'maniskill': 64}  # each simulator's usual camera size in this project
# Short episodes so that one window sees several resets (their cost is part of the rate).
EPISODE_STEPS = {'libero_state': 100, 'libero_rgb': 40, 'maniskill_state': 100, 'maniskill_rgb': 50}
CASES = tuple(EPISODE_STEPS)


def log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def make_env(case: str):
    sim, obs_mode = case.split('_')
    if sim == 'libero':
        from sim_bridge.libero_env import LiberoEnv, LiberoEnvConfig

        return LiberoEnv(LiberoEnvConfig(suite=LIBERO_TASK[0], task_id=LIBERO_TASK[1], obs_mode=obs_mode,
                                         image_size=IMAGE_SIZE[sim], max_episode_steps=EPISODE_STEPS[case]))
    from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig

    # reconfigure_on_reset as config/train_sim.yaml runs the bridges.
    return ManiSkillEnv(ManiSkillEnvConfig(obs_mode=obs_mode, image_size=IMAGE_SIZE[sim],
                                           max_episode_steps=EPISODE_STEPS[case], reconfigure_on_reset=True))


def raw_rate(case: str, seconds: float) -> dict:
    t0 = time.perf_counter()
    env = make_env(case)
    build_s = time.perf_counter() - t0
    action = np.zeros(env.action_dim, np.float32)
    try:
        steps = episodes = 0
        step_s, reset_s = [], []
        seed = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            r0 = time.perf_counter()
            env.reset(seed)
            reset_s.append(time.perf_counter() - r0)
            seed += 1
            done = False
            while not done:
                s0 = time.perf_counter()
                _, _, done = env.step(action)
                step_s.append(time.perf_counter() - s0)
                steps += 1
            episodes += 1
        wall = time.perf_counter() - t0
        dims = {'state_dim': env.state_dim, 'cameras': list(env.camera_names)}
    finally:
        env.close()
    return {'env_steps_per_s': round(steps / wall, 2), 'env_steps': steps, 'episodes': episodes,
            'wall_s': round(wall, 1), 'step_ms_p50': round(1e3 * float(np.median(step_s)), 2),
            'reset_ms_p50': round(1e3 * float(np.median(reset_s)), 1), 'build_s': round(build_s, 1), **dims}


def tiny_checkpoint(path: Path, state_dim: int, cameras: list[str], image_size: int) -> Path:
    torch.manual_seed(0)
    cfg = PolicyConfig(state_dim=state_dim, action_dim=7, horizon=ACTIONS_PER_CHUNK, d_model=32, n_heads=2,
                       prefix_layers=1, expert_layers=1, num_steps=3, noise_level=0.5,
                       camera_names=tuple(cameras), image_size=image_size, vision_patch=8)
    save_checkpoint(path, FlowVLA(cfg), {'stage': 'bench', 'weights_version': 0})
    return path


def ros_rate(case: str, seconds: float, dims: dict, work: Path) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String

    from stepnft_ros import ros_io

    sim, obs_mode = case.split('_')
    ckpt = tiny_checkpoint(work / f'ckpt_{case}', dims['state_dim'], dims['cameras'], IMAGE_SIZE[sim])
    bridge_params = {'obs_mode': obs_mode, 'image_size': IMAGE_SIZE[sim], 'max_episode_steps': EPISODE_STEPS[case],
                     'actions_per_chunk': ACTIONS_PER_CHUNK}
    if sim == 'libero':
        module, name = 'sim_bridge.libero_node', 'libero_bridge'
        bridge_params.update(suite=LIBERO_TASK[0], task_id=LIBERO_TASK[1])
    else:
        module, name = 'sim_bridge.maniskill_node', 'maniskill_bridge'
    summaries: list[tuple[float, dict]] = []
    with Graph(work) as graph:
        graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
            'checkpoint': str(ckpt), 'episode_dir': str(work / f'episodes_{case}'), 'robots': ['env0'],
            'mode': 'train', 'actions_per_chunk': ACTIONS_PER_CHUNK})
        graph.start(module, name, bridge_params, namespace='env0')
        node = rclpy.create_node(f'sim_cost_{case}')
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        node.create_subscription(String, '/env0/episode_summary',
                                 lambda m: summaries.append((time.perf_counter(), json.loads(m.data))),
                                 ros_io.RELIABLE_QOS)
        try:
            spin_until(executor, graph, lambda: summaries, 300.0, 'the first episode')
            t0 = time.perf_counter()
            spin_until(executor, graph, lambda: summaries[-1][0] >= t0 + seconds, seconds + 120.0, 'the window')
        finally:
            executor.shutdown()
            node.destroy_node()
    first, last = summaries[0][0], summaries[-1][0]
    window = [s for t, s in summaries if t > first]
    steps = sum(s['env_steps'] for s in window)
    return {'env_steps_per_s': round(steps / (last - first), 2),
            'decisions_per_s': round(steps / (last - first) / ACTIONS_PER_CHUNK, 2),
            'env_steps': steps, 'episodes': len(window), 'window_s': round(last - first, 1)}


def run(args, work: Path) -> dict:
    import rclpy
    from domain_coordinator import domain_id

    results = {}
    with domain_id() as did:
        os.environ['ROS_DOMAIN_ID'] = str(did)
        os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
        os.environ.setdefault('ROS_LOG_DIR', str(work / 'ros_log'))
        rclpy.init()
        try:
            for case in args.cases:
                others = wait_quiet(30.0)
                log(f'{case}: raw env loop ({args.seconds:g} s)')
                raw = raw_rate(case, args.seconds)
                log(f'{case}: raw {raw["env_steps_per_s"]} steps/s; bridge + policy server ({args.seconds:g} s)')
                ros = ros_rate(case, args.seconds, raw, work)
                log(f'{case}: through ROS {ros["env_steps_per_s"]} steps/s')
                results[case] = {'episode_steps': EPISODE_STEPS[case], 'others_cpu_at_start': others,
                                 'raw': raw, 'ros': ros,
                                 'ros_over_raw': round(ros['env_steps_per_s'] / raw['env_steps_per_s'], 3)}
        finally:
            rclpy.shutdown()
    return {
        'what': 'env steps/s, resets included, one env; raw = in-process constant action; ros = bridge + '
                'policy_server processes (tiny policy, train mode, recording), from episode_summary',
        'machine': {'cpu': cpu_model(), 'cores': os.cpu_count(), 'gpu': torch.cuda.is_available(),
                    'mujoco_gl': os.environ.get('MUJOCO_GL', 'egl')},
        'libero_task': f'{LIBERO_TASK[0]}/{LIBERO_TASK[1]}', 'maniskill_task': 'PickCube-v1 (pd_ee_delta_pose)',
        'image_size': IMAGE_SIZE, 'actions_per_chunk': ACTIONS_PER_CHUNK, 'cases': results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--cases', type=lambda s: s.split(','), default=list(CASES),
                   help=f'comma-separated subset of {",".join(CASES)}')
    p.add_argument('--seconds', type=float, default=30.0, help='measuring window per case and mode')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'sim_cost.json'))
    args = p.parse_args(argv)
    unknown = set(args.cases) - set(CASES)
    if unknown:
        p.error(f'unknown cases {sorted(unknown)}; choose from {CASES}')
    with tempfile.TemporaryDirectory(prefix='sim_cost_') as tmp:
        report = run(args, Path(tmp))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + '\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
