"""Learning benchmark: π-StepNFT, its ablations and the baselines from one SFT start, at equal env steps.

Each (method, task, training seed) run is its own resumable job: the model, the optimizer and the
history are saved after every update under <work>/<task>/<method>/s<seed>/ (TensorBoard scalars in its
tensorboard/), and a restarted run continues from there. Its result JSON lands in
bench/results/learning/. Runs start from the task's embedded SFT start (stepnft_ros.pipeline.EMBEDDED_STARTS)
unless --num-demos / --sft-steps / --d-model / --velocity-dropout name another (PickCube's or PushCube's
plain clone, the start of the runs recorded before velocity dropout became its default: --velocity-dropout
0). `summarize` merges every result into bench/results/learning_summary.json and plots success against env steps and
wall-clock with Wilson 95 % bands.

    python bench/learning.py run --method stepnft --seed 0 --env-steps 300000 --workers 2
    python bench/learning.py summarize
    python bench/learning.py main-job --run-dir runs/train_sim --cmd 'bash scripts/main.sh'
    python bench/learning.py score-graph --run-dir runs/train_sim --task PushCube-v1 --method ros_graph

Evaluation: ODE success on held-out test seeds (default 200, from 10000); nothing selects
checkpoints on them, so `final` is the number to read. `best` is reported for collapse checks only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig  # noqa: E402
from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer  # noqa: E402
from stepnft_ros.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from stepnft_ros.env_pool import EnvPool  # noqa: E402
from stepnft_ros.learner import version_dir  # noqa: E402
from stepnft_ros.monitoring import EVENTS_DIR, ScalarLog  # noqa: E402
from stepnft_ros.online import OnlineConfig, run_online  # noqa: E402
from stepnft_ros.pipeline import EMBEDDED_STARTS, DefaultSFT, ensure_sft_checkpoint  # noqa: E402
from stepnft_ros.policy import FlowPolicy, load_checkpoint, save_checkpoint  # noqa: E402
from stepnft_ros.policy.checkpoint import read_header  # noqa: E402
from stepnft_ros.progress import mcnemar_exact, rate_interval, wilson  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'
FIRST_TEST_SEED = 10_000  # demos use seeds from 200 and 3000, training episodes from 1000000


def held_out_seeds(n: int) -> list[int]:
    """The n held-out test seeds every evaluation of the benchmarks uses."""
    return list(range(FIRST_TEST_SEED, FIRST_TEST_SEED + n))

# The regime every method shares unless it says otherwise (see docs/benchmarks-and-results.md).
BASE_ALGO = dict(lr=1e-4, epochs=4, minibatch_size=1024, executed_only=True, adam_beta1=0.9, adam_beta2=0.95)
BASE_ONLINE = dict(episodes_per_iteration=256, group_size=8, labels='group_mean', noise_level=0.3)
# the default π-StepNFT regime (`stepnft_recorded_step`): Flow-SDE noise only at the recorded solver step,
# 1024 episodes per update, batch-mean labels
REC_ALGO = dict(minibatch_size=4096)
REC_ONLINE = dict(episodes_per_iteration=1024, group_size=1, labels='batch_mean', sde_noise='recorded_step')
GROUP_ONLINE = {**REC_ONLINE, 'labels': 'group_mean', 'group_size': 8}
CORRELATED_ONLINE = {**GROUP_ONLINE, 'step_noise_correlation': 1.0, 'noise_level': 0.8}  # one ξ per episode
METHODS: dict[str, tuple[dict, dict]] = {
    # name: (StepNFTConfig overrides, OnlineConfig overrides)
    'stepnft': ({}, {}),
    'grpo': ({'algo': 'grpo', 'lambda_kl': 0.0}, {}),
    # success-filtered BC in the recorded-step regime: the same rollouts and optimizer steps per update as
    # stepnft_recorded_step, flow matching on the successful episodes' executed actions
    'filtered_bc': ({**REC_ALGO, 'algo': 'filtered_bc'}, {**REC_ONLINE, 'labels': 'terminal_binary'}),
    # how far one update may move the policy (the regime's open question; see docs/benchmarks-and-results.md)
    'stepnft_lr3e-5': ({'lr': 3e-5}, {}),
    'stepnft_target_kl': ({'target_kl': 1e-3}, {}),
    # the same optimizer steps per update, 8x the episodes behind each (about the measured noise scale)
    'stepnft_batch2048': ({'minibatch_size': 8192}, {'episodes_per_iteration': 2048}),
    # Flow-SDE noise only at the recorded step k* (the update credits the outcome to it alone):
    # bench/results/gradient_snr_recorded_a0.3.json halves the noise scale, so 1024 episodes per update;
    # the every-step twin is the control at the same scale.
    'stepnft_recorded_step': (REC_ALGO, REC_ONLINE),
    # the lr sweep at that scale: with the update's direction about half signal at 1024 episodes, how far
    # one update may move before noise damage outweighs the gain
    'stepnft_recorded_step_lr3e-4': ({**REC_ALGO, 'lr': 3e-4}, REC_ONLINE),
    # the likelihood baseline in the same regime (same rollouts, labels and optimizer steps): is the limit
    # π-StepNFT's loss, or the signal these rollouts carry?
    'grpo_recorded_step': ({**REC_ALGO, 'algo': 'grpo', 'lambda_kl': 0.0}, REC_ONLINE),
    'stepnft_every_step_1024': (REC_ALGO, {**REC_ONLINE, 'sde_noise': 'every_step'}),
    # ... and only at the last solver step, where bench/results/gradient_snr_recorded_a0.3_per_step.json
    # found the signal of the recorded-step rollouts, with a larger a since that step's std is only
    # a·sqrt(Δ/3) (0.17 at a = 0.6). Measured: it costs success and learns no faster (docs/benchmarks-and-results.md).
    'stepnft_last_step': ({**REC_ALGO, 'step_selection': 'last'}, {**REC_ONLINE, 'noise_level': 0.6}),
    # the recorded-step regime, each update also reusing the previous 3 iterations' rollouts (≈ 4096
    # episodes behind each gradient; the policy moves little per update: KL ≈ 7e-4)
    'stepnft_replay4': ({'minibatch_size': 16384}, {**REC_ONLINE, 'replay_iterations': 4}),
    # group-relative labels: 8 episodes per reset seed, label = success - the group's mean (the default of
    # config/train_sim.yaml since it measured better on PushCube; docs/benchmarks-and-results.md)
    'stepnft_group_labels': (REC_ALGO, GROUP_ONLINE),
    # ablations of π-StepNFT: one change each from the group-label regime above. The batch-mean label
    # scheme is stepnft_recorded_step (which also draws every episode from its own reset seed).
    **{name: ({**REC_ALGO, **algo}, {**GROUP_ONLINE, **online}) for name, (algo, online) in {
        'stepnft_whole_chunk': ({'executed_only': False}, {}),  # the loss covers unexecuted actions too
        'stepnft_pm1_labels': ({}, {'labels': 'terminal_binary'}),  # ±1 from the outcome, no baseline
        'stepnft_weighted': ({'loss_form': 'weighted'}, {}),
        'stepnft_terminal_target': ({'target': 'terminal'}, {}),
        'stepnft_fixed_last_step': ({'step_selection': 'last'}, {}),  # noise and trace at k = K-1 only
    }.items()},
    # exploration that moves trajectories: one step-noise direction ξ per episode (ρ = 1; each decision's
    # recorded step is still a Flow-SDE transition) at a = 0.8. On the PushCube start it leaves 18 % of
    # the states without a success in 8 tries instead of 32 % (bench/results/reach_PushCube-v1.json)
    'stepnft_correlated_noise': (REC_ALGO, CORRELATED_ONLINE),
    # ... with half the lr: seed 1 of the above moved far per update (KL ≈ 3e-2, ~70 % of decisions clipped)
    'stepnft_correlated_noise_lr5e-5': ({**REC_ALGO, 'lr': 5e-5}, CORRELATED_ONLINE),
    # ... with a falling linearly from 0.8 to 0.3 over the first 1.0 M env steps: at the plateau near 50 % about
    # half of the ODE test failures carry the cube to within 5 cm of the goal and stall there (placed means
    # < 2.5 cm; bench/results/failures_PickCube-v1.json), while a = 0.8 rollouts succeed 10 points less often than
    # the ODE policy. Wide noise finds grasps early; late, it turns the near misses the update must sort into misses.
    'stepnft_correlated_noise_lr5e-5_anneal': ({**REC_ALGO, 'lr': 5e-5}, {**CORRELATED_ONLINE, 'noise_level_final': 0.3,
                                                                      'noise_decay_env_steps': 1_000_000}),
    # ... with the lr rising from 5e-5 to 1e-4 as a falls (same window): with a at 0.3 each update moved the policy a
    # third as far (KL 1e-3 against 3e-3 at a = 0.8, nothing clipped) while training success still rose by about a
    # point per update. Is the late climb limited by the update's size?
    'stepnft_correlated_noise_lr5e-5_anneal_lr_rise': ({**REC_ALGO, 'lr': 5e-5}, {
        **CORRELATED_ONLINE, 'noise_level_final': 0.3, 'noise_decay_env_steps': 1_000_000, 'lr_final': 1e-4}),
    # ... with a = 0.5: on PickCube a = 0.8 dropped training success from 24 to 14 % and lost 4.5 points
    'stepnft_correlated_noise_a0.5': (REC_ALGO, {**CORRELATED_ONLINE, 'noise_level': 0.5}),
    # ... also keeping a moving average of the weights over updates (decay 0.7: about 3 updates), evaluated
    # beside the trained weights at every evaluation: is the test score's update-to-update swing on PickCube
    # (40.5-50 % while training success kept rising) update noise that averaging removes?
    'stepnft_correlated_noise_a0.5_ema0.7': ({**REC_ALGO, 'ema_decay': 0.7}, {**CORRELATED_ONLINE, 'noise_level': 0.5}),
    # ... with 8 epochs over each update's rollouts instead of 4 (twice the optimizer steps per batch; the
    # trust region still bounds each decision's change): on PickCube the a = 0.5 regime gains about 2 points
    # of training success per update and its test score levels at 40-50 %. Does each batch teach more?
    'stepnft_correlated_noise_a0.5_epochs8': ({**REC_ALGO, 'epochs': 8},
                                              {**CORRELATED_ONLINE, 'noise_level': 0.5}),
    # ... with 512 episodes per update instead of 1024 (64 reset states × 8), the same minibatch size, so the
    # same optimizer steps per env step on fresher rollouts and twice the updates. 8 epochs taught no more
    # per batch than 4: if one update's progress is saturated by its batch, updates per env step are the lever.
    'stepnft_correlated_noise_a0.5_episodes512': (REC_ALGO, {**CORRELATED_ONLINE, 'noise_level': 0.5,
                                                             'episodes_per_iteration': 512}),
    # ... and with 2048 (256 reset states × 8): 512 measured slower than 1024 at the same optimizer steps per
    # env step, so is the signal behind each update, not the number of updates, still the limit at 1024?
    'stepnft_correlated_noise_a0.5_episodes2048': (REC_ALGO, {**CORRELATED_ONLINE, 'noise_level': 0.5,
                                                              'episodes_per_iteration': 2048}),
    # ... exploring in mirrored pairs (antithetic sampling): episodes 2j and 2j+1 of each group of 8 share ε
    # and k* and take step noise ξ and −ξ. a = 0.5 noise mostly costs success whatever its sign (a = 0.8
    # cost 10 points of training success); that even part is noise in the gradient, which mirroring cancels.
    'stepnft_correlated_noise_a0.5_antithetic': (REC_ALGO, {**CORRELATED_ONLINE, 'noise_level': 0.5,
                                                            'antithetic': True}),
    # ... spending half of each update's groups again on initial states whose latest group of 8 had mixed
    # outcomes, the most balanced first (learnability p(1 - p)): on the start about 30 % of fresh states have no
    # success in 8 tries and their groups carry no group-relative signal (bench/results/reach_PickCube-v1_*.json).
    'stepnft_correlated_noise_a0.5_revisit0.5': (REC_ALGO, {**CORRELATED_ONLINE, 'noise_level': 0.5,
                                                           'revisit_fraction': 0.5}),
    # ... the opposite of revisiting: groups of 4 instead of 8, so each update meets 256 initial states
    # instead of 128. Revisits put more groups on fewer states and fresh-state success rose more slowly, so
    # is state diversity the lever? Each episode keeps (G - 1)/G of its label mass: 0.75 against 0.875.
    'stepnft_correlated_noise_a0.5_group4': (REC_ALGO, {**CORRELATED_ONLINE, 'noise_level': 0.5,
                                                        'group_size': 4}),
    # ... with a = 0.3: on PickCube a = 0.8 -> 0.5 turned a loss (-4.5) into a gain on every seed (+9.5 to +14);
    # the a = 0.5 noise still costs 6 points of training success at the start (17.7 % SDE against 24 % ODE), and a
    # precise grasp may reward smaller, cleaner deviations more than the wider search they buy. Is the trend monotone?
    'stepnft_correlated_noise_a0.3': (REC_ALGO, {**CORRELATED_ONLINE, 'noise_level': 0.3}),
    'stepnft_paper_scale': ({'epochs': 2, 'minibatch_size': 4096, 'lr': 1e-4},
                            {'episodes_per_iteration': 32, 'group_size': 1, 'labels': 'terminal_binary',
                             'noise_level': 0.5}),
}


def log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def make_env(env_id: str, max_episode_steps: int) -> ManiSkillEnv:
    return ManiSkillEnv(ManiSkillEnvConfig(env_id=env_id, control_mode='pd_ee_delta_pose', obs_mode='state',
                                           max_episode_steps=max_episode_steps, reconfigure_on_reset=True))


def sft_spec(args: argparse.Namespace) -> DefaultSFT:
    """The task's embedded start (PushCube: 10 demos, 1000 steps; both: velocity dropout 0.5) unless
    --num-demos / --sft-steps / --d-model / --velocity-dropout say otherwise."""
    base = EMBEDDED_STARTS.get(args.task, DefaultSFT())
    spec = replace(base, env_id=args.task, d_model=args.d_model,
                   num_demos=base.num_demos if args.num_demos is None else args.num_demos,
                   sft_steps=base.sft_steps if args.sft_steps is None else args.sft_steps)
    if args.velocity_dropout == 0:
        spec = replace(spec, state_dropout=0.0, state_dropout_dims=())
    elif args.velocity_dropout is not None:  # the joint velocities: [n, 2n) of the flat [qpos, qvel, extras] state
        env = make_env(args.task, 10)
        joints = len(env.joint_names)
        env.close()
        spec = replace(spec, state_dropout=args.velocity_dropout, state_dropout_dims=tuple(range(joints, 2 * joints)))
    return spec


def start_tag(spec: DefaultSFT) -> str:
    """Suffix naming a start by its width and velocity dropout when they are not the plain clone's (d_model 64,
    no dropout): its SFT, start evaluation, runs and results stay apart from every other start's."""
    return ('' if spec.d_model == DefaultSFT.d_model else f'_d{spec.d_model}') + (
        f'_vdrop{spec.state_dropout:g}' if spec.state_dropout else '')


