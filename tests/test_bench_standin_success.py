"""bench/standin_success.py's pieces that need no graph: stale observations and the paired report."""

from __future__ import annotations

import argparse
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

    def write(name, **run):
        (work / f'{name}.json').write_text(json.dumps(run))

    write('standin_sim', seeds=seeds, success=[True, True, False, True], env_steps=[50, 60, 100, 70])
    write('standin_sim_stale1', seeds=seeds, success=[False, True, False, False], env_steps=[100] * 4)
    graph = {'max_scene_steps': 200, 'rate_scale': 1.0, 'wall_s': 30.0}
    write('standin_ros_latency_hiding_blend2', seeds=seeds[:3], success=[True, False, True],
          scene_steps=[90, 200, 130], **graph)
    write('standin_ros_latency_hiding_blend2_inference100ms', seeds=seeds[:3], success=[False, False, True],
          scene_steps=[200, 200, 180], inference_delay_ms=100.0, **graph)
    # a clone for observations a step old: its own loop, stale loop and graph run
    write('standin_sim_lag1', seeds=seeds, success=[True, False, False, True], env_steps=[60, 100, 100, 80])
    write('standin_sim_lag1_stale1', seeds=seeds, success=[True, True, False, True], env_steps=[60] * 4)
    write('standin_ros_lag1_latency_hiding_blend2', seeds=seeds[:3], success=[True, True, True],
          scene_steps=[80, 90, 100], **graph)
    args = argparse.Namespace(work=str(tmp_path), task='PushCube-v1', num_demos=100, sft_steps=3000,
                              observation_lag=1)
    out = bench.report(args)
    assert out['checkpoint_spec']['observation_lag'] == 0 and set(out['clones']) == {'observation_lag_0',
                                                                                      'observation_lag_1'}
    plain, lagged = out['clones']['observation_lag_0'], out['clones']['observation_lag_1']
    ros = plain['over_ros']['latency_hiding_blend2']
    assert ros['success'] == round(2 / 3, 4) and ros['within_scene_steps']['100']['success'] == round(1 / 3, 4)
    assert ros['within_scene_steps']['150']['success'] == round(2 / 3, 4)
    assert ros['vs_ros_free'] == {'gained': 1, 'lost': 1, 'p_value': 1.0}
    assert ros['ros_free_on_these_seeds']['success'] == round(2 / 3, 4)
    assert plain['over_ros']['latency_hiding_blend2_inference100ms']['inference_delay_ms'] == 100.0
    assert plain['ros_free_observations_1_steps_old']['vs_ros_free']['lost'] == 2
    assert 'synchronous' not in plain['over_ros']
    assert list(lagged['over_ros']) == ['latency_hiding_blend2'], "the clones' graph runs stay apart"
    assert lagged['over_ros']['latency_hiding_blend2']['success'] == 1.0
    assert lagged['vs_plain_clone'] == {
        'ros_free': {'gained': 0, 'lost': 1, 'p_value': 1.0},
        'ros_free_observations_1_steps_old': {'gained': 2, 'lost': 0, 'p_value': 0.5},
        'over_ros_latency_hiding_blend2': {'gained': 1, 'lost': 0, 'p_value': 1.0}}
    saved = json.loads((tmp_path / 'standin_success_PushCube-v1.json').read_text())
    assert saved['clones']['observation_lag_0']['ros_free']['success'] == 0.75


def test_each_clone_has_its_own_start_and_shares_the_demos(tmp_path, monkeypatch):
    bench = bench_module('standin_success')
    built = []
    monkeypatch.setattr(bench, 'ensure_sft_checkpoint', lambda out, spec, log: built.append((out, spec)) or out)
    args = argparse.Namespace(work=str(tmp_path), task='PushCube-v1', num_demos=100, sft_steps=3000,
                              observation_lag=0)
    plain = bench.sft(args)
    plain.mkdir(parents=True)
    (plain / 'demos.npz').write_bytes(b'demos')
    lagged = bench.sft(argparse.Namespace(**{**vars(args), 'observation_lag': 1}))
    assert lagged == plain.with_name(plain.name + '_lag1')
    assert (lagged / 'demos.npz').read_bytes() == b'demos'
    assert [spec.observation_lag for _, spec in built] == [0, 1]
