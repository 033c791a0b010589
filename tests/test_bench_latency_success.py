"""bench/latency_success.py: its zero-delay synchronous schedule is the evaluator's protocol, and a
slow policy server makes the arm hold (synchronous) or run on (latency hiding)."""

from __future__ import annotations

import numpy as np
import pytest
from ros_harness import bench_module, tiny_checkpoint

from stepnft_ros.env_pool import EnvPool
from stepnft_ros.policy import FlowPolicy, load_checkpoint


class DriftEnv:
    """A point moved by the action's first dims; records every action; done after `steps` steps."""

    action_low, action_high = -np.ones(3, np.float32), np.ones(3, np.float32)

    def __init__(self, steps: int = 13) -> None:
        self.steps, self.actions = steps, []

    def _obs(self):
        return {'state': np.array([*self.pos, self.t], np.float32), 'images': {}, 'instruction': ''}

    def reset(self, seed):
        self.pos, self.t = np.array([0.01 * seed, 0.0]), 0
        return self._obs()

    def step(self, action):
        self.t += 1
        self.actions.append(np.array(action, np.float64))
        self.pos = self.pos + 0.1 * np.asarray(action[:2])
        return self._obs(), bool(self.pos[0] > 0), self.t >= self.steps

    def tcp_pose(self):
        return np.array([*self.pos, 0.0]), np.array([0.0, 0.0, 0.0, 1.0])

    def close(self):
        pass


@pytest.fixture
def bench(tmp_path):
    module = bench_module('latency_success')
    model, _ = load_checkpoint(tiny_checkpoint(tmp_path / 'ckpt', state_dim=3, action_dim=3))
    module._worker.update(policy=FlowPolicy(model, mode='ode'), env=DriftEnv())
    return module


def test_without_delay_the_synchronous_schedule_acts_as_the_evaluator_does(bench):
    result = bench.episode(('synchronous', 0.0, 0.0, 2, 7))
    scheduled = np.stack(bench._worker['env'].actions)
    reference = DriftEnv()
    with EnvPool(lambda: reference, num_workers=0) as pool:
        (episode,) = pool.run_episodes(bench._worker['policy'], [7], actions_per_chunk=2)
    np.testing.assert_allclose(scheduled, np.stack(reference.actions), atol=1e-6)
    assert result['success'] == episode.success and result['holds'] == 0 and result['ticks'] == 13


def test_a_slow_server_makes_the_synchronous_arm_hold_and_the_latency_hiding_arm_run_on(bench):
    sync = bench.episode(('synchronous', 2.0, 0.0, 4, 3))
    held = [a for a in bench._worker['env'].actions[2:] if not a[:2].any()]  # zero deltas after the first chunk
    assert sync['holds'] == len(held) > 0
    bench._worker['env'] = DriftEnv()
    hiding = bench.episode(('latency_hiding', 2.0, 0.0, 4, 3))
    assert hiding['holds'] < sync['holds']
    assert hiding['ticks'] == sync['ticks'] == 13  # the episode's time limit counts held ticks too


def test_the_summary_counts_pauses_per_minute_and_rates_with_intervals(bench):
    line = np.stack([np.array([0.01 * t, 0.0, 0.0]) for t in range(10)])  # constant velocity: no jerk
    results = [{'success': s, 'ticks': 600, 'holds': h, 'stale': 0, 'executed_per_chunk': 4.0, 'positions': line}
               for s, h in ((True, 30), (False, 0))]
    row = bench.summarize(results, hz=20.0)
    assert row['success'] == 0.5 and row['interval'][0] < 0.5 < row['interval'][1]
    assert row['pauses_per_min'] == 30.0 and row['max_jerk_m_s3'] == pytest.approx(0.0, abs=1e-9)
