"""bench/latency_ros.py's metrics: held ticks come from the gaps between the bridge's commands, and
a hold shows as jerk of the commanded targets where a steady motion has none."""

from __future__ import annotations

import numpy as np
import pytest
from ros_harness import bench_module

PERIOD = 0.1


@pytest.fixture(scope='module')
def bench():
    return bench_module('latency_ros')


def ramp_commands(ticks, jitter=0.0, seed=0):
    """One command per control tick in `ticks`, the arm's joints on a constant-velocity ramp."""
    rng = np.random.default_rng(seed)
    return [(t * PERIOD + jitter * rng.uniform(-1, 1), np.full(8, 0.01 * t)) for t in ticks]


def on_reference(bench, centre, times):
    return [(t, q) for t, q in zip(times, bench.reference(np.asarray(times), centre), strict=True)]


def test_a_steady_stream_holds_nothing_and_has_no_jerk(bench):
    centre = np.zeros(8)
    row = bench.schedule_metrics(ramp_commands(range(600), jitter=0.02), on_reference(bench, centre, [0.0, 0.5]),
                                 [(0, 4)] * 150, PERIOD, 60.0, centre)
    assert row['held_ticks_per_min'] == 0.0 and row['commands'] == 600
    assert row['max_jerk_rad_s3'] == pytest.approx(0.0, abs=1e-6)
    assert row['rms_tracking_error_rad'] == 0.0 and row['executed_per_chunk'] == 4.0


def test_gaps_between_commands_count_as_held_ticks_and_show_as_jerk(bench):
    ticks = [t for t in range(601) if t % 6 not in (4, 5)]  # chunks of 4 ticks, 2 held ticks after each
    centre = np.zeros(8)
    joints = [(0.0, np.full(8, 0.1))]  # at t = 0 the reference is the centre
    row = bench.schedule_metrics(ramp_commands(ticks), joints, [(2, 4), (0, 0)], PERIOD, 60.0, centre)
    assert row['held_ticks_per_min'] == 200.0
    # a ramp of 0.01 per tick held for 2 ticks, then 0.03 on in one: Δq 0.01 0 0 0.03 0.01, Δ³q peaks at -0.05
    assert row['max_jerk_rad_s3'] == pytest.approx(0.05 / PERIOD ** 3)
    assert row['rms_tracking_error_rad'] == pytest.approx(0.1)
    assert row['first_executed_action'] == 2.0 and row['chunks_without_executed_actions'] == 1


def test_too_few_commands_is_an_error(bench):
    with pytest.raises(RuntimeError, match='sent 2 commands'):
        bench.schedule_metrics(ramp_commands(range(2)), [], [], PERIOD, 10.0, np.zeros(8))
