"""bench/learning.py's summary arithmetic: comparing runs of different lengths at equal env steps."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from ros_harness import REPO, bench_module, tiny_checkpoint

from stepnft_ros.algo.stepnft import StepNFTConfig
from stepnft_ros.learner import version_dir
from stepnft_ros.policy import load_checkpoint, save_checkpoint


class IdlePool:
    """Stands in for the bench's EnvPool where a test supplies the episodes itself."""

    restarts = 0

    def __init__(self, make_env, num_workers, log):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _run(method: str, seed: int, steps: list[int], success: list[float], outcomes: list[list[bool]]) -> dict:
    curve = [{'iteration': i, 'env_steps': s, 'rl_wall_s': float(i), 'eval_success': p}
             for i, (s, p) in enumerate(zip(steps, success, strict=True))]
    return {'task': 'T', 'method': method, 'seed': seed, 'start': success[0], 'final': success[-1],
            'env_steps': steps[-1], 'curve': curve, 'curve_outcomes': outcomes,
            'start_outcomes': outcomes[0], 'final_outcomes': outcomes[-1], 'test_seeds': len(outcomes[0])}


def test_at_budget_compares_every_method_where_all_reference_runs_have_been():
    bench = bench_module('learning')
    start = [True, False, False, False]
    mid = [True, True, False, False]
    late = [True, True, True, False]
    ref = bench.REFERENCE_METHOD
    runs = [
        _run(ref, 0, [0, 100, 200], [0.25, 0.5, 0.75], [start, mid, late]),  # the shortest reference run: budget 100
        _run(ref, 1, [0, 103, 190, 300], [0.25, 0.5, 0.75, 0.25], [start, mid, late, start]),  # continued further
        _run('baseline', 0, [0, 104], [0.25, 0.25], [start, start]),  # a few per cent past the budget: counted
        _run('short', 0, [0, 50], [0.25, 0.5], [start, mid]),  # stopped at half the budget: left out
    ]
    runs[0]['curve'], runs[0]['curve_outcomes'], runs[0]['env_steps'] = runs[0]['curve'][:2], [start, mid], 100
    methods = {m: {} for m in (ref, 'baseline', 'short')}
    bench.at_budget(methods, runs)
    block = methods[ref]['at_reference_budget']
    assert block['env_steps_limit'] == 105 and block['seeds'] == [0, 1]
    assert block['env_steps'] == [100, 103] and block['success'] == [0.5, 0.5]
    assert [(p['gained'], p['lost']) for p in block['paired_vs_start']] == [(1, 0), (1, 0)]
    assert block['across_seeds']['gains'] == [0.25, 0.25]
    baseline = methods['baseline']['at_reference_budget']
    assert baseline['success'] == [0.25]
    assert [(p['gained'], p['lost']) for p in baseline[f'paired_vs_{ref}']] == [(0, 1)]
    assert 'at_reference_budget' not in methods['short']


def test_outcomes_of_results_that_kept_only_the_start_and_the_final():
    bench = bench_module('learning')
    run = _run('m', 0, [0, 1, 2], [0.0, 0.5, 1.0], [[False], [True], [True]])
    del run['curve_outcomes']
    assert [bench.outcomes_at(run, i) for i in range(3)] == [[False], None, [True]]


