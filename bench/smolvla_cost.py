"""Cost of a full-size SmolVLA behind the policy seam: inference per chunk and the π-StepNFT update per decision.

Random weights at SmolVLM2-500M's sizes (SigLIP-base vision tower at 512 px, 16 of the 32 text layers
as SmolVLA keeps them, the 0.75-wide action expert: ≈ 450 M parameters, ≈ 100 M of them trained), so
no download is needed; cost does not depend on the weights' values. Each configuration runs in its
own process, so its peak memory is its own:
- inference: the prefix (VLM over image + instruction + state, filling the KV cache), one velocity
  call on it, and a whole ODE chunk (prefix + K velocity calls), as the policy server runs it;
- update: StepNFTTrainer.update on N decisions (one epoch, one minibatch), whole or in micro-batches
  of m decisions (StepNFTConfig.microbatch_size), with and without gradient checkpointing of the
  action expert's MLPs (SmolVLABackend.enable_gradient_checkpointing): time per decision, and the
  memory the update adds on top of the loaded model.

    python bench/smolvla_cost.py                            # full size, CPU, 1 thread
    python bench/smolvla_cost.py --device cuda --dtype bf16 --decisions 256 --microbatch 0,32
    python bench/smolvla_cost.py --size tiny                # smoke run (tests)
    python bench/smolvla_cost.py --only-fsdp --fsdp-ranks 2 --out bench/results/smolvla_fsdp_cpu.json

--fsdp-ranks N adds the micro-batched update sharded over N FSDP ranks (gloo, algo/fsdp.py): per
rank, the weights, gradients and AdamW moments it holds, counted tensor by tensor.

Writes bench/results/smolvla_cost_<device>.json (--out to change).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from gpu_check import graph_max_abs_diff, timed  # noqa: E402  (bench/ is on sys.path: this file's directory, or gpu_check's insert)

from stepnft_ros.atomic import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'
STATE_DIM, ACTION_DIM, CAMERA, CAMERA_SIZE = 8, 7, 'base_camera', 256  # SmolVLA pads the image to its 512 px
SIZES = {
    # SmolVLA's defaults otherwise: 16 VLM layers, chunk 50, 10 flow steps, state/action padded to 32
    'full': {'vlm': 'smolvlm2_500m', 'smolvla': {}},
    'tiny': {'vlm': 'tiny', 'smolvla': {'num_vlm_layers': 4, 'chunk_size': 4, 'n_action_steps': 4, 'num_steps': 4,
                                        'resize_imgs_with_padding': (64, 64)}},
}
WORDS = ('pick', 'up', 'the', 'red', 'cube', 'and', 'place', 'it', 'on', 'green', 'plate')


def build(size: str, workdir: Path, device: torch.device):
    from stepnft_ros.policy.smolvla import VLM_STUB_SIZES, new_smolvla, write_vlm_stub

    spec = SIZES[size]
    vlm = write_vlm_stub(workdir / 'vlm', **VLM_STUB_SIZES[spec['vlm']], words=WORDS)
    model = new_smolvla(vlm, ACTION_DIM, STATE_DIM, (CAMERA,), CAMERA_SIZE, seed=0, **spec['smolvla'])
    return model.to(device).eval()


def observations(n: int, seed: int = 0):
    from stepnft_ros.policy.types import Observation

    rng = np.random.default_rng(seed)
    return [Observation(state=rng.standard_normal(STATE_DIM).astype(np.float32),
                        images={CAMERA: rng.integers(0, 256, (CAMERA_SIZE, CAMERA_SIZE, 3), dtype=np.uint8)},
                        instruction=' '.join(WORDS[:3 + i % 8])) for i in range(n)]


def seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn over `repeats` calls after one warm-up call."""
    return timed(fn, repeats, 1, device)['p50_ms'] / 1e3


