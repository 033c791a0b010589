"""π-StepNFT: step-wise negative-aware fine-tuning (ALGORITHM.md §4, ablations §5).

One velocity evaluation per stored decision; no critic, no chain log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from stepnft_ros.policy.modeling import FlowVLA
from stepnft_ros.policy.sampler import grid_at, sde_mean, sde_sigma, sde_std
from stepnft_ros.policy.types import Trace

if TYPE_CHECKING:  # episodes imports algo.labels; a runtime import here would be circular
    from stepnft_ros.episodes.schema import DecisionBatch

LOSS_FORMS = ('ranking', 'weighted')
TARGETS = ('next_step', 'terminal')
ROLLOUTS = ('sde', 'ode')


@dataclass(frozen=True)
class StepNFTConfig:
    """Hyper-parameters of the update (defaults: the paper's, except lr for small models)."""

    beta: float = 1.0
    """β: mirror distance of the branches v± = v_old ± β·Δv."""
    delta_max: float = 0.5
    """δ_max: trust region on ||Δv|| (per sample, over the whole chunk)."""
    eps_s: float = 1e-4
    """ε_s: added to the step variance s² in the step error."""
    b: float = 1.0
    """b: temperature of the logistic ranking loss."""
    lambda_kl: float = 1e-4
    """λ_KL: weight of mean ||v_θ − v_old||²."""
    lr: float = 1e-4
    """AdamW learning rate (paper: 1e-5 at π0 scale; small models need more)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    epochs: int = 2
    """Passes over each batch of on-policy episodes (paper: 2–5)."""
    minibatch_size: int = 256
    """Decisions per gradient step."""
    loss_form: str = 'ranking'
    """'ranking' (push–pull logistic) or 'weighted' (Diffusion-NFT style r·E⁺ + (1 − r)·E⁻)."""
    target: str = 'next_step'
    """'next_step' (x_{k*+1}) or 'terminal' (supervise x̂0 against the executed chunk)."""
    rollout: str = 'sde'
    """Exploration sampler: 'sde' (Flow-SDE) or 'ode' (no exploration noise)."""
    step_selection: str = 'uniform'
    """'uniform' random k* per decision, or a fixed step as a digit string, e.g. '0'."""
    train_prefix: bool = False
    """Also train the prefix encoder (the paper freezes it and trains the action expert)."""

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        check(self.beta > 0, f'beta must be > 0, got {self.beta}')
        check(self.delta_max > 0, f'delta_max must be > 0, got {self.delta_max}')
        check(self.eps_s >= 0, f'eps_s must be >= 0, got {self.eps_s}')
        check(self.b > 0, f'b must be > 0, got {self.b}')
        check(self.lambda_kl >= 0, f'lambda_kl must be >= 0, got {self.lambda_kl}')
        check(self.lr > 0, f'lr must be > 0, got {self.lr}')
        check(self.grad_clip > 0, f'grad_clip must be > 0, got {self.grad_clip}')
        check(self.epochs >= 1, f'epochs must be >= 1, got {self.epochs}')
        check(self.minibatch_size >= 1, f'minibatch_size must be >= 1, got {self.minibatch_size}')
        check(self.loss_form in LOSS_FORMS, f'loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}')
        check(self.target in TARGETS, f'target must be one of {TARGETS}, got {self.target!r}')
        check(self.rollout in ROLLOUTS, f'rollout must be one of {ROLLOUTS}, got {self.rollout!r}')
        check(self.step_selection == 'uniform' or self.step_selection.isdigit(),
              f"step_selection must be 'uniform' or a step index, got {self.step_selection!r}")

    def fixed_step(self, num_steps: int) -> int | None:
        """k* for fixed step selection (None for uniform); validated against K."""
        if self.step_selection == 'uniform':
            return None
        k = int(self.step_selection)
        if k >= num_steps:
            raise ValueError(f'step_selection {k} is outside the K = {num_steps} solver steps')
        return k


def trust_region(delta_v: torch.Tensor, delta_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Δv ← Δv·min(1, δ_max/||Δv||), norm over each sample's whole chunk: (B, H, D) -> (B, H, D), clipped (B,)."""
    norm = delta_v.flatten(1).norm(dim=1)
    scale = (delta_max / norm.clamp_min(1e-12)).clamp(max=1.0)
    return delta_v * scale[:, None, None], norm > delta_max


def mirrored_branches(v_old: torch.Tensor, delta_v: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """v⁺ = v_old + β·Δv, v⁻ = v_old − β·Δv."""
    return v_old + beta * delta_v, v_old - beta * delta_v


def step_error(target: torch.Tensor, prediction: torch.Tensor, s: torch.Tensor, eps_s: float) -> torch.Tensor:
    """E = Σ (target − prediction)² / (s² + ε_s), summed over the chunk: (B, H, D), s (B,) -> (B,).

    The variance is detached: it is a property of the sampler, not something to learn.
    """
    variance = s.detach() ** 2 + eps_s
    return ((target - prediction) ** 2).flatten(1).sum(1) / variance


def push_pull_loss(e_plus: torch.Tensor, e_minus: torch.Tensor, y: torch.Tensor, b: float) -> torch.Tensor:
    """ℓ = softplus((b/2)·y·(E⁺ − E⁻)): (B,)."""
    return F.softplus(0.5 * b * y * (e_plus - e_minus))


def weighted_loss(e_plus: torch.Tensor, e_minus: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Ablation `loss_form='weighted'`: ℓ = r·E⁺ + (1 − r)·E⁻: (B,)."""
    return r * e_plus + (1.0 - r) * e_minus


def branch_errors(v_theta: torch.Tensor, trace: Trace, cfg: StepNFTConfig,
                  num_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E⁺, E⁻ (B,) of the mirrored branches, and which samples hit the trust region (B,)."""
    delta_v, clipped = trust_region(v_theta - trace.v_old, cfg.delta_max)
    v_plus, v_minus = mirrored_branches(trace.v_old, delta_v, cfg.beta)
    tau_k, tau_next, delta_k = grid_at(trace.k, num_steps)
    sigma_k = sde_sigma(tau_k, tau_next, trace.a)
    s_k = sde_std(sigma_k, delta_k)
    if cfg.target == 'next_step':
        e_plus = step_error(trace.x_next, sde_mean(trace.x_k, v_plus, tau_k, tau_next, sigma_k), s_k, cfg.eps_s)
        e_minus = step_error(trace.x_next, sde_mean(trace.x_k, v_minus, tau_k, tau_next, sigma_k), s_k, cfg.eps_s)
    else:  # 'terminal': x̂0^± = x_k − τ_k·v^± against the executed chunk
        tau = tau_k[:, None, None]
        e_plus = step_error(trace.x_final, trace.x_k - tau * v_plus, s_k, cfg.eps_s)
        e_minus = step_error(trace.x_final, trace.x_k - tau * v_minus, s_k, cfg.eps_s)
    return e_plus, e_minus, clipped


def stepnft_loss(v_theta: torch.Tensor, trace: Trace, y: torch.Tensor, r: torch.Tensor,
                 weight: torch.Tensor, cfg: StepNFTConfig, num_steps: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The π-StepNFT objective for one (mini)batch.

    v_theta: (B, H, D) v_θ(x_k*, τ_k*, o) with the current θ; y: (B,) ±1; r: (B,) ∈ [0, 1];
    weight: (B,) per-episode averaging weights (0 masks a decision). The weighted mean
    Σ w·ℓ / Σ w equals "mean over decisions of each episode, then over episodes" on a full batch.
    Returns the loss and plain-float metrics.
    """
    e_plus, e_minus, clipped = branch_errors(v_theta, trace, cfg, num_steps)
    if cfg.loss_form == 'ranking':
        per_sample = push_pull_loss(e_plus, e_minus, y, cfg.b)
    else:
        per_sample = weighted_loss(e_plus, e_minus, r)
    kl = (v_theta - trace.v_old).flatten(1).pow(2).sum(1)  # ||v_θ − v_old||² per sample
    total_weight = weight.sum().clamp_min(1e-12)
    policy_loss = (weight * per_sample).sum() / total_weight
    kl_term = (weight * kl).sum() / total_weight
    loss = policy_loss + cfg.lambda_kl * kl_term
    with torch.no_grad():
        valid = weight > 0
        n_valid = valid.sum().clamp_min(1)
        # the model ranks the observed transition correctly when y·(E⁺ − E⁻) < 0
        correct = (y * (e_plus - e_minus) < 0) & valid
        metrics = {
            'loss': loss.item(), 'policy_loss': policy_loss.item(), 'kl': kl_term.item(),
            'preference_accuracy': (correct.sum() / n_valid).item(),
            'e_plus': e_plus[valid].mean().item() if valid.any() else 0.0,
            'e_minus': e_minus[valid].mean().item() if valid.any() else 0.0,
            'clip_fraction': ((clipped & valid).sum() / n_valid).item(),
        }
    return loss, metrics


class StepNFTTrainer:
    """Applies π-StepNFT updates to a FlowVLA from batches of finished on-policy episodes."""

    def __init__(self, model: FlowVLA, cfg: StepNFTConfig, seed: int = 0) -> None:
        self.model = model
        self.cfg = cfg
        self.params = list(model.parameters()) if cfg.train_prefix else model.action_expert_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0

    def update(self, batch: DecisionBatch) -> dict[str, float]:
        """`cfg.epochs` passes of shuffled minibatches; returns metrics averaged over gradient steps."""
        model, cfg = self.model, self.cfg
        device = next(model.parameters()).device
        num_steps = model.config.num_steps
        trace = batch.trace.to(device)
        y, r, weight = batch.y.to(device), batch.r.to(device), batch.weight.to(device)
        obs = batch.obs.to(device)
        prefix = None
        if not cfg.train_prefix:  # frozen prefix: encode every observation once per update
            with torch.no_grad():
                prefix = model.encode_prefix(obs)
        model.train()
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(len(batch), generator=self.generator).to(device)
            for start in range(0, len(batch), cfg.minibatch_size):
                idx = order[start:start + cfg.minibatch_size]
                if weight[idx].sum() <= 0:
                    continue
                mb_prefix = (prefix[0][idx], prefix[1][idx]) if prefix is not None \
                    else model.encode_prefix(obs.index(idx.cpu()).to(device))
                mb_trace = trace.index(idx)
                tau_k = grid_at(mb_trace.k, num_steps)[0]
                v_theta = model.velocity(mb_trace.x_k, tau_k, mb_prefix)  # the one forward pass
                loss, metrics = stepnft_loss(v_theta, mb_trace, y[idx], r[idx], weight[idx], cfg, num_steps)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                metrics['grad_norm'] = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip).item()
                self.optimizer.step()
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
        model.eval()
        self.updates += 1
        out = {key: value / max(steps, 1) for key, value in sums.items()}
        out['gradient_steps'] = float(steps)
        out['decisions'] = float(len(batch))
        out['episodes'] = float(batch.n_episodes)
        return out

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW moments and step counts as flat tensors (safetensors-friendly) for resumable training."""
        out = {}
        for index, state in self.optimizer.state_dict()['state'].items():
            for key, value in state.items():
                out[f'{index}.{key}'] = torch.as_tensor(value).detach().cpu().clone()
        return out

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of optimizer_tensors (ValueError if they do not fit this trainer's parameters)."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            index, key = name.split('.', 1)
            state.setdefault(int(index), {})[key] = value
        full = self.optimizer.state_dict()
        if set(state) - set(range(len(self.params))):
            raise ValueError(f'optimizer state for {len(state)} parameters, the trainer has {len(self.params)}')
        full['state'] = state
        self.optimizer.load_state_dict(full)