def test_score_graph_scores_a_graph_runs_versions_once_and_files_them_as_a_learning_result(tmp_path, monkeypatch):
    bench = bench_module('learning')
    run = tmp_path / 'run'
    initial = tiny_checkpoint(tmp_path / 'sft', seed=0)
    history = [{'weights_version': v, 'env_steps': 100 * v, 'wall_s': 10.0 * v} for v in (1, 2, 3)]
    checkpoints = run / 'learner' / 'checkpoints'
    for v in (1, 2, 3):  # what the learner writes: weights, and in the metadata its config and start
        model, _ = load_checkpoint(tiny_checkpoint(tmp_path / f'w{v}', seed=v))
        save_checkpoint(version_dir(checkpoints, v), model,
                        {'weights_version': v, 'initial': str(initial), 'algo': {'lr': 1e-4},
                         'learner_config': {'seed': 7}})
    (run / 'learner' / 'history.json').write_text(json.dumps(history))
    first_weight = {v: next(load_checkpoint(version_dir(checkpoints, v))[0].parameters())
                    .flatten()[0].item() for v in (1, 2, 3)}
    first_weight[0] = next(load_checkpoint(initial)[0].parameters()).flatten()[0].item()
    scored = []

    class Pool(IdlePool):  # the evaluation: version v solves the first v + 1 test seeds
        def evaluate(self, policy, seeds, actions_per_chunk):
            assert policy.mode == 'ode' and actions_per_chunk == 4
            weight = next(policy.model.parameters()).flatten()[0].item()
            v = next(v for v, w in first_weight.items() if torch.isclose(torch.tensor(w), torch.tensor(weight)))
            scored.append(v)
            outcomes = [i <= v for i in range(len(seeds))]
            return sum(outcomes) / len(outcomes), outcomes

    monkeypatch.setattr(bench, 'EnvPool', Pool)
    monkeypatch.setattr(bench, 'RESULTS', tmp_path / 'results')
    args = argparse.Namespace(run_dir=str(run), method='ros_graph', seed=None, every=2, workers=1,
                              actions_per_chunk=4, max_episode_steps=100, task='T', test_seeds=8)
    result = bench.score_graph(args)
    assert scored == [0, 2, 3]  # every 2nd version, and the last
    assert [c['env_steps'] for c in result['curve']] == [0, 300, 600]  # cumulative, from the learner's history
    assert [c['eval_success'] for c in result['curve']] == [1 / 8, 3 / 8, 4 / 8]
    assert result['seed'] == 7 and result['start_outcomes'] == [True] + [False] * 7
    assert json.loads((tmp_path / 'results' / 'learning' / 'T_ros_graph_s7.json').read_text()) == result
    assert bench.score_graph(args) == result and scored == [0, 2, 3]  # kept outcomes: nothing scored again


def test_each_ablation_changes_exactly_one_setting_of_the_group_label_regime():
    learning = bench_module('learning')
    base_algo, base_online = learning.METHODS[learning.ABLATION_BASE]
    one_change = [name for name in learning.ABLATIONS if name != learning.REFERENCE_METHOD]
    assert len(one_change) == 5
    for name in one_change:
        algo, online = learning.METHODS[name]
        changed = {k for k in {**base_algo, **algo} if algo.get(k) != base_algo.get(k)} | {
            k for k in {**base_online, **online} if online.get(k) != base_online.get(k)}
        assert len(changed) == 1, (name, changed)
    # batch-mean labels without seed groups: the label-scheme ablation that changes both of their settings
    algo, online = learning.METHODS[learning.REFERENCE_METHOD]
    assert algo == base_algo and {k for k in online if online[k] != base_online.get(k)} == {'labels', 'group_size'}


def test_the_default_method_is_the_regime_of_the_train_sim_configuration():
    """The summary's default_method must be what config/train_sim.yaml runs, or its numbers describe another regime."""
    import yaml

    learning = bench_module('learning')
    config = yaml.safe_load((REPO / 'config/train_sim.yaml').read_text())
    server, learner = config['policy_server']['ros__parameters'], config['learner']['ros__parameters']
    bridge = config['/**/maniskill_bridge']['ros__parameters']
    algo_over, online_over = learning.METHODS[learning.DEFAULT_METHOD]
    algo = StepNFTConfig(**{**learning.BASE_ALGO, **algo_over})  # as the bench's runs build it
    online = {**learning.BASE_ONLINE, **online_over}
    assert online == {'episodes_per_iteration': learner['episodes_per_update'], 'group_size': bridge['group_size'],
                      'labels': learner['labels'], 'noise_level': server['noise_level'],
                      'sde_noise': server['sde_noise'], 'step_noise_correlation': server['step_noise_correlation']}
    for key in ('lr', 'epochs', 'minibatch_size', 'executed_only', 'adam_beta2'):
        assert getattr(algo, key) == learner[key], key
    assert algo.step_selection == server['step_selection']


