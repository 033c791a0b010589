"""Audit a train_sim run's episode bags: do the recorded traces, outcomes and lengths belong together?

A graph that records well-formed traces under the wrong observation, an outcome under the wrong
episode, or a chunk the robot never ran keeps every summary statistic (success rate, loss,
preference accuracy) the same and destroys the signal. On episodes spread over the whole run, with
each weights version's own checkpoint (the start for version 0, the learner's vNNNNNN after it):

- v_old: the velocity the version's checkpoint gives at the recorded (x_k, τ_k*, observation)
  against the recorded v_old (a stale hot swap, or a trace stored with another decision's
  observation, fails this);
- the chunk: the published actions against the unnormalized x_K of the trace, and (sde_noise
  recorded_step, the default) x_K against the ODE continuation of x_k*+1 (a chunk from another
  row of the batch, or noise where none belongs, fails this);
- the SDE step: the residual x_k*+1 − μ(x_k*, v_old) per solver step against the Flow-SDE standard
  deviation at noise level a (the sampler's noise is where π-StepNFT's signal comes from);
- outcomes: every failed episode ran to the step cap, and each episode's decision count matches
  its bridge-reported env steps (an outcome attached to another robot's episode fails this);
- replay (--replay N, ManiSkill runs): N episodes re-run from their reset seeds in a fresh
  environment with their recorded chunks; every recorded observation, the length and the outcome
  must come back (what the ROS-free loop would have recorded for the same actions).

It also counts, per learner update, the episodes sampled by an older weights version than the one
the update started from (what the graph's asynchrony feeds the learner).

    python bench/trace_audit.py --run-dir runs/main_job_push [--episodes 600] [--replay 20 --env-id PushCube-v1]
        [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.episodes.schema import Episode, collate_episodes  # noqa: E402
from stepnft_ros.episodes.store import EpisodeStore  # noqa: E402
from stepnft_ros.learner import version_dir  # noqa: E402
from stepnft_ros.policy import load_checkpoint  # noqa: E402
from stepnft_ros.policy.checkpoint import read_header  # noqa: E402
from stepnft_ros.policy.sampler import euler_step, grid_at, sde_mean, sde_sigma, sde_std  # noqa: E402
from stepnft_ros.rollout import Env, to_observation  # noqa: E402


def audit(run: Path, checkpoint: Path, episodes: int, actions_per_chunk: int, step_cap: int,
          recorded_step: bool = True) -> dict:
    store = EpisodeStore(run / 'episodes')
    ids = store.episode_ids()
    loaded = [store.load(i) for i in ids[::max(1, len(ids) // episodes)][:episodes]]  # spread over the run
    by_version: dict[int, list[Episode]] = {}
    for e in loaded:
        versions = {e.decision_version(d) for d in e.decisions}
        if len(versions) == 1:  # the few spanning a hot swap are left to the schedule count
            by_version.setdefault(versions.pop(), []).append(e)
    per_version, residuals, ks, deltas, steps = [], [], [], [], None
    for version, group in sorted(by_version.items()):
        path = checkpoint if version == 0 else version_dir(run / 'learner' / 'checkpoints', version)
        if not path.exists():
            per_version.append({'weights_version': version, 'episodes': len(group), 'checkpoint': 'missing'})
            continue
        model, _ = load_checkpoint(path)
        model.eval()
        batch = collate_episodes(group, model.config, 'batch_mean')
        trace, steps = batch.trace, model.config.num_steps
        with torch.no_grad():
            prefix = model.encode_prefix(batch.obs)
            tau_k, tau_next, delta = grid_at(trace.k, steps)
            v = model.velocity(trace.x_k, tau_k, prefix)
            sigma = sde_sigma(tau_k, tau_next, trace.a)
            residuals.append(trace.x_next - sde_mean(trace.x_k, trace.v_old, tau_k, tau_next, sigma))
            ks.append(trace.k)
            deltas.append(sde_std(sigma, delta))
            published = torch.as_tensor(np.stack([np.asarray(d.chunk, np.float32) for e in group for d in e.decisions]))
            row = {'weights_version': version, 'episodes': len(group), 'decisions': len(batch),
                   'max_abs_v_minus_v_old': max_abs(v, trace.v_old),
                   'max_abs_chunk_minus_x_K': max_abs(model.normalizer.unnormalize_action(trace.x_final), published)}
            if recorded_step:
                row['max_abs_x_K_minus_ode_continuation'] = max_abs(ode_continuation(model, prefix, trace, steps),
                                                                    trace.x_final)
        per_version.append(row)
    k, residual, expected = torch.cat(ks), torch.cat(residuals), torch.cat(deltas)
    sde_step = [{'k': j, 'decisions': int((k == j).sum()), 'residual_std': round(residual[k == j].std().item(), 4),
                 'sde_std': round(expected[k == j][0].item(), 4)} for j in range(steps) if (k == j).any()]
    inconsistent = [{'episode': e.episode_id, 'success': e.success, 'decisions': len(e.decisions),
                     'env_steps': e.env_steps} for e in loaded
                    if len(e.decisions) != -(-e.env_steps // actions_per_chunk)
                    or (not e.success and e.env_steps != step_cap)]
    checked = [r for r in per_version if 'decisions' in r]
    return {'run': str(run), 'checkpoint': str(checkpoint), 'episodes_read': len(loaded),
            'decisions': sum(r['decisions'] for r in checked),
            'max_abs_v_minus_v_old': max(r['max_abs_v_minus_v_old'] for r in checked),
            'per_version': per_version, 'sde_step': sde_step, 'outcome_length_inconsistent': inconsistent[:20],
            'outcome_length_inconsistent_count': len(inconsistent), 'learner_updates': schedule(run, store)}


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(f'{(a - b).abs().max().item():.3g}')


@torch.no_grad()
def ode_continuation(model, prefix, trace, steps: int) -> torch.Tensor:
    """x_K from x_k*+1 by the deterministic solver steps after k* (sde_noise 'recorded_step')."""
    x = trace.x_next.clone()
    for j in range(steps):
        tau, _, delta = grid_at(torch.full_like(trace.k, j), steps)
        after = (trace.k < j).reshape(-1, 1, 1)
        x = torch.where(after, euler_step(x, model.velocity(x, tau, prefix), delta), x)
    return x


def replay(episodes: Sequence[Episode], make_env: Callable[[], Env], actions_per_chunk: int) -> dict:
    """Re-run each seeded episode's recorded chunks in a fresh environment: the largest difference to a
    recorded observation's state, and the episodes whose length or outcome came out otherwise."""
    env = make_env()
    worst, mismatched, replayed = 0.0, [], 0
    for e in (e for e in episodes if e.seed is not None):
        raw, success, done, steps = env.reset(e.seed), False, False, 0
        for d in e.decisions:
            state = np.asarray(to_observation(raw).state)
            worst = max(worst, float(np.abs(np.asarray(d.observation.state) - state).max()))
            for action in np.asarray(d.chunk)[d.executed_from:d.executed_from + d.executed][:actions_per_chunk]:
                raw, success, done = env.step(np.clip(action, env.action_low, env.action_high))
                steps += 1
                if done:
                    break
            if done:
                break
        replayed += 1
        if steps != e.env_steps or bool(success) != bool(e.success):
            mismatched.append({'episode': e.episode_id, 'recorded': [e.env_steps, e.success],
                               'replayed': [steps, success]})
    close = getattr(env, 'close', None)
    if close is not None:
        close()
    return {'episodes': replayed, 'max_abs_state_difference': worst, 'length_or_outcome_mismatched': mismatched}


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
    p.add_argument('--episodes', type=int, default=600, help='episodes to read, spread evenly over the run')
    p.add_argument('--actions-per-chunk', type=int, default=4)
    p.add_argument('--step-cap', type=int, default=100, help='max_episode_steps of the run')
    p.add_argument('--sde-noise', default='recorded_step', choices=('recorded_step', 'every_step'),
                   help="the run's policy_server sde_noise (recorded_step: x_K must be x_k*+1's ODE continuation)")
    p.add_argument('--replay', type=int, default=0, help='re-run this many of the audited episodes in ManiSkill')
    p.add_argument('--env-id', default='PushCube-v1', help="the run's task (for --replay)")
    p.add_argument('--control-mode', default='pd_ee_delta_pose')
    p.add_argument('--out', help='also write the JSON here')
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    out = audit(run, Path(args.checkpoint) if args.checkpoint else run / 'sft_default' / 'sft', args.episodes,
                args.actions_per_chunk, args.step_cap, recorded_step=args.sde_noise == 'recorded_step')
    if args.replay:
        from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig

        store = EpisodeStore(run / 'episodes')
        ids = store.episode_ids()
        picked = [store.load(i) for i in ids[::max(1, len(ids) // args.replay)][:args.replay]]
        config = ManiSkillEnvConfig(env_id=args.env_id, control_mode=args.control_mode, obs_mode='state',
                                    max_episode_steps=args.step_cap, reconfigure_on_reset=True)
        out['replay'] = replay(picked, lambda: ManiSkillEnv(config), args.actions_per_chunk)
    text = json.dumps(out, indent=1)
    if args.out:
        atomic_write_text(Path(args.out), text + '\n')
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
