"""The checks to run first whenever a GPU machine is available; one JSON of what ran, what it measured, what failed.

Each check is independent and reports `ok`, `skipped` (a package that machine lacks, named) or
`error` (the exception), so one missing piece never hides the others:

1. `cuda`: torch, the device, its memory.
2. `policy_latency`: FlowPolicy chunk latency (ODE and Flow-SDE with its trace) for the embedded
   default policy and the vision-language shape, fp32 and bf16 autocast, batch 1 and 16.
3. `learner_update`: π-StepNFT updates (StepNFTTrainer.update on collated episodes, the learner's
   own path) in decisions/s; target ≥ 500 on an H100-class GPU.
4. `onnxruntime_cuda`: the onnxruntime backend on the CUDA execution provider against torch.
5. `mujoco_egl`: MuJoCo offscreen rendering through EGL (LIBERO's cameras), the GL renderer
   string (NVIDIA, not llvmpipe) and ms per frame.
6. `policy_server_ros`: bench/ros_overhead.py's per-decision part with the policy server on the
   device (needs rclpy).

The core needs only torch, numpy and safetensors, so checks 1-4 run on a bare CUDA image; the
others say what is missing. On a CPU machine `--device cpu` runs the same code (what CI-like
machines can check of this script); its numbers are not GPU numbers.

    python bench/gpu_check.py --out $OUT/gpu_check.json          # on the GPU machine
    python bench/gpu_check.py --device cpu --quick                 # here: does every check run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.episodes.schema import Decision, Episode, collate_episodes  # noqa: E402
from stepnft_ros.policy import FlowPolicy, FlowVLA, Observation, PolicyConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'bench' / 'results'
# the embedded default policy (stepnft_ros.pipeline.DefaultSFT) and the VLA shape of bench/update_cost.py
CONFIGS = {
    'state_default': PolicyConfig(state_dim=42, action_dim=7, horizon=8, d_model=64, n_heads=4, prefix_layers=1,
                                  expert_layers=2, num_steps=4, noise_level=0.3),
    'vision_language': PolicyConfig(state_dim=8, action_dim=7, horizon=8, camera_names=('scene', 'wrist'),
                                    image_size=64, use_language=True, d_model=128, n_heads=4),
}


def log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def observations(cfg: PolicyConfig, n: int, seed: int = 0) -> list[Observation]:
    rng = np.random.default_rng(seed)
    return [Observation(state=rng.standard_normal(cfg.state_dim).astype(np.float32),
                        images={c: rng.integers(0, 255, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
                                for c in cfg.camera_names},
                        instruction=f'pick up object {i % 3}') for i in range(n)]


def timed(fn, repeats: int, warmup: int, device: torch.device) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1e3
    return {'p50_ms': round(float(np.median(ms)), 3), 'p95_ms': round(float(np.percentile(ms, 95)), 3)}


def check_cuda(args, device: torch.device) -> dict:
    out = {'torch': torch.__version__, 'cuda_available': torch.cuda.is_available(), 'python': platform.python_version()}
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f'{props.major}.{props.minor}', cuda=torch.version.cuda,
                   bf16=torch.cuda.is_bf16_supported())
    return out


def check_policy_latency(args, device: torch.device) -> dict:
    rows = []
    for name, cfg in args.configs.items():
        torch.manual_seed(0)
        model = FlowVLA(cfg)
        for mode in ('ode', 'sde'):
            policy = FlowPolicy(model, mode=mode, seed=0, device=str(device))
            for batch in (1, 16):
                obs = observations(cfg, batch)
                for precision in ('fp32', 'bf16'):
                    def step(policy=policy, obs=obs, precision=precision):
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
                            policy.infer_batch(obs)
                    rows.append({'config': name, 'mode': mode, 'batch': batch, 'precision': precision,
                                 **timed(step, args.repeats, args.warmup, device)})
        if device.type == 'cuda':  # the ODE chunk replayed from a CUDA graph, against the eager loop
            eager = FlowPolicy(model, mode='ode', seed=0, device=str(device))
            graphed = FlowPolicy(model, mode='ode', seed=0, device=str(device), cuda_graph=True)
            for batch in (1, 16):
                obs = observations(cfg, batch)
                rows.append({'config': name, 'mode': 'ode', 'batch': batch, 'precision': 'fp32', 'cuda_graph': True,
                             'max_abs_diff_vs_eager': graph_max_abs_diff(eager, graphed, obs),
                             **timed(lambda obs=obs, graphed=graphed: graphed.infer_batch(obs), args.repeats,
                                     args.warmup, device)})
    return {'rows': rows}


def graph_max_abs_diff(eager: FlowPolicy, graphed: FlowPolicy, obs: list[Observation]) -> float:
    """Largest action difference between a CUDA-graph policy and the eager one, both freshly seeded."""
    eager.reset()
    graphed.reset()
    return float(np.abs(graphed.infer_batch(obs).chunks - eager.infer_batch(obs).chunks).max())


def synthetic_episodes(cfg: PolicyConfig, model: FlowVLA, n_episodes: int, decisions: int, device: str,
                       executed: int) -> list[Episode]:
    """Flow-SDE decisions of the model itself on random observations, random outcomes: the learner's input."""
    policy = FlowPolicy(model, mode='sde', seed=0, device=device)
    obs = observations(cfg, decisions)
    episodes = []
    for e in range(n_episodes):
        out = policy.infer_batch(obs)
        episode = Episode(episode_id=f'synthetic-{e}', weights_version=0, success=bool(e % 3 == 0),
                          env_steps=decisions * executed)
        episode.decisions = [Decision(observation=obs[j], chunk=out.chunks[j], executed=executed,
                                      trace=out.trace.index(torch.tensor([j])).to('cpu')) for j in range(decisions)]
        episodes.append(episode)
    return episodes