def test_the_ablation_table_pairs_each_ablation_with_the_base_at_the_smaller_budget():
    bench = bench_module('learning')
    start, mid, late = [True, False, False, False], [True, True, False, False], [True, True, True, False]
    runs = [
        _run(bench.ABLATION_BASE, 0, [0, 100, 200, 300], [0.25, 0.5, 0.75, 0.5], [start, mid, late, mid]),
        _run('stepnft_whole_chunk', 0, [0, 102], [0.25, 0.25], [start, start]),  # shorter: the base at 100
        _run('stepnft_weighted', 1, [0, 100], [0.25, 0.5], [start, mid]),  # no base run of training seed 1
        _run('grpo', 0, [0, 100], [0.25, 0.5], [start, mid]),  # not an ablation
    ]
    table = bench.ablation_table(runs)
    assert list(table) == ['T'] and len(table['T']) == 1
    row = table['T'][0]
    assert (row['method'], row['env_steps'], row['success'], row['base_env_steps'], row['base_success']) == (
        'stepnft_whole_chunk', 102, 0.25, 100, 0.5)
    assert (row['gained'], row['lost']) == (0, 1) and row['interval'][0] < 0.25 < row['interval'][1]


def test_sft_ceiling_variants_parse_into_sft_specs_and_reject_typos():
    ceiling = bench_module('sft_ceiling')
    spec = ceiling.parse_variant('100x8000xd128', 'PushCube-v1')
    assert (spec.env_id, spec.num_demos, spec.sft_steps, spec.d_model) == ('PushCube-v1', 100, 8000, 128)
    assert ceiling.parse_variant('10x1000', 'PushCube-v1').d_model == 64
    with pytest.raises(ValueError, match='DEMOSxSTEPS'):
        ceiling.parse_variant('100-8000', 'PushCube-v1')


def test_a_start_of_another_width_or_dropout_names_its_runs_apart_from_the_plain_clone():
    learning = bench_module('learning')
    plain = argparse.Namespace(task='PickCube-v1', num_demos=300, sft_steps=8000, d_model=64, velocity_dropout=0.0)
    assert learning.sft_spec(plain).state_dropout_dims == () and learning.start_tag(learning.sft_spec(plain)) == ''
    wide = argparse.Namespace(**{**vars(plain), 'd_model': 128})
    assert learning.start_tag(learning.sft_spec(wide)) == '_d128'
    assert learning.sft_spec(wide).d_model == 128 and learning.sft_spec(wide).env_id == 'PickCube-v1'
    dropout = argparse.Namespace(**{**vars(wide), 'velocity_dropout': 0.3})
    spec = learning.sft_spec(dropout)  # PickCube's Panda: 9 joints, so qvel is [9, 18) of the state
    assert (spec.state_dropout, spec.state_dropout_dims) == (0.3, tuple(range(9, 18)))
    assert learning.start_tag(spec) == '_d128_vdrop0.3'


def test_without_sft_flags_a_run_starts_from_the_tasks_embedded_start():
    learning = bench_module('learning')
    push = argparse.Namespace(task='PushCube-v1', num_demos=None, sft_steps=None, d_model=64, velocity_dropout=None)
    spec = learning.sft_spec(push)
    assert (spec.num_demos, spec.sft_steps, spec.state_dropout, learning.start_tag(spec)) == (
        10, 1000, 0.5, '_vdrop0.5')
    assert learning.sft_spec(argparse.Namespace(**{**vars(push), 'velocity_dropout': 0.0})).state_dropout_dims == ()
    pick = learning.sft_spec(argparse.Namespace(**{**vars(push), 'task': 'PickCube-v1'}))
    assert (pick.env_id, pick.num_demos, pick.sft_steps) == ('PickCube-v1', 300, 8000)
    assert (pick.state_dropout, pick.state_dropout_dims, learning.start_tag(pick)) == (
        0.5, tuple(range(9, 18)), '_vdrop0.5')  # so its runs share names with the same start's earlier runs
    other = learning.sft_spec(argparse.Namespace(**{**vars(push), 'task': 'PullCube-v1', 'num_demos': 20}))
    assert (other.env_id, other.num_demos, other.sft_steps, other.state_dropout) == ('PullCube-v1', 20, 8000, 0.0)


