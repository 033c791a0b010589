"""Rollout throughput of the ROS-free loop against the raw simulator, measured side by side.

1. raw: one ManiSkill env in this process stepping random actions (the ceiling of one core);
2. pool: EnvPool with N worker processes and the policy answering every waiting worker in one
   batched Flow-SDE pass, as the online loop runs it.

Prints JSON (and writes bench/results/rollout_throughput.json) with the steps/s of each and
`pool_vs_cores_x_raw` = pool / (cores × raw), the fraction of the machine's simulation capacity
the loop keeps busy (target ≥ 0.7):

    python bench/rollout_throughput.py --checkpoint runs/learning/PickCube-v1/sft_start/sft --workers 2,4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.learning import make_env  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.env_pool import EnvPool  # noqa: E402
from stepnft_ros.policy import FlowPolicy, load_checkpoint  # noqa: E402


def raw_rate(env_id: str, seconds: float) -> float:
    env = make_env(env_id, 100)
    rng = np.random.default_rng(0)
    steps, seed = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.reset(seed)
        seed += 1
        done = False
        while not done:
            _, _, done = env.step(rng.uniform(env.action_low, env.action_high).astype(np.float32))
            steps += 1
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def pool_rate(env_id: str, checkpoint: str, workers: int, episodes: int) -> dict:
    model, _ = load_checkpoint(checkpoint)
    policy = FlowPolicy(model, mode='sde', noise_level=0.3)
    with EnvPool(partial(make_env, env_id, 100), num_workers=workers) as pool:
        pool.run_episodes(policy, list(range(workers)), 4)  # warm-up: workers imported and ready
        start = time.perf_counter()
        done = pool.run_episodes(policy, list(range(1_000_000, 1_000_000 + episodes)), 4)
        seconds = time.perf_counter() - start
    steps = sum(e.env_steps for e in done)
    return {'workers': workers, 'episodes': episodes, 'env_steps': steps, 'seconds': round(seconds, 2),
            'steps_per_s': round(steps / seconds, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='policy checkpoint (e.g. the SFT start)')
    p.add_argument('--env-id', default='PickCube-v1')
    p.add_argument('--workers', default='2,4', help='comma list of worker counts')
    p.add_argument('--episodes', type=int, default=64, help='episodes per pool measurement')
    p.add_argument('--raw-seconds', type=float, default=20.0)
    p.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results' / 'rollout_throughput.json'))
    args = p.parse_args()
    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0))
    raw = raw_rate(args.env_id, args.raw_seconds)
    pools = [pool_rate(args.env_id, args.checkpoint, int(w), args.episodes) for w in args.workers.split(',')]
    raw_after = raw_rate(args.env_id, args.raw_seconds)  # bracket the pool runs: the machine drifts
    raw_mean = (raw + raw_after) / 2
    for entry in pools:
        entry['pool_vs_cores_x_raw'] = round(entry['steps_per_s'] / (cores * raw_mean), 3)
    report = {'benchmark': 'rollout_throughput', 'env': f'{args.env_id} state pd_ee_delta_pose physx_cpu',
              'cores': cores, 'raw_single_env_steps_per_s': [round(raw, 1), round(raw_after, 1)], 'pool': pools}
    atomic_write_text(args.out, json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
