"""Learning proof on a real simulator: few-shot SFT, then π-StepNFT online, on ManiSkill3 PickCube.

1. Expert demos offline from ManiSkill's motion planner (cached).
2. SFT a small state-only flow policy on a few of them, so it succeeds only partially.
3. π-StepNFT online from that checkpoint: Flow-SDE rollouts, terminal-binary labels, and an
   ODE evaluation on fixed held-out seeds after every iteration. The main variant and the
   ablations (loss_form=weighted, target=terminal) start from the same SFT checkpoint and use
   the same seeds and wall-clock budget; they run as parallel processes so they share the
   machine equally.

Prints one JSON document (and writes it to <out>/learning_pickcube.json):

    python bench/learning_pickcube.py --rl-minutes 30            # main + both ablations
    python bench/learning_pickcube.py --variants stepnft --rl-minutes 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig  # noqa: E402
from stepnft_ros.algo.stepnft import StepNFTConfig  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.online import OnlineConfig, run_online  # noqa: E402
from stepnft_ros.pipeline import DefaultSFT, ensure_sft_checkpoint  # noqa: E402
from stepnft_ros.policy import FlowPolicy, load_checkpoint, save_checkpoint  # noqa: E402
from stepnft_ros.rollout import evaluate  # noqa: E402

VARIANTS = {
    'stepnft': {},
    'weighted': {'loss_form': 'weighted'},
    'terminal': {'target': 'terminal'},
}
FIRST_EVAL_SEED = 10_000  # held out: demos use seeds from 0, RL episodes from OnlineConfig.first_train_seed


def log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def env_config(args: argparse.Namespace) -> ManiSkillEnvConfig:
    # Rebuilding the scene on reset (~0.2 s) makes every seed start exactly as in the demos;
    # plain resets leak PhysX state (e.g. a stale is_grasped) from the previous episode.
    return ManiSkillEnvConfig(env_id='PickCube-v1', control_mode='pd_ee_delta_pose', obs_mode='state',
                              max_episode_steps=args.max_episode_steps, reconfigure_on_reset=True)


def eval_seeds(args: argparse.Namespace) -> tuple[int, ...]:
    return tuple(range(FIRST_EVAL_SEED, FIRST_EVAL_SEED + args.eval_episodes))


def prepare_sft(args: argparse.Namespace, out: Path) -> dict:
    """Demos -> SFT checkpoint (pipeline.ensure_sft_checkpoint) -> its ODE success on the held-out seeds."""
    spec = DefaultSFT(max_episode_steps=args.max_episode_steps, num_demos=args.num_demos, sft_steps=args.sft_steps,
                      sft_batch=args.sft_batch, d_model=args.d_model, horizon=args.horizon,
                      noise_level=args.noise_level, seed=args.seed)
    start = time.perf_counter()
    ckpt = ensure_sft_checkpoint(out, spec, log=log)
    summary_path = out / 'sft_summary.json'
    wanted = {'spec': asdict(spec), 'eval_episodes': args.eval_episodes, 'actions_per_chunk': args.actions_per_chunk}
    if summary_path.exists():
        cached = json.loads(summary_path.read_text())
        if cached.get('args') == wanted:
            return cached
    model, meta = load_checkpoint(ckpt)
    with ManiSkillEnv(env_config(args)) as env:
        success, _ = evaluate(env, FlowPolicy(model, mode='ode'), list(eval_seeds(args)), args.actions_per_chunk)
    summary = {'args': wanted, 'num_demos': meta.get('demos'), 'sft_final_loss': meta.get('final_loss'),
               'prepare_wall_s': round(time.perf_counter() - start, 1), 'sft_eval_success': success,
               'policy_config': asdict(model.config)}
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    log(f'SFT: {spec.num_demos} demos, ODE success {success:.3f} on {args.eval_episodes} held-out seeds')
    return summary


def run_variant(args: argparse.Namespace, out: Path, variant: str) -> dict:
    torch.set_num_threads(1)  # the variants run side by side on a 2-core machine
    model, _ = load_checkpoint(out / 'sft')
    algo = replace(StepNFTConfig(lr=args.lr, epochs=args.epochs, minibatch_size=args.minibatch_size),
                   **VARIANTS[variant])
    online = OnlineConfig(iterations=10_000, episodes_per_iteration=args.episodes_per_iteration,
                          actions_per_chunk=args.actions_per_chunk, eval_seeds=eval_seeds(args),
                          time_budget_s=args.rl_minutes * 60.0, seed=args.seed, labels=args.labels)
    start = time.perf_counter()

    def progress(entry: dict) -> None:
        entry['wall_s'] = round(time.perf_counter() - start, 1)
        log(f'{variant} it {entry["iteration"]}: eval {entry["eval_success"]:.3f} '
            f'train {entry.get("train_success", float("nan")):.3f} env_steps {entry["env_steps"]} '
            f'rl_wall {entry["rl_wall_s"]:.0f}s pref_acc {entry.get("preference_accuracy", float("nan")):.3f} '
            f'clip {entry.get("clip_fraction", float("nan")):.3f}')

    with ManiSkillEnv(env_config(args)) as env:
        history = run_online(env, model, online, algo, log=progress)
    save_checkpoint(out / f'rl_{variant}', model, {'stage': 'stepnft', 'variant': variant,
                                                 'weights_version': len(history) - 1})
    evals = [h['eval_success'] for h in history]
    result = {'variant': variant, 'algo_config': asdict(algo), 'online_config': asdict(online),
              'sft_success': evals[0], 'final_success': evals[-1], 'best_success': max(evals),
              'gain_final': evals[-1] - evals[0], 'iterations': len(history) - 1,
              'env_steps': history[-1]['env_steps'], 'rl_wall_s': history[-1]['rl_wall_s'],
              'total_wall_s': round(time.perf_counter() - start, 1), 'history': history}
    atomic_write_text(out / f'result_{variant}.json', json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='runs/learning_pickcube', help='work and result directory')
    p.add_argument('--variants', default='stepnft,weighted,terminal', help=f'comma list of {list(VARIANTS)}')
    p.add_argument('--rl-minutes', type=float, default=30.0, help='RL wall-clock budget per variant')
    p.add_argument('--num-demos', type=int, default=100, help='demos for SFT')
    p.add_argument('--sft-steps', type=int, default=3000)
    p.add_argument('--sft-batch', type=int, default=128)
    p.add_argument('--d-model', type=int, default=64, help='token width of the policy')
    p.add_argument('--horizon', type=int, default=8, help='H: actions per chunk')
    p.add_argument('--actions-per-chunk', type=int, default=4, help='actions executed before re-planning')
    p.add_argument('--max-episode-steps', type=int, default=100)
    p.add_argument('--noise-level', type=float, default=0.7, help='a: Flow-SDE noise level of the rollouts')
    p.add_argument('--labels', default='terminal_binary', choices=('terminal_binary', 'batch_mean'))
    p.add_argument('--lr', type=float, default=1e-4)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--minibatch-size', type=int, default=4096,
                   help='decisions per gradient step; the default takes each on-policy batch whole')
    p.add_argument('--episodes-per-iteration', type=int, default=48)
    p.add_argument('--eval-episodes', type=int, default=48, help='held-out seeds evaluated after every iteration')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--worker', help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        run_variant(args, out, args.worker)
        return 0
    variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f'unknown variants {unknown}; choose from {list(VARIANTS)}')
    torch.set_num_threads(1)  # small model: one thread is as fast, and never oversubscribes
    sft = prepare_sft(args, out)
    passthrough = list(argv if argv is not None else sys.argv[1:])
    procs = {v: subprocess.Popen([sys.executable, __file__, *passthrough, '--worker', v]) for v in variants}
    codes = {v: proc.wait() for v, proc in procs.items()}
    failed = {v: c for v, c in codes.items() if c != 0}
    results = {v: json.loads((out / f'result_{v}.json').read_text()) for v in variants if v not in failed}
    report = {
        'benchmark': 'learning_pickcube', 'env': 'ManiSkill3 PickCube-v1 state pd_ee_delta_pose physx_cpu',
        'machine': {'cpus': os.cpu_count(), 'torch': torch.__version__, 'cuda': torch.cuda.is_available()},
        'eval_seeds': list(eval_seeds(args)), 'sft': sft, 'failed_variants': failed,
        'summary': {v: {k: r[k] for k in ('sft_success', 'final_success', 'best_success', 'gain_final',
                                          'iterations', 'env_steps', 'rl_wall_s')} for v, r in results.items()},
        'variants': results,
    }
    atomic_write_text(out / 'learning_pickcube.json', json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ('benchmark', 'sft', 'summary', 'failed_variants')}, indent=2))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
