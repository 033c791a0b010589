"""Checkpoints: one self-describing safetensors file (weights + config + metadata), never pickle.

`<dir>/model.safetensors` carries the PolicyConfig JSON in its header metadata, so the weights
and the config can't drift apart; `<dir>/config.json` is a human-readable copy. Both are
written atomically (temp file, fsync, rename).

A LeRobot policy directory (config.json with a "type") is another backend's checkpoint: SmolVLA
loads through policy/smolvla.py, in LeRobot's own format; other types are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from stepnft_ros.atomic import atomic_write_bytes, atomic_write_text
from stepnft_ros.policy.backend import FlowBackend, lerobot_policy_type
from stepnft_ros.policy.config import PolicyConfig
from stepnft_ros.policy.modeling import FlowVLA

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
FORMAT = 'stepnft_ros.policy/1'


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not match what the caller expects."""


SUPPORTED_LEROBOT_TYPES = ('smolvla',)
_PI0_MISSING = ("LeRobot 0.4.4's π0 models need transformers == 4.53.2 patched with openpi's "
                "transformers_replace files, which no package registry ships (stock transformers grows the KV "
                "cache at every denoising step), and the gated google/paligemma-3b-pt-224 tokenizer; this "
                "install cannot build them, so no backend loads them yet")
UNLOADABLE_LEROBOT_TYPES = {'pi0': _PI0_MISSING, 'pi05': _PI0_MISSING}
"""Flow-matching VLAs whose load path is known to be blocked here, with what is missing."""


def save_checkpoint(directory: str | Path, model: FlowBackend, metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` (weights, normalization stats, config) and JSON-able `metadata` to `directory`.

    A backend other than FlowVLA writes its own format (its `save_checkpoint` method)."""
    if not isinstance(model, FlowVLA):
        return model.save_checkpoint(directory, metadata)
    directory = Path(directory)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    header = {'format': FORMAT, 'config': model.config.to_json(),
              'metadata': json.dumps(metadata or {}, sort_keys=True)}
    path = atomic_write_bytes(directory / WEIGHTS_FILE, safetensors.torch.save(tensors, metadata=header))
    atomic_write_text(directory / CONFIG_FILE, model.config.to_json() + '\n')
    return path


def read_header(directory: str | Path) -> tuple[PolicyConfig, dict[str, Any]]:
    """Config and metadata of a checkpoint without loading its tensors."""
    if _lerobot_type(directory) is not None:
        from stepnft_ros.policy.smolvla import read_smolvla_header
        return read_smolvla_header(directory)
    path = _weights_path(directory)
    try:
        with safetensors.safe_open(str(path), framework='pt') as f:
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for torn/garbage files
        raise CheckpointError(f'{path}: not a readable safetensors file ({err})') from err
    if header.get('format') != FORMAT:
        raise CheckpointError(f'{path}: format {header.get("format")!r}, expected {FORMAT!r}')
    try:
        config = PolicyConfig.from_dict(json.loads(header['config']))
        metadata = json.loads(header.get('metadata', '{}'))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f'{path}: invalid config in header ({err})') from err
    return config, metadata


def load_checkpoint(directory: str | Path, expected: PolicyConfig | None = None,
                    device: str | torch.device = 'cpu') -> tuple[FlowBackend, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights: a FlowVLA, or the backend a
    LeRobot policy directory needs (SmolVLABackend).

    `expected`: fail unless the checkpoint's action_dim/horizon/state_dim/cameras match it.
    """
    if _lerobot_type(directory) is not None:
        from stepnft_ros.policy.smolvla import load_smolvla
        return load_smolvla(directory, expected=expected, device=device)
    config, metadata = read_header(directory)
    path = _weights_path(directory)
    check_interface(config, expected, str(path))
    try:
        tensors = safetensors.torch.load_file(str(path), device=str(device))
    except Exception as err:
        raise CheckpointError(f'{path}: cannot read tensors ({err})') from err
    model = FlowVLA(config).to(device)
    state = model.state_dict()
    check_weights(path, tensors, state, missing=sorted(set(state) - set(tensors)))
    model.load_state_dict(tensors)
    return model, metadata


def check_interface(config: PolicyConfig, expected: PolicyConfig | None, where: str, origin: str = '') -> None:
    """CheckpointError unless a checkpoint's config speaks the robot's interface (`expected`);
    `origin` says where the checkpoint's values come from."""
    if expected is None:
        return
    for name in ('action_dim', 'horizon', 'state_dim', 'camera_names', 'image_size'):
        got, want = getattr(config, name), getattr(expected, name)
        if got != want:
            raise CheckpointError(f'{where}: {name} is {got!r}{origin}, expected {want!r} (what the robot has)')


def check_weights(path: Path, tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                  missing: list[str]) -> None:
    """CheckpointError unless `tensors` fit the model's `state` (no unexpected names or wrong shapes,
    none of `missing`, the names the caller counts as absent) and are finite."""
    unexpected = sorted(set(tensors) - set(state))
    wrong = sorted(k for k in set(tensors) & set(state) if tuple(tensors[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(f'{path}: weights do not fit the config: {len(missing)} missing {missing[:5]}, '
                              f'{len(unexpected)} unexpected {unexpected[:5]}, wrong shape {wrong[:5]}')
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise CheckpointError(f'{path}: non-finite values in {bad[:5]}')


def _lerobot_type(directory: str | Path) -> str | None:
    """The LeRobot policy type of `directory` (None: not a LeRobot directory); CheckpointError for a
    type no backend handles."""
    kind = lerobot_policy_type(directory)
    if kind is not None and kind not in SUPPORTED_LEROBOT_TYPES:
        why = f': {UNLOADABLE_LEROBOT_TYPES[kind]}' if kind in UNLOADABLE_LEROBOT_TYPES else ''
        raise CheckpointError(f'{directory}: LeRobot policy type {kind!r}{why}; '
                              f'supported: {", ".join(SUPPORTED_LEROBOT_TYPES)}')
    return kind


def _weights_path(directory: str | Path) -> Path:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f'no checkpoint at {path}')
    return path
