"""ODE chunks replayed from a CUDA graph.

At batch 1 a large backend's chunk is bound by kernel launches, not arithmetic: full-size SmolVLA on an
H200 takes 19.6 ms per velocity call and 195 ms for its 10-step chunk eagerly, while its weights are read
in well under a millisecond (bench/results/gpu_check.json). Capturing the K-step solve once per input
shape and replaying it launches the whole chunk at once.

Only the ODE sampler is captured: it draws no random numbers inside the solve (ε and k* are drawn
outside, from the policy's generator, in the order the eager sampler draws them), so a replay computes
what the eager loop computes. The Flow-SDE sampler keeps the eager loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.utils import _pytree as pytree

from stepnft_ros.policy.backend import Prefix
from stepnft_ros.policy.sampler import sample_chunk
from stepnft_ros.policy.types import Trace

Velocity = Callable[[torch.Tensor, torch.Tensor, Prefix], torch.Tensor]
MAX_GRAPHS = 8  # input shapes kept (batch sizes, prefix lengths); the least recently used is dropped


def _signature(leaves: list, spec: pytree.TreeSpec, noise: torch.Tensor) -> tuple:
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError('a CUDA graph needs a prefix of tensors only')
    autocast = torch.is_autocast_enabled('cuda')
    return (str(spec), tuple((tuple(t.shape), t.dtype) for t in leaves), tuple(noise.shape),
            autocast, torch.get_autocast_dtype('cuda') if autocast else None)


class CapturedODESolve:
    """One input shape's K-step Euler solve (and its trace) as a CUDA graph over static input buffers."""

    def __init__(self, velocity: Velocity, leaves: list[torch.Tensor], spec: pytree.TreeSpec, noise: torch.Tensor,
                 k_star: torch.Tensor, num_steps: int) -> None:
        """leaves, spec: the prefix flattened (torch.utils._pytree)."""
        self._prefix = [t.clone() for t in leaves]
        self._noise, self._k_star = noise.clone(), k_star.clone()

        def solve() -> tuple[torch.Tensor, Trace]:
            static_prefix = pytree.tree_unflatten(self._prefix, spec)
            return sample_chunk(lambda x, tau: velocity(x, tau, static_prefix), self._noise, num_steps, 0.0,
                                k_star=self._k_star)

        autocast = torch.is_autocast_enabled('cuda')
        # Autocast's cast cache would hold tensors made during capture; a graph must not depend on it.
        cast = torch.autocast('cuda', dtype=torch.get_autocast_dtype('cuda'), enabled=autocast, cache_enabled=False)
        side = torch.cuda.Stream()  # warm-up (lazy init, cuBLAS workspaces) off the capture, as CUDA graphs need
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), cast:
            for _ in range(2):
                solve()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), cast:
            self._x, self._trace = solve()

    def __call__(self, leaves: list[torch.Tensor], noise: torch.Tensor,
                 k_star: torch.Tensor) -> tuple[torch.Tensor, Trace]:
        for static, new in zip(self._prefix, leaves, strict=True):
            static.copy_(new)
        self._noise.copy_(noise)
        self._k_star.copy_(k_star)
        self.graph.replay()
        return self._x.clone(), Trace(*(t.clone() for t in self._trace.as_tuple()))


class GraphedODE:
    """Captured solves by input shape for one model; `clear()` when the model's weights are replaced
    (a graph reads the parameters it was captured with)."""

    def __init__(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self._solves: OrderedDict[tuple, CapturedODESolve] = OrderedDict()

    def clear(self) -> None:
        self._solves.clear()

    def __len__(self) -> int:
        return len(self._solves)

    def __call__(self, velocity: Velocity, prefix: Prefix, noise: torch.Tensor,
                 k_star: torch.Tensor) -> tuple[torch.Tensor, Trace]:
        if noise.device.type != 'cuda':
            raise ValueError(f'CUDA graphs need a CUDA device, the policy runs on {noise.device}')
        leaves, spec = pytree.tree_flatten(prefix)  # once per chunk: the key and the buffers' new values
        key = _signature(leaves, spec, noise)
        solve = self._solves.get(key)
        if solve is None:
            solve = self._solves[key] = CapturedODESolve(velocity, leaves, spec, noise, k_star, self.num_steps)
            while len(self._solves) > MAX_GRAPHS:
                self._solves.popitem(last=False)
        self._solves.move_to_end(key)
        return solve(leaves, noise, k_star)
