"""How reproducible is a test score? Re-score a checkpoint on the held-out test seeds and compare seed by seed.

The same checkpoint, scored again, can flip some test episodes: the env workers answer in a different
order, so the policy sees other batches (float sums in another order), and another machine's CPU takes
other float paths in the simulator and the network. Contact-rich episodes amplify such differences. This
scores a checkpoint `--repeats` times (ODE, as bench/learning.py does) and compares every repeat with the
first and, if given, with an evaluation recorded elsewhere (another machine, an earlier session):

    python bench/rescore.py --task PickCube-v1 --name vdrop_start \\
        --checkpoint runs/learning/PickCube-v1/sft_start_vdrop0.5/sft \\
        --recorded bench/results/learning/PickCube-v1_stepnft_correlated_noise_lr5e-5_anneal_vdrop0.5_s0.json \\
        --recorded runs/learning/PickCube-v1/start_eval_200_vdrop0.5.json

Writes bench/results/rescore_<task>.json (one entry per --name, merged with earlier runs): each repeat's
success with its Wilson 95 % interval, and per comparison the test seeds gained and lost with the exact
McNemar p-value.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.learning import RESULTS, held_out_seeds, make_env, paired  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.env_pool import EnvPool  # noqa: E402
from stepnft_ros.policy import FlowPolicy, load_checkpoint  # noqa: E402
from stepnft_ros.progress import rate_interval  # noqa: E402


def recorded_outcomes(path: Path) -> list[bool]:
    """The start's per-seed outcomes of a bench/learning.py results JSON, or a cached evaluation's."""
    data = json.loads(path.read_text())
    for key in ('start_outcomes', 'eval_outcomes'):
        if key in data:
            return [bool(o) for o in data[key]]
    raise SystemExit(f'{path}: neither start_outcomes nor eval_outcomes in it')


def score(outcomes: list[bool]) -> dict:
    n, k = len(outcomes), sum(outcomes)
    return {'success': k / n, 'interval': rate_interval(k / n, n)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--task', default='PickCube-v1')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--name', required=True, help='its entry in the results file')
    p.add_argument('--recorded', type=Path, action='append', default=[],
                   help='a results JSON holding the same checkpoint scored elsewhere (repeatable)')
    p.add_argument('--repeats', type=int, default=2)
    p.add_argument('--test-seeds', type=int, default=200)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--actions-per-chunk', type=int, default=4)
    p.add_argument('--max-episode-steps', type=int, default=100)
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit('--repeats must be at least 1')
    torch.set_num_threads(1)
    recorded = [recorded_outcomes(path) for path in args.recorded]
    for path, outcomes in zip(args.recorded, recorded, strict=True):
        if len(outcomes) != args.test_seeds:
            raise SystemExit(f'{path} holds {len(outcomes)} test seeds, not {args.test_seeds}')
    model, _ = load_checkpoint(args.checkpoint)
    repeats = []
    with EnvPool(partial(make_env, args.task, args.max_episode_steps), num_workers=args.workers) as pool:
        for _ in range(args.repeats):
            _, per_seed = pool.evaluate(FlowPolicy(model, mode='ode'), held_out_seeds(args.test_seeds),
                                        args.actions_per_chunk)
            repeats.append([bool(o) for o in per_seed])
    entry = {
        'task': args.task, 'checkpoint': args.checkpoint, 'test_seeds': args.test_seeds, 'workers': args.workers,
        'recorded': [{'file': str(path), **score(o)} for path, o in zip(args.recorded, recorded, strict=True)],
        'repeats': [{**score(r), 'vs_first_repeat': paired(repeats[0], r),
                     'vs_recorded': [paired(o, r) for o in recorded]} for r in repeats],
        'outcomes': repeats,
    }
    out = RESULTS / f'rescore_{args.task}.json'
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged[args.name] = entry
    atomic_write_text(out, json.dumps(merged, indent=1) + '\n')
    print(json.dumps({k: v for k, v in entry.items() if k != 'outcomes'}, indent=1))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
