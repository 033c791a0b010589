"""How do a checkpoint's episodes fail? Grasp, transport and placement, per held-out test seed.

A learning curve says how often a policy succeeds; this says what the failures look like, so that a
plateau can be read: a policy that never grasps needs different exploration than one that carries the
object to within a few centimetres of the goal and stalls. Per episode it records, from ManiSkill's
info, whether the object was ever grasped and ever placed, and, for tasks whose env has an object and
a goal site, the object-goal distance over time and what the policy asked for at the end (`final_move`).
Samplers: `ode` (the evaluation protocol) or `sde:A[:RHO]` (Flow-SDE at noise level A, step noise
correlated over the episode with ρ = RHO, with the same per-episode noise streams as training
rollouts). Nothing is selected on these seeds.

    python bench/failure_modes.py --task PickCube-v1 --samplers ode sde:0.8:1.0 sde:0.3:1.0 \\
        --checkpoint start=runs/learning/PickCube-v1/sft_start/sft \\
        --checkpoint s0=runs/learning/PickCube-v1/stepnft_correlated_noise_lr5e-5/s0/state

Writes bench/results/failures_<task>.json (one summary per checkpoint and sampler, per-seed rows kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.learning import RESULTS, held_out_seeds, make_env  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.policy import FlowPolicy, load_checkpoint  # noqa: E402
from stepnft_ros.rollout import run_episode  # noqa: E402

OBJECT_NAMES = ('cube', 'obj')  # what ManiSkill's tabletop tasks call the object to move ...
GOAL_NAMES = ('goal_site', 'goal_region')  # ... and the goal it must reach


def parse_sampler(text: str) -> tuple[float, float]:
    """'ode' -> (0, 0); 'sde:A[:RHO]' -> (a, ρ)."""
    if text == 'ode':
        return 0.0, 0.0
    parts = text.split(':')
    if parts[0] != 'sde' or len(parts) not in (2, 3):
        raise ValueError(f'sampler {text!r} is not "ode" or "sde:A[:RHO]" (e.g. sde:0.8:1.0)')
    return float(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0


LAST_DECISIONS = 3  # decisions whose executed moves `final_move` averages


def object_to_goal(env) -> np.ndarray | None:
    """Vector (m, world frame) from the task's object to its goal, if the env has both."""
    base = env._env.unwrapped
    obj = next((getattr(base, n) for n in OBJECT_NAMES if hasattr(base, n)), None)
    goal = next((getattr(base, n) for n in GOAL_NAMES if hasattr(base, n)), None)
    if obj is None or goal is None:
        return None
    return (goal.pose.p - obj.pose.p).reshape(-1).numpy().astype(np.float64)


def final_move(decisions, to_goal: np.ndarray) -> dict:
    """What the policy asked for at the end: the mean position part (pd_ee_delta_pose's first three
    dimensions, normalized units, base frame) of the last decisions' executed actions, its size and its
    cosine with the object-goal vector. The base of ManiSkill's tabletop robots is aligned with the world,
    so the two frames agree. A policy that stops short of the goal because it believes it has arrived
    asks for a small move in no particular direction (cosine near 0)."""
    moves = np.concatenate([np.asarray(d.chunk[:d.executed])[:, :3] for d in decisions[-LAST_DECISIONS:]])
    size, cos = size_and_cosine(moves.mean(axis=0)[None], np.asarray(to_goal)[None])
    return {'size': round(float(size[0]), 4), 'cos_to_goal': round(float(cos[0]), 3)}


