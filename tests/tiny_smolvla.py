"""A tiny random SmolVLA built offline: a SmolVLM config + word-level tokenizer + image/video
processors in a directory (~6 KB, no weights), and a SmolVLA backend on it (0.4 M parameters)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import stepnft_ros.policy  # noqa: F401  (its torchvision shim runs before transformers is imported)
from stepnft_ros.policy.types import Observation

WORDS = ('pick', 'up', 'the', 'red', 'cube', 'and', 'lift', 'it', 'stack', 'push')
CAMERAS = ('base_camera',)
IMAGE_SIZE = 32  # SmolVLA pads it to the vision tower's 64 px
STATE_DIM, ACTION_DIM, HORIZON, NUM_STEPS = 4, 3, 4, 4


def build_vlm_dir(path: str | Path) -> Path:
    """A tiny SmolVLM's config, tokenizer and processors: what SmolVLA reads from `vlm_model_name`."""
    from stepnft_ros.policy.smolvla import VLM_STUB_SIZES, write_vlm_stub

    return write_vlm_stub(path, **VLM_STUB_SIZES['tiny'], words=WORDS)


def tiny_smolvla(vlm_dir: Path, seed: int = 0, action_pad: int = 0, state_dim: int = STATE_DIM,
                 action_dim: int = ACTION_DIM, cameras: tuple[str, ...] = CAMERAS, image_size: int = IMAGE_SIZE,
                 **kwargs):
    """A random SmolVLABackend; `action_pad` > 0 pads the action to max_action_dim = D + action_pad;
    `kwargs`: other SmolVLAConfig fields."""
    import torch

    from stepnft_ros.policy.smolvla import ACTION_KEY, STATE_KEY, new_smolvla

    g = torch.Generator().manual_seed(seed + 1)
    stats = {key: {'mean': torch.randn(n, generator=g), 'std': torch.rand(n, generator=g) + 0.5}
             for key, n in ((STATE_KEY, state_dim), (ACTION_KEY, action_dim))}
    options = dict(num_vlm_layers=4, chunk_size=HORIZON, n_action_steps=HORIZON, num_steps=NUM_STEPS,
                   max_state_dim=state_dim, max_action_dim=action_dim + action_pad,
                   resize_imgs_with_padding=(64, 64))
    options.update(kwargs)
    return new_smolvla(vlm_dir, action_dim, state_dim, cameras, image_size, stats=stats, seed=seed, **options)


def observations(n: int, seed: int = 0) -> list[Observation]:
    rng = np.random.default_rng(seed)
    return [Observation(state=rng.normal(size=STATE_DIM).astype(np.float32),
                        images={c: rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) for c in CAMERAS},
                        instruction=' '.join(WORDS[:1 + (i % len(WORDS))])) for i in range(n)]
