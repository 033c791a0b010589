"""Configuration of the flow-matching VLA policy (ALGORITHM.md §1–2)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class PolicyConfig:
    """Sizes and interfaces of a π0-style policy: prefix encoder + action expert.

    The state-only configuration (no cameras, ``use_language=False``) is the fast CPU setup.
    """

    action_dim: int = 7
    """D: dimensions of one action (e.g. 6-DoF end-effector delta + gripper)."""
    horizon: int = 8
    """H: actions per chunk (one chunk = one decision)."""
    state_dim: int = 0
    """Proprioceptive state size; 0 = no state token."""
    camera_names: tuple[str, ...] = ()
    """RGB cameras the policy expects (1–3); empty = no vision."""
    image_size: int = 64
    """Square size (pixels) every camera image must have."""
    vision_patch: int = 8
    """Patch size of the convolutional vision encoder; image_size must be a multiple."""
    use_language: bool = False
    """Encode the instruction with a transformers text encoder."""
    text_encoder_path: str = ''
    """Local directory of a pretrained transformers encoder + tokenizer; '' = build from config."""
    text_layers: int = 2
    """Layers of the text encoder built from a local config (ignored with text_encoder_path)."""
    max_text_tokens: int = 64
    """Instructions are truncated to this many tokens."""
    d_model: int = 128
    """Token width of prefix and action expert."""
    n_heads: int = 4
    """Attention heads."""
    prefix_layers: int = 1
    """Self-attention layers over the concatenated prefix tokens."""
    expert_layers: int = 2
    """Action-expert layers (self-attention over the H action tokens + cross-attention to the prefix)."""
    dropout: float = 0.0
    """Dropout in the transformer layers; 0 keeps v_θ deterministic, which the RL update assumes."""
    num_steps: int = 4
    """K: solver steps of the ODE/SDE samplers."""
    noise_level: float = 0.3
    """a: Flow-SDE noise level (0.2–0.5 in the paper)."""

    def __post_init__(self) -> None:
        _require(self.action_dim >= 1, f'action_dim must be >= 1, got {self.action_dim}')
        _require(self.horizon >= 1, f'horizon must be >= 1, got {self.horizon}')
        _require(self.state_dim >= 0, f'state_dim must be >= 0, got {self.state_dim}')
        _require(len(self.camera_names) <= 3, f'at most 3 cameras, got {self.camera_names!r}')
        _require(len(set(self.camera_names)) == len(self.camera_names),
                 f'camera_names must be unique, got {self.camera_names!r}')
        _require(self.image_size >= self.vision_patch > 0 and self.image_size % self.vision_patch == 0,
                 f'image_size ({self.image_size}) must be a positive multiple of vision_patch '
                 f'({self.vision_patch})')
        _require(self.state_dim > 0 or self.camera_names or self.use_language,
                 'the policy needs at least one input: state_dim > 0, a camera, or use_language')
        _require(self.d_model % self.n_heads == 0,
                 f'd_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})')
        _require(self.prefix_layers >= 0, f'prefix_layers must be >= 0, got {self.prefix_layers}')
        _require(self.expert_layers >= 1, f'expert_layers must be >= 1, got {self.expert_layers}')
        _require(self.num_steps >= 1, f'num_steps (K) must be >= 1, got {self.num_steps}')
        _require(self.noise_level >= 0.0, f'noise_level (a) must be >= 0, got {self.noise_level}')
        _require(0.0 <= self.dropout < 1.0, f'dropout must be in [0, 1), got {self.dropout}')

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f'unknown PolicyConfig fields: {unknown}')
        data = dict(data)
        if 'camera_names' in data:
            data['camera_names'] = tuple(data['camera_names'])
        return cls(**data)
