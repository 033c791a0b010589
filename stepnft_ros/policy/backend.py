"""The policy backend seam: what the samplers, the trainers and the nodes need from a policy network.

Two backends implement it: the project's `FlowVLA` (modeling.py) and a LeRobot SmolVLA checkpoint
(`SmolVLABackend`, smolvla.py). Everything else (FlowPolicy's ODE/SDE sampling and trace, the
π-StepNFT / GRPO / flow-matching updates, the learner, the nodes) uses only this interface, so it
does not know which backend it holds. Checkpoint loading picks the backend from the directory
(checkpoint.load_checkpoint).

Time convention of both: τ = 1 noise, τ = 0 data, x_τ = τ·ε + (1 − τ)·a, v ≈ ε − a, in the
backend's normalized action space of the robot's D action dimensions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from stepnft_ros.policy.config import PolicyConfig
from stepnft_ros.policy.types import ObservationBatch

Prefix = Any
"""What encode_prefix returns: tensors (in tuples, lists or dicts) whose first axis is the batch
(FlowVLA: (prefix (B, P, d), pad (B, P)); SmolVLA: (pad (B, P), {layer: {key/value (B, P, h, d)}}))."""


@runtime_checkable
class ActionNormalizer(Protocol):
    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:  # (..., D) robot units -> normalized
        ...

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:  # (..., D) normalized -> robot units
        ...


@runtime_checkable
class FlowBackend(Protocol):
    """A flow-matching policy network (an nn.Module: parameters(), train(), eval(), to()).

    `config` is the robot-facing interface (action_dim D, horizon H = chunk size, state_dim,
    camera_names, image_size) plus the sampler's K (num_steps) and a (noise_level).
    """

    config: PolicyConfig
    normalizer: ActionNormalizer

    def encode_prefix(self, obs: ObservationBatch) -> Prefix:
        """Encode observations once (vision, language, state); reused by all K solver steps."""
        ...

    def velocity(self, x: torch.Tensor, tau: torch.Tensor, prefix: Prefix) -> torch.Tensor:
        """v_θ(x, τ, o): x (B, H, D) normalized actions, τ (B,) -> (B, H, D); differentiable."""
        ...

    def action_expert_parameters(self) -> list[nn.Parameter]:
        """What π-StepNFT trains by default (the prefix stays frozen, as in the paper)."""
        ...


def index_prefix(prefix: Prefix, idx: torch.Tensor) -> Prefix:
    """The rows `idx` of every tensor in a prefix (any backend's structure)."""
    if isinstance(prefix, torch.Tensor):
        return prefix[idx]
    if isinstance(prefix, Mapping):
        return {k: index_prefix(v, idx) for k, v in prefix.items()}
    if isinstance(prefix, (tuple, list)):
        return type(prefix)(index_prefix(v, idx) for v in prefix)
    raise TypeError(f'cannot index a prefix part of type {type(prefix).__name__}')


def lerobot_policy_type(directory: str | Path) -> str | None:
    """The `type` a LeRobot policy directory's config.json names (e.g. 'smolvla'); None for anything
    else (our own checkpoints' config.json is a PolicyConfig, which has no `type`)."""
    import json

    path = Path(directory) / 'config.json'
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # let the format's own loader report the unreadable file
    kind = data.get('type') if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None