def test_reach_counts_states_without_a_success_split_by_the_ode_outcome():
    reach = bench_module('reach')
    counts = torch.tensor([0, 0, 3, 8]).numpy()
    ode = torch.tensor([False, False, True, True]).numpy()
    s = reach.summarize_counts(counts, 8, ode)
    assert s['mean_success'] == 11 / 32 and s['states_never'] == 0.5 and s['states_always'] == 0.25
    assert s['ode_failed'] == {'states': 2, 'mean_success': 0.0, 'states_never': 1.0}
    assert s['ode_solved']['mean_success'] == 11 / 16 and s['ode_solved']['states_never'] == 0.0
    assert reach.parse_sampler('every_step:0.6') == ('every_step', 0.6, 0.0, False)
    assert reach.parse_sampler('recorded_step:0.8:1.0') == ('recorded_step', 0.8, 1.0, False)  # with ρ
    assert reach.parse_sampler('recorded_step:0.5:1.0:anti') == ('recorded_step', 0.5, 1.0, True)
    for bad in ('everywhere:0.3', 'recorded_step', 'recorded_step:0.3:0.9:1', 'recorded_step:0.3:0.9:anti:x'):
        with pytest.raises(ValueError, match=r'WHERE:NOISE_LEVEL\[:RHO\[:anti\]\]'):
            reach.parse_sampler(bad)
    outcomes = np.array([[1, 0, 1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1]], bool)
    assert reach.mixed_pairs(outcomes) == 2 / 8  # pairs (2j, 2j+1) of each state whose outcomes differ


def test_reach_refuses_to_add_samplers_to_a_file_measured_with_other_settings(tmp_path):
    reach = bench_module('reach')
    out = tmp_path / 'reach.json'
    out.write_text(json.dumps({'checkpoint': 'start.safetensors', 'group_size': 4, 'samplers': {}}))
    with pytest.raises(ValueError, match='group_size'):
        reach.main(['--checkpoint', 'start.safetensors', '--group-size', '8', '--out', str(out)])
    assert json.loads(out.read_text())['group_size'] == 4  # the file is left as it was


def test_a_main_job_is_recorded_with_its_start_and_final_paired_seed_by_seed(tmp_path, monkeypatch):
    bench = bench_module('learning')
    monkeypatch.setattr(bench, 'RESULTS', tmp_path / 'results')
    run = tmp_path / 'run'
    (run / 'sft_default').mkdir(parents=True)
    (run / 'learner').mkdir()
    (run / 'summary.json').write_text(json.dumps({'start': 0.25, 'final': 0.75, 'wall_min': 1.0}))
    (run / 'sft_default/sft_spec.json').write_text(json.dumps({'env_id': 'PushCube-v1'}))
    (run / 'learner/history.json').write_text(json.dumps([{'weights_version': 1, 'kl': 0.001}]))
    (run / 'eval_history.json').write_text(json.dumps([
        {'weights_version': 0, 'eval_success': 0.25, 'episodes': 4, 'first_seed': 10000,
         'outcomes': [True, False, False, False]},
        {'weights_version': 2, 'eval_success': 0.75, 'episodes': 4, 'first_seed': 10000,
         'outcomes': [False, True, True, True]}]))
    args = argparse.Namespace(run_dir=str(run), cmd='bash scripts/main.sh', note='', name='main_job_group_labels')
    out = bench.record_main_job(args)
    assert out['final_vs_start'] == {'gained': 3, 'lost': 1, 'p_value': 0.625}
    assert json.loads((tmp_path / 'results/main_job_group_labels.json').read_text())['evaluations'][1]['outcomes'][1]
    with pytest.raises(ValueError, match="start with 'main_job'"):
        bench.record_main_job(argparse.Namespace(**{**vars(args), 'name': 'group'}))


