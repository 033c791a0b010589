"""bench/gpu_check.py runs where no GPU is: the checks a GPU session will run first must not be broken code."""

from __future__ import annotations

import json
import subprocess
import sys

from ros_harness import REPO, bench_module


def test_checks_run_on_cpu_and_one_that_breaks_does_not_hide_the_others(tmp_path, monkeypatch):
    gpu_check = bench_module('gpu_check')

    def broken(args, device):
        raise RuntimeError('no such provider')
    monkeypatch.setitem(gpu_check.CHECKS, 'onnxruntime_cuda', broken)
    out = tmp_path / 'gpu_check.json'
    code = gpu_check.main(['--device', 'cpu', '--quick', '--checks', 'cuda,onnxruntime_cuda,learner_update',
                           '--configs', 'state_default', '--out', str(out)])
    report = json.loads(out.read_text())
    checks = report['checks']
    assert code == 1 and report['device'] == 'cpu'
    assert checks['onnxruntime_cuda']['status'] == 'error' and 'no such provider' in checks['onnxruntime_cuda']['error']
    assert checks['cuda']['status'] == 'ok' and checks['cuda']['torch']
    rows = checks['learner_update']['rows']
    assert checks['learner_update']['status'] == 'ok' and {r['precision'] for r in rows} == {'fp32', 'bf16'}
    assert all(r['decisions'] == 8 * 24 and r['decisions_per_s'] > 0 for r in rows)


def test_smolvla_check_measures_chunk_latency_and_update_throughput(tmp_path):
    gpu_check = bench_module('gpu_check')
    out = tmp_path / 'gpu_check.json'
    assert gpu_check.main(['--device', 'cpu', '--quick', '--checks', 'smolvla', '--out', str(out)]) == 0
    check = json.loads(out.read_text())['checks']['smolvla']
    assert check['status'] == 'ok', check
    inference, *updates = check['rows']
    assert inference['kind'] == 'inference' and 0 < inference['chunk_cached_prefix_s'] and 0 < inference['chunk_s']
    assert [u['microbatch'] for u in updates] == [0, 2]
    assert all(u['decisions'] == 8 and u['decisions_per_s'] > 0 and 'error' not in u for u in updates)


def test_smolvla_cost_measures_a_bf16_stored_vlm_and_expert(tmp_path):
    out = tmp_path / 'cost.json'
    proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'smolvla_cost.py'), '--size', 'tiny', '--vlm-weights',
                           'bf16', '--inference-only', '--repeats', '1', '--out', str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())['rows']
    assert row['kind'] == 'inference' and row['vlm_weights'] == 'bf16' and 'error' not in row, row
    assert 0 < row['chunk_cached_prefix_s'] and 0 < row['chunk_s']
