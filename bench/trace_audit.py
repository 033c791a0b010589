"""Audit a train_sim run's episode bags: do the recorded traces, outcomes and lengths belong together?

A graph that records well-formed traces under the wrong observation, or an outcome under the wrong
episode, keeps every summary statistic (success rate, loss, preference accuracy) the same and
destroys the signal. Three checks, on the version-0 episodes of a run and its starting checkpoint:

- v_old: the velocity the checkpoint gives at the recorded (x_k, τ_k*, observation) against the
  recorded v_old (a trace stored with another decision's observation fails this);
- the SDE step: the residual x_k*+1 − μ(x_k*, v_old) per solver step against the Flow-SDE standard
  deviation at noise level a (the sampler's noise is where π-StepNFT's signal comes from);
- outcomes: every failed episode ran to the step cap, and each episode's decision count matches
  its bridge-reported env steps (an outcome attached to another robot's episode fails this).

It also counts, per learner update, the episodes sampled by an older weights version than the one
the update started from (what the graph's asynchrony feeds the learner).

    python bench/trace_audit.py --run-dir runs/main_job_push [--episodes 400] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.episodes.schema import collate_episodes  # noqa: E402
from stepnft_ros.episodes.store import EpisodeStore  # noqa: E402
from stepnft_ros.policy import load_checkpoint  # noqa: E402
from stepnft_ros.policy.checkpoint import read_header  # noqa: E402
from stepnft_ros.policy.sampler import grid_at, sde_mean, sde_sigma, sde_std  # noqa: E402


def audit(run: Path, checkpoint: Path, episodes: int, actions_per_chunk: int, step_cap: int) -> dict:
    store = EpisodeStore(run / 'episodes')
    loaded = [store.load(i) for i in store.episode_ids()[:episodes]]
    first = [e for e in loaded if e.decisions and all(e.decision_version(d) == 0 for d in e.decisions)]
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    batch = collate_episodes(first, model.config, 'batch_mean')
    trace, steps = batch.trace, model.config.num_steps
    with torch.no_grad():
        tau_k, tau_next, delta = grid_at(trace.k, steps)
        v = model.velocity(trace.x_k, tau_k, model.encode_prefix(batch.obs))
        sigma = sde_sigma(tau_k, tau_next, trace.a)
        residual = trace.x_next - sde_mean(trace.x_k, trace.v_old, tau_k, tau_next, sigma)
        expected = sde_std(sigma, delta)
    per_step = [{'k': k, 'decisions': int((trace.k == k).sum()),
                 'residual_std': round(residual[trace.k == k].std().item(), 4),
                 'sde_std': round(expected[trace.k == k][0].item(), 4)} for k in range(steps) if (trace.k == k).any()]
    inconsistent = [{'episode': e.episode_id, 'success': e.success, 'decisions': len(e.decisions),
                     'env_steps': e.env_steps} for e in loaded
                    if len(e.decisions) != -(-e.env_steps // actions_per_chunk)
                    or (not e.success and e.env_steps != step_cap)]
    return {'run': str(run), 'checkpoint': str(checkpoint), 'episodes_read': len(loaded),
            'version0_episodes': len(first), 'decisions': len(batch),
            'max_abs_v_minus_v_old': float(f'{(v - trace.v_old).abs().max().item():.3g}'),
            'sde_step': per_step, 'outcome_length_inconsistent': inconsistent[:20],
            'outcome_length_inconsistent_count': len(inconsistent), 'learner_updates': schedule(run, store)}


def schedule(run: Path, store: EpisodeStore) -> list[dict]:
    """Per learner update: how many of the episodes it trained on were sampled, wholly or partly, by
    an older weights version than the one it updated (the graph's asynchrony; the loop has none)."""
    rows, before = [], set()
    for path in sorted((run / 'learner' / 'checkpoints').glob('v[0-9]*')):
        version = int(path.name[1:])
        consumed = set(read_header(path)[1]['learner']['consumed'])
        episodes = [store.load(i) for i in sorted(consumed - before)]
        before = consumed
        decisions = [(e, d) for e in episodes for d in e.decisions]
        rows.append({'update': version, 'episodes': len(episodes),
                     'episodes_by_an_older_version': sum(e.oldest_version < version - 1 for e in episodes),
                     'episodes_spanning_a_hot_swap': sum(len({e.decision_version(d) for d in e.decisions}) > 1
                                                         for e in episodes),
                     'decisions_by_an_older_version': sum(e.decision_version(d) < version - 1 for e, d in decisions),
                     'decisions': len(decisions)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--run-dir', required=True)
    p.add_argument('--checkpoint', help='the run\'s starting checkpoint (default: <run-dir>/sft_default/sft)')
    p.add_argument('--episodes', type=int, default=400, help='the first episodes of the run to read')
    p.add_argument('--actions-per-chunk', type=int, default=4)
    p.add_argument('--step-cap', type=int, default=100, help='max_episode_steps of the run')
    p.add_argument('--out', help='also write the JSON here')
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    out = audit(run, Path(args.checkpoint) if args.checkpoint else run / 'sft_default' / 'sft', args.episodes,
                args.actions_per_chunk, args.step_cap)
    text = json.dumps(out, indent=1)
    if args.out:
        atomic_write_text(Path(args.out), text + '\n')
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