def size_and_cosine(moves: np.ndarray, to_goal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (N, 3) position moves: its size and its cosine with the row's object-goal vector (0 when
    either is zero)."""
    size = np.linalg.norm(moves, axis=1)
    cos = np.einsum('ij,ij->i', moves, to_goal) / np.maximum(size * np.linalg.norm(to_goal, axis=1), 1e-12)
    return size, cos


def run_shard(task: str, checkpoint: str, sampler: str, seeds: list[int], actions_per_chunk: int,
              max_episode_steps: int) -> list[dict]:
    torch.set_num_threads(1)
    a, rho = parse_sampler(sampler)
    model, _ = load_checkpoint(checkpoint)
    policy = FlowPolicy(model, mode='sde' if a > 0 else 'ode', noise_level=a if a > 0 else None,
                        sde_noise='recorded_step', step_noise_correlation=rho)
    env = make_env(task, max_episode_steps)
    rows = []
    for seed in seeds:
        after_steps: list[tuple[bool, bool, np.ndarray | None]] = []  # (grasped, placed, to goal) after each step

        def record(_raw, after_steps=after_steps) -> None:
            after_steps.append((bool(env.last_info.get('is_grasped', False)),
                                bool(env.last_info.get('is_obj_placed', False)), object_to_goal(env)))

        # the noise streams a training rollout from this seed would use; the k* draws seeded by it too, so
        # a seed's row does not depend on the shard it ran in
        policy.reset(seed)
        episode = run_episode(env, policy, seed, actions_per_chunk, on_step=record, episode_streams=True)
        grasped, placed, to_goal = zip(*after_steps[1:], strict=True)  # the first call is the reset's
        distance = [round(float(np.linalg.norm(v)), 4) for v in to_goal if v is not None]
        rows.append({'seed': seed, 'success': bool(episode.success), 'steps': episode.env_steps,
                     'ever_grasped': any(grasped), 'ever_placed': any(placed), 'final_grasped': grasped[-1],
                     'min_distance': min(distance) if distance else None,
                     'final_distance': distance[-1] if distance else None,
                     **({'final_move': final_move(episode.decisions, to_goal[-1])} if to_goal[-1] is not None else {})})
    return rows


def summarize(rows: list[dict]) -> dict:
    failed = [r for r in rows if not r['success']]
    summary = {'episodes': len(rows), 'success': round(sum(r['success'] for r in rows) / len(rows), 4),
               'failures': len(failed),
               'failed_never_grasped': sum(not r['ever_grasped'] for r in failed),
               'failed_grasped_never_placed': sum(r['ever_grasped'] and not r['ever_placed'] for r in failed),
               'failed_placed_not_success': sum(r['ever_placed'] for r in failed),
               'failed_holding_at_end': sum(r['final_grasped'] for r in failed),
               'success_steps_median': float(np.median(won)) if (won := [r['steps'] for r in rows if r['success']])
               else None}
    if failed and failed[0]['min_distance'] is not None:
        closest = np.array([r['min_distance'] for r in failed])
        summary['failed_min_distance_quantiles_cm'] = {
            str(q): round(float(np.quantile(closest, q)) * 100, 1) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
        for cm in (5, 10):
            summary[f'failed_within_{cm}cm'] = int(np.sum(closest < cm / 100))
    if rows[0].get('final_move') is not None:  # the last decisions' move: near misses against successes
        for name, group in (('near_misses', [r for r in failed if r['final_distance'] < 0.05]),
                            ('successes', [r for r in rows if r['success']])):
            if group:
                summary[f'final_move_{name}'] = {
                    'episodes': len(group),
                    'size_median': round(float(np.median([r['final_move']['size'] for r in group])), 4),
                    'cos_to_goal_median': round(float(np.median([r['final_move']['cos_to_goal'] for r in group])), 3)}
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--task', default='PickCube-v1')
    p.add_argument('--checkpoint', action='append', required=True, help='NAME=PATH (repeatable)')
    p.add_argument('--samplers', nargs='+', default=['ode'])
    p.add_argument('--test-seeds', type=int, default=200)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--actions-per-chunk', type=int, default=4)
    p.add_argument('--max-episode-steps', type=int, default=100)
    args = p.parse_args()
    checkpoints = dict(c.split('=', 1) for c in args.checkpoint)
    for sampler in args.samplers:
        parse_sampler(sampler)  # fail before any work
    seeds = held_out_seeds(args.test_seeds)
    shards = [seeds[i::args.workers] for i in range(args.workers)]
    out = RESULTS / f'failures_{args.task}.json'
    result = json.loads(out.read_text()) if out.exists() else {'task': args.task, 'runs': {}}
    with ProcessPoolExecutor(args.workers) as pool:
        for name, path in checkpoints.items():
            for sampler in args.samplers:
                jobs = [pool.submit(run_shard, args.task, path, sampler, shard, args.actions_per_chunk,
                                    args.max_episode_steps) for shard in shards]
                rows = sorted((r for job in jobs for r in job.result()), key=lambda r: r['seed'])
                summary = summarize(rows)
                result['runs'][f'{name}/{sampler}'] = {'checkpoint': path, 'sampler': sampler, **summary, 'rows': rows}
                print(json.dumps({'run': f'{name}/{sampler}', **summary}), flush=True)
                atomic_write_text(out, json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