class PeakMemory:
    """Memory a block adds at its peak: CUDA's allocator peak, or the process RSS sampled every 2 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra_gib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        self._proc = psutil.Process()
        self._base = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == 'cuda':
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.extra_gib = round((peak - self._base) / 2**30, 3)


def measure(job: dict) -> dict:
    """One configuration, in this process: 'inference', or 'update' with job's decisions/microbatch/checkpointing."""
    from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer
    from stepnft_ros.episodes import Decision, Episode, collate_episodes
    from stepnft_ros.policy import FlowPolicy
    from stepnft_ros.policy.types import stack_observations

    torch.set_num_threads(job['threads'])
    torch.manual_seed(0)
    device = torch.device(job['device'])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if job['dtype'] == 'bf16' else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model = build(job['size'], Path(tmp), device)
        if job.get('vlm_weights') == 'bf16':  # the transformer stacks; LeRobot casts their inputs to match
            model.flow.vlm_with_expert.to(torch.bfloat16)
        cfg = model.config
        expert = model.action_expert_parameters()
        out = {**job, 'build_s': round(time.perf_counter() - start, 1),
               'parameters_m': round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
               'trainable_m': round(sum(p.numel() for p in expert) / 1e6, 1),
               'horizon': cfg.horizon, 'num_steps': cfg.num_steps}
        if job['kind'] == 'inference':
            obs = observations(1)
            batch = stack_observations(obs, cfg).to(device)
            policy = FlowPolicy(model, mode='ode', seed=0, device=device)
            with torch.no_grad(), autocast:
                prefix = model.encode_prefix(batch)
                x = torch.randn(1, cfg.horizon, cfg.action_dim, device=device)
                tau = torch.ones(1, device=device)
                with PeakMemory(device) as mem:
                    out['prefix_s'] = seconds(lambda: model.encode_prefix(batch), job['repeats'], device)
                    out['velocity_s'] = seconds(lambda: model.velocity(x, tau, prefix), job['repeats'], device)
                    # the K solver steps alone, the prefix already cached (the GPU target: <= 30 ms)
                    out['chunk_cached_prefix_s'] = seconds(
                        lambda: [model.velocity(x, tau, prefix) for _ in range(cfg.num_steps)], job['repeats'], device)
                    out['chunk_s'] = seconds(lambda: policy.infer_batch(obs), job['repeats'], device)
                if device.type == 'cuda':
                    out.update(graph_rows(model, policy, obs, prefix, job['repeats'], device))
            out['inference_extra_gib'] = mem.extra_gib
            return out
        n = job['decisions']
        obs = observations(n)
        sample = FlowPolicy(model, mode='sde', seed=0, device=device).infer(obs[0])  # cost does not depend on values
        episode = Episode('cost', 0, success=True, env_steps=n)
        episode.decisions = [Decision(o, sample.chunks[0], sample.trace, executed=cfg.horizon) for o in obs]
        half = Episode('cost-fail', 0, success=False, env_steps=n)  # both labels, so both branches of the loss
        half.decisions = episode.decisions[n // 2:]
        episode.decisions = episode.decisions[:n // 2]
        batch = collate_episodes([episode, half], cfg, 'terminal_binary')
        if job['checkpointing']:
            model.enable_gradient_checkpointing()
        trainer = StepNFTTrainer(model, StepNFTConfig(lr=1e-6, epochs=1, minibatch_size=n,
                                                      microbatch_size=job['microbatch']), seed=0,
                                 fsdp=job.get('ranks', 1) > 1)

        def update():
            with autocast:
                trainer.update(batch)
        update()  # warm-up: optimizer state allocated
        with PeakMemory(device) as mem:
            out['update_s'] = seconds(update, job['repeats'], device)
        out['update_s_per_decision'] = round(out['update_s'] / n, 4)
        out['decisions_per_s'] = round(n / out['update_s'], 2)
        out['update_extra_gib'] = mem.extra_gib
        out.update(held_gib(trainer))
        return out


def graph_rows(model, eager, obs, prefix, repeats: int, device: torch.device) -> dict:
    """The ODE chunk replayed from a CUDA graph (FlowPolicy(cuda_graph=True)): the K solver steps alone
    on the cached prefix, the whole chunk, and how far its actions are from the eager loop's."""
    from stepnft_ros.policy import FlowPolicy
    from stepnft_ros.policy.cuda_graph import GraphedODE

    cfg = model.config
    graphed = FlowPolicy(model, mode='ode', seed=0, device=device, cuda_graph=True)
    solve = GraphedODE(cfg.num_steps)
    noise = torch.randn(len(obs), cfg.horizon, cfg.action_dim, device=device)
    k_star = torch.zeros(len(obs), dtype=torch.long, device=device)
    out = {'chunk_cached_prefix_graph_s': seconds(lambda: solve(model.velocity, prefix, noise, k_star), repeats,
                                                  device),
           'chunk_graph_s': seconds(lambda: graphed.infer_batch(obs), repeats, device)}
    out['graph_max_abs_diff_vs_eager'] = graph_max_abs_diff(eager, graphed, obs)
    return out


def held_gib(trainer) -> dict:
    """What this process holds of the weights, their gradients and AdamW's moments (its shards under
    FSDP), counted tensor by tensor: RSS would still show the full model built before sharding."""
    def gib(tensors) -> float:
        local = [t.to_local() if hasattr(t, 'to_local') else t for t in tensors]
        return round(sum(t.numel() * t.element_size() for t in local) / 2**30, 3)
    params = list(trainer.model.parameters())
    moments = [v for state in trainer.optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim() > 0]
    return {'held_weights_gib': gib(params), 'held_grads_gib': gib(p.grad for p in params if p.grad is not None),
            'held_adam_gib': gib(moments)}


def _child(job: dict, queue) -> None:
    try:
        queue.put(measure(job))
    except Exception as err:  # reported in the JSON, the other configurations still run
        queue.put({**job, 'error': f'{type(err).__name__}: {err}'})


def _rank_child(job: dict, rank: int, init: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=job['ranks'])
    try:
        _child(job, queue)
    finally:
        dist.destroy_process_group()


def run_isolated(job: dict) -> dict:
    """One configuration in fresh processes: one, or job['ranks'] FSDP ranks (rank 0's row, with every
    rank's held memory)."""
    ctx = mp.get_context('spawn')
    ranks = job.get('ranks', 1)
    queues = [ctx.Queue() for _ in range(ranks)]
    with tempfile.TemporaryDirectory() as rendezvous:
        if ranks == 1:
            procs = [ctx.Process(target=_child, args=(job, queues[0]))]
        else:
            procs = [ctx.Process(target=_rank_child, args=(job, r, f'file://{rendezvous}/init', q))
                     for r, q in enumerate(queues)]
        for proc in procs:
            proc.start()
        results = [q.get() for q in queues]
        for proc in procs:
            proc.join()
    if ranks > 1 and 'error' not in results[0]:
        results[0]['per_rank_held_gib'] = [round(r.get('held_weights_gib', 0) + r.get('held_grads_gib', 0)
                                                 + r.get('held_adam_gib', 0), 3) for r in results]
    return results[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', default='full', choices=sorted(SIZES))
    p.add_argument('--device', default='cpu')
    p.add_argument('--dtype', default='fp32', choices=('fp32', 'bf16'), help='bf16: autocast')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    p.add_argument('--decisions', type=int, default=12, help='decisions per timed update')
    p.add_argument('--microbatch', default='0,3', help='micro-batch sizes to compare (0: the whole update at once)')
    p.add_argument('--repeats', type=int, default=2)
    p.add_argument('--fsdp-ranks', type=int, default=0,
                   help='also run each micro-batched update sharded over this many FSDP ranks (gloo)')
    p.add_argument('--only-fsdp', action='store_true',
                   help='only the FSDP rows and the unsharded rows they compare to')
    p.add_argument('--vlm-weights', default='fp32', choices=('fp32', 'bf16'),
                   help='bf16: the VLM and the action expert stored in bf16 (projections stay fp32), as real '
                        'checkpoints load their VLM; use with --dtype fp32 (no autocast)')
    p.add_argument('--inference-only', action='store_true', help='only the inference row')
    p.add_argument('--out', help='default bench/results/smolvla_cost_<device>.json')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    base = {'size': args.size, 'device': str(device), 'dtype': args.dtype, 'threads': args.threads,
            'repeats': args.repeats, 'vlm_weights': args.vlm_weights}
    updates = [{**base, 'kind': 'update', 'decisions': args.decisions, 'microbatch': int(m), 'checkpointing': c}
               for c in (False, True) for m in args.microbatch.split(',')]
    sharded = [{**job, 'ranks': args.fsdp_ranks} for job in updates if args.fsdp_ranks > 1 and job['microbatch']
               and not job['checkpointing']]  # micro-batches: each rank encodes only its own decisions' prefix
    if args.only_fsdp:
        jobs = [{**job, 'ranks': 1} for job in sharded] + sharded
    elif args.inference_only:
        jobs = [{**base, 'kind': 'inference'}]
    else:
        jobs = [{**base, 'kind': 'inference'}, *updates, *sharded]
    rows = []
    for job in jobs:
        print(f'[{time.strftime("%H:%M:%S")}] {job}', file=sys.stderr, flush=True)
        rows.append({**run_isolated(job), 'loadavg_1min_after': round(os.getloadavg()[0], 2)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report = {'benchmark': 'smolvla_cost', 'host': platform.node(), 'date': time.strftime('%Y-%m-%d %H:%M:%S'),
              'torch': torch.__version__, 'camera': f'1 × {CAMERA_SIZE} px (padded to the vision tower\'s size)',
              'weights': 'random (cost does not depend on their values)', 'cpus': os.cpu_count(),
              'note': 'times are wall clock: compare them only with a quiet machine (loadavg per row)', 'rows': rows}
    out = Path(args.out) if args.out else RESULTS / f'smolvla_cost_{device.type}.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1) + '\n')
    print(json.dumps(report, indent=1))
    return 0 if all('error' not in r for r in rows) else 1


if __name__ == '__main__':
    raise SystemExit(main())
