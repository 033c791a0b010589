"""bench/learning.py's summary arithmetic: comparing runs of different lengths at equal env steps."""

from __future__ import annotations

from ros_harness import bench_module


def _run(method: str, seed: int, steps: list[int], success: list[float], outcomes: list[list[bool]]) -> dict:
    curve = [{'iteration': i, 'env_steps': s, 'rl_wall_s': float(i), 'eval_success': p}
             for i, (s, p) in enumerate(zip(steps, success, strict=True))]
    return {'task': 'T', 'method': method, 'seed': seed, 'start': success[0], 'final': success[-1],
            'env_steps': steps[-1], 'curve': curve, 'curve_outcomes': outcomes,
            'start_outcomes': outcomes[0], 'final_outcomes': outcomes[-1]}


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
