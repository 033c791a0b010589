"""Latency per decision, torch vs onnxruntime, measured side by side in one process.

One decision = validate + stack the observations, encode the prefix once, K velocity steps of
the sampler, de-normalize: exactly what the policy server runs per batch. The two backends
alternate decision by decision, so machine noise hits both alike. Both run on the same number of
threads (default 1: torch.set_num_threads and onnxruntime's intra_op_num_threads).

    python bench/onnx_latency.py [--decisions 300] [--threads 1] [--mode ode|sde] [--device cpu|cuda]

Prints JSON and writes it to bench/results/onnx_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.policy import FlowPolicy, FlowVLA, OnnxFlowPolicy, PolicyConfig  # noqa: E402
from stepnft_ros.policy.onnx_backend import probe_observations  # noqa: E402

CONFIGS = {
    # the embedded default policy (stepnft_ros.pipeline.DefaultSFT) on ManiSkill PickCube state
    'state_default': PolicyConfig(state_dim=42, action_dim=7, horizon=8, d_model=64, n_heads=4, prefix_layers=1,
                                  expert_layers=2, num_steps=4, noise_level=0.7),
    # two 64 px cameras + instruction + state, as in bench/update_cost.py
    'vision_language': PolicyConfig(state_dim=8, action_dim=7, horizon=8, camera_names=('scene', 'wrist'),
                                    image_size=64, use_language=True, d_model=128, n_heads=4),
}
BATCHES = (1, 8)


def summary(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    return {'p50_ms': round(float(np.median(ms)), 3), 'mean_ms': round(float(ms.mean()), 3),
            'p90_ms': round(float(np.percentile(ms, 90)), 3)}


def bench_config(name: str, cfg: PolicyConfig, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = FlowVLA(cfg).eval()
    start = time.perf_counter()
    onnx_policy = OnnxFlowPolicy(model, mode=args.mode, device=args.device, threads=args.threads)
    export_s = time.perf_counter() - start
    # A hot swap as the policy server does it after a π-StepNFT update (new action-expert weights).
    updated = FlowVLA(cfg).eval()
    updated.prefix_encoder.load_state_dict(model.prefix_encoder.state_dict())
    start = time.perf_counter()
    onnx_policy.model = updated
    swap_s = time.perf_counter() - start
    torch_policy = FlowPolicy(updated, mode=args.mode, device=args.device)
    out = {'config': json.loads(cfg.to_json()), 'provider': onnx_policy.provider,
           'trace_and_build_s': round(export_s, 2), 'hot_swap_expert_s': round(swap_s, 2), 'batches': {}}
    for batch in BATCHES:
        obs = probe_observations(cfg, batch, seed=batch)
        torch_policy.reset(1)
        onnx_policy.reset(1)
        diff = float(np.abs(torch_policy.infer_batch(obs).chunks - onnx_policy.infer_batch(obs).chunks).max())
        for _ in range(args.warmup):
            torch_policy.infer_batch(obs)
            onnx_policy.infer_batch(obs)
        times: dict[str, list[float]] = {'torch': [], 'onnxruntime': []}
        for _ in range(args.decisions):  # alternate, so drifts in machine load hit both backends alike
            for backend, policy in (('torch', torch_policy), ('onnxruntime', onnx_policy)):
                t0 = time.perf_counter()
                policy.infer_batch(obs)
                times[backend].append(time.perf_counter() - t0)
        row = {backend: summary(t) for backend, t in times.items()}
        row['speedup_p50'] = round(row['torch']['p50_ms'] / row['onnxruntime']['p50_ms'], 2)
        row['max_abs_diff'] = diff
        out['batches'][str(batch)] = row
        print(f'[bench] {name} B={batch}: torch p50 {row["torch"]["p50_ms"]} ms, onnxruntime p50 '
              f'{row["onnxruntime"]["p50_ms"]} ms (x{row["speedup_p50"]}), max diff {diff:.1e}', file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--decisions', type=int, default=300, help='timed decisions per backend and batch size')
    parser.add_argument('--warmup', type=int, default=20)
    parser.add_argument('--threads', type=int, default=1, help='torch threads = onnxruntime intra-op threads')
    parser.add_argument('--mode', choices=('ode', 'sde'), default='ode')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (torch device; CUDA execution provider)")
    parser.add_argument('--configs', default=','.join(CONFIGS), help=f'comma-separated subset of {list(CONFIGS)}')
    parser.add_argument('--out', default=str(Path(__file__).resolve().parent / 'results' / 'onnx_latency.json'))
    args = parser.parse_args()
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device cuda: torch sees no CUDA device')
    torch.set_num_threads(args.threads)
    import onnxruntime

    result = {
        'benchmark': 'latency per decision (prefix once + K velocity steps), torch vs onnxruntime',
        'mode': args.mode, 'device': args.device, 'threads': {'torch': torch.get_num_threads(),
                                                              'onnxruntime_intra_op': args.threads},
        'decisions': args.decisions,
        'machine': {'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(),
                    'load_avg_1m': round(os.getloadavg()[0], 2),
                    'gpu': torch.cuda.get_device_name() if args.device.startswith('cuda') else None},
        'versions': {'torch': torch.__version__, 'onnxruntime': onnxruntime.__version__},
        'configs': {name: bench_config(name, CONFIGS[name], args) for name in args.configs.split(',')},
    }
    result['machine']['load_avg_1m_end'] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=2)
    atomic_write_text(args.out, text + '\n')
    print(text)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