def test_a_shorter_run_is_paired_with_the_reference_at_its_own_budget():
    bench = bench_module('learning')
    start, mid, late = [True, False, False, False], [True, True, False, False], [True, True, True, False]
    ref = _run(bench.REFERENCE_METHOD, 0, [0, 100, 200, 300], [0.25, 0.5, 0.75, 0.25], [start, mid, late, start])
    at = bench.reference_at(ref, 204)  # a run stopped at 204 env steps meets the reference's 200 (5 % slack)
    assert (at['reference_env_steps'], at['reference_success'], at['outcomes']) == (200, 0.75, late)
    assert bench.reference_at(ref, 50)['reference_env_steps'] == 0
    assert bench.reference_at({'curve': ref['curve']}, 204) is None  # no per-seed outcomes kept


def test_plot_draws_only_the_named_methods_of_one_task_and_names_a_missing_one(tmp_path, monkeypatch):
    bench = bench_module('learning')
    monkeypatch.setattr(bench, 'RESULTS', tmp_path)
    (tmp_path / 'learning').mkdir()
    outcomes = [[True, False], [True, True]]
    for method, seed, task in (('a', 0, 'T'), ('a', 1, 'T'), ('b', 0, 'T'), ('a', 0, 'U')):
        (tmp_path / 'learning' / f'{task}_{method}_s{seed}.json').write_text(
            json.dumps({**_run(method, seed, [0, 10], [0.5, 1.0], outcomes), 'task': task}))
    out = tmp_path / 'a.png'
    drawn = bench.plot_methods(argparse.Namespace(task='T', methods=['a'], out=str(out)))
    assert drawn['plotted'] == ['a s0', 'a s1']
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with pytest.raises(SystemExit, match='no T results for: c'):
        bench.plot_methods(argparse.Namespace(task='T', methods=['a', 'c'], out=str(out)))


def test_a_cached_start_built_before_a_spec_field_existed_is_reused_and_a_different_one_refused(tmp_path):
    from dataclasses import asdict, replace

    from stepnft_ros.pipeline import DefaultSFT, ensure_sft_checkpoint

    (tmp_path / 'sft').mkdir()
    (tmp_path / 'sft/model.safetensors').write_bytes(b'')  # the cache check does not load it
    old = {k: v for k, v in asdict(DefaultSFT()).items() if k != 'joint_units'}  # as written before the field
    (tmp_path / 'sft_spec.json').write_text(json.dumps(old, sort_keys=True))
    assert ensure_sft_checkpoint(tmp_path, DefaultSFT(), log=lambda _: None) == tmp_path / 'sft'
    other = replace(DefaultSFT(), control_mode='pd_joint_pos', joint_units=True)
    with pytest.raises(ValueError, match='use another directory'):
        ensure_sft_checkpoint(tmp_path, other, log=lambda _: None)
    (tmp_path / 'sft_spec.json').write_text('{not json')
    with pytest.raises(ValueError, match='use another directory'):
        ensure_sft_checkpoint(tmp_path, DefaultSFT(), log=lambda _: None)


