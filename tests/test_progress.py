"""The train_sim console: a line per learner update, the summary and summary.json (no ROS)."""

from __future__ import annotations

import json

import pytest

from stepnft_ros.launch_description import NodeSpec
from stepnft_ros.launcher import node_parameter
from stepnft_ros.progress import Progress, mcnemar_exact, rate_interval, wilson


def test_wilson_interval():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson(0, 48)
    assert low == 0.0 and high == pytest.approx(0.0741, abs=1e-4)
    assert wilson(48, 48)[1] == pytest.approx(1.0) and wilson(0, 0) == (0.0, 1.0)


def test_rate_interval_takes_a_rate_and_rounds_for_reports():
    # 50 of 200 by the closed form: centre 0.2547, half-width 0.0596
    assert rate_interval(0.25, 200) == [0.1951, 0.3143]
    assert rate_interval(0.595, 200) == [0.5258, 0.6606]
    assert rate_interval(0.0, 0) == [0.0, 1.0]


def record(version, success, env_steps=500):
    return {'weights_version': version, 'train_success': success, 'episodes': 4, 'episodes_consumed': 4 * version,
            'env_steps': env_steps, 'loss': 0.5 / version}


def test_progress_prints_each_new_update_once_and_writes_the_summary(tmp_path):
    (tmp_path / 'learner').mkdir()
    history, evals = tmp_path / 'learner/history.json', tmp_path / 'eval_history.json'
    history.write_text(json.dumps([record(1, 0.25)]))  # a resumed run: update 1 was shown by an earlier launch
    lines = []
    progress = Progress(tmp_path, max_updates=4, out=lines.append)
    progress.poll()
    assert lines == []
    evals.write_text(json.dumps([{'weights_version': 0, 'eval_success': 0.25, 'episodes': 48}]))
    history.write_text(json.dumps([record(1, 0.25), record(2, 0.5)]))
    progress.poll()
    progress.poll()
    assert len(lines) == 1 and lines[0].startswith('[train] update 2/4, 4 episodes (8 total), train success 0.50, '
                                                   'loss 0.2500, eval 0.25 (v0), ')
    assert 'ETA ' in lines[0]
    with_holdout = progress.update_line({**record(3, 0.5), 'holdout_preference_accuracy': 0.614}, 60.0)
    assert 'loss 0.1667, held-out pref acc 0.61, ' in with_holdout
    evals.write_text(json.dumps([{'weights_version': 0, 'eval_success': 0.25, 'episodes': 48},
                                 {'weights_version': 4, 'eval_success': 0.5, 'episodes': 48}]))
    history.write_text(json.dumps([record(v, 0.5) for v in (1, 2, 3, 4)] + [{'garbage': True}]))
    progress.poll()
    assert [line.split(',')[0] for line in lines] == ['[train] update 2/4', '[train] update 3/4', '[train] update 4/4']
    assert 'eval 0.50,' in lines[-1] and 'ETA 0.0 min' in lines[-1]  # the final version's own score

    summary = progress.summarize(wall_s=90.0)
    assert json.loads((tmp_path / 'summary.json').read_text()) == summary
    assert summary['start'] == 0.25 and summary['final'] == 0.5 and summary['eval_episodes'] == 48
    assert summary['start_interval'] == pytest.approx(wilson(12, 48), abs=1e-4)
    assert summary['final_interval'] == pytest.approx(wilson(24, 48), abs=1e-4)
    assert (summary['updates'], summary['env_steps'], summary['wall_min']) == (4, 2000, 1.5)
    line = progress.summary_line(summary)
    assert line.startswith('[summary] held-out success 0.250 [0.149, 0.388] -> 0.500 [0.364, 0.636] (v0 -> v4, '
                           '48 episodes, Wilson 95 %), 4 updates, 2000 env steps, 1.5 min')


def test_summary_without_an_evaluator(tmp_path):
    progress = Progress(tmp_path)
    summary = progress.summarize(wall_s=6.0)
    assert summary['start'] is None and summary['final_interval'] is None and summary['updates'] == 0
    assert progress.summary_line(summary).startswith('[summary] no held-out evaluation; 0 updates')


def test_node_parameter_follows_spec_then_file_sections(tmp_path):
    params = tmp_path / 'params.yaml'
    params.write_text('/**:\n  ros__parameters: {max_updates: 1, seed: 3}\n'
                      'learner:\n  ros__parameters: {max_updates: 8}\n'
                      '/**/maniskill_bridge:\n  ros__parameters: {group_size: 2}\n')
    specs = [NodeSpec('learner', 'learner', 'm', parameters={'work_dir': 'w'}),
             NodeSpec('maniskill_bridge', 'b', 'm', namespace='env0', parameters={'first_seed': 5})]
    assert node_parameter(specs, params, '/learner', 'max_updates', 0) == 8
    assert node_parameter(specs, params, '/learner', 'work_dir', '') == 'w'
    assert node_parameter(specs, params, '/learner', 'seed', 0) == 3
    assert node_parameter(specs, params, '/env0/maniskill_bridge', 'group_size', 1) == 2
    assert node_parameter(specs, params, '/env0/maniskill_bridge', 'first_seed', 0) == 5
    assert node_parameter(specs, params, '/learner', 'nope', 'default') == 'default'


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2**12)  # 2 P(X <= 2), X ~ Bin(12, 1/2)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(20, 0) < 1e-5