def check_learner_update(args, device: torch.device) -> dict:
    rows = []
    for name, cfg in args.configs.items():
        torch.manual_seed(0)
        model = FlowVLA(cfg).to(device)
        episodes = synthetic_episodes(cfg, model, args.episodes, 24, str(device), executed=4)
        batch = collate_episodes(episodes, cfg, 'batch_mean')
        algo = StepNFTConfig(lr=1e-4, epochs=1, minibatch_size=args.minibatch, executed_only=True)
        for precision in ('fp32', 'bf16'):
            trainer = StepNFTTrainer(model, algo, seed=0)

            def update(trainer=trainer, precision=precision, batch=batch):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
                    trainer.update(batch)
            t = timed(update, max(2, args.repeats // 10), 1, device)
            rows.append({'config': name, 'precision': precision, 'decisions': len(batch),
                         'minibatch': args.minibatch, **t,
                         'decisions_per_s': round(len(batch) / (t['p50_ms'] / 1e3), 1)})
        if device.type == 'cuda':
            rows[-1]['peak_memory_gib'] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return {'rows': rows, 'target_decisions_per_s': 500}


def check_onnxruntime_cuda(args, device: torch.device) -> dict:
    try:
        import onnxruntime
    except ImportError:
        return {'status': 'skipped', 'why': 'onnxruntime is not installed'}
    providers = onnxruntime.get_available_providers()
    want = 'CUDAExecutionProvider' if device.type == 'cuda' else 'CPUExecutionProvider'
    if want not in providers:
        return {'status': 'skipped', 'providers': providers,
                'why': f'{want} missing: install onnxruntime-gpu (not onnxruntime) for the CUDA provider'}
    from stepnft_ros.policy.onnx_backend import OnnxFlowPolicy
    rows = []
    cfg = CONFIGS['state_default']
    torch.manual_seed(0)
    model = FlowVLA(cfg)
    onnx_policy = OnnxFlowPolicy(model, mode='ode', device=str(device))
    torch_policy = FlowPolicy(model, mode='ode', device=str(device))
    for batch in (1, 16):
        obs = observations(cfg, batch)
        a = np.stack(onnx_policy.infer_batch(obs).chunks)
        b = np.stack(torch_policy.infer_batch(obs).chunks)
        rows.append({'batch': batch, 'max_abs_diff_vs_torch': float(np.abs(a - b).max()),
                     'onnxruntime': timed(lambda obs=obs: onnx_policy.infer_batch(obs), args.repeats, args.warmup,
                                          device),
                     'torch': timed(lambda obs=obs: torch_policy.infer_batch(obs), args.repeats, args.warmup, device)})
    return {'providers': providers, 'session_provider': onnx_policy.provider, 'rows': rows}


def check_mujoco_egl(args, device: torch.device) -> dict:
    """In a child process: MUJOCO_GL must be set before mujoco is imported."""
    code = r'''
import json, os, time
import mujoco
xml = """<mujoco><worldbody><light pos="0 0 2"/><geom type="plane" size="1 1 .1"/>
<body pos="0 0 .2"><freejoint/><geom type="box" size=".05 .05 .05" rgba="1 0 0 1"/></body></worldbody></mujoco>"""
model = mujoco.MjModel.from_xml_string(xml)
data = mujoco.MjData(model)
renderer = mujoco.Renderer(model, 128, 128)
out = {"mujoco": mujoco.__version__, "MUJOCO_GL": os.environ.get("MUJOCO_GL")}
try:
    from OpenGL import GL
    out["gl_vendor"] = GL.glGetString(GL.GL_VENDOR).decode()
    out["gl_renderer"] = GL.glGetString(GL.GL_RENDERER).decode()
except Exception as err:
    out["gl_renderer"] = f"unknown ({type(err).__name__}: {err})"
times = []
for i in range(60):
    mujoco.mj_step(model, data)
    start = time.perf_counter()
    renderer.update_scene(data)
    pixels = renderer.render()
    times.append(time.perf_counter() - start)
out["frame_shape"] = list(pixels.shape)
out["nonblank"] = bool(pixels.std() > 0)
out["ms_per_frame_p50"] = round(sorted(times[10:])[len(times[10:]) // 2] * 1e3, 3)
print(json.dumps(out))
'''
    try:
        import mujoco  # noqa: F401
    except ImportError:
        return {'status': 'skipped', 'why': 'mujoco is not installed (pip install mujoco==3.8.1, as requirements.txt)'}
    env = {**os.environ, 'MUJOCO_GL': 'egl', 'PYOPENGL_PLATFORM': 'egl'}
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f'EGL render failed (exit {proc.returncode}): {proc.stderr[-2000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_policy_server_ros(args, device: torch.device) -> dict:
    try:
        import rclpy  # noqa: F401
    except ImportError:
        return {'status': 'skipped', 'why': 'rclpy is not installed (scripts/setup.sh installs the ROS 2 wheels)'}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'ros_overhead.json'
        cmd = [sys.executable, str(REPO / 'bench' / 'ros_overhead.py'), '--parts', 'overhead', '--envs', '1,4',
               '--decisions', str(args.repeats), '--warmup', str(args.warmup), '--quiet-wait', '0',
               '--device', str(device), '--out', str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f'ros_overhead.py exit {proc.returncode}: {proc.stderr[-2000:]}')
        return json.loads(out.read_text())


def check_smolvla(args, device: torch.device) -> dict:
    """Full-size SmolVLA (random weights, bench/smolvla_cost.py) in bf16: chunk latency with the prefix
    cached (target <= 30 ms on an H100-class GPU) and π-StepNFT update throughput (target >= 500 decisions/s)."""
    try:
        import lerobot  # noqa: F401
    except ImportError:
        return {'status': 'skipped', 'why': 'lerobot is not installed (scripts/setup.sh installs lerobot==0.4.4)'}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import smolvla_cost

    size = 'tiny' if args.quick else 'full'
    base = {'size': size, 'device': str(device), 'dtype': 'bf16' if device.type == 'cuda' else 'fp32',
            'threads': torch.get_num_threads(), 'repeats': max(2, args.repeats // 5)}
    decisions = 8 if args.quick else 256
    rows = [smolvla_cost.measure({**base, 'kind': 'inference'})]
    rows += [smolvla_cost.measure({**base, 'kind': 'update', 'decisions': decisions, 'microbatch': micro,
                                   'checkpointing': False}) for micro in (0, decisions // 4)]
    return {'rows': rows, 'target_chunk_cached_prefix_s': 0.030, 'target_decisions_per_s': 500}


CHECKS = {
    'cuda': check_cuda,
    'policy_latency': check_policy_latency,
    'learner_update': check_learner_update,
    'onnxruntime_cuda': check_onnxruntime_cuda,
    'mujoco_egl': check_mujoco_egl,
    'policy_server_ros': check_policy_server_ros,
    'smolvla': check_smolvla,
}


def package_versions() -> dict:
    """The versions the checks ran against (that machine's image, not this project's pins), None where absent."""
    from importlib import metadata

    out = {}
    for dist in ('torch', 'numpy', 'transformers', 'huggingface-hub', 'lerobot', 'av', 'mujoco', 'onnxruntime',
                 'onnxruntime-gpu', 'ros-rclpy'):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda', help="'cuda' (default) or 'cpu' to check that the script runs")
    p.add_argument('--checks', default=','.join(CHECKS), help=f'comma-separated subset of {list(CHECKS)}')
    p.add_argument('--configs', default=','.join(CONFIGS), help=f'policy shapes, a subset of {list(CONFIGS)}')
    p.add_argument('--quick', action='store_true', help='few repeats and a small batch: a smoke run')
    p.add_argument('--out', default=str(RESULTS / 'gpu_check.json'))
    args = p.parse_args(argv)
    unknown = set(args.checks.split(',')) - set(CHECKS)
    if unknown:
        p.error(f'unknown checks {sorted(unknown)}; choose from {list(CHECKS)}')
    if set(args.configs.split(',')) - set(CONFIGS):
        p.error(f'unknown configs in {args.configs!r}; choose from {list(CONFIGS)}')
    args.configs = {name: CONFIGS[name] for name in args.configs.split(',')}
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: torch sees no CUDA device (use --device cpu to check the script itself)')
    args.repeats, args.warmup = (5, 1) if args.quick else (50, 10)
    args.episodes, args.minibatch = (8, 64) if args.quick else (256, 4096)
    torch.set_num_threads(max(1, os.cpu_count() or 1) if device.type == 'cpu' else 1)
    report = {'benchmark': 'gpu_check', 'device': str(device), 'host': platform.node(), 'quick': args.quick,
              'date': time.strftime('%Y-%m-%d %H:%M:%S'), 'packages': package_versions(), 'checks': {}}
    for name in args.checks.split(','):
        log(f'{name} ...')
        start = time.perf_counter()
        try:
            result = CHECKS[name](args, device)
            result.setdefault('status', 'ok')
        except Exception as err:  # a check that breaks must not hide the others
            result = {'status': 'error', 'error': f'{type(err).__name__}: {err}',
                      'traceback': traceback.format_exc()[-3000:]}
        result['seconds'] = round(time.perf_counter() - start, 1)
        report['checks'][name] = result
        log(f'{name}: {result["status"]} ({result["seconds"]} s)')
        atomic_write_text(Path(args.out), json.dumps(report, indent=1) + '\n')  # after each: a cut run keeps the rest
    print(json.dumps(report, indent=1))
    return 0 if all(r['status'] != 'error' for r in report['checks'].values()) else 1


if __name__ == '__main__':
    sys.exit(main())