def test_failure_modes_sort_failed_episodes_by_how_far_they_got():
    failures = bench_module('failure_modes')
    assert failures.parse_sampler('ode') == (0.0, 0.0)
    assert failures.parse_sampler('sde:0.8:1.0') == (0.8, 1.0) and failures.parse_sampler('sde:0.3') == (0.3, 0.0)
    with pytest.raises(ValueError, match='is not "ode"'):
        failures.parse_sampler('sde')

    def row(success, grasped, placed, closest, steps=100):
        return {'success': success, 'steps': steps, 'ever_grasped': grasped, 'ever_placed': placed,
                'final_grasped': grasped, 'min_distance': closest, 'final_distance': closest}
    rows = [row(True, True, True, 0.01, steps=60), row(False, False, False, 0.20), row(False, True, False, 0.04),
            row(False, True, False, 0.08), row(False, True, True, 0.02)]
    summary = failures.summarize(rows)
    assert (summary['success'], summary['failures'], summary['success_steps_median']) == (0.2, 4, 60.0)
    assert (summary['failed_never_grasped'], summary['failed_grasped_never_placed'],
            summary['failed_placed_not_success'], summary['failed_holding_at_end']) == (1, 2, 1, 3)
    assert (summary['failed_within_5cm'], summary['failed_within_10cm']) == (2, 3)
    assert failures.summarize([row(False, True, False, None)])['success_steps_median'] is None
    assert 'final_move_near_misses' not in summary  # rows without it: an env with no object or goal

    # the last decisions' move: toward the goal for the success, sideways and small for the near miss
    rows[0]['final_move'], rows[2]['final_move'] = {'size': 0.1, 'cos_to_goal': 0.9}, {'size': 0.02, 'cos_to_goal': 0.0}
    for r in rows[1:] + rows[:1]:
        r.setdefault('final_move', {'size': 0.05, 'cos_to_goal': 0.5})
    summary = failures.summarize(rows)
    assert summary['final_move_successes'] == {'episodes': 1, 'size_median': 0.1, 'cos_to_goal_median': 0.9}
    assert summary['final_move_near_misses'] == {'episodes': 2, 'size_median': 0.035, 'cos_to_goal_median': 0.25}


def test_final_move_averages_the_executed_moves_of_the_last_decisions():
    failures = bench_module('failure_modes')
    decision = SimpleNamespace  # what final_move reads of a Decision: its chunk and how much of it ran
    toward, unexecuted = [0.2, 0.0, 0.0, 1.0], [-9.0, 0.0, 0.0, 0.0]
    decisions = [decision(chunk=np.array([[-1.0, 0, 0, 0]] * 2), executed=2)] + [  # too early to count
        decision(chunk=np.array([toward, toward, unexecuted]), executed=2)] * failures.LAST_DECISIONS
    move = failures.final_move(decisions, np.array([0.03, 0.0, 0.0]))
    assert move == {'size': 0.2, 'cos_to_goal': 1.0}
    assert failures.final_move(decisions, np.array([0.0, -0.03, 0.0]))['cos_to_goal'] == 0.0
    assert failures.final_move(decisions[:1], np.zeros(3)) == {'size': 1.0, 'cos_to_goal': 0.0}  # at the goal


def test_failure_modes_record_each_test_episode_in_the_simulator(tmp_path):
    """One PickCube episode of a tiny policy under correlated SDE noise: a row per seed, from the env's info."""
    failures = bench_module('failure_modes')
    ckpt = tiny_checkpoint(tmp_path / 'tiny')
    rows = failures.run_shard('PickCube-v1', str(ckpt), 'sde:0.8:1.0', [10_000, 10_001], 4, 6)
    assert [r['seed'] for r in rows] == [10_000, 10_001]
    for r in rows:  # an untrained policy in 6 steps: nothing grasped or placed, the cube still far from the goal
        assert (r['success'], r['steps'], r['ever_grasped'], r['ever_placed']) == (False, 6, False, False)
        assert 0.0 < r['min_distance'] <= r['final_distance'] + 1e-9 < 1.0
        assert r['final_move']['size'] > 0 and -1.0 <= r['final_move']['cos_to_goal'] <= 1.0
    again = failures.run_shard('PickCube-v1', str(ckpt), 'sde:0.8:1.0', [10_001], 4, 6)
    assert again == rows[1:], 'the seed fixes the episode: its own noise streams, not the shard it ran in'