def run_one(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    task_dir = Path(args.work) / args.task
    start_spec = sft_spec(args)
    tag = start_tag(start_spec)
    name = args.method + tag  # the method as the results name it
    if args.branch_from:
        name += f'_from_{args.branch_from}'
    run_dir = task_dir / name / f's{args.seed}'
    run_dir.mkdir(parents=True, exist_ok=True)
    state_dir = run_dir / 'state'
    branched_at = None
    if args.branch_from:  # continue another run's saved state under this method's settings
        source = task_dir / (args.branch_from + tag) / f's{args.seed}' / 'state'
        if not (source / 'history.json').exists():
            raise SystemExit(f'--branch-from: no saved run at {source}')
        if not (state_dir / 'history.json').exists():
            shutil.copytree(source, state_dir, dirs_exist_ok=True)
            last = json.loads((source / 'history.json').read_text())[-1]
            atomic_write_text(state_dir / 'branched_from.json', json.dumps(
                {'method': args.branch_from, 'iteration': last['iteration'], 'env_steps': last['env_steps']}))
        branched_at = json.loads((state_dir / 'branched_from.json').read_text())
    sft = ensure_sft_checkpoint(task_dir / f'sft_start{tag}', start_spec, log=log)
    algo_over, online_over = METHODS[args.method]
    algo = StepNFTConfig(**{**BASE_ALGO, **algo_over})
    online = OnlineConfig(**{**BASE_ONLINE, **online_over}, iterations=10_000, actions_per_chunk=4,
                          eval_seeds=tuple(held_out_seeds(args.test_seeds)),
                          eval_every=args.eval_every, env_step_budget=args.env_steps, seed=args.seed,
                          first_train_seed=1_000_000 + 100_000 * args.seed)
    history: list[dict] = []
    if (state_dir / 'history.json').exists():  # resume
        model, _ = load_checkpoint(state_dir)
        history = json.loads((state_dir / 'history.json').read_text())
        log(f'{name} s{args.seed}: resuming after iteration {history[-1]["iteration"]}')
    else:
        model, _ = load_checkpoint(sft)
    trainer = StepNFTTrainer(model, algo, seed=args.seed + 1000 * len(history))
    if history:
        trainer.load_optimizer_tensors(safetensors.torch.load_file(str(state_dir / 'optimizer.safetensors')))
        trainer.updates = history[-1]['iteration']
    start_cache = task_dir / f'start_eval_{args.test_seeds}{tag}.json'
    if not history and start_cache.exists():  # every method starts from the same SFT evaluation
        history = [json.loads(start_cache.read_text())]
    started = time.perf_counter()
    wall_before = history[-1].get('total_wall_s', 0.0) if history else 0.0

    def checkpoint(hist: list[dict], tr: StepNFTTrainer) -> None:
        hist[-1]['total_wall_s'] = round(wall_before + time.perf_counter() - started, 1)
        if hist[-1]['iteration'] == 0 and not start_cache.exists():
            atomic_write_text(start_cache, json.dumps(hist[0]))
        save_checkpoint(state_dir, tr.model, {'stage': name, 'iteration': hist[-1]['iteration']})
        atomic_write_bytes(state_dir / 'optimizer.safetensors', safetensors.torch.save(tr.optimizer_tensors()))
        atomic_write_text(state_dir / 'history.json', json.dumps(hist))

    scalars = ScalarLog(run_dir / EVENTS_DIR, resume_after=history[-1]['iteration'] if history else None)

    def progress(e: dict) -> None:
        scalars.write('train', e, e['iteration'])
        ev = f' eval {e["eval_success"]:.3f}' if 'eval_success' in e else ''
        ev += f' ema_eval {e["ema_eval_success"]:.3f}' if 'ema_eval_success' in e else ''
        log(f'{name} s{args.seed} it {e["iteration"]}: env_steps {e["env_steps"]} '
            f'train {e.get("train_success", float("nan")):.3f}{ev} steps/s {e.get("rollout_steps_per_s", 0)} '
            f'pref_acc {e.get("preference_accuracy", float("nan")):.3f} kl {e.get("kl", float("nan")):.2e} '
            f'clip {e.get("clip_fraction", float("nan")):.3f} grad_steps {e.get("gradient_steps", 0):.0f}')

    with EnvPool(partial(make_env, args.task, args.max_episode_steps), num_workers=args.workers, log=log) as pool:
        history = run_online(pool, model, online, algo, log=progress, history=history, trainer=trainer,
                             on_iteration=checkpoint)
        restarts = pool.restarts
    scalars.close()
    evals = [h for h in history if 'eval_success' in h]
    result = {
        'task': args.task, 'method': name, 'seed': args.seed, 'test_seeds': args.test_seeds,
        'sft_start': asdict(start_spec), 'algo_config': asdict(algo),
        'online_config': {k: v for k, v in asdict(online).items() if k != 'eval_seeds'},
        'start': evals[0]['eval_success'], 'final': evals[-1]['eval_success'],
        'best': max(h['eval_success'] for h in evals), 'env_steps': evals[-1]['env_steps'],  # at the final evaluation
        'wall_min': round(history[-1].get('total_wall_s', 0.0) / 60.0, 2),
        'rl_wall_min': round(history[-1]['rl_wall_s'] / 60.0, 2), 'worker_restarts': restarts,
        'curve': [{k: h[k] for k in ('iteration', 'env_steps', 'rl_wall_s', 'eval_success')} for h in evals],
        'curve_outcomes': [h['eval_outcomes'] for h in evals],  # per test seed, for paired tests at any budget
        'history': [{k: v for k, v in h.items() if k not in ('eval_outcomes', 'ema_eval_outcomes')} for h in history],
        'start_outcomes': evals[0]['eval_outcomes'],
        **({'branched_from': branched_at} if branched_at else {}),
        'final_outcomes': evals[-1]['eval_outcomes'],
    }
    if averaged := [h for h in evals if 'ema_eval_success' in h]:  # the weight average, on the same test seeds
        result['ema_curve'] = [{'iteration': h['iteration'], 'env_steps': h['env_steps'],
                                'eval_success': h['ema_eval_success'],
                                'vs_trained_weights': paired(h['eval_outcomes'], h['ema_eval_outcomes']),
                                'vs_start': paired(evals[0]['eval_outcomes'], h['ema_eval_outcomes'])}
                               for h in averaged]
        result['ema_curve_outcomes'] = [h['ema_eval_outcomes'] for h in averaged]
    out = RESULTS / 'learning' / f'{args.task}_{name}_s{args.seed}.json'
    atomic_write_text(out, json.dumps(result, indent=1))
    log(f'{name} s{args.seed}: {result["start"]:.3f} -> {result["final"]:.3f} '
        f'(best {result["best"]:.3f}) at {result["env_steps"]} env steps -> {out}')
    return result


# the bench twin of config/train_sim.yaml's policy-server and learner settings (what the main job runs;
# tests/test_bench_learning.py keeps the two equal)
DEFAULT_METHOD = 'stepnft_correlated_noise_a0.5'
REFERENCE_METHOD = 'stepnft_recorded_step'  # the π-StepNFT regime every other method is compared with
ABLATION_BASE = 'stepnft_group_labels'  # the regime the ablations each change one thing of
ABLATIONS = ('stepnft_whole_chunk', 'stepnft_pm1_labels', 'stepnft_weighted', 'stepnft_terminal_target',
             'stepnft_fixed_last_step', 'stepnft_recorded_step')  # the last: batch-mean labels, one seed per episode


def load_runs() -> list[dict]:
    """Every (method, task, seed) result under bench/results/learning/."""
    return [json.loads(p.read_text()) for p in sorted((RESULTS / 'learning').glob('*.json'))]


def summarize(args: argparse.Namespace) -> dict:
    runs = load_runs()
    summary: dict = {'test_seeds': args.test_seeds, 'tasks': {}}
    for r in runs:
        entry = summary['tasks'].setdefault(r['task'], {}).setdefault(
            r['method'], {'seeds': [], 'start': [], 'final': [], 'best': [], 'env_steps': [], 'wall_min': [],
                          'final_interval': [], 'paired_vs_start': []})
        n = r['test_seeds']
        for key in ('seed', 'start', 'final', 'best', 'env_steps', 'wall_min'):
            entry['seeds' if key == 'seed' else key].append(r[key])
        entry['final_interval'].append(rate_interval(r['final'], n))
        entry['paired_vs_start'].append(paired_vs_start(r))
    for methods in summary['tasks'].values():
        for entry in methods.values():
            entry['across_seeds'] = across_seeds(entry['start'], entry['final'])
    compare_with_reference(summary, runs)
    for task, methods in summary['tasks'].items():
        at_budget(methods, [r for r in runs if r['task'] == task])
    summary['default_method'] = DEFAULT_METHOD
    summary['ablations'] = {'base': ABLATION_BASE, 'tasks': ablation_table(runs)}
    primary = args.task
    summary['task'] = primary
    summary.update(summary['tasks'].get(primary, {}))
    if args.second_task in summary['tasks'] and args.second_task != primary:
        summary['second_task'] = {'task': args.second_task, **summary['tasks'][args.second_task]}
    for main_job in sorted(RESULTS.glob('main_job*.json')):  # main_job.json: the latest; older ones by task
        summary[main_job.stem] = json.loads(main_job.read_text())
    atomic_write_text(RESULTS / 'learning_summary.json', json.dumps(summary, indent=1))
    plot(runs, RESULTS / 'learning_curves.png')
    return summary


def same_seed_run(runs: list[dict], run: dict, method: str) -> dict | None:
    """`method`'s run of the same task and training seed as `run`, if there is one."""
    return next((q for q in runs if (q['task'], q['method'], q['seed']) == (run['task'], method, run['seed'])), None)


def compare_with_reference(summary: dict, runs: list[dict]) -> None:
    """Every method against π-StepNFT's reference run of the same task and training seed: paired on the
    test seeds at both final versions, and at the run's own env-step budget."""
    for r in runs:
        ref = same_seed_run(runs, r, REFERENCE_METHOD)
        if ref is None or 'final_outcomes' not in ref or r is ref or 'final_outcomes' not in r:
            continue
        entry = summary['tasks'][r['task']][r['method']]
        entry.setdefault(f'paired_vs_{REFERENCE_METHOD}', []).append(
            {'seed': r['seed'], **paired(ref['final_outcomes'], r['final_outcomes'])})
        if (same_budget := reference_at(ref, r['env_steps'])) is not None:
            ref_outcomes = same_budget.pop('outcomes')
            entry.setdefault(f'vs_{REFERENCE_METHOD}_at_equal_env_steps', []).append(
                {'seed': r['seed'], 'env_steps': r['env_steps'], 'success': r['final'], **same_budget,
                 **paired(ref_outcomes, r['final_outcomes'])})


def ablation_table(runs: list[dict]) -> dict:
    """Per task, one row per ablation run against the base regime's run of the same training seed, both at
    the smaller of their two env-step budgets (each its last evaluation within it): success with Wilson
    intervals, paired per test seed."""
    table: dict = {}
    for r in runs:
        base = same_seed_run(runs, r, ABLATION_BASE)
        if r['method'] not in ABLATIONS or base is None:
            continue
        budget = min(r['env_steps'], base['env_steps']) * BUDGET_SLACK
        i, j = last_evaluation_within(r, budget), last_evaluation_within(base, budget)
        if i is None or j is None:
            continue
        ours, theirs = outcomes_at(r, i), outcomes_at(base, j)
        n = r['test_seeds']
        row = {'method': r['method'], 'seed': r['seed'], 'start': r['start'],
               'env_steps': r['curve'][i]['env_steps'], 'success': r['curve'][i]['eval_success'],
               'interval': rate_interval(r['curve'][i]['eval_success'], n),
               'base_env_steps': base['curve'][j]['env_steps'], 'base_success': base['curve'][j]['eval_success']}
        if ours is not None and theirs is not None:
            row |= paired(theirs, ours)
        table.setdefault(r['task'], []).append(row)
    return table


def record_main_job(args: argparse.Namespace) -> dict:
    """bench/results/<name>.json from a finished `bash scripts/main.sh --run-dir DIR` run: its summary,
    every evaluation and each update's learning signals, read from the nodes' own files."""
    if not args.name.startswith('main_job'):
        raise ValueError(f"--name must start with 'main_job' (summarize collects main_job*.json), got {args.name!r}")
    run = Path(args.run_dir)
    summary = json.loads((run / 'summary.json').read_text())
    start = json.loads((run / 'sft_default/sft_spec.json').read_text())  # the embedded start it built
    keep = ('weights_version', 'train_success', 'env_steps', 'holdout_preference_accuracy', 'preference_accuracy',
            'kl', 'clip_fraction', 'delta_v_norm', 'update_s')
    evaluations = json.loads((run / 'eval_history.json').read_text())
    out = {'command': args.cmd, 'task': start['env_id'], 'sft_start': start, **summary,
           'evaluations': [{k: h[k] for k in ('weights_version', 'eval_success', 'episodes', 'first_seed', 'outcomes')
                            if k in h} for h in evaluations],
           'updates_detail': [{k: round(h[k], 6) if isinstance(h[k], float) else h[k] for k in keep if k in h}
                              for h in json.loads((run / 'learner/history.json').read_text())],
           'note': args.note}
    if 'outcomes' in evaluations[0] and 'outcomes' in evaluations[-1]:  # evaluators from 2026-12-02 on
        out['final_vs_start'] = paired(evaluations[0]['outcomes'], evaluations[-1]['outcomes'])
    atomic_write_text(RESULTS / f'{args.name}.json', json.dumps(out, indent=1) + '\n')
    return out


def score_graph(args: argparse.Namespace) -> dict:
    """A train_sim graph run (its learner's checkpoints) scored by this benchmark's evaluator on its test
    seeds, and written as one more learning result: `summarize` then sets the ROS graph beside the
    ROS-free loop at equal env steps, paired per test seed. Each version's outcomes are kept under
    <run-dir>/bench_eval/, so an interrupted scoring resumes."""
    torch.set_num_threads(1)
    run = Path(args.run_dir)
    history = json.loads((run / 'learner' / 'history.json').read_text())
    if not history:
        raise SystemExit(f'{run}: the learner has not finished an update yet')
    checkpoints = run / 'learner' / 'checkpoints'
    _, meta = read_header(version_dir(checkpoints, history[-1]['weights_version']))
    learner_cfg = meta['learner_config']
    versions = [0] + [h['weights_version'] for h in history]
    picked = sorted({v for v in versions if v % args.every == 0} | {versions[-1]})
    steps = dict(zip(versions, np.cumsum([0] + [h['env_steps'] for h in history]).tolist(), strict=True))
    wall = {0: 0.0, **{h['weights_version']: h['wall_s'] for h in history}}
    seeds = held_out_seeds(args.test_seeds)
    cache = run / 'bench_eval'
    cache.mkdir(exist_ok=True)
    curve, outcomes = [], []
    with EnvPool(partial(make_env, args.task, args.max_episode_steps), num_workers=args.workers, log=log) as pool:
        for v in picked:
            path = cache / f'v{v:06d}_{args.test_seeds}.json'
            if path.exists():
                scored = json.loads(path.read_text())
            else:
                model, _ = load_checkpoint(meta['initial'] if v == 0 else version_dir(checkpoints, v))
                success, per_seed = pool.evaluate(FlowPolicy(model, mode='ode'), seeds, args.actions_per_chunk)
                scored = {'eval_success': success, 'eval_outcomes': per_seed}
                atomic_write_text(path, json.dumps(scored))
            log(f'{run.name} v{v}: {scored["eval_success"]:.3f} at {steps[v]} env steps')
            curve.append({'iteration': v, 'env_steps': steps[v], 'rl_wall_s': wall[v],
                          'eval_success': scored['eval_success']})
            outcomes.append(scored['eval_outcomes'])
    seed = learner_cfg['seed'] if args.seed is None else args.seed
    result = {
        'task': args.task, 'method': args.method, 'seed': seed, 'test_seeds': args.test_seeds,
        'source': f'ROS graph run {run} (learner checkpoints scored by bench/learning.py score-graph)',
        'algo_config': meta['algo'], 'learner_config': learner_cfg,
        'start': curve[0]['eval_success'], 'final': curve[-1]['eval_success'],
        'best': max(c['eval_success'] for c in curve), 'env_steps': curve[-1]['env_steps'],
        'wall_min': round(history[-1]['wall_s'] / 60.0, 2), 'rl_wall_min': round(history[-1]['wall_s'] / 60.0, 2),
        'worker_restarts': 0, 'curve': curve, 'curve_outcomes': outcomes, 'history': history,
        'start_outcomes': outcomes[0], 'final_outcomes': outcomes[-1],
    }
    out = RESULTS / 'learning' / f'{args.task}_{args.method}_s{seed}.json'
    atomic_write_text(out, json.dumps(result, indent=1))
    return result


BUDGET_SLACK = 1.05  # runs stop at the first update past their budget, a few per cent over it


def at_budget(methods: dict, runs: list[dict]) -> None:
    """Every method at the budget all of π-StepNFT's default runs of the task reached, so that runs
    continued further (or stopped earlier) still compare at equal env steps: per training seed, its
    last evaluation within that budget, the gain across seeds, and paired tests where the result kept
    that evaluation's per-seed outcomes."""
    reference = [r for r in runs if r['method'] == REFERENCE_METHOD]
    if not reference:
        return
    limit = min(r['env_steps'] for r in reference) * BUDGET_SLACK
    reached = {}
    for r in runs:
        i = last_evaluation_within(r, limit)
        if r['env_steps'] < limit / BUDGET_SLACK ** 2 or i is None:
            continue  # stopped well short of the budget: not comparable
        reached[(r['method'], r['seed'])] = (r, r['curve'][i], outcomes_at(r, i))
    ref = {seed: o for (m, seed), (_, _, o) in reached.items() if m == REFERENCE_METHOD}
    for method, entry in methods.items():
        rows = sorted((key[1], value) for key, value in reached.items() if key[0] == method)
        if not rows:
            continue
        block = {'env_steps_limit': int(limit), 'seeds': [seed for seed, _ in rows],
                 'env_steps': [c['env_steps'] for _, (_, c, _) in rows],
                 'success': [c['eval_success'] for _, (_, c, _) in rows],
                 'paired_vs_start': [paired(r['start_outcomes'], o) if o is not None and 'start_outcomes' in r
                                     else None for _, (r, _, o) in rows]}
        block['across_seeds'] = across_seeds([r['start'] for _, (r, _, _) in rows], block['success'])
        if method != REFERENCE_METHOD:
            block[f'paired_vs_{REFERENCE_METHOD}'] = [
                {'seed': seed, **paired(ref[seed], o)} if o is not None and ref.get(seed) is not None else None
                for seed, (_, _, o) in rows]
        entry['at_reference_budget'] = block


def reference_at(ref: dict, env_steps: int) -> dict | None:
    """The reference run's last evaluation within `env_steps` (with the usual slack) and its per-seed
    outcomes, so a shorter or longer run compares at its own budget; None where it kept no outcomes."""
    i = last_evaluation_within(ref, env_steps * BUDGET_SLACK)
    outcomes = outcomes_at(ref, i) if i is not None else None
    if outcomes is None:
        return None
    c = ref['curve'][i]
    return {'reference_env_steps': c['env_steps'], 'reference_success': c['eval_success'], 'outcomes': outcomes}


def last_evaluation_within(run: dict, env_steps: float) -> int | None:
    """Index of the run's last evaluation at or below `env_steps`, None if even its first is past it."""
    inside = [i for i, c in enumerate(run['curve']) if c['env_steps'] <= env_steps]
    return inside[-1] if inside else None


def outcomes_at(run: dict, i: int) -> list[bool] | None:
    """Per-seed outcomes of the run's i-th evaluation, where its result kept them."""
    if 'curve_outcomes' in run:
        return run['curve_outcomes'][i]
    if i == len(run['curve']) - 1:
        return run.get('final_outcomes')
    return run.get('start_outcomes') if i == 0 else None


def across_seeds(start: list[float], final: list[float]) -> dict:
    """Gain over the start per training seed, its mean and a Student-t 95 % interval across the seeds
    (the spread between training seeds, which a single seed's test-seed interval does not show)."""
    from scipy import stats  # mani_skill's dependency

    gains = np.array(final) - np.array(start)
    out = {'training_seeds': len(gains), 'gains': [round(float(g), 4) for g in gains],
           'mean_gain': round(float(gains.mean()), 4)}
    if len(gains) > 1:
        half = stats.t.ppf(0.975, len(gains) - 1) * gains.std(ddof=1) / np.sqrt(len(gains))
        out['mean_gain_t95'] = [round(float(gains.mean() - half), 4), round(float(gains.mean() + half), 4)]
    return out


def paired_vs_start(run: dict) -> dict | None:
    """The final version against the start on the same test seeds (deterministic ODE episodes):
    seeds gained and lost, and the exact McNemar p-value. None for results written without the
    start's per-seed outcomes."""
    if 'start_outcomes' not in run:
        return None
    return paired(run['start_outcomes'], run['final_outcomes'])


def paired(before: list[bool], after: list[bool]) -> dict:
    """Test seeds `after` solves and `before` does not (gained), the reverse (lost), exact McNemar p."""
    gained = sum(not a and b for a, b in zip(before, after, strict=True))
    lost = sum(a and not b for a, b in zip(before, after, strict=True))
    return {'gained': gained, 'lost': lost, 'p_value': float(f'{mcnemar_exact(gained, lost):.3g}')}


def plot_methods(args: argparse.Namespace) -> dict:
    """Plots the named methods' runs of one task (every training seed) to args.out."""
    runs = [r for r in load_runs() if r['task'] == args.task and r['method'] in args.methods]
    if missing := sorted(set(args.methods) - {r['method'] for r in runs}):
        raise SystemExit(f'no {args.task} results for: {", ".join(missing)}')
    plot(runs, Path(args.out))
    return {'task': args.task, 'plotted': [f'{r["method"]} s{r["seed"]}' for r in runs], 'out': args.out}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    tasks = sorted({r['task'] for r in runs})
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.8 * len(tasks)), dpi=110, squeeze=False)
    colours = {}
    palette = plt.get_cmap('tab10' if len({r['method'] for r in runs}) <= 10 else 'tab20')  # tab20 pairs hues
    for row, task in enumerate(tasks):
        for r in (r for r in runs if r['task'] == task):
            colour = colours.setdefault(r['method'], palette(len(colours) % palette.N))
            n = r['test_seeds']
            for col, x_key, scale in ((0, 'env_steps', 1e-6), (1, 'rl_wall_s', 1 / 60)):
                xs = [c[x_key] * scale for c in r['curve']]
                ys = [c['eval_success'] for c in r['curve']]
                lo, hi = zip(*(wilson(round(y * n), n) for y in ys), strict=True)
                label = r['method'] if r['seed'] == min(q['seed'] for q in runs if q['method'] == r['method']
                                                         and q['task'] == task) else None
                axes[row, col].plot(xs, ys, '-o', ms=3, color=colour, label=label)
                axes[row, col].fill_between(xs, lo, hi, color=colour, alpha=0.12)
        for col, xlabel in ((0, 'training env steps (millions)'), (1, 'rollout + update wall-clock (min)')):
            ax = axes[row, col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f'{task} ODE test success')
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=7)
    fig.suptitle('held-out ODE success (Wilson 95 % bands; one line per training seed)')
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    r = sub.add_parser('run', help='one (method, task, seed) run, resumable')
    r.add_argument('--method', default='stepnft', choices=sorted(METHODS))
    r.add_argument('--seed', type=int, default=0)
    r.add_argument('--env-steps', type=int, default=300_000, help='training env-step budget')
    r.add_argument('--workers', type=int, default=2 * (os.cpu_count() or 1),
                   help='env worker processes (0: one env in this process); two per core keep the cores '
                        'simulating while the policy answers (bench/results/rollout_throughput.json)')
    r.add_argument('--eval-every', type=int, default=4, help='updates between test evaluations')
    r.add_argument('--num-demos', type=int, help="demos of the SFT start (default: the task's embedded start)")
    r.add_argument('--sft-steps', type=int, help="SFT steps of the start (default: the task's embedded start)")
    r.add_argument('--d-model', type=int, default=DefaultSFT.d_model,
                   help='width of the start policy; other than the default, runs and results are named '
                        '<method>_d<width>')
    r.add_argument('--velocity-dropout', type=float, metavar='P',
                   help="clone the start with the joint velocities zeroed in a share P of its training samples "
                        "(SFTConfig.state_dropout), so that it reads the goal to move from standstill; 0: the plain "
                        "clone (default: the task's embedded start, PickCube 0.5, others 0); runs and results of a "
                        "start with dropout are named <method>_vdrop<P>")
    r.add_argument('--max-episode-steps', type=int, default=100)
    r.add_argument('--branch-from', metavar='METHOD',
                   help="start from METHOD's saved run of the same task and seed (its model, optimizer moments "
                        "and history) and go on with this method's settings; results are named "
                        "<method>_from_<METHOD>")
    s = sub.add_parser('summarize', help='merge the result JSONs, plot the curves')
    s.add_argument('--second-task', default='PushCube-v1',
                   help="the task reported as `second_task`; every task's runs are under `tasks`")
    c = sub.add_parser('plot', help="one task's curves for the named methods only (the summary's plot holds all)")
    c.add_argument('--methods', nargs='+', required=True)
    c.add_argument('--out', required=True, help='PNG path')
    m = sub.add_parser('main-job', help='record a finished main job (bash scripts/main.sh) as main_job.json')
    m.add_argument('--run-dir', required=True)
    m.add_argument('--cmd', required=True, help='the command that ran it, as recorded')
    m.add_argument('--note', default='', help='what else a reader needs (e.g. what shared the cores)')
    m.add_argument('--name', default='main_job', help='results file stem: main_job (the defaults) or main_job_<what '
                                                     'differs> for a main job run with other parameters')
    g = sub.add_parser('score-graph', help="score a train_sim graph run's checkpoints on the test seeds, "
                                           'as a learning result')
    g.add_argument('--run-dir', required=True)
    g.add_argument('--method', default='ros_graph', help='its name in the summary')
    g.add_argument('--seed', type=int, help="training seed to file it under (default: the learner's)")
    g.add_argument('--every', type=int, default=1, help='score every n-th version (and the last)')
    g.add_argument('--workers', type=int, default=2)
    g.add_argument('--actions-per-chunk', type=int, default=4)
    g.add_argument('--max-episode-steps', type=int, default=100)
    g.add_argument('--task', required=True, help="the run's env_id")
    for q in (r, s, c):
        q.add_argument('--task', default='PickCube-v1')
    for q in (r, s, g):
        q.add_argument('--test-seeds', type=int, default=200)
        q.add_argument('--work', default='runs/learning', help='run state (checkpoints, histories)')
    args = p.parse_args(argv)
    out = {'run': run_one, 'summarize': summarize, 'plot': plot_methods, 'main-job': record_main_job,
           'score-graph': score_graph}[args.command](args)
    bulky = ('history', 'final_outcomes', 'curve_outcomes', 'ema_curve_outcomes', 'tasks')
    print(json.dumps({k: v for k, v in out.items() if k not in bulky}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
