"""Latency hiding in the arm bridge's scheduler: pauses and jerk of the commands against inference delay.

The arm bridge's ChunkScheduler (stepnft_ros/control/scheduler.py), driven tick by tick as the
bridge drives it, with a stand-in policy whose answers arrive after an injected delay (plus
jitter): each chunk predicts a smooth reference trajectory from its observation tick on, with a
small plan error. Per configuration it reports, over the same simulated minutes:

- pauses per minute: ticks at which the scheduler had no action (the arm holds), after the
  first 2 s (the wait for the very first chunk is not counted, nor is its jerk);
- max and p99 jerk of the commanded positions (third difference / period³, holds included);
- tracking error against the reference (RMS), and which share of each chunk ran.

It exercises the scheduling logic only: no ROS transport, no arm dynamics, no task success (the
stand-in arm measurement of the issue is not this). Prints JSON and writes
bench/results/latency_hiding.json:

    python bench/latency_hiding.py [--minutes 5] [--delays-ms 0,50,100,200]
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.control import ChunkScheduler  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'
CONFIGS = {
    'synchronous': dict(latency_hiding=False),
    'latency_hiding': dict(latency_hiding=True, blend_actions=0),
    'latency_hiding_blend2': dict(latency_hiding=True, blend_actions=2),
}


def reference(t: np.ndarray) -> np.ndarray:
    """A smooth reach-like motion (rad), one joint: what a good policy would command."""
    return 0.5 * np.sin(2 * np.pi * t / 40.0) + 0.2 * np.sin(2 * np.pi * t / 13.0)


def simulate(cfg: dict, delay_ticks: float, jitter_ticks: float, ticks: int, actions_per_chunk: int,
             horizon: int, plan_error: float, seed: int, warmup: int) -> dict:
    rng = np.random.default_rng(seed)
    s = ChunkScheduler(actions_per_chunk, request_timeout_ticks=50, **cfg)
    arrivals: list[tuple[float, int]] = []  # (arrival time in ticks, observation tick)
    latencies: list[float] = []
    position = float(reference(np.array([0.0]))[0])
    commanded, holds = [], 0
    for tick in range(1, ticks + 1):
        while arrivals and arrivals[0][0] <= tick:  # answers that came in since the last tick
            arrived, obs_tick = heapq.heappop(arrivals)
            plan = reference(obs_tick + 1 + np.arange(horizon)) + plan_error * rng.standard_normal()
            if s.add_chunk(obs_tick, plan[:, None]):
                latencies.append(arrived - obs_tick)
                s.set_latency(float(np.percentile(latencies[-20:], 90)))
        action = s.action(tick)
        if action is not None:
            position = float(action[0])
        elif tick > warmup:
            holds += 1
        commanded.append(position)
        if s.should_request(tick):
            s.requested(tick)
            latency = max(0.05, delay_ticks + jitter_ticks * rng.standard_normal())
            heapq.heappush(arrivals, (tick + latency, tick))
    s.reset()
    ranges = s.finished()
    q = np.array(commanded)[warmup:]  # steady state: not the wait for the very first chunk
    jerk = np.abs(np.diff(q, 3))  # per tick³ (the period is folded into the unit below)
    error = q - reference(np.arange(warmup + 1, ticks + 1))
    return {'holds': holds, 'jerk': jerk, 'rms_error': float(np.sqrt(np.mean(error ** 2))),
            'executed_per_chunk': float(np.mean([n for _, _, n in ranges if n])),
            'skipped_first_actions': float(np.mean([f for _, f, n in ranges if n]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--minutes', type=float, default=5.0, help='simulated minutes per configuration and delay')
    p.add_argument('--rate-hz', type=float, default=10.0, help="the arm bridge's control_rate_hz")
    p.add_argument('--delays-ms', default='0,50,100,200', help='injected inference delays')
    p.add_argument('--jitter', type=float, default=0.2, help='delay jitter (std) as a fraction of the delay')
    p.add_argument('--actions-per-chunk', type=int, default=4)
    p.add_argument('--horizon', type=int, default=8)
    p.add_argument('--plan-error', type=float, default=0.01, help='std of each chunk\'s offset (rad)')
    p.add_argument('--out', default=str(RESULTS / 'latency_hiding.json'))
    args = p.parse_args(argv)
    period = 1.0 / args.rate_hz
    ticks = int(args.minutes * 60 * args.rate_hz)
    rows = []
    for delay_ms in (float(d) for d in args.delays_ms.split(',')):
        delay_ticks = delay_ms / 1e3 / period + 0.05  # + transport: never exactly on a tick
        for name, cfg in CONFIGS.items():
            r = simulate(cfg, delay_ticks, args.jitter * delay_ticks, ticks, args.actions_per_chunk, args.horizon,
                         args.plan_error, seed=0, warmup=int(2 * args.rate_hz))
            rows.append({'delay_ms': delay_ms, 'schedule': name,
                         'pauses_per_min': round(r['holds'] / args.minutes, 1),
                         'max_jerk_rad_s3': round(float(r['jerk'].max()) / period ** 3, 1),
                         'p99_jerk_rad_s3': round(float(np.percentile(r['jerk'], 99)) / period ** 3, 1),
                         'rms_tracking_error_rad': round(r['rms_error'], 4),
                         'executed_per_chunk': round(r['executed_per_chunk'], 2),
                         'skipped_first_actions': round(r['skipped_first_actions'], 2)})
    report = {'benchmark': 'latency_hiding', 'rate_hz': args.rate_hz, 'minutes': args.minutes,
              'actions_per_chunk': args.actions_per_chunk, 'horizon': args.horizon, 'jitter': args.jitter,
              'plan_error_rad': args.plan_error,
              'what': 'ChunkScheduler driven as the arm bridge drives it, answers after an injected delay; '
                      'scheduling only (no ROS transport, no arm dynamics, no task success)',
              'rows': rows}
    text = json.dumps(report, indent=1)
    atomic_write_text(Path(args.out), text + '\n')
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
