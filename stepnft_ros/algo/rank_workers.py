"""A long-lived learner's update spread over processes: rank 0 is the caller, ranks 1..n−1 are workers it starts.

The offline `stepnft train` gets its ranks from torchrun. A learner that lives for hours (the
learner node) cannot be started by torchrun without making every rank a ROS node, so it starts its
own: each worker loads the same weights and optimizer state and joins one gloo group with the
caller. Update after update, rank 0 hands each worker the collated batch (through a queue, so an
idle worker waits for episodes without a collective timing out) and every rank runs its share of
the same data-parallel update (StepNFTTrainer(distributed=True)). Every rank takes the same step,
so the workers never send weights back; only rank 0 writes checkpoints.

A worker found dead before an update raises on rank 0 (RuntimeError naming it); one that dies
during an update makes the update's collective fail after `timeout_s`. The caller decides what to
do (the learner node exits; its checkpoint commit rule loses nothing). Workers whose rank 0 is gone
exit on their own.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path
from queue import Empty

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer

_STOP = None


class RankWorkers:
    """Starts world_size − 1 worker processes and makes this process rank 0 of their group."""

    def __init__(self, world_size: int, checkpoint: str | Path, optimizer_file: str | Path | None,
                 algo: StepNFTConfig, seed: int, device: str = 'cpu', torch_threads: int = 1,
                 timeout_s: float = 600.0) -> None:
        if world_size < 2:
            raise ValueError(f'RankWorkers is for 2 or more ranks, got {world_size}')
        if dist.is_initialized():
            raise RuntimeError('this process already belongs to a torch.distributed group')
        self._rendezvous = tempfile.TemporaryDirectory(prefix='stepnft-ranks-')
        init = f'file://{self._rendezvous.name}/init'
        ctx = mp.get_context('spawn')  # a fresh interpreter: no forked ROS or thread state
        self.queues = [ctx.Queue() for _ in range(1, world_size)]
        self.processes = [
            ctx.Process(target=_worker, daemon=True, name=f'stepnft-rank-{rank}',
                        args=(rank, world_size, init, queue, str(checkpoint), None if optimizer_file is None
                              else str(optimizer_file), algo, seed, device, torch_threads, timeout_s))
            for rank, queue in zip(range(1, world_size), self.queues, strict=True)]
        for process in self.processes:
            process.start()
        dist.init_process_group('gloo', init_method=init, rank=0, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.world_size = world_size

    def update(self, trainer: StepNFTTrainer, batch, human=None, bc_weight: float = 0.0) -> dict[str, float]:
        """Hand the batch to the workers, then run rank 0's share; the metrics are the whole update's."""
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                raise RuntimeError(f'learner rank {rank} exited (code {process.exitcode}); '
                                   'the update cannot run without it')
        for queue in self.queues:
            queue.put((batch, human, bc_weight))
        return trainer.update(batch, human=human, bc_weight=bc_weight)

    def close(self) -> None:
        for queue in self.queues:
            queue.put(_STOP)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        self._rendezvous.cleanup()


def _worker(rank: int, world_size: int, init: str, queue, checkpoint: str, optimizer_file: str | None,
            algo: StepNFTConfig, seed: int, device: str, torch_threads: int, timeout_s: float) -> None:
    import safetensors.torch

    from stepnft_ros.policy import load_checkpoint

    parent = os.getppid()
    torch.set_num_threads(torch_threads)
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        model, _ = load_checkpoint(checkpoint, device=device)
        trainer = StepNFTTrainer(model, algo, seed=seed, distributed=True)
        if optimizer_file is not None:
            trainer.load_optimizer_tensors(safetensors.torch.load_file(optimizer_file))
        while True:
            try:
                message = queue.get(timeout=2.0)
            except Empty:
                if os.getppid() != parent:  # rank 0 is gone
                    return
                continue
            if message is _STOP:
                return
            batch, human, bc_weight = message
            trainer.update(batch, human=human, bc_weight=bc_weight)
    finally:
        dist.destroy_process_group()
