"""π0-style flow-matching VLA: a prefix encoder (vision + language + state) and an action expert.

Time convention (ALGORITHM.md §1): τ = 1 is pure noise, τ = 0 is data; the network predicts the
velocity v ≈ ε − A of the interpolant A^τ = τ·ε + (1 − τ)·A.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stepnft_ros.policy.config import PolicyConfig
from stepnft_ros.policy.normalization import Normalizer
from stepnft_ros.policy.types import ObservationBatch


class VisionEncoder(nn.Module):
    """Patchifies each camera with a strided convolution: (B, C, 3, h, w) uint8 -> (B, C·N, d)."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        n_side = cfg.image_size // cfg.vision_patch
        self.patchify = nn.Sequential(
            nn.Conv2d(3, cfg.d_model // 2, kernel_size=3, padding=1), nn.GELU(),
            nn.Conv2d(cfg.d_model // 2, cfg.d_model, kernel_size=cfg.vision_patch, stride=cfg.vision_patch),
        )
        self.patch_pos = nn.Parameter(torch.randn(1, n_side * n_side, cfg.d_model) * 0.02)
        self.camera_embed = nn.Parameter(torch.randn(len(cfg.camera_names), 1, cfg.d_model) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c = images.shape[:2]
        pixels = images.flatten(0, 1).float() / 127.5 - 1.0                 # (B·C, 3, h, w) in [-1, 1]
        tokens = self.patchify(pixels).flatten(2).transpose(1, 2)          # (B·C, N, d)
        tokens = tokens + self.patch_pos
        tokens = tokens.view(b, c, -1, tokens.shape[-1]) + self.camera_embed  # (B, C, N, d)
        return tokens.flatten(1, 2)


class TextEncoder(nn.Module):
    """Instruction -> (B, T, d) tokens + (B, T) padding mask, through a transformers encoder.

    Without a pretrained path it builds a small BERT from a local config with a byte-level
    tokenizer (ByT5's needs no vocabulary file), so nothing is downloaded.
    """

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        import transformers  # heavy import, only for language-conditioned policies

        if cfg.text_encoder_path:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.text_encoder_path, local_files_only=True)
            self.encoder = transformers.AutoModel.from_pretrained(cfg.text_encoder_path, local_files_only=True)
            hidden = self.encoder.config.hidden_size
        else:
            self.tokenizer = transformers.ByT5Tokenizer()
            hidden = cfg.d_model
            bert_cfg = transformers.BertConfig(
                vocab_size=len(self.tokenizer), hidden_size=hidden, num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.n_heads, intermediate_size=4 * hidden,
                max_position_embeddings=cfg.max_text_tokens, hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout)
            self.encoder = transformers.BertModel(bert_cfg, add_pooling_layer=False)
        self.project = nn.Linear(hidden, cfg.d_model)
        self.max_tokens = cfg.max_text_tokens

    def forward(self, instructions: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.project.weight.device
        tok = self.tokenizer(list(instructions), padding=True, truncation=True,
                             max_length=self.max_tokens, return_tensors='pt').to(device)
        hidden = self.encoder(input_ids=tok['input_ids'], attention_mask=tok['attention_mask']).last_hidden_state
        return self.project(hidden), tok['attention_mask'] == 0


class PrefixEncoder(nn.Module):
    """Observation -> prefix tokens (B, P, d) and key-padding mask (B, P) (True = padding)."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.vision = VisionEncoder(cfg) if cfg.camera_names else None
        self.text = TextEncoder(cfg) if cfg.use_language else None
        self.state = nn.Sequential(nn.Linear(cfg.state_dim, cfg.d_model), nn.GELU(),
                                   nn.Linear(cfg.d_model, cfg.d_model)) if cfg.state_dim else None
        self.mixer = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, 4 * cfg.d_model, cfg.dropout,
                                       activation='gelu', batch_first=True, norm_first=True),
            cfg.prefix_layers, enable_nested_tensor=False) if cfg.prefix_layers else None

    def forward(self, obs: ObservationBatch, normalizer: Normalizer) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, masks = [], []
        b = obs.batch_size
        if self.state is not None:
            tokens.append(self.state(normalizer.normalize_state(obs.state)).unsqueeze(1))
        if self.vision is not None:
            tokens.append(self.vision(obs.images))
        for t in tokens:
            masks.append(torch.zeros(b, t.shape[1], dtype=torch.bool, device=t.device))
        if self.text is not None:
            text_tokens, text_pad = self.text(obs.instructions)
            tokens.append(text_tokens)
            masks.append(text_pad)
        prefix, pad = torch.cat(tokens, 1), torch.cat(masks, 1)
        if self.mixer is not None:
            prefix = self.mixer(prefix, src_key_padding_mask=pad)
        return prefix, pad


def time_embedding(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of τ ∈ [0, 1]: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=tau.device))
    angles = tau[:, None] * freqs[None] * math.pi
    return torch.cat([angles.sin(), angles.cos()], -1)


class ActionExpert(nn.Module):
    """(A^τ (B, H, D), τ (B,), prefix (B, P, d)) -> v (B, H, D).

    Each action token mixes its action with the time embedding (π0's MLP), attends to the other
    action tokens and cross-attends to the prefix.
    """

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.action_in = nn.Linear(cfg.action_dim, d)
        self.time_mlp = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d))
        self.position = nn.Parameter(torch.randn(1, cfg.horizon, d) * 0.02)
        self.blocks = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d, cfg.n_heads, 4 * d, cfg.dropout, activation='gelu',
                                       batch_first=True, norm_first=True),
            cfg.expert_layers)
        self.norm = nn.LayerNorm(d)
        self.action_out = nn.Linear(d, cfg.action_dim)
        self.d_model = d

    def forward(self, x: torch.Tensor, tau: torch.Tensor, prefix: torch.Tensor,
                prefix_pad: torch.Tensor) -> torch.Tensor:
        h = self.action_in(x)                                                  # (B, H, d)
        t = time_embedding(tau, self.d_model)[:, None].expand(-1, h.shape[1], -1)
        h = self.time_mlp(torch.cat([h, t], -1)) + self.position
        h = self.blocks(h, prefix, memory_key_padding_mask=prefix_pad)
        return self.action_out(self.norm(h))


class FlowVLA(nn.Module):
    """The policy network v_θ(A^τ, τ, o), split so the prefix is computed once per observation."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.normalizer = Normalizer(cfg.state_dim, cfg.action_dim)
        self.prefix_encoder = PrefixEncoder(cfg)
        self.action_expert = ActionExpert(cfg)

    def encode_prefix(self, obs: ObservationBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, d) prefix tokens and (B, P) padding mask; reuse them across the K solver steps."""
        return self.prefix_encoder(obs, self.normalizer)

    def velocity(self, x: torch.Tensor, tau: torch.Tensor,
                 prefix: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """v_θ(x, τ, o): x (B, H, D) normalized actions, τ (B,) -> (B, H, D)."""
        return self.action_expert(x, tau, *prefix)

    def action_expert_parameters(self) -> list[nn.Parameter]:
        """What π-StepNFT trains by default (the prefix stays frozen, as in the paper)."""
        return list(self.action_expert.parameters())
