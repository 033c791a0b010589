"""Task success against inference delay: the arm bridge's chunk schedules on a real ManiSkill task.

`bench/latency_hiding.py` measures the ChunkScheduler's pauses and jerk with a stand-in policy and
no task. This benchmark closes the loop on a simulated task: a trained policy acts in ManiSkill
through the same ChunkScheduler the arm bridge uses, driven tick by tick (one tick = one control
period of the env), and each answer arrives `delay` ms after the observation it was computed from
(plus jitter), as on a robot whose policy server is slow. The simulator advances one tick per
action as the arm would; while the scheduler has nothing to execute the arm holds (zero end-effector
delta, the gripper as last commanded). Per schedule and delay, on the same held-out seeds:

- success rate (Wilson 95 %), paired per seed against the synchronous schedule at the same delay;
- pauses per minute (held ticks once the first chunk has arrived), and the p99 / max jerk of the
  tool centre point (third difference of its position / period³);
- chunks that arrived after their whole horizon (stale) and actions executed per chunk.

With no delay the synchronous schedule is the evaluator's protocol (4 actions per chunk, the
initial noise of each decision drawn as `EnvPool` draws it), so its success reproduces the
checkpoint's held-out score. Prints JSON and writes bench/results/latency_success_<task>.json:

    python bench/latency_success.py --checkpoint runs/main_job/learner/checkpoints/v000008
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.learning import FIRST_TEST_SEED, RESULTS, held_out_seeds, make_env  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.control import ChunkScheduler  # noqa: E402
from stepnft_ros.env_pool import policy_shape  # noqa: E402
from stepnft_ros.policy import FlowPolicy, load_checkpoint  # noqa: E402
from stepnft_ros.progress import mcnemar_exact, wilson  # noqa: E402
from stepnft_ros.rollout import episode_noise, to_observation  # noqa: E402

SCHEDULES = {
    'synchronous': dict(latency_hiding=False),
    'latency_hiding': dict(latency_hiding=True, blend_actions=0),
    'latency_hiding_blend2': dict(latency_hiding=True, blend_actions=2),
}

_worker: dict = {}


def _init(checkpoint: str, task: str, max_episode_steps: int) -> None:
    torch.set_num_threads(1)
    model, _ = load_checkpoint(checkpoint)
    _worker['policy'] = FlowPolicy(model, mode='ode')
    _worker['env'] = make_env(task, max_episode_steps)


def control_hz(task: str) -> float:
    env = make_env(task, 1)
    try:
        return 1.0 / env.control_period
    finally:
        env.close()


def episode(job: tuple[str, float, float, int, int]) -> dict:
    """One episode of `seed` under a schedule with answers `delay_ticks` (± jitter) after their observation."""
    schedule, delay_ticks, jitter_ticks, actions_per_chunk, seed = job
    policy, env = _worker['policy'], _worker['env']
    horizon, action_dim = policy_shape(policy)
    rng = np.random.default_rng(seed)
    noise = episode_noise(seed)  # EnvPool's draw: the same ODE chunks as the evaluator at delay 0
    scheduler = ChunkScheduler(actions_per_chunk, request_timeout_ticks=50, **SCHEDULES[schedule])
    arrivals: list[tuple[float, int, np.ndarray]] = []  # (arrival tick, observation tick, chunk)
    latencies: list[float] = []
    hold = np.zeros(action_dim, dtype=np.float32)  # zero end-effector delta; the gripper dim is set below
    hold[-1] = -1.0 if env.action_low[-1] < 0 else 0.0
    positions, holds, started, success = [], 0, False, False

    def request(tick: int, raw: dict) -> None:
        scheduler.requested(tick)
        out = policy.infer_batch([to_observation(raw)],
                                 initial_noise=torch.randn((1, horizon, action_dim), generator=noise))
        chunk = np.clip(out.chunks[0], env.action_low, env.action_high)
        latency = max(0.05, delay_ticks + jitter_ticks * rng.standard_normal())
        heapq.heappush(arrivals, (tick + latency, tick, chunk))

    raw = env.reset(seed)
    request(0, raw)
    tick = 0
    while True:
        tick += 1
        while arrivals and arrivals[0][0] <= tick:  # answers that came in since the last tick
            arrived, obs_tick, chunk = heapq.heappop(arrivals)
            if scheduler.add_chunk(obs_tick, chunk):
                started = True
                latencies.append(arrived - obs_tick)
                scheduler.set_latency(float(np.percentile(latencies[-20:], 90)))
        action = scheduler.action(tick)
        if action is None:
            holds += started
            action = hold
        else:
            hold[-1] = action[-1]  # hold the gripper where the policy last put it
        raw, success, done = env.step(action)
        positions.append(env.tcp_pose()[0])
        if done:
            break
        if scheduler.should_request(tick):
            request(tick, raw)
    scheduler.reset()
    ran = [n for _, _, n in scheduler.finished() if n]
    return {'success': bool(success), 'ticks': tick, 'holds': int(holds), 'stale': scheduler.stale_chunks,
            'executed_per_chunk': float(np.mean(ran)) if ran else 0.0, 'positions': np.array(positions)}


def summarize(results: list[dict], hz: float) -> dict:
    jerk = np.concatenate([np.linalg.norm(np.diff(r['positions'], 3, axis=0), axis=1) for r in results
                           if len(r['positions']) > 3]) * hz ** 3
    outcomes = [r['success'] for r in results]
    minutes = sum(r['ticks'] for r in results) / hz / 60.0
    low, high = wilson(sum(outcomes), len(outcomes))
    return {'success': float(np.mean(outcomes)), 'interval': [round(low, 4), round(high, 4)],
            'pauses_per_min': round(sum(r['holds'] for r in results) / minutes, 2),
            'p99_jerk_m_s3': round(float(np.percentile(jerk, 99)), 3), 'max_jerk_m_s3': round(float(jerk.max()), 3),
            'stale_chunks': int(sum(r['stale'] for r in results)),
            'executed_per_chunk': round(float(np.mean([r['executed_per_chunk'] for r in results])), 3),
            'outcomes': outcomes}


def pair_with_synchronous(rows: list[dict]) -> None:
    """Each schedule's outcomes against the synchronous schedule's at the same delay, seed by seed."""
    for row in rows:
        sync = next((r for r in rows if r['delay_ms'] == row['delay_ms'] and r['schedule'] == 'synchronous'), None)
        if sync is not None and row is not sync:
            pairs = list(zip(sync['outcomes'], row['outcomes'], strict=True))
            gained, lost = sum(b and not a for a, b in pairs), sum(a and not b for a, b in pairs)
            p_value = float(f'{mcnemar_exact(gained, lost):.3g}')
            row['vs_synchronous'] = {'gained': gained, 'lost': lost, 'p_value': p_value}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='a FlowVLA checkpoint trained on --task with state obs')
    p.add_argument('--task', default='PushCube-v1')
    p.add_argument('--delays-ms', default='0,50,100,200')
    p.add_argument('--jitter', type=float, default=0.2, help='delay jitter (std) as a fraction of the delay')
    p.add_argument('--schedules', default=','.join(SCHEDULES))
    p.add_argument('--test-seeds', type=int, default=200)
    p.add_argument('--actions-per-chunk', type=int, default=4)
    p.add_argument('--max-episode-steps', type=int, default=100)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--out', help='results file (default bench/results/latency_success_<task>.json)')
    args = p.parse_args(argv)
    delays = [float(d) for d in args.delays_ms.split(',')]
    schedules = args.schedules.split(',')
    if unknown := set(schedules) - set(SCHEDULES):
        raise SystemExit(f'unknown schedules {sorted(unknown)}; choose from {sorted(SCHEDULES)}')
    hz = control_hz(args.task)
    seeds = held_out_seeds(args.test_seeds)
    rows = []
    start = time.time()
    with ProcessPoolExecutor(args.workers, initializer=_init,
                             initargs=(args.checkpoint, args.task, args.max_episode_steps)) as pool:
        for delay in delays:
            ticks = delay / 1000.0 * hz
            for schedule in schedules:
                jobs = [(schedule, ticks, args.jitter * ticks, args.actions_per_chunk, s) for s in seeds]
                row = {'delay_ms': delay, 'delay_ticks': round(ticks, 3), 'schedule': schedule,
                       **summarize(list(pool.map(episode, jobs, chunksize=4)), hz)}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != 'outcomes'}), file=sys.stderr, flush=True)
    pair_with_synchronous(rows)
    result = {'benchmark': 'latency_success', 'task': args.task, 'checkpoint': args.checkpoint, 'control_hz': hz,
              'test_seeds': args.test_seeds, 'first_test_seed': FIRST_TEST_SEED,
              'actions_per_chunk': args.actions_per_chunk, 'max_episode_steps': args.max_episode_steps,
              'jitter': args.jitter, 'wall_min': round((time.time() - start) / 60.0, 2),
              'what': 'the ChunkScheduler of the arm bridge driven tick by tick on the ManiSkill task, answers '
                      'delayed by the injected inference time; the arm holds (zero delta) when nothing is planned',
              'rows': rows}
    out = Path(args.out) if args.out else RESULTS / f'latency_success_{args.task}.json'
    atomic_write_text(out, json.dumps(result, indent=1) + '\n')
    print(json.dumps({**result, 'rows': [{k: v for k, v in r.items() if k != 'outcomes'} for r in rows]}, indent=1))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
