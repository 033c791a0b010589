"""How much signal one update's gradient carries, per label scheme and loss coverage, on the same rollouts.

Collects Flow-SDE episodes from a checkpoint in groups of G from one initial state, then, for each
configuration, computes the update's first gradient (at θ = θold) on two halves of the batch with
disjoint initial states and reports their cosine similarity. For independent estimates of a mean
gradient g with per-episode noise σ², E[cos] ≈ |g|² / (|g|² + σ²/n): a cosine near 0 means the
direction is noise at this batch size, and doubling n doubles the signal-to-noise ratio. Repeated
over random half-splits; prints JSON and writes bench/results/gradient_snr.json.

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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.learning import make_env  # noqa: E402
from stepnft_ros.algo.stepnft import StepNFTConfig, executed_mask, grpo_loss, stepnft_loss  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.env_pool import EnvPool  # noqa: E402
from stepnft_ros.episodes.schema import collate_episodes  # noqa: E402
from stepnft_ros.policy import FlowPolicy, load_checkpoint  # noqa: E402
from stepnft_ros.policy.sampler import grid_at  # noqa: E402

CONFIGS = {
    # name: (labels, StepNFTConfig overrides)
    'stepnft group_mean executed': ('group_mean', {}),
    'stepnft batch_mean executed': ('batch_mean', {}),
    'stepnft terminal_binary executed': ('terminal_binary', {}),
    'stepnft group_mean whole_chunk': ('group_mean', {'executed_only': False}),
    'stepnft terminal_binary whole_chunk': ('terminal_binary', {'executed_only': False}),
    'grpo group_mean executed': ('group_mean', {'algo': 'grpo'}),
}


def first_gradient(model, episodes, labels: str, cfg: StepNFTConfig) -> torch.Tensor:
    """The loss gradient over the action expert at θ = θold, flattened."""
    batch = collate_episodes(episodes, model.config, labels)
    params = model.action_expert_parameters()
    with torch.no_grad():
        prefix = model.encode_prefix(batch.obs)
    horizon = batch.trace.x_k.shape[1]
    executed = batch.executed if cfg.executed_only else torch.full_like(batch.executed, horizon)
    mask = executed_mask(executed, horizon)
    v_theta = model.velocity(batch.trace.x_k, grid_at(batch.trace.k, model.config.num_steps)[0], prefix)
    if cfg.algo == 'grpo':
        loss, _ = grpo_loss(v_theta, batch.trace, batch.y, batch.weight, cfg, model.config.num_steps, mask)
    else:
        loss, _ = stepnft_loss(v_theta, batch.trace, batch.y, batch.r, batch.weight, cfg,
                               model.config.num_steps, mask)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params, strict=True)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--env-id', default='PickCube-v1')
    p.add_argument('--episodes', type=int, default=512)
    p.add_argument('--group-size', type=int, default=8)
    p.add_argument('--noise-level', type=float, default=0.3)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--splits', type=int, default=20, help='random half-splits per configuration')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results' / 'gradient_snr.json'))
    args = p.parse_args()
    torch.set_num_threads(1)
    model, _ = load_checkpoint(args.checkpoint)
    policy = FlowPolicy(model, mode='sde', noise_level=args.noise_level, seed=args.seed)
    groups = args.episodes // args.group_size
    seeds = [5_000_000 + 1000 * args.seed + g for g in range(groups) for _ in range(args.group_size)]
    start = time.perf_counter()
    with EnvPool(partial(make_env, args.env_id, 100), num_workers=args.workers) as pool:
        episodes = pool.run_episodes(policy, seeds, 4)
    rollout_s = time.perf_counter() - start
    by_group: dict[int, list] = {}
    for e in episodes:
        by_group.setdefault(e.seed, []).append(e)
    keys = sorted(by_group)
    rng = random.Random(args.seed)
    results = {}
    for name, (labels, overrides) in CONFIGS.items():
        cfg = replace(StepNFTConfig(), **overrides)
        cosines, norms = [], []
        for _ in range(args.splits):
            rng.shuffle(keys)
            halves = keys[:len(keys) // 2], keys[len(keys) // 2:]
            g1, g2 = (first_gradient(model, [e for k in half for e in by_group[k]], labels, cfg) for half in halves)
            cosines.append(torch.nn.functional.cosine_similarity(g1, g2, dim=0).item())
            norms.append(((g1.norm() + g2.norm()) / 2).item())
        mean = sum(cosines) / len(cosines)
        sd = (sum((c - mean) ** 2 for c in cosines) / max(len(cosines) - 1, 1)) ** 0.5
        results[name] = {'cosine_mean': round(mean, 4), 'cosine_se': round(sd / len(cosines) ** 0.5, 4),
                         'grad_norm': round(sum(norms) / len(norms), 6)}
        print(f'{name}: cos {mean:.4f} ± {sd / len(cosines) ** 0.5:.4f}', file=sys.stderr, flush=True)
    success = sum(bool(e.success) for e in episodes) / len(episodes)
    mixed = sum(0 < sum(bool(e.success) for e in by_group[k]) < args.group_size for k in by_group) / len(by_group)
    report = {'benchmark': 'gradient_snr', 'checkpoint': args.checkpoint, 'env': args.env_id,
              'episodes': len(episodes), 'group_size': args.group_size, 'noise_level': args.noise_level,
              'sde_success': round(success, 4), 'groups_with_mixed_outcomes': round(mixed, 4),
              'decisions_per_half': sum(len(e.decisions) for e in episodes) // 2,
              'rollout_s': round(rollout_s, 1), 'splits': args.splits, 'configs': results}
    atomic_write_text(args.out, json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