def test_a_branched_run_continues_the_source_state_under_its_own_settings(tmp_path, monkeypatch):
    bench = bench_module('learning')
    task_dir = tmp_path / 'work' / 'T'
    source = task_dir / 'stepnft_correlated_noise_lr5e-5' / 's0' / 'state'
    model, _ = load_checkpoint(tiny_checkpoint(tmp_path / 'trained', seed=3))
    save_checkpoint(source, model, {'iteration': 2})
    (source / 'optimizer.safetensors').write_bytes(safetensors.torch.save({}))
    evaluation = {'eval_success': 0.5, 'eval_outcomes': [True, False]}
    (source / 'history.json').write_text(json.dumps(
        [{'iteration': 0, 'env_steps': 0, 'rl_wall_s': 0.0, **evaluation},
         {'iteration': 2, 'env_steps': 200, 'rl_wall_s': 2.0, **evaluation}]))
    seen = {}

    def one_more_update(pool, model, online, algo, log, history, trainer, on_iteration):
        seen.update(lr=trainer.optimizer.param_groups[0]['lr'], updates=trainer.updates, weight=next(
            model.parameters()).flatten()[0].item())
        history = history + [{'iteration': 3, 'env_steps': 300, 'rl_wall_s': 3.0, 'eval_success': 1.0,
                              'eval_outcomes': [True, True]}]
        on_iteration(history, trainer)
        return history

    monkeypatch.setattr(bench, 'EnvPool', IdlePool)
    monkeypatch.setattr(bench, 'run_online', one_more_update)
    monkeypatch.setattr(bench, 'ensure_sft_checkpoint', lambda *a, **k: tmp_path / 'trained')
    monkeypatch.setattr(bench, 'RESULTS', tmp_path / 'results')
    args = argparse.Namespace(work=str(tmp_path / 'work'), task='T', method='stepnft_correlated_noise', seed=0,
                              branch_from='stepnft_correlated_noise_lr5e-5', env_steps=300, eval_every=1,
                              workers=1, num_demos=None, sft_steps=None, d_model=64, velocity_dropout=0.0, test_seeds=2,
                              max_episode_steps=100)
    result = bench.run_one(args)
    # the source's weights, optimizer step count and history; this method's lr (1e-4, not 5e-5)
    assert seen == {'lr': 1e-4, 'updates': 2, 'weight': next(model.parameters()).flatten()[0].item()}
    assert result['method'] == 'stepnft_correlated_noise_from_stepnft_correlated_noise_lr5e-5'
    assert result['branched_from'] == {'method': 'stepnft_correlated_noise_lr5e-5', 'iteration': 2, 'env_steps': 200}
    assert [c['iteration'] for c in result['curve']] == [0, 2, 3] and result['final'] == 1.0
    assert json.loads((source / 'history.json').read_text())[-1]['iteration'] == 2  # the source is left as it was
    args.branch_from = 'missing'
    with pytest.raises(SystemExit, match='no saved run'):
        bench.run_one(args)


