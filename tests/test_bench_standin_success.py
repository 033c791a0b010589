"""bench/standin_success.py's pieces that need no graph: stale observations and the paired report."""

from __future__ import annotations

import json

import numpy as np
from ros_harness import bench_module
from toy_env import PointReach


def test_stale_observations_lag_by_the_delay_and_success_stays_the_envs():
    bench = bench_module('standin_success')
    fresh, stale = PointReach(), bench.StaleObservations(PointReach(), delay=2)
    assert np.array_equal(stale.reset(5)['state'], fresh.reset(5)['state'])
    states = []
    for _ in range(4):
        now, success_now, _ = fresh.step(np.array([1.0, 0.0]))
        old, success, _ = stale.step(np.array([1.0, 0.0]))
        states.append(now['state'])
        assert success == success_now
    assert np.array_equal(old['state'], states[-3]), 'two steps old'
    stale.reset(6)
    first, _, _ = stale.step(np.zeros(2))
    assert np.array_equal(first['state'], PointReach().reset(6)['state']), 'before two steps: the reset'


def test_report_pairs_each_ros_run_with_the_loop_and_counts_success_within_shorter_budgets(tmp_path, monkeypatch):
    bench = bench_module('standin_success')
    monkeypatch.setattr(bench, 'RESULTS', tmp_path)
    work = tmp_path / 'PushCube-v1'
    work.mkdir()
    seeds = [10000, 10001, 10002, 10003]
    (work / 'standin_sim.json').write_text(json.dumps(
        {'seeds': seeds, 'success': [True, True, False, True], 'env_steps': [50, 60, 100, 70]}))
    (work / 'standin_sim_stale1.json').write_text(json.dumps(
        {'seeds': seeds, 'success': [False, True, False, False], 'env_steps': [100] * 4}))
    (work / 'standin_ros_latency_hiding_blend2.json').write_text(json.dumps(
        {'seeds': seeds[:3], 'success': [True, False, True], 'scene_steps': [90, 200, 130], 'max_scene_steps': 200,
         'rate_scale': 1.0, 'wall_s': 30.0}))
    out = bench.report(type('Args', (), {'work': str(tmp_path), 'task': 'PushCube-v1', 'num_demos': 100,
                                         'sft_steps': 3000})())
    ros = out['over_ros']['latency_hiding_blend2']
    assert ros['success'] == round(2 / 3, 4) and ros['within_scene_steps']['100']['success'] == round(1 / 3, 4)
    assert ros['within_scene_steps']['150']['success'] == round(2 / 3, 4)
    assert ros['vs_ros_free'] == {'gained': 1, 'lost': 1, 'p_value': 1.0}
    assert ros['ros_free_on_these_seeds']['success'] == round(2 / 3, 4)
    assert out['ros_free_observations_1_steps_old']['vs_ros_free']['lost'] == 2
    assert 'synchronous' not in out['over_ros']
    assert json.loads((tmp_path / 'standin_success_PushCube-v1.json').read_text())['ros_free']['success'] == 0.75
