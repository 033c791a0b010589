"""What the policy class reaches by supervised learning alone: SFT starts with more demos and more steps.

The RL runs of bench/learning.py level off (PushCube at +11 to +15 points, PickCube at +5 to +9).
This asks whether the same policy (architecture, size, action chunking) can represent a much better
policy at all: if behaviour cloning on more planner demos goes far past the RL plateau, the plateau
is the learner's, not the policy class's. Each variant is an SFT start built exactly like the
embedded one (`pipeline.DefaultSFT`, demos cached per variant) and scored with the learning
benchmark's evaluator: ODE success on the same held-out test seeds, paired against the first variant.

    python bench/sft_ceiling.py --task PushCube-v1 --variants 10x1000 10x8000 100x8000 --workers 2

A variant is DEMOSxSTEPS, optionally xdMODEL (e.g. 100x8000xd128). Results (resumable, one entry
per variant) go to bench/results/sft_ceiling_<task>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.learning import RESULTS, held_out_seeds, make_env, paired  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.env_pool import EnvPool  # noqa: E402
from stepnft_ros.pipeline import DefaultSFT, ensure_sft_checkpoint  # noqa: E402
from stepnft_ros.policy import FlowPolicy, load_checkpoint  # noqa: E402
from stepnft_ros.progress import wilson  # noqa: E402

VARIANT = re.compile(r'^(\d+)x(\d+)(?:xd(\d+))?$')


def parse_variant(text: str, task: str) -> DefaultSFT:
    m = VARIANT.match(text)
    if m is None:
        raise ValueError(f'variant {text!r} is not DEMOSxSTEPS or DEMOSxSTEPSxdMODEL (e.g. 100x8000xd128)')
    spec = replace(DefaultSFT(), env_id=task, num_demos=int(m[1]), sft_steps=int(m[2]))
    return replace(spec, d_model=int(m[3])) if m[3] else spec


def report(variant: str, msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] [{variant}] {msg}', file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--task', default='PushCube-v1')
    p.add_argument('--variants', nargs='+', required=True, help='DEMOSxSTEPS[xdMODEL]; the first is the reference')
    p.add_argument('--test-seeds', type=int, default=200)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--actions-per-chunk', type=int, default=4)
    p.add_argument('--max-episode-steps', type=int, default=100)
    p.add_argument('--work', default='runs/sft_ceiling')
    p.add_argument('--out', help='default: bench/results/sft_ceiling_<task>.json')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    specs = {v: parse_variant(v, args.task) for v in args.variants}  # all parsed before any work starts
    out = Path(args.out or RESULTS / f'sft_ceiling_{args.task}.json')
    result = json.loads(out.read_text()) if out.exists() else {'task': args.task, 'variants': {}}
    seeds = held_out_seeds(args.test_seeds)
    with EnvPool(partial(make_env, args.task, args.max_episode_steps), num_workers=args.workers) as pool:
        for name, spec in specs.items():
            if name in result['variants'] and len(result['variants'][name]['outcomes']) == len(seeds):
                continue
            start = time.perf_counter()
            ckpt = ensure_sft_checkpoint(Path(args.work) / args.task / name, spec,
                                         log=partial(report, name))
            build_s = time.perf_counter() - start
            model, _ = load_checkpoint(ckpt)
            start = time.perf_counter()
            success, outcomes = pool.evaluate(FlowPolicy(model, mode='ode'), seeds, args.actions_per_chunk)
            lo, hi = wilson(sum(outcomes), len(outcomes))
            result['variants'][name] = {
                'spec': asdict(spec), 'params': sum(t.numel() for t in model.parameters()),
                'success': success, 'wilson95': [lo, hi], 'build_s_if_not_cached': round(build_s, 1),
                'eval_s': round(time.perf_counter() - start, 1), 'outcomes': outcomes}
            report(name, f'ODE success {success:.3f} [{lo:.3f}, {hi:.3f}]')
            atomic_write_text(out, json.dumps(result, indent=1))
    reference = result['variants'].get(args.variants[0])
    if reference is not None:
        for entry in result['variants'].values():
            entry['paired_vs_reference'] = paired(reference['outcomes'], entry['outcomes'])
    result['reference'] = args.variants[0]
    result['test_seeds'] = len(seeds)
    atomic_write_text(out, json.dumps(result, indent=1))
    print(json.dumps({n: {k: e[k] for k in ('success', 'wilson95', 'params')} for n, e in result['variants'].items()},
                     indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
