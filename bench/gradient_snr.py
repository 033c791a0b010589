"""How much signal one update's gradient carries, per label scheme and loss coverage, on the same rollouts.

Collects Flow-SDE episodes from a checkpoint in groups of G from one initial state (cached as
episode bags, so every configuration sees the same rollouts), then, for each configuration,
computes the loss gradient at θ = θold (the first step of an update) of every group separately:
u_1..u_n with mean G, the batch gradient. With Σ their covariance (tr Σ = Σ|u_j − G|²/(n − 1)),
|g|² = |G|² − tr Σ / n estimates the squared true gradient without bias, and
B_noise = tr Σ / |g|² is the batch (in groups) at which the gradient's signal equals its noise
(the "gradient noise scale"). snr2 = |g|² / (tr Σ / n) is the batch gradient's signal-to-noise
ratio; a sign-flip test over groups says whether it is distinguishable from pure noise
(p_value). Prints JSON and writes bench/results/gradient_snr.json.

    python bench/gradient_snr.py --checkpoint runs/learning/PickCube-v1/sft_start/sft --episodes 512
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.learning import make_env  # noqa: E402
from stepnft_ros.algo.stepnft import StepNFTConfig, batch_mask, grpo_loss, stepnft_loss  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.env_pool import EnvPool  # noqa: E402
from stepnft_ros.episodes.schema import collate_episodes  # noqa: E402
from stepnft_ros.episodes.store import EpisodeStore  # noqa: E402
from stepnft_ros.policy import FlowPolicy, load_checkpoint  # noqa: E402
from stepnft_ros.policy.sampler import SDE_NOISE, grid_at, recorded_step  # noqa: E402

CONFIGS = {
    # name: (labels, StepNFTConfig overrides)
    'stepnft group_mean executed': ('group_mean', {}),
    'stepnft batch_mean executed': ('batch_mean', {}),
    'stepnft terminal_binary executed': ('terminal_binary', {}),
    'stepnft group_mean whole_chunk': ('group_mean', {'executed_only': False}),
    'stepnft terminal_binary whole_chunk': ('terminal_binary', {'executed_only': False}),
    'grpo group_mean executed': ('group_mean', {'algo': 'grpo'}),
}
# The same gradient from the decisions whose recorded step k* is k, one solver step at a time
# (--per-step): which steps' noise carries the outcome's signal.
PER_STEP_LABELS = 'batch_mean'


def group_gradients(model, episodes, labels: str, cfg: StepNFTConfig, only_step: int | None = None) -> torch.Tensor:
    """(groups, parameters): the loss gradient over the action expert at θ = θold of each group's
    decisions (those with k* = only_step, if given), with the labels computed on the whole batch
    (as an update sees them)."""
    batch = collate_episodes(episodes, model.config, labels)
    params = model.action_expert_parameters()
    num_steps = model.config.num_steps
    with torch.no_grad():
        prefix = model.encode_prefix(batch.obs)
    mask = batch_mask(batch, cfg.executed_only)
    seeds = torch.tensor([e.seed for e in episodes if any(d.valid for d in e.decisions)])[batch.episode_index]
    rows = []
    for seed in seeds.unique():
        chosen = seeds == seed
        if only_step is not None:
            chosen &= batch.trace.k == only_step
        idx = torch.nonzero(chosen).flatten()
        trace = batch.trace.index(idx)
        v_theta = model.velocity(trace.x_k, grid_at(trace.k, num_steps)[0], (prefix[0][idx], prefix[1][idx]))
        if cfg.algo == 'grpo':
            loss, _ = grpo_loss(v_theta, trace, batch.y[idx], batch.weight[idx], cfg, num_steps, mask[idx])
        else:
            loss, _ = stepnft_loss(v_theta, trace, batch.y[idx], batch.r[idx], batch.weight[idx], cfg, num_steps,
                                   mask[idx])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                               for g, p in zip(grads, params, strict=True)]))
    return torch.stack(rows)


def noise_scale(u: torch.Tensor) -> dict[str, float]:
    """Unbiased |g|², tr Σ, snr2 and B_noise (groups) from per-group gradients u (n, P)."""
    n = u.shape[0]
    mean = u.mean(0)
    trace_sigma = ((u - mean) ** 2).sum().item() / (n - 1)
    g2 = mean.pow(2).sum().item() - trace_sigma / n
    return {'g2': g2, 'trace_sigma': trace_sigma, 'snr2': g2 / (trace_sigma / n),
            'b_noise_groups': trace_sigma / g2 if g2 > 0 else None}  # None: no measurable signal


def collect(args: argparse.Namespace, model) -> list:
    """The rollouts, from the bag cache when it holds them."""
    cache = EpisodeStore(Path(args.cache))
    episodes = cache.load_new(set())
    if len(episodes) >= args.episodes:
        return sorted(episodes, key=lambda e: e.episode_id)[:args.episodes]
    policy = FlowPolicy(model, mode='sde', noise_level=args.noise_level, seed=args.seed, sde_noise=args.sde_noise,
                        initial_noise_scale=args.initial_noise_scale,
                        step_noise_correlation=args.step_noise_correlation,
                        fixed_step=recorded_step(args.step_selection, model.config.num_steps))
    groups = args.episodes // args.group_size
    seeds = [5_000_000 + 1000 * args.seed + g for g in range(groups) for _ in range(args.group_size)]
    with EnvPool(partial(make_env, args.env_id, 100), num_workers=args.workers) as pool:
        episodes = pool.run_episodes(policy, seeds, args.actions_per_chunk, id_prefix='snr')
    for e in episodes:
        cache.write(e)
    return episodes


def outcome_variance(by_group: dict[int, list]) -> dict:
    """How much of the outcome variance lies within a reset seed (the policy's own sampling) rather than
    between initial states: total p(1 − p) against the mean unbiased within-group variance."""
    size = max(len(g) for g in by_group.values())  # complete groups only
    groups = np.array([[float(bool(e.success)) for e in g] for g in by_group.values() if len(g) == size])
    n = groups.shape[1]
    total = float(groups.var())
    within = float(groups.var(axis=1).mean() * n / (n - 1))
    return {'total_var': round(total, 4), 'within_seed_var': round(within, 4),
            'within_seed_fraction': round(within / total, 3) if total > 0 else None,
            'successes_per_group_histogram': np.bincount(groups.sum(1).astype(int), minlength=n + 1).tolist()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--env-id', default='PickCube-v1')
    p.add_argument('--episodes', type=int, default=512)
    p.add_argument('--group-size', type=int, default=8)
    p.add_argument('--noise-level', type=float, default=0.3)
    p.add_argument('--sde-noise', default='every_step', choices=SDE_NOISE)
    p.add_argument('--actions-per-chunk', type=int, default=4, help='actions of each chunk executed')
    p.add_argument('--initial-noise-scale', type=float, default=1.0, help='x_0 = scale · ε (0: chains start at 0)')
    p.add_argument('--step-noise-correlation', type=float, default=0.0,
                   help='ρ of the step noise ξ between decisions of one episode (1: one ξ per episode)')
    p.add_argument('--step-selection', default='uniform', help="the recorded step k*: 'uniform', 'last' or an index")
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results' / 'gradient_snr.json'))
    p.add_argument('--cache', default='runs/gradient_snr/episodes', help='episode bags of the rollouts')
    p.add_argument('--null-draws', type=int, default=500, help='sign-flip draws of the no-signal null')
    p.add_argument('--configs', nargs='+', choices=sorted(CONFIGS), help='measure only these (default: all)')
    p.add_argument('--outcomes-only', action='store_true',
                   help='only the outcome statistics of the (cached) rollouts, no gradients')
    p.add_argument('--per-step', action='store_true',
                   help=f'measure instead {PER_STEP_LABELS} labels from each recorded solver step k* alone')
    args = p.parse_args()
    torch.set_num_threads(1)
    model, _ = load_checkpoint(args.checkpoint)
    start = time.perf_counter()
    episodes = collect(args, model)
    rollout_s = time.perf_counter() - start
    by_group: dict[int, list] = {}
    for e in episodes:
        by_group.setdefault(e.seed, []).append(e)
    rng = random.Random(args.seed)
    results = {}
    configs = [(name, labels, overrides, None) for name, (labels, overrides) in CONFIGS.items()
               if not args.configs or name in args.configs]
    if args.outcomes_only:
        configs = []
    elif args.per_step:
        configs = [(f'stepnft {PER_STEP_LABELS} executed, k* = {k}', PER_STEP_LABELS, {}, k)
                    for k in range(model.config.num_steps)]
    for name, labels, overrides, only_step in configs:
        cfg = replace(StepNFTConfig(), **overrides)
        u = group_gradients(model, episodes, labels, cfg, only_step)
        point = noise_scale(u)
        # Sign-flip null: with no true gradient, u_j and −u_j are equally likely, so snr2 of randomly
        # flipped groups is its distribution under "the batch direction is pure noise".
        null = sorted(noise_scale(u * torch.tensor([rng.choice((-1.0, 1.0)) for _ in range(len(u))])[:, None])['snr2']
                      for _ in range(args.null_draws))
        p_value = (1 + sum(x >= point['snr2'] for x in null)) / (1 + len(null))
        results[name] = {'snr2': round(point['snr2'], 3), 'null_snr2_95th': round(null[int(0.95 * len(null)) - 1], 3),
                         'p_value': round(p_value, 4),
                         'b_noise_episodes': None if point['b_noise_groups'] is None
                         else round(point['b_noise_groups'] * args.group_size, 1),
                         'g2': point['g2'], 'trace_sigma': point['trace_sigma']}
        print(f'{name}: snr2 {point["snr2"]:.3f} (null 95th {results[name]["null_snr2_95th"]:.3f}, p {p_value:.3f}), '
              f'B_noise {results[name]["b_noise_episodes"]} episodes', file=sys.stderr, flush=True)
    success = sum(bool(e.success) for e in episodes) / len(episodes)
    mixed = sum(0 < sum(bool(e.success) for e in g) < len(g) for g in by_group.values()) / len(by_group)
    report = {'benchmark': 'gradient_snr', 'checkpoint': args.checkpoint, 'env': args.env_id,
              'episodes': len(episodes), 'groups': len(by_group), 'group_size': args.group_size,
              'noise_level': args.noise_level, 'sde_noise': args.sde_noise,
              'initial_noise_scale': args.initial_noise_scale,
              'step_noise_correlation': args.step_noise_correlation, 'actions_per_chunk': args.actions_per_chunk,
              'step_selection': args.step_selection, 'sde_success': round(success, 4),
              'groups_with_mixed_outcomes': round(mixed, 4), 'outcome_variance': outcome_variance(by_group),
              'decisions': sum(len(e.decisions) for e in episodes), 'rollout_s': round(rollout_s, 1),
              'configs': results}
    atomic_write_text(args.out, json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
