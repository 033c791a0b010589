"""From which initial states does the sampler ever succeed? Per-state success of Flow-SDE rollouts.

A learner from episode outcomes gets a positive example from an initial state only if some rollout
from it succeeds. This runs G rollouts of a checkpoint from each of a set of seeds, under several
samplers (noise level, where the noise goes), and reports per sampler the share of states with no
success in G tries and the mean success, plus the same split by the checkpoint's deterministic (ODE)
outcome. Nothing is selected on these seeds; it is a diagnostic.

    python bench/reach.py --checkpoint runs/learning/PushCube-v1/sft_start/sft --env-id PushCube-v1 \\
        --samplers recorded_step:0.3 every_step:0.3 every_step:0.6 --group-size 8
    # step noise correlated over each episode's decisions (ρ = 0.9), on the states the first never solved:
    python bench/reach.py ... --samplers recorded_step:0.3:0.9 --never-of recorded_step:0.3
    # one ξ per episode, with and without antithetic pairs (how often a pair's outcomes differ):
    python bench/reach.py ... --samplers recorded_step:0.5:1.0 recorded_step:0.5:1.0:anti

Writes bench/results/reach_<env-id>.json (per-seed success counts kept, resumable per sampler).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.learning import FIRST_TEST_SEED, RESULTS, held_out_seeds, make_env  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.env_pool import EnvPool  # noqa: E402
from stepnft_ros.policy import FlowPolicy, load_checkpoint  # noqa: E402
from stepnft_ros.policy.sampler import SDE_NOISE  # noqa: E402


def parse_sampler(text: str) -> tuple[str, float, float, bool]:
    """WHERE:NOISE_LEVEL[:RHO[:anti]] -> (where, a, step-noise correlation ρ (0 when not given), antithetic
    pairs: episodes 2j and 2j+1 of each state share ε and k* and take step noise ξ and −ξ)."""
    parts = text.split(':')
    where, level = parts[0], parts[1] if len(parts) > 1 else ''
    rho = parts[2] if len(parts) > 2 and parts[2] else '0'
    anti = parts[3:] == ['anti']
    if where not in SDE_NOISE or not level or len(parts) > 4 or (len(parts) == 4 and not anti):
        raise ValueError(f'sampler {text!r} is not WHERE:NOISE_LEVEL[:RHO[:anti]] with WHERE in {SDE_NOISE} '
                         '(e.g. every_step:0.3, recorded_step:0.3:0.9 or recorded_step:0.5:1.0:anti)')
    return where, float(level), float(rho), anti


def mixed_pairs(outcomes: np.ndarray) -> float:
    """outcomes: (states, G) per rollout; the share of rollout pairs (2j, 2j+1) of one state whose outcomes
    differ. Only such pairs tell the update which of two explorations was better (antithetic: ξ or −ξ)."""
    pairs = outcomes[:, : outcomes.shape[1] // 2 * 2].reshape(len(outcomes), -1, 2)
    return float(np.mean(pairs[..., 0] != pairs[..., 1]))


def summarize_counts(successes: np.ndarray, group_size: int, ode: np.ndarray | None) -> dict:
    """successes: per seed, how many of its group_size rollouts succeeded; ode: per seed ODE outcome."""
    out = {'mean_success': float(successes.sum() / (group_size * len(successes))),
           'states_never': float(np.mean(successes == 0)), 'states_always': float(np.mean(successes == group_size))}
    if ode is not None:
        for name, mask in (('ode_failed', ~ode), ('ode_solved', ode)):
            if mask.any():
                out[name] = {'states': int(mask.sum()), 'mean_success': float(successes[mask].mean() / group_size),
                             'states_never': float(np.mean(successes[mask] == 0))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--env-id', default='PushCube-v1')
    p.add_argument('--samplers', nargs='+', default=['recorded_step:0.3'], help='WHERE:NOISE_LEVEL')
    p.add_argument('--group-size', type=int, default=8, help='rollouts per initial state')
    p.add_argument('--seeds', type=int, default=200, help=f'initial states: seeds from {FIRST_TEST_SEED}')
    p.add_argument('--actions-per-chunk', type=int, default=4)
    p.add_argument('--max-episode-steps', type=int, default=100)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--seed', type=int, default=0, help="the sampler's noise seed")
    p.add_argument('--never-of', metavar='SAMPLER',
                   help='only the states a sampler already in the file never solved (stored as NAME@never_of:SAMPLER)')
    p.add_argument('--out', help='default: bench/results/reach_<env-id>.json')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    samplers = [parse_sampler(s) for s in args.samplers]
    out = Path(args.out or RESULTS / f'reach_{args.env_id}.json')
    result = json.loads(out.read_text()) if out.exists() else {}
    settings = dict(checkpoint=str(args.checkpoint), env_id=args.env_id, group_size=args.group_size,
                    seeds=[FIRST_TEST_SEED, FIRST_TEST_SEED + args.seeds], actions_per_chunk=args.actions_per_chunk,
                    max_episode_steps=args.max_episode_steps, noise_seed=args.seed)
    # Resuming adds samplers to the file; their counts only compare if everything else is the same.
    changed = {k: (result[k], v) for k, v in settings.items() if k in result and result[k] != v}
    if changed:
        raise ValueError(f'{out} was measured with other settings {changed} (file, now): pass another --out')
    result.update(settings, samplers=result.get('samplers', {}))
    model, _ = load_checkpoint(args.checkpoint)
    seeds = held_out_seeds(args.seeds)
    with EnvPool(partial(make_env, args.env_id, args.max_episode_steps), num_workers=args.workers) as pool:
        if 'ode_outcomes' not in result:
            result['ode_outcomes'] = pool.evaluate(FlowPolicy(model, mode='ode'), seeds, args.actions_per_chunk)[1]
            atomic_write_text(out, json.dumps(result, indent=1))
        ode = np.array(result['ode_outcomes'], bool)
        subset = np.ones(len(seeds), bool)
        if args.never_of:
            if args.never_of not in result['samplers']:
                raise ValueError(f'--never-of {args.never_of}: no such sampler in {out} ({list(result["samplers"])})')
            subset = np.array(result['samplers'][args.never_of]['successes_per_state']) == 0
        states = [s for s, keep in zip(seeds, subset, strict=True) if keep]
        for where, level, rho, anti in samplers:
            name = (f'{where}:{level}' + (f':{rho}' if rho else '') + (':anti' if anti else '')
                    + (f'@never_of:{args.never_of}' if args.never_of else ''))
            if name in result['samplers']:
                continue
            start = time.perf_counter()
            policy = FlowPolicy(model, mode='sde', seed=args.seed, noise_level=level, sde_noise=where,
                                step_noise_correlation=rho)
            episodes = pool.run_episodes(policy, [s for s in states for _ in range(args.group_size)],
                                         args.actions_per_chunk, id_prefix='reach', antithetic=anti)
            outcomes = np.array([bool(e.success) for e in episodes]).reshape(len(states), args.group_size)
            counts = outcomes.sum(1)
            result['samplers'][name] = {**summarize_counts(counts, args.group_size, ode[subset]),
                                        'mixed_pairs': mixed_pairs(outcomes),
                                        'wall_s': round(time.perf_counter() - start, 1), 'seeds': states,
                                        'successes_per_state': counts.tolist()}
            print(f'[{time.strftime("%H:%M:%S")}] {name}: ' + json.dumps(
                {k: v for k, v in result['samplers'][name].items() if k != 'successes_per_state'}),
                file=sys.stderr, flush=True)
            atomic_write_text(out, json.dumps(result, indent=1))
    print(json.dumps({n: {k: v for k, v in s.items() if k != 'successes_per_state'}
                      for n, s in result['samplers'].items()}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
