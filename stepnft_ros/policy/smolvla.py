"""A LeRobot SmolVLA checkpoint as a policy backend (backend.FlowBackend), loaded offline.

SmolVLA's flow convention is the project's (τ = 1 noise, x_τ = τ·ε + (1 − τ)·a, v ≈ ε − a, Euler
with Δ = 1/K), so the adapter maps the seam one to one onto LeRobot 0.4.4 (pinned: this uses its
model internals):
- encode_prefix: LeRobot's preprocessor (state normalization, instruction + newline tokenized by
  the VLM's tokenizer), then the VLM over images + language + state once, filling its KV cache:
  prefix = (prefix_pad_masks (B, P), {layer: {'key_states', 'value_states': (B, P, h, d)}}).
- velocity: `VLAFlowMatching.denoise_step` on that cache, per-sample τ, differentiable into the
  action expert.
- normalization: the checkpoint's own LeRobot normalizer / unnormalizer steps.
- trainable parameters: the action expert (lm_expert + action/time projections); the VLM and the
  state projection feed the cached prefix.

The sampler works in the robot's D action dimensions (traces, bags and action names use D). A
checkpoint padded to max_action_dim > D gets zeros in the padded dimensions at every solver step
(the value its training targets held there) instead of noise the robot never receives; with
max_action_dim == D the ODE sampler is LeRobot's `sample_actions` exactly (tests/test_smolvla.py).

Offline: SmolVLA builds its VLM from `vlm_model_name`'s config and tokenizer even when the weights
come from the checkpoint. Those files are looked up in `vlm_dir` (argument; only there), else in
`<checkpoint>/vlm/` (save_smolvla writes them there), `$STEPNFT_VLM_DIR` and `vlm_model_name` itself
if it is a local directory, in that order; never downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from stepnft_ros.atomic import fsync_path
from stepnft_ros.policy.config import PolicyConfig
from stepnft_ros.policy.types import ObservationBatch

LEROBOT_VERSION = '0.4.4'
WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
PREPROCESSOR_FILE = 'policy_preprocessor.json'
POSTPROCESSOR_FILE = 'policy_postprocessor.json'
METADATA_FILE = 'stepnft.json'
"""Our side of a SmolVLA checkpoint: format, sampler settings (K, a) and the caller's metadata."""
FORMAT = 'stepnft_ros.smolvla/1'
VLM_SUBDIR = 'vlm'
VLM_ENV = 'STEPNFT_VLM_DIR'
VLM_FILES = ('config.json', 'tokenizer_config.json', 'preprocessor_config.json')
"""What SmolVLA reads from the VLM directory (plus tokenizer.json or vocab.json); no weights."""
VLM_COPIED = VLM_FILES + ('tokenizer.json', 'vocab.json', 'merges.txt', 'special_tokens_map.json',
                          'added_tokens.json', 'processor_config.json', 'video_preprocessor_config.json',
                          'chat_template.json', 'chat_template.jinja', 'generation_config.json')
CAMERA_PREFIX = 'observation.images.'
EMPTY_CAMERA_PREFIX = CAMERA_PREFIX + 'empty_camera_'
STATE_KEY = 'observation.state'
ACTION_KEY = 'action'
_STATS_FOR_MODE = {'MEAN_STD': ('mean', 'std'), 'MIN_MAX': ('min', 'max'), 'QUANTILES': ('q01', 'q99'),
                   'QUANTILE10': ('q10', 'q90')}


def _error(message: str) -> Exception:
    from stepnft_ros.policy.checkpoint import CheckpointError  # checkpoint.py imports this module lazily

    return CheckpointError(message)


def _import_lerobot():
    """LeRobot's SmolVLA modules, or a CheckpointError that says how to install them."""
    try:
        from lerobot.policies.smolvla import modeling_smolvla, processor_smolvla  # noqa: F401
        from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig  # noqa: F401
    except ImportError as err:
        raise _error(f'SmolVLA checkpoints need lerobot=={LEROBOT_VERSION} (scripts/setup.sh installs it with '
                     f'requirements-vla.txt): {err}') from err
    import lerobot

    if lerobot.__version__ != LEROBOT_VERSION:
        raise _error(f'lerobot {lerobot.__version__} is installed; this adapter is written against '
                     f'{LEROBOT_VERSION} (scripts/setup.sh installs it)')


