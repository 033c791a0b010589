"""Supervised flow matching (behaviour cloning) from demonstrations (ALGORITHM.md §1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from stepnft_ros.policy.backend import FlowBackend
from stepnft_ros.policy.types import ObservationBatch

TIME_DISTRIBUTIONS = ('beta', 'uniform')


def sample_flow_time(n: int, distribution: str = 'beta', generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """τ ~ Beta(1.5, 1)·0.999 + 0.001 (π0's choice) or U(0.001, 1): (n,).

    Beta(α, 1) is sampled as U^(1/α), U ~ U(0, 1), which a seeded generator reproduces exactly.
    """
    u = torch.rand(n, generator=generator, device=device)
    if distribution == 'beta':
        return u.pow(1.0 / 1.5) * 0.999 + 0.001
    if distribution == 'uniform':
        return u * 0.999 + 0.001
    raise ValueError(f'time distribution must be one of {TIME_DISTRIBUTIONS}, got {distribution!r}')


def flow_matching_loss(model: FlowBackend, obs: ObservationBatch | None, actions: torch.Tensor,
                       mask: torch.Tensor | None = None, distribution: str = 'beta',
                       generator: torch.Generator | None = None, prefix: Any = None) -> torch.Tensor:
    """E ||v_θ(A^τ, τ, o) − (ε − A)||² with A^τ = τ·ε + (1 − τ)·A.

    actions: (B, H, D) normalized chunks; mask: (B, H) 1 for real actions, 0 for padding past
    the episode end; prefix: model.encode_prefix(obs) when the caller has it (e.g. encoded without
    gradient for a frozen prefix; obs is then not needed), else it is encoded here.
    """
    b = actions.shape[0]
    eps = torch.randn(actions.shape, generator=generator, device=actions.device)
    tau = sample_flow_time(b, distribution, generator, actions.device)
    a_tau = tau[:, None, None] * eps + (1.0 - tau[:, None, None]) * actions
    v = model.velocity(a_tau, tau, model.encode_prefix(obs) if prefix is None else prefix)
    err = F.mse_loss(v, eps - actions, reduction='none').mean(-1)  # (B, H)
    if mask is None:
        return err.mean()
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass(frozen=True)
class SFTConfig:
    """Behaviour-cloning schedule."""

    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 256
    """Chunks per step."""
    lr: float = 3e-4
    """AdamW learning rate (cosine-decayed to 10%)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    time_distribution: str = 'beta'
    """'beta' (π0) or 'uniform'."""
    seed: int = 0
    """Seeds batch sampling and noise."""
    observation_lag: int = 0
    """Pair each chunk with the observation this many control steps before its first action: a policy
    for a loop whose observations are that old when its actions start (about one step over a ROS graph)."""
    state_dropout: float = 0.0
    """Probability with which a training sample's state_dropout_dims are set to zero. On the joint
    velocities it keeps the policy from learning to continue its own motion (in planner demos the
    velocities predict the next action almost perfectly), so it must read the goal to move from standstill."""
    state_dropout_dims: tuple[int, ...] = ()
    """State dimensions state_dropout zeroes (e.g. a ManiSkill state's joint velocities, [n, 2n) for n joints)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.state_dropout < 1.0 or (self.state_dropout > 0.0) != bool(self.state_dropout_dims):
            raise ValueError(f'state_dropout must be in [0, 1) and > 0 exactly when state_dropout_dims are given, '
                             f'got {self.state_dropout} and {self.state_dropout_dims}')
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f'steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}')
        if self.observation_lag < 0:
            raise ValueError(f'observation_lag must be >= 0, got {self.observation_lag}')
        if not self.lr > 0:
            raise ValueError(f'lr must be > 0, got {self.lr}')
        if self.time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f'time_distribution must be one of {TIME_DISTRIBUTIONS}, got {self.time_distribution!r}')


BatchFn = Callable[[torch.Tensor], tuple[ObservationBatch, torch.Tensor, torch.Tensor]]


def train_sft(model: FlowBackend, num_samples: int, get_batch: BatchFn, cfg: SFTConfig,
              log: Callable[[int, float], None] | None = None) -> list[float]:
    """Train all of `model` by flow matching. `get_batch(indices)` returns (obs, actions (B,H,D)
    normalized, mask (B,H)). Returns the loss of every step."""
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=0.1 * cfg.lr)
    model.train()
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(0, num_samples, (min(cfg.batch_size, num_samples),), generator=generator)
        obs, actions, mask = get_batch(idx)
        loss = flow_matching_loss(model, obs, actions, mask, cfg.time_distribution, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1])
    model.eval()
    return losses
