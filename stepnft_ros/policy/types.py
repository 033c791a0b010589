"""Typed containers at the edges of the core: observations in, action chunks and traces out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from stepnft_ros.policy.config import PolicyConfig


class ObservationError(ValueError):
    """An observation the policy must not act on (wrong shape, encoding or non-finite values)."""


@dataclass(frozen=True)
class Observation:
    """One robot observation o.

    state: (S,) float32 proprio; images: camera name -> (image_size, image_size, 3) uint8 RGB;
    instruction: the task's language instruction.
    """

    state: np.ndarray | None = None
    images: Mapping[str, np.ndarray] = field(default_factory=dict)
    instruction: str = ''


def validate_observation(obs: Observation, cfg: PolicyConfig) -> None:
    """Raise ObservationError naming the first problem that makes `obs` unusable for `cfg`."""
    if cfg.state_dim:
        if obs.state is None:
            raise ObservationError(f'state missing: the policy expects ({cfg.state_dim},)')
        state = np.asarray(obs.state)
        if state.shape != (cfg.state_dim,):
            raise ObservationError(f'state has shape {state.shape}, expected ({cfg.state_dim},)')
        if not np.all(np.isfinite(state)):
            bad = np.flatnonzero(~np.isfinite(state)).tolist()
            raise ObservationError(f'state has non-finite values at indices {bad[:8]}')
    for name in cfg.camera_names:
        if name not in obs.images:
            raise ObservationError(f'camera {name!r} missing; got {sorted(obs.images)}')
        image = np.asarray(obs.images[name])
        expected = (cfg.image_size, cfg.image_size, 3)
        if image.shape != expected:
            raise ObservationError(f'camera {name!r} image has shape {image.shape}, expected {expected}')
        if image.dtype != np.uint8:
            raise ObservationError(f'camera {name!r} image has dtype {image.dtype}, expected uint8 RGB')


@dataclass(frozen=True)
class ObservationBatch:
    """Observations stacked for the network.

    state: (B, S) float32 (raw, un-normalized) or None; images: (B, C, 3, h, w) uint8 or None;
    instructions: B strings.
    """

    state: torch.Tensor | None
    images: torch.Tensor | None
    instructions: tuple[str, ...]

    @property
    def batch_size(self) -> int:
        return len(self.instructions)

    def to(self, device: torch.device | str) -> ObservationBatch:
        return ObservationBatch(
            state=None if self.state is None else self.state.to(device),
            images=None if self.images is None else self.images.to(device),
            instructions=self.instructions,
        )

    def index(self, idx: torch.Tensor) -> ObservationBatch:
        rows = idx.tolist()
        return ObservationBatch(
            state=None if self.state is None else self.state[idx],
            images=None if self.images is None else self.images[idx],
            instructions=tuple(self.instructions[i] for i in rows),
        )


def stack_observations(observations: Sequence[Observation], cfg: PolicyConfig) -> ObservationBatch:
    """Validate and stack observations; raises ObservationError on the first bad one."""
    if not observations:
        raise ObservationError('no observations to stack')
    for i, obs in enumerate(observations):
        try:
            validate_observation(obs, cfg)
        except ObservationError as err:
            raise ObservationError(f'observation {i}: {err}') from None
    state = None
    if cfg.state_dim:
        state = torch.from_numpy(np.stack([np.asarray(o.state, dtype=np.float32) for o in observations]))
    images = None
    if cfg.camera_names:
        # (B, C, h, w, 3) -> (B, C, 3, h, w)
        stacked = np.stack([np.stack([o.images[n] for n in cfg.camera_names]) for o in observations])
        images = torch.from_numpy(np.ascontiguousarray(stacked)).permute(0, 1, 4, 2, 3).contiguous()
    return ObservationBatch(state=state, images=images,
                            instructions=tuple(o.instruction for o in observations))


@dataclass(frozen=True)
class Trace:
    """What π-StepNFT stores per decision (ALGORITHM.md §2), batched; actions are normalized.

    x_k: (B, H, D) sampler state at the chosen step k*; x_next: (B, H, D) state at k*+1;
    v_old: (B, H, D) v_θold(x_k, τ_k*, o); k: (B,) int64 chosen step; a: (B,) noise level used;
    x_final: (B, H, D) the executed chunk x_K (normalized, before clipping).
    """

    x_k: torch.Tensor
    x_next: torch.Tensor
    v_old: torch.Tensor
    k: torch.Tensor
    a: torch.Tensor
    x_final: torch.Tensor

    def to(self, device: torch.device | str) -> Trace:
        return Trace(*(t.to(device) for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.x_k, self.x_next, self.v_old, self.k, self.a, self.x_final)

    def index(self, idx: torch.Tensor) -> Trace:
        return Trace(*(t[idx] for t in self.as_tuple()))

    @staticmethod
    def cat(traces: Sequence[Trace]) -> Trace:
        return Trace(*(torch.cat(parts) for parts in zip(*(t.as_tuple() for t in traces), strict=True)))