class LeRobotActionNormalizer:
    """Action (un)normalization through the checkpoint's own LeRobot processor steps."""

    def __init__(self, normalize_step, unnormalize_step) -> None:
        self._normalize, self._unnormalize = normalize_step, unnormalize_step

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:  # (..., D)
        return self._normalize._normalize_action(action, inverse=False)

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:  # (..., D)
        return self._unnormalize._normalize_action(action, inverse=True)


class SmolVLABackend(nn.Module):
    """A LeRobot SmolVLAPolicy behind the project's policy interface (see the module docstring)."""

    kind = 'smolvla'

    def __init__(self, policy, preprocessor, postprocessor, config: PolicyConfig, vlm_dir: Path,
                 vlm_model_name: str) -> None:
        super().__init__()
        self.policy = policy
        self.preprocessor, self.postprocessor = preprocessor, postprocessor
        self.config = config
        self.vlm_dir = Path(vlm_dir)
        self.vlm_model_name = vlm_model_name  # as the checkpoint names it (e.g. a hub id), kept on save
        self.normalizer = LeRobotActionNormalizer(_step(preprocessor, 'NormalizerProcessorStep'),
                                                  _step(postprocessor, 'UnnormalizerProcessorStep'))
        self.camera_keys = tuple(CAMERA_PREFIX + name for name in config.camera_names)

    @property
    def flow(self):
        """LeRobot's VLAFlowMatching (the network)."""
        return self.policy.model

    def encode_prefix(self, obs: ObservationBatch):
        """Observations -> (prefix_pad_masks (B, P), KV cache of the VLM over images + language + state)."""
        from lerobot.policies.smolvla.modeling_smolvla import make_att_2d_masks
        from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

        device = next(self.parameters()).device
        batch: dict[str, Any] = {STATE_KEY: obs.state.float(), 'task': list(obs.instructions)}
        for i, key in enumerate(self.camera_keys):
            batch[key] = obs.images[:, i].float() / 255.0  # (B, 3, h, w) in [0, 1], as LeRobot's datasets
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.preprocessor(batch).items()}
        images, img_masks = self.policy.prepare_images(batch)
        state = self.policy.prepare_state(batch)
        flow = self.flow
        embs, pad, att = flow.embed_prefix(images, img_masks, batch[OBS_LANGUAGE_TOKENS],
                                           batch[OBS_LANGUAGE_ATTENTION_MASK], state=state)
        _, cache = flow.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(pad, att), position_ids=torch.cumsum(pad, dim=1) - 1,
            past_key_values=None, inputs_embeds=[embs, None], use_cache=True, fill_kv_cache=True)
        return pad, cache

    def velocity(self, x: torch.Tensor, tau: torch.Tensor, prefix) -> torch.Tensor:
        """v_θ(x, τ, o): x (B, H, D), τ (B,) -> (B, H, D) on the cached prefix.

        What LeRobot's VLAFlowMatching.denoise_step computes (tests compare the two), from its modules,
        with every tensor made on the device: denoise_step builds its suffix attention mask from a
        Python list, a host-to-device copy that a CUDA graph cannot capture (cuda_graph.py)."""
        from lerobot.policies.smolvla.modeling_smolvla import create_sinusoidal_pos_embedding, make_att_2d_masks

        pad, cache = prefix
        d, padded = self.config.action_dim, self.policy.config.max_action_dim
        if padded > d:
            x = F.pad(x, (0, padded - d))  # padded dims held at their data value (module docstring)
        flow = self.flow
        actions = flow.action_in_proj(x)
        time = create_sinusoidal_pos_embedding(tau, flow.vlm_with_expert.expert_hidden_size, flow.config.min_period,
                                               flow.config.max_period, device=actions.device).type(actions.dtype)
        suffix = torch.cat([actions, time[:, None, :].expand_as(actions)], dim=2)
        suffix = flow.action_time_mlp_out(F.silu(flow.action_time_mlp_in(suffix)))
        b, n = suffix.shape[:2]
        suffix_pad = torch.ones(b, n, dtype=torch.bool, device=suffix.device)
        # every action token opens an attention block: causal among the actions, all of the prefix visible
        suffix_att = torch.ones(b, n, dtype=suffix.dtype, device=suffix.device)
        masks = torch.cat([pad[:, None, :].expand(b, n, pad.shape[1]), make_att_2d_masks(suffix_pad, suffix_att)],
                          dim=2)
        positions = pad.sum(dim=-1, keepdim=True) + torch.cumsum(suffix_pad, dim=1) - 1
        out, _ = flow.vlm_with_expert.forward(attention_mask=masks, position_ids=positions, past_key_values=cache,
                                              inputs_embeds=[None, suffix], use_cache=flow.config.use_cache,
                                              fill_kv_cache=False)
        return flow.action_out_proj(out[1][:, -flow.config.chunk_size:].to(torch.float32))[..., :d]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each action-expert layer's MLP in the backward pass instead of keeping its
        activations. LeRobot runs the expert's layers in its own loop with no checkpointing hook, so
        the MLPs (the widest activations, 3 × the intermediate width per action token) are what can be
        wrapped without copying that loop; bench/smolvla_cost.py measures what it saves."""
        from torch.utils.checkpoint import checkpoint

        def checkpointed(forward):
            def run(x):
                return checkpoint(forward, x, use_reentrant=False) if torch.is_grad_enabled() else forward(x)
            return run

        for layer in self.flow.vlm_with_expert.lm_expert.layers:
            if not getattr(layer.mlp, '_stepnft_checkpointed', False):
                layer.mlp.forward = checkpointed(layer.mlp.forward)
                layer.mlp._stepnft_checkpointed = True

    def action_expert_parameters(self) -> list[nn.Parameter]:
        flow = self.flow
        modules = (flow.vlm_with_expert.lm_expert, flow.action_in_proj, flow.action_out_proj,
                   flow.action_time_mlp_in, flow.action_time_mlp_out)
        return [p for m in modules for p in m.parameters()]

    def save_checkpoint(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        return save_smolvla(directory, self, metadata)


def _step(pipeline, class_name: str):
    for step in pipeline.steps:
        if type(step).__name__ == class_name:
            return step
    raise _error(f'the LeRobot pipeline {getattr(pipeline, "name", "?")!r} has no {class_name}')


# ---- configuration -------------------------------------------------------------------------------

def policy_config_for(cfg, where: str, num_steps: int | None = None, noise_level: float | None = None) -> PolicyConfig:
    """The robot-facing PolicyConfig of a SmolVLAConfig; CheckpointError for features the project's
    observation cannot provide (other inputs than cameras and `observation.state`, non-square images)."""
    from lerobot.configs.types import FeatureType

    cameras, image_shapes, state_dim, other = [], set(), 0, []
    for key, feature in cfg.input_features.items():
        if key.startswith(EMPTY_CAMERA_PREFIX):
            continue  # `empty_cameras` placeholders: SmolVLA pads them itself, no robot sends them
        if feature.type == FeatureType.VISUAL and key.startswith(CAMERA_PREFIX):
            cameras.append(key[len(CAMERA_PREFIX):])
            image_shapes.add(tuple(feature.shape))
        elif feature.type == FeatureType.STATE and key == STATE_KEY:
            state_dim = int(feature.shape[0])
        else:
            other.append(key)
    action = cfg.output_features.get(ACTION_KEY)
    if other or action is None or len(cfg.output_features) != 1:
        raise _error(f'{where}: input features {sorted(other)} / output features {sorted(cfg.output_features)}: '
                     f'this project feeds {STATE_KEY}, {CAMERA_PREFIX}<camera> and the instruction, and reads '
                     f'{ACTION_KEY!r}')
    if not state_dim:
        raise _error(f'{where}: no {STATE_KEY} input feature (SmolVLA needs the robot state)')
    if not cameras or len(cameras) > 3:
        raise _error(f'{where}: {len(cameras)} cameras {cameras}; the project supports 1-3')
    if len(image_shapes) != 1 or next(iter(image_shapes))[0] != 3 or \
            next(iter(image_shapes))[1] != next(iter(image_shapes))[2]:
        raise _error(f'{where}: camera features have shapes {sorted(image_shapes)}; the project needs one '
                     f'square RGB size (3, N, N) for all cameras')
    if getattr(cfg, 'adapt_to_pi_aloha', False):
        raise _error(f'{where}: adapt_to_pi_aloha checkpoints (ALOHA joint flips) are not supported')
    size = next(iter(image_shapes))[1]
    extra = {} if noise_level is None else {'noise_level': noise_level}
    return PolicyConfig(action_dim=int(action.shape[0]), horizon=int(cfg.chunk_size), state_dim=state_dim,
                        camera_names=tuple(cameras), image_size=size, vision_patch=size, use_language=True,
                        num_steps=int(num_steps or cfg.num_steps), **extra)


def resolve_vlm_dir(checkpoint: Path | None, vlm_model_name: str, vlm_dir: str | Path | None = None) -> Path:
    """The local directory with the VLM's config and tokenizer files (module docstring), or a
    CheckpointError that names the missing files and where to put them."""
    if vlm_dir:
        candidates = [Path(vlm_dir)]
    else:  # the checkpoint's own copy first: it is the VLM it was saved with
        candidates = [checkpoint / VLM_SUBDIR] if checkpoint is not None else []
        if os.environ.get(VLM_ENV):
            candidates.append(Path(os.environ[VLM_ENV]))
        if vlm_model_name and Path(vlm_model_name).is_dir():
            candidates.append(Path(vlm_model_name))
    for path in candidates:
        if _vlm_files_missing(path) == []:
            return path
    looked = ', '.join(f'{p} (missing {_vlm_files_missing(p)})' for p in candidates) or 'nowhere'
    where = checkpoint / VLM_SUBDIR if checkpoint is not None else f'${VLM_ENV}'
    raise _error(f'the VLM {vlm_model_name!r} that SmolVLA is built on is not available offline: put its '
                 f'{", ".join(VLM_FILES)} and tokenizer.json (no weights needed; the checkpoint has them) '
                 f'into {where}, or point ${VLM_ENV} at a directory that has them. Looked in: {looked}')


def _vlm_files_missing(path: Path) -> list[str]:
    if not path.is_dir():
        return list(VLM_FILES) + ['tokenizer.json']
    missing = [f for f in VLM_FILES if not (path / f).is_file()]
    if not any((path / f).is_file() for f in ('tokenizer.json', 'vocab.json')):
        missing.append('tokenizer.json')
    return missing


# ---- building and loading ------------------------------------------------------------------------

VLM_STUB_SIZES: dict[str, dict[str, Any]] = {
    # SmolVLM2-500M-Video-Instruct's text (SmolLM2-360M) and vision (SigLIP base, patch 16, 512 px) shapes
    'smolvlm2_500m': {'text_config': {'hidden_size': 960, 'intermediate_size': 2560, 'num_hidden_layers': 32,
                                      'num_attention_heads': 15, 'num_key_value_heads': 5, 'head_dim': 64,
                                      'vocab_size': 49280, 'max_position_embeddings': 8192, 'rms_norm_eps': 1e-5,
                                      'rope_theta': 100000.0},
                      'vision_config': {'hidden_size': 768, 'intermediate_size': 3072, 'num_hidden_layers': 12,
                                        'num_attention_heads': 12, 'image_size': 512, 'patch_size': 16},
                      'scale_factor': 4},
    # a few hundred thousand parameters, for tests and smoke runs
    'tiny': {'text_config': {'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 4,
                             'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 16,
                             'max_position_embeddings': 512},
             'vision_config': {'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2,
                               'num_attention_heads': 2, 'image_size': 64, 'patch_size': 16},
             'scale_factor': 2},
}
"""Shapes for write_vlm_stub (random-weight backbones)."""


def write_vlm_stub(path: str | Path, text_config: Mapping[str, Any], vision_config: Mapping[str, Any],
                   scale_factor: int, words: tuple[str, ...] = ()) -> Path:
    """SmolVLM's config, a word-level tokenizer and the image/video processors in `path`, no weights:
    what SmolVLA reads from `vlm_model_name`, enough for a randomly initialized backbone of any size
    (tests, cost benchmarks). text_config: a llama config (its vocab_size may exceed the tokenizer's);
    vision_config: SigLIP's (image_size, patch_size, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        SmolVLMConfig,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special = {'fake_image_token': '<fake_token_around_image>', 'image_token': '<image>',
               'global_image_token': '<global-img>', 'end_of_utterance_token': '<end_of_utterance>'}
    vocab = {t: i for i, t in enumerate(['<pad>', '<unk>', *special.values(), *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', unk_token='<unk>',
                                        extra_special_tokens=special)
    text = {'model_type': 'llama', 'vocab_size': len(vocab), **text_config}
    SmolVLMConfig(text_config=text, vision_config=dict(vision_config), scale_factor=scale_factor,
                  image_token_id=vocab['<image>']).save_pretrained(path)
    tokenizer.save_pretrained(path)
    edge = {'longest_edge': int(vision_config['image_size'])}
    images = SmolVLMImageProcessor(do_image_splitting=False, size=edge, max_image_size=edge,
                                   video_sampling={'max_frames': 1, 'fps': 1, 'video_size': edge})
    tokens_per_image = (int(vision_config['image_size']) // int(vision_config['patch_size']) // scale_factor) ** 2
    SmolVLMProcessor(image_processor=images, tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(),
                     image_seq_len=tokens_per_image).save_pretrained(path)
    return path


def new_smolvla(vlm_dir: str | Path, action_dim: int, state_dim: int, camera_names: tuple[str, ...],
                image_size: int, stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                noise_level: float | None = None, seed: int = 0, **smolvla_kwargs: Any) -> SmolVLABackend:
    """A randomly initialized SmolVLA for the robot's interface (e.g. to SFT from scratch, or a tiny
    one for tests). `stats`: LeRobot normalization stats (default mean 0 / std 1 for state and action);
    `smolvla_kwargs`: SmolVLAConfig fields (chunk_size, num_steps, max_action_dim, ...)."""
    _import_lerobot()
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

    vlm = resolve_vlm_dir(None, str(vlm_dir), vlm_dir)
    kwargs = {'max_state_dim': max(state_dim, 32), 'max_action_dim': max(action_dim, 32), **smolvla_kwargs}
    cfg = SmolVLAConfig(vlm_model_name=str(vlm), load_vlm_weights=False, device='cpu', **kwargs)
    cfg.input_features = {STATE_KEY: PolicyFeature(FeatureType.STATE, (state_dim,)),
                          **{CAMERA_PREFIX + c: PolicyFeature(FeatureType.VISUAL, (3, image_size, image_size))
                             for c in camera_names}}
    cfg.output_features = {ACTION_KEY: PolicyFeature(FeatureType.ACTION, (action_dim,))}
    config = policy_config_for(cfg, 'new SmolVLA', noise_level=noise_level)
    if stats is None:
        stats = {STATE_KEY: {'mean': torch.zeros(state_dim), 'std': torch.ones(state_dim)},
                 ACTION_KEY: {'mean': torch.zeros(action_dim), 'std': torch.ones(action_dim)}}
    with _seeded(seed), _stdout_to_stderr():
        policy = SmolVLAPolicy(cfg)
        pre, post = make_smolvla_pre_post_processors(cfg, {k: dict(v) for k, v in stats.items()})
    return SmolVLABackend(policy.eval(), pre, post, config, vlm, str(vlm))


def load_smolvla(directory: str | Path, expected: PolicyConfig | None = None, device: str | torch.device = 'cpu',
                 vlm_dir: str | Path | None = None) -> tuple[SmolVLABackend, dict[str, Any]]:
    """A LeRobot SmolVLA checkpoint directory (config.json with "type": "smolvla", model.safetensors,
    policy_preprocessor.json / policy_postprocessor.json with their stats files) -> (backend, metadata).

    CheckpointError, before anything is built where possible, for: missing files, another policy type,
    features that do not match `expected`, a missing VLM config/tokenizer, weights that do not fit the
    config (missing, unexpected, wrong shape, non-finite, unreadable file) and missing normalization
    stats. Never a randomly initialized model.
    """
    directory = Path(directory)
    _import_lerobot()
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    for name in (CONFIG_FILE, WEIGHTS_FILE, PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        if not (directory / name).is_file():
            hint = (' (LeRobot < 0.4 checkpoints keep their stats in the weights: convert them with '
                    'lerobot/processor/migrate_policy_normalization.py)' if name.startswith('policy_') else '')
            raise _error(f'{directory}: {name} missing: not a LeRobot {LEROBOT_VERSION} SmolVLA checkpoint{hint}')
    cfg, config, ours = _read_config(directory)
    from stepnft_ros.policy.checkpoint import check_interface  # checkpoint.py imports this module lazily

    check_interface(config, expected, str(directory), origin=' (from its LeRobot features)')
    vlm_model_name = cfg.vlm_model_name
    vlm = resolve_vlm_dir(directory, vlm_model_name, vlm_dir)
    # Built from the VLM's config only; every weight comes from the checkpoint (checked below).
    cfg.vlm_model_name, cfg.load_vlm_weights, cfg.device, cfg.compile_model = str(vlm), False, 'cpu', False
    cfg.use_cache = True  # the prefix is always a KV cache here (an inference setting, not a weight)
    try:
        with _stdout_to_stderr():
            policy = SmolVLAPolicy(cfg)
    except Exception as err:
        raise _error(f'{directory}: cannot build SmolVLA from its config and the VLM files in {vlm} ({err})') from err
    load_weights_strict(policy, directory / WEIGHTS_FILE)
    pre, post = _load_processors(directory, vlm)
    _check_stats(directory, pre, post)
    backend = SmolVLABackend(policy.eval(), pre, post, config, vlm, vlm_model_name)
    return backend.to(device), ours.get('metadata', {})


def load_weights_strict(model: nn.Module, path: Path) -> None:
    """Load a safetensors file into `model`, raising CheckpointError unless every weight is there,
    none is extra, every shape fits and every value is finite (LeRobot's own loader only warns and
    leaves the missing ones random). Tied weights stored once count as present."""
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for torn/garbage files
        raise _error(f'{path}: cannot read tensors ({err})') from err
    state = model.state_dict()
    groups: dict[int, set[str]] = {}
    for name, t in state.items():
        groups.setdefault(t.data_ptr(), set()).add(name)
    from stepnft_ros.policy.checkpoint import check_weights  # checkpoint.py imports this module lazily

    # a tied weight (one storage, several names) counts as present under any of its names
    check_weights(path, tensors, state, missing=sorted(
        n for n in state if n not in tensors and not (groups[state[n].data_ptr()] & tensors.keys())))
    model.load_state_dict(tensors, strict=False)  # strict=False only for the tied names checked above


def _load_processors(directory: Path, vlm: Path):
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    try:
        pre = PolicyProcessorPipeline.from_pretrained(
            str(directory), config_filename=PREPROCESSOR_FILE, local_files_only=True,
            overrides={'tokenizer_processor': {'tokenizer_name': str(vlm)}, 'device_processor': {'device': 'cpu'}})
        post = PolicyProcessorPipeline.from_pretrained(
            str(directory), config_filename=POSTPROCESSOR_FILE, local_files_only=True,
            overrides={'device_processor': {'device': 'cpu'}}, to_transition=policy_action_to_transition,
            to_output=transition_to_policy_action)
    except Exception as err:  # missing step state files, unknown steps, bad JSON
        raise _error(f'{directory}: cannot load its LeRobot pre/post-processors ({err})') from err
    return pre, post


def _check_stats(directory: Path, pre, post) -> None:
    """LeRobot skips normalization silently for a feature without stats: refuse that instead."""
    from lerobot.configs.types import FeatureType

    for pipeline, step_name, keys in ((pre, 'NormalizerProcessorStep', ((STATE_KEY, FeatureType.STATE),
                                                                          (ACTION_KEY, FeatureType.ACTION))),
                                      (post, 'UnnormalizerProcessorStep', ((ACTION_KEY, FeatureType.ACTION),))):
        step = _step(pipeline, step_name)
        for key, kind in keys:
            mode = step.norm_map.get(kind)
            needed = _STATS_FOR_MODE.get(getattr(mode, 'value', mode), ())
            have = step._tensor_stats.get(key, {})
            missing = [s for s in needed if s not in have]
            if missing:
                raise _error(f'{directory}: {pipeline.name} has no {"/".join(missing)} statistics for {key!r} '
                             f'({getattr(mode, "value", mode)} normalization)')


def _read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / METADATA_FILE
    if not path.is_file():
        return {}  # a checkpoint straight from LeRobot
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _error(f'{path}: unreadable ({err})') from err
    if not isinstance(data, dict) or data.get('format') != FORMAT:
        raise _error(f'{path}: format {data.get("format") if isinstance(data, dict) else None!r}, expected {FORMAT!r}')
    return data


def read_smolvla_header(directory: str | Path) -> tuple[PolicyConfig, dict[str, Any]]:
    """PolicyConfig and metadata of a SmolVLA checkpoint without building the model."""
    _import_lerobot()
    _, config, ours = _read_config(Path(directory))
    return config, ours.get('metadata', {})


def _read_config(directory: Path):
    """(LeRobot SmolVLAConfig, our PolicyConfig of it, stepnft.json's content) of a checkpoint."""
    from lerobot.configs.policies import PreTrainedConfig

    try:
        cfg = PreTrainedConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # draccus raises its own parsing errors
        raise _error(f'{directory / CONFIG_FILE}: not a readable LeRobot policy config ({err})') from err
    if cfg.type != 'smolvla':
        raise _error(f'{directory}: LeRobot policy type {cfg.type!r}; supported: smolvla')
    ours = _read_metadata(directory)
    config = policy_config_for(cfg, str(directory), num_steps=ours.get('num_steps'),
                               noise_level=ours.get('noise_level'))
    return cfg, config, ours


# ---- saving ----------------------------------------------------------------------------------------

def save_smolvla(directory: str | Path, backend: SmolVLABackend, metadata: dict[str, Any] | None = None) -> Path:
    """Write a LeRobot-loadable checkpoint (config.json, model.safetensors, pre/post-processors) plus
    the VLM's config/tokenizer files in vlm/ and our stepnft.json; every file written atomically.
    `vlm_model_name` keeps the name the checkpoint had (e.g. the hub id)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_step = _step(backend.preprocessor, 'TokenizerProcessorStep')
    # Staged next to the target (same filesystem): each file is then renamed into place, not copied
    # (a full-size model.safetensors is ~1 GB).
    with tempfile.TemporaryDirectory(prefix=f'.{directory.name}.', suffix='.tmp', dir=directory.parent) as tmp:
        tmp = Path(tmp)
        names = (backend.policy.config.vlm_model_name, tokenizer_step.tokenizer_name)
        backend.policy.config.vlm_model_name = tokenizer_step.tokenizer_name = backend.vlm_model_name
        try:
            backend.policy.save_pretrained(tmp)
            backend.preprocessor.save_pretrained(tmp)
            backend.postprocessor.save_pretrained(tmp)
        finally:
            backend.policy.config.vlm_model_name, tokenizer_step.tokenizer_name = names
        for name in VLM_COPIED:
            if (backend.vlm_dir / name).is_file():
                (tmp / VLM_SUBDIR).mkdir(exist_ok=True)
                shutil.copyfile(backend.vlm_dir / name, tmp / VLM_SUBDIR / name)
        ours = {'format': FORMAT, 'num_steps': backend.config.num_steps, 'noise_level': backend.config.noise_level,
                'metadata': metadata or {}}
        (tmp / METADATA_FILE).write_text(json.dumps(ours, indent=2, sort_keys=True) + '\n')
        # Weights last: a reader that finds model.safetensors finds the rest too.
        files = sorted((p for p in tmp.rglob('*') if p.is_file()), key=lambda p: p.name == WEIGHTS_FILE)
        for path in files:
            target = directory / path.relative_to(tmp)
            target.parent.mkdir(exist_ok=True)
            fsync_path(path)
            os.replace(path, target)
            fsync_path(target.parent)
    return directory / WEIGHTS_FILE


# ---- helpers ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global generator for LeRobot's initializers, restoring the caller's state after."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@contextlib.contextmanager
def _stdout_to_stderr():
    """LeRobot prints progress ("Reducing the number of VLM layers ...") to stdout, where the CLI
    writes its JSON reports: send it to stderr while a model is built."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