def test_velocity_probe_compares_the_policy_with_and_without_the_joint_velocities(tmp_path):
    probe = bench_module('velocity_probe')
    # [qpos 9, qvel 9, extras: is_grasped first, obj_to_goal_pos last]
    velocity, goal, grasped = probe.state_layout('PickCube-v1')
    assert (velocity, goal, grasped) == (slice(9, 18), slice(39, 42), 18)
    from stepnft_ros.pipeline import PANDA_JOINT_VELOCITIES  # what the embedded PickCube start drops
    assert PANDA_JOINT_VELOCITIES == tuple(range(velocity.start, velocity.stop))

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(50, 42)).astype(np.float32)
    obs[:, goal] = rng.normal(size=(50, 3)) * 0.1
    obs[:, grasped] = np.arange(50) % 2  # every other state holds the object
    distance = np.linalg.norm(obs[:, goal], axis=1) * 100
    near = (distance >= 2.5) & (distance < 12.0)
    idx = probe.select_states({'obs': obs}, goal, grasped, (2.5, 12.0), count=200)
    assert list(idx) == list(np.flatnonzero(near & (obs[:, grasped] > 0.5))) and len(idx) > 0
    assert len(probe.select_states({'obs': obs}, goal, None, (2.5, 12.0), count=200)) == near.sum()
    assert len(probe.select_states({'obs': obs}, goal, grasped, (2.5, 12.0), count=3)) == 3
    assert len(probe.select_states({'obs': obs}, None, None, (2.5, 12.0), count=200)) == 50  # no goal: every state
    with pytest.raises(SystemExit, match='no demonstration state'):
        probe.select_states({'obs': obs}, goal, grasped, (500.0, 600.0), count=10)

    # moves: the mean of each state's executed position moves, against the object-goal vector
    chunks = np.zeros((2, 2, 7))
    chunks[0, :, 0] = 0.2       # toward +x twice
    chunks[1, 0, 1] = -0.4      # toward -y, then nothing
    toward = np.array([[0.03, 0, 0], [0, 0.03, 0]])  # the first along its goal, the second against it
    assert probe.moves(chunks, toward) == {'size_median': 0.2, 'cos_to_goal_median': 0.0}
    assert probe.moves(chunks, None) == {'size_median': 0.2}

    model, _ = load_checkpoint(tiny_checkpoint(tmp_path / 'tiny'))
    states, to_goal = obs[idx], obs[idx][:, goal]
    out = probe.probe(model, states, velocity, to_goal, actions_per_chunk=2)
    assert out['as_recorded'] != out['velocity_zeroed']  # the network reads its velocity inputs
    assert out['size_ratio'] == round(out['velocity_zeroed']['size_median'] / out['as_recorded']['size_median'], 3)
    # nothing zeroed: both passes see the same states and the same initial noise, so they agree exactly
    same = probe.probe(model, states, slice(0, 0), to_goal, actions_per_chunk=2)
    assert same['as_recorded'] == same['velocity_zeroed'] and same['size_ratio'] == 1.0


def test_rescore_compares_repeats_and_a_recorded_evaluation_seed_by_seed(tmp_path, monkeypatch):
    rescore = bench_module('rescore')
    ckpt = tiny_checkpoint(tmp_path / 'tiny')
    monkeypatch.setattr(rescore, 'RESULTS', tmp_path)
    recorded = tmp_path / 'run.json'
    recorded.write_text(json.dumps({'start_outcomes': [True, False]}))  # an untrained policy solves neither
    assert rescore.main(['--checkpoint', str(ckpt), '--name', 'tiny', '--recorded', str(recorded), '--test-seeds',
                         '2', '--workers', '0', '--max-episode-steps', '6']) == 0
    entry = json.loads((tmp_path / 'rescore_PickCube-v1.json').read_text())['tiny']
    assert entry['outcomes'] == [[False, False], [False, False]]
    assert entry['recorded'][0]['success'] == 0.5
    for repeat in entry['repeats']:
        assert repeat['success'] == 0.0 and repeat['vs_first_repeat'] == {'gained': 0, 'lost': 0, 'p_value': 1.0}
        assert (repeat['vs_recorded'][0]['gained'], repeat['vs_recorded'][0]['lost']) == (0, 1)
    with pytest.raises(SystemExit, match='holds 2 test seeds, not 3'):
        rescore.main(['--checkpoint', str(ckpt), '--name', 'x', '--recorded', str(recorded), '--test-seeds', '3'])
    (tmp_path / 'bad.json').write_text(json.dumps({'curve': []}))
    with pytest.raises(SystemExit, match='neither start_outcomes nor eval_outcomes'):
        rescore.main(['--checkpoint', str(ckpt), '--name', 'x', '--recorded', str(tmp_path / 'bad.json')])
