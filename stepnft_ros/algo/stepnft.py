"""π-StepNFT: step-wise negative-aware fine-tuning (ALGORITHM.md §4, ablations §5), and the two
baselines it is measured against on the same rollouts and traces.

One velocity evaluation per stored decision; no critic, no chain log-likelihood. The baselines:
'grpo' (Flow-SDE policy gradient with the Gaussian log-likelihood of the recorded solver step,
a clipped ratio and group-relative advantages) and 'filtered_bc' (flow matching on the executed
actions of the successful rollouts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from stepnft_ros.algo.sft import flow_matching_loss
from stepnft_ros.policy.backend import FlowBackend, index_prefix
from stepnft_ros.policy.sampler import check_step_selection, grid_at, recorded_step, sde_mean, sde_sigma, sde_std
from stepnft_ros.policy.types import Trace

if TYPE_CHECKING:  # episodes imports algo.labels; a runtime import here would be circular
    from stepnft_ros.episodes.schema import DecisionBatch, HumanBatch

LOSS_FORMS = ('ranking', 'weighted')
TARGETS = ('next_step', 'terminal')
ROLLOUTS = ('sde', 'ode')
ALGOS = ('stepnft', 'grpo', 'filtered_bc')
EMA_PREFIX = 'ema.'  # the weight average's tensors among the trainer's saved state


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
    microbatch_size: int = 0
    """Decisions per forward/backward pass (0: the whole minibatch at once). A minibatch's micro-batch
    gradients are summed, each scaled to its share of the minibatch's weight, before its one optimizer
    step: the same update up to float summation order, with activation memory bounded by the
    micro-batch (what a 450 M+ backbone needs). A frozen prefix is then encoded per micro-batch
    instead of once per update, trading one prefix pass per epoch for not holding every decision's
    prefix (SmolVLA's KV cache is megabytes per decision)."""
    loss_form: str = 'ranking'
    """'ranking' (push–pull logistic) or 'weighted' (Diffusion-NFT style r·E⁺ + (1 − r)·E⁻)."""
    target: str = 'next_step'
    """'next_step' (x_{k*+1}) or 'terminal' (supervise x̂0 against the executed chunk)."""
    rollout: str = 'sde'
    """Exploration sampler: 'sde' (Flow-SDE) or 'ode' (no exploration noise)."""
    step_selection: str = 'uniform'
    """'uniform' random k* per decision, 'last' (k* = K − 1, the step whose noise lands on the action
    itself), or a fixed step as a digit string, e.g. '0'."""
    train_prefix: bool = False
    """Also train the prefix encoder (the paper freezes it and trains the action expert)."""
    executed_only: bool = True
    """Loss, KL and metrics over the executed actions of each chunk only (the rest never reached the
    robot, so their sampled noise carries no signal); False: the whole chunk (ablation)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    """AdamW betas (the paper's (0.9, 0.95))."""
    algo: str = 'stepnft'
    """'stepnft', or a baseline on the same traces: 'grpo' (clipped likelihood ratio of the recorded
    Flow-SDE step) or 'filtered_bc' (flow matching on the successful episodes' executed actions)."""
    clip_ratio: float = 0.2
    """'grpo': PPO clip ε on the likelihood ratio."""
    target_kl: float = 0.0
    """Stop an update's remaining minibatches once the mean ||v_θ − v_old||² per executed element
    exceeds this (0: never). Unlike δ_max, this bounds how far one update moves the policy."""
    holdout_fraction: float = 0.0
    """Episodes of each batch kept out of its update (0: none). After the update, the preference
    accuracy on their decisions (`holdout_preference_accuracy`) tells a gradient that generalizes
    (> 0.5) from one that fits the batch's noise (≈ 0.5)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights, ema ← d·ema + (1 − d)·θ after each update (0: none;
    the first update starts it at θ). Rollouts and the loss stay on θ (on-policy); the average is a candidate
    for evaluation and deployment, with each update's noise averaged over about 1 / (1 − d) updates."""

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
        check(self.microbatch_size >= 0,
              f'microbatch_size must be >= 0 (0: the whole minibatch), got {self.microbatch_size}')
        check(self.loss_form in LOSS_FORMS, f'loss_form must be one of {LOSS_FORMS}, got {self.loss_form!r}')
        check(self.target in TARGETS, f'target must be one of {TARGETS}, got {self.target!r}')
        check(self.rollout in ROLLOUTS, f'rollout must be one of {ROLLOUTS}, got {self.rollout!r}')
        check(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0,
              f'adam betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}')
        check(self.algo in ALGOS, f'algo must be one of {ALGOS}, got {self.algo!r}')
        check(self.clip_ratio > 0, f'clip_ratio must be > 0, got {self.clip_ratio}')
        check(self.target_kl >= 0, f'target_kl must be >= 0, got {self.target_kl}')
        check(0.0 <= self.holdout_fraction < 1.0, f'holdout_fraction must be in [0, 1), got {self.holdout_fraction}')
        check(0.0 <= self.ema_decay < 1.0, f'ema_decay must be in [0, 1), got {self.ema_decay}')
        check_step_selection(self.step_selection)

    def fixed_step(self, num_steps: int) -> int | None:
        """k* for fixed step selection (None for uniform); validated against K."""
        return recorded_step(self.step_selection, num_steps)


def trust_region(delta_v: torch.Tensor, delta_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Δv ← Δv·min(1, δ_max/||Δv||), norm over each sample's whole chunk: (B, H, D) -> (B, H, D), clipped (B,)."""
    norm = delta_v.flatten(1).norm(dim=1)
    scale = (delta_max / norm.clamp_min(1e-12)).clamp(max=1.0)
    return delta_v * scale[:, None, None], norm > delta_max


def mirrored_branches(v_old: torch.Tensor, delta_v: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """v⁺ = v_old + β·Δv, v⁻ = v_old − β·Δv."""
    return v_old + beta * delta_v, v_old - beta * delta_v


def step_error(target: torch.Tensor, prediction: torch.Tensor, s: torch.Tensor, eps_s: float,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """E = Σ (target − prediction)² / (s² + ε_s), summed over the chunk: (B, H, D), s (B,) -> (B,).

    mask: (B, H) 1 for the actions that count (the executed ones), None for all. The variance is
    detached: it is a property of the sampler, not something to learn.
    """
    variance = s.detach() ** 2 + eps_s
    squared = (target - prediction) ** 2
    if mask is not None:
        squared = squared * mask[:, :, None]
    return squared.flatten(1).sum(1) / variance


def executed_mask(executed_from: torch.Tensor, executed: torch.Tensor, horizon: int) -> torch.Tensor:
    """(B,) first executed actions and counts -> (B, H) float mask of the actions each chunk executed."""
    index = torch.arange(horizon, device=executed.device)[None, :]
    return ((index >= executed_from[:, None]) & (index < (executed_from + executed)[:, None])).float()


def batch_mask(batch: DecisionBatch, executed_only: bool) -> torch.Tensor:
    """(B, H) mask of the actions a batch's loss covers: the executed ones, or every action (the ablation)."""
    horizon = batch.trace.x_k.shape[1]
    if executed_only:
        return executed_mask(batch.executed_from, batch.executed, horizon)
    return torch.ones(len(batch), horizon, device=batch.executed.device)


def masked_mean_square(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample mean of delta² over the masked actions' elements: (B, H, D), (B, H) -> (B,)."""
    elements = (mask.sum(1) * delta.shape[-1]).clamp_min(1.0)
    return (delta ** 2 * mask[:, :, None]).flatten(1).sum(1) / elements


def push_pull_loss(e_plus: torch.Tensor, e_minus: torch.Tensor, y: torch.Tensor, b: float) -> torch.Tensor:
    """ℓ = softplus((b/2)·y·(E⁺ − E⁻)): (B,)."""
    return F.softplus(0.5 * b * y * (e_plus - e_minus))


def weighted_loss(e_plus: torch.Tensor, e_minus: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Ablation `loss_form='weighted'`: ℓ = r·E⁺ + (1 − r)·E⁻: (B,)."""
    return r * e_plus + (1.0 - r) * e_minus


def branch_errors(v_theta: torch.Tensor, trace: Trace, cfg: StepNFTConfig, num_steps: int,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E⁺, E⁻ (B,) of the mirrored branches over the masked actions, and which samples hit the
    trust region (B,)."""
    if mask is not None:  # the trust region's norm also covers only what counts
        v_theta = trace.v_old + (v_theta - trace.v_old) * mask[:, :, None]
    delta_v, clipped = trust_region(v_theta - trace.v_old, cfg.delta_max)
    v_plus, v_minus = mirrored_branches(trace.v_old, delta_v, cfg.beta)
    tau_k, tau_next, delta_k = grid_at(trace.k, num_steps)
    sigma_k = sde_sigma(tau_k, tau_next, trace.a)
    s_k = sde_std(sigma_k, delta_k)
    if cfg.target == 'next_step':
        e_plus = step_error(trace.x_next, sde_mean(trace.x_k, v_plus, tau_k, tau_next, sigma_k), s_k, cfg.eps_s, mask)
        e_minus = step_error(trace.x_next, sde_mean(trace.x_k, v_minus, tau_k, tau_next, sigma_k), s_k, cfg.eps_s,
                             mask)
    else:  # 'terminal': x̂0^± = x_k − τ_k·v^± against the executed chunk
        tau = tau_k[:, None, None]
        e_plus = step_error(trace.x_final, trace.x_k - tau * v_plus, s_k, cfg.eps_s, mask)
        e_minus = step_error(trace.x_final, trace.x_k - tau * v_minus, s_k, cfg.eps_s, mask)
    return e_plus, e_minus, clipped


def stepnft_loss(v_theta: torch.Tensor, trace: Trace, y: torch.Tensor, r: torch.Tensor,
                 weight: torch.Tensor, cfg: StepNFTConfig, num_steps: int,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The π-StepNFT objective for one (mini)batch.

    v_theta: (B, H, D) v_θ(x_k*, τ_k*, o) with the current θ; y: (B,) ±1; r: (B,) ∈ [0, 1];
    weight: (B,) per-episode averaging weights (0 masks a decision); mask: (B, H) the actions
    that count (executed_mask), None for the whole chunk. The weighted mean Σ w·ℓ / Σ w equals
    "mean over decisions of each episode, then over episodes" on a full batch.
    Returns the loss and plain-float metrics.
    """
    mask = torch.ones(v_theta.shape[:2], device=v_theta.device) if mask is None else mask
    e_plus, e_minus, clipped = branch_errors(v_theta, trace, cfg, num_steps, mask)
    if cfg.loss_form == 'ranking':
        per_sample = push_pull_loss(e_plus, e_minus, y, cfg.b)
    else:
        per_sample = weighted_loss(e_plus, e_minus, r)
    loss, policy_loss, kl_term = _episode_weighted_objective(per_sample, v_theta, trace.v_old, weight, mask,
                                                             cfg.lambda_kl)
    with torch.no_grad():
        # the model ranks the observed transition correctly when y·(E⁺ − E⁻) < 0; y = 0 has no preference
        correct = (y * (e_plus - e_minus) < 0).float()
        metrics = {'loss': loss.item(), 'policy_loss': policy_loss.item(), 'kl': kl_term.item(),
                   **_weighted_metrics(weight * (y != 0), preference_accuracy=correct),
                   **{f'policy_loss_k{k}': _weighted_metrics(weight * (trace.k == k), value=per_sample)['value']
                      for k in range(num_steps)},
                   **_weighted_metrics(weight, e_plus=e_plus, e_minus=e_minus,
                                       clip_fraction=clipped.float(),
                                       delta_v_norm=((v_theta - trace.v_old) * mask[:, :, None]).flatten(1)
                                       .norm(dim=1))}
    return loss, metrics


def _episode_weighted_objective(per_sample: torch.Tensor, v_theta: torch.Tensor, v_old: torch.Tensor,
                                weight: torch.Tensor, mask: torch.Tensor,
                                lambda_kl: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ w·ℓ / Σ w plus λ_KL times the same average of mean (v_θ − v_old)² over the counted elements:
    (loss, policy term, KL term)."""
    total_weight = weight.sum().clamp_min(1e-12)
    policy_loss = (weight * per_sample).sum() / total_weight
    kl_term = (weight * masked_mean_square(v_theta - v_old, mask)).sum() / total_weight
    return policy_loss + lambda_kl * kl_term, policy_loss, kl_term


def _weighted_metrics(weight: torch.Tensor, **per_sample: torch.Tensor) -> dict[str, float]:
    """Plain mean of each per-sample metric over the decisions with weight > 0."""
    valid = weight > 0
    if not valid.any():
        return {name: 0.0 for name in per_sample}
    return {name: value[valid].float().mean().item() for name, value in per_sample.items()}


def step_log_likelihood(v: torch.Tensor, trace: Trace, num_steps: int, mask: torch.Tensor) -> torch.Tensor:
    """log N(x_{k*+1}; μ_{k*}(x_{k*}, v), s²·I) over the masked actions' elements: (B,).

    The Flow-SDE transition of the recorded step is Gaussian, so this is exact up to the masked
    elements; what policy-gradient flow RL (Flow-GRPO, πRL) differentiates, on one step per decision.
    """
    tau_k, tau_next, delta_k = grid_at(trace.k, num_steps)
    sigma_k = sde_sigma(tau_k, tau_next, trace.a)
    s_k = sde_std(sigma_k, delta_k).clamp_min(1e-6)[:, None, None]
    mu = sde_mean(trace.x_k, v, tau_k, tau_next, sigma_k)
    log_density = -0.5 * ((trace.x_next - mu) / s_k) ** 2 - torch.log(s_k) - 0.5 * math.log(2.0 * math.pi)
    return (log_density * mask[:, :, None]).flatten(1).sum(1)


def grpo_loss(v_theta: torch.Tensor, trace: Trace, advantage: torch.Tensor, weight: torch.Tensor,
              cfg: StepNFTConfig, num_steps: int, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-ratio policy gradient on the recorded step: −min(ρ·A, clip(ρ, 1 ± ε)·A), ρ = p_θ / p_old.

    advantage: (B,) the episode's (group-relative) advantage, i.e. the label y.
    """
    log_ratio = step_log_likelihood(v_theta, trace, num_steps, mask) - step_log_likelihood(
        trace.v_old, trace, num_steps, mask)
    ratio = torch.exp(log_ratio.clamp(max=20.0))  # a wild ratio is clipped anyway; keep exp finite
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_ratio, 1.0 + cfg.clip_ratio)
    per_sample = -torch.minimum(ratio * advantage, clipped_ratio * advantage)
    loss, policy_loss, kl_term = _episode_weighted_objective(per_sample, v_theta, trace.v_old, weight, mask,
                                                             cfg.lambda_kl)
    with torch.no_grad():
        metrics = {'loss': loss.item(), 'policy_loss': policy_loss.item(), 'kl': kl_term.item(),
                   **_weighted_metrics(weight, clip_fraction=((ratio - 1.0).abs() > cfg.clip_ratio).float(),
                                       ratio=ratio, approx_kl=(ratio - 1.0) - log_ratio)}
    return loss, metrics



def require_distributable(cfg: StepNFTConfig) -> None:
    """Data-parallel ranks must draw identical noise; filtered_bc draws its own per minibatch."""
    if cfg.algo == 'filtered_bc':
        raise ValueError("distributed updates are for the stepnft and grpo losses, not 'filtered_bc' (it samples "
                         'noise per minibatch)')


class StepNFTTrainer:
    """Applies π-StepNFT updates (or a baseline's, `cfg.algo`) to a policy backend (FlowVLA, SmolVLA,
    backend.FlowBackend) from batches of finished on-policy episodes.

    Data parallel over torch.distributed (`distributed=True`, after init_process_group; e.g. under
    torchrun, gloo on CPUs, nccl on GPUs): every rank holds the same batch and the same seed,
    computes its share (rank::world_size) of each minibatch's decisions, and the gradients are
    summed across ranks before the step, each rank's loss weighted by its share of the minibatch's
    weight. Every rank then takes the very step one process would take on the whole minibatch (up
    to float summation order), so the ranks stay identical and any one of them can write the
    checkpoint. The velocity passes, the update's cost, are what is split.
    """

    def __init__(self, model: FlowBackend, cfg: StepNFTConfig, seed: int = 0, distributed: bool = False,
                 fsdp: bool = False) -> None:
        self.model = model
        self.cfg = cfg
        distributed = distributed or fsdp
        if distributed:
            require_distributable(cfg)
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.fsdp = fsdp
        if fsdp:  # before the optimizer: it must hold the sharded parameters
            from stepnft_ros.algo.fsdp import shard_policy

            shard_policy(model)
        self.params = list(model.parameters()) if cfg.train_prefix else model.action_expert_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.generator = torch.Generator().manual_seed(seed)
        # its own stream: the behaviour-cloning term leaves the π-StepNFT minibatches as they were
        self.bc_generator = torch.Generator().manual_seed(seed + 7919)
        self.updates = 0
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        if cfg.ema_decay > 0:
            if fsdp:
                raise ValueError('ema_decay needs the whole model on every rank; it does not combine with FSDP')
            self.ema = torch.optim.swa_utils.AveragedModel(
                model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay))
            self.ema.eval()

    @property
    def averaged_model(self) -> FlowBackend | None:
        """The weight average (cfg.ema_decay), a policy like the trained one; None when off."""
        return None if self.ema is None else self.ema.module

    def update(self, batch: DecisionBatch, human: HumanBatch | None = None,
               bc_weight: float = 0.0) -> dict[str, float]:
        """`cfg.epochs` passes of shuffled minibatches; returns metrics averaged over gradient steps.

        human, bc_weight > 0: a person's demonstration chunks (real-arm takeovers). Every gradient step
        adds bc_weight × the flow-matching loss of algo/sft.py on up to a minibatch of them to the
        step's loss (`bc_loss`), so the demonstrations pull on the policy at every step, under the
        same gradient clip and target_kl stop, rather than as separate steps that could undo or be
        undone by the π-StepNFT steps. bc_weight 0 (the paper's mode) leaves the update as it was.
        """
        model, cfg = self.model, self.cfg
        device = next(model.parameters()).device
        num_steps = model.config.num_steps
        batch = batch.to(device)
        trace, y, r, weight, obs = batch.trace, batch.y, batch.r, batch.weight, batch.obs
        mask = batch_mask(batch, cfg.executed_only)
        if cfg.algo == 'filtered_bc':  # imitate the successful episodes only, each decision equally
            weight = weight * (y > 0)
        held_out = self._holdout(batch)
        weight = weight * ~held_out
        prefix = None
        if not cfg.train_prefix and not cfg.microbatch_size:  # frozen prefix: encode every observation once
            prefix = self._encode(obs)
        model.train()
        sums: dict[str, float] = {}
        steps, stopped_early = 0, False
        for _ in range(cfg.epochs):
            order = torch.randperm(len(batch), generator=self.generator).to(device)
            for start in range(0, len(batch), cfg.minibatch_size):
                idx = order[start:start + cfg.minibatch_size]
                if weight[idx].sum() <= 0:
                    continue
                share = torch.ones((), device=device)
                count = None  # micro-batches per rank: the same on every rank (under FSDP each is a collective)
                if self.world_size > 1:
                    per_rank = -(-len(idx) // self.world_size)
                    count = -(-per_rank // (cfg.microbatch_size or per_rank))
                    # this rank's decisions of the minibatch, its loss scaled to its share
                    if len(idx) >= self.world_size:
                        total = weight[idx].sum()
                        idx = idx[self.rank::self.world_size]
                        share = weight[idx].sum() / total
                    else:  # fewer decisions than ranks: each takes them all, for a 1/world_size share
                        share = share / self.world_size
                if cfg.algo == 'filtered_bc':  # its loss is unweighted: pass it the successful decisions only
                    idx = idx[weight[idx] > 0]
                self.optimizer.zero_grad(set_to_none=True)
                metrics = {}
                for micro, part in self._micro_batches(idx, weight, mask, count):
                    loss, micro_metrics = self._loss(obs, prefix, trace, y, r, weight, mask, micro, num_steps)
                    (loss * share * part).backward()
                    for key, value in micro_metrics.items():
                        metrics[key] = metrics.get(key, 0.0) + float(part) * value
                if bc_weight > 0 and human is not None and len(human):
                    bc = self._bc_loss(human, device)
                    (bc * (bc_weight / self.world_size)).backward()  # every rank the same: summed to one
                    metrics['bc_loss'] = bc.item()
                if self.world_size > 1:
                    metrics = self._all_reduce(metrics, share)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                metrics['grad_norm'] = (grad_norm.full_tensor() if self.fsdp else grad_norm).item()  # FSDP: a DTensor
                self.optimizer.step()
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
                if cfg.target_kl > 0 and metrics.get('kl', 0.0) > cfg.target_kl:
                    stopped_early = True
                    break
            if stopped_early:
                break
        model.eval()
        self.updates += 1
        if self.ema is not None:
            self.ema.update_parameters(model)
        out = {key: value / max(steps, 1) for key, value in sums.items()}
        if held_out.any():
            out['holdout_preference_accuracy'] = self._preference_accuracy(batch, prefix, mask, held_out)
        out['gradient_steps'] = float(steps)
        out['stopped_early'] = float(stopped_early)
        out['decisions'] = float(len(batch))
        out['episodes'] = float(batch.n_episodes)
        out['executed_fraction'] = float(mask.mean().item())
        labelled = batch.weight > 0
        out['label_mean'] = float(y[labelled].mean().item()) if labelled.any() else 0.0
        out['label_positive_fraction'] = float((y[labelled] > 0).float().mean().item()) if labelled.any() else 0.0
        # group_mean gives y = 0 to groups whose episodes agree: their decisions carry no gradient.
        out['label_zero_fraction'] = float((y[labelled] == 0).float().mean().item()) if labelled.any() else 0.0
        return out

    def _bc_loss(self, human: HumanBatch, device: torch.device) -> torch.Tensor:
        """Flow matching (algo/sft.py) on up to a minibatch of the person's chunks."""
        size = min(len(human), self.cfg.minibatch_size)
        idx = torch.randperm(len(human), generator=self.bc_generator)[:size]
        part = human.index(idx).to(device)
        return flow_matching_loss(self.model, part.obs, part.actions, part.mask, generator=self.bc_generator,
                                  prefix=self._encode(part.obs))

    def _all_reduce(self, metrics: dict[str, float], share: torch.Tensor) -> dict[str, float]:
        """Sum the ranks' gradients (each already scaled to its share; FSDP has reduce-scattered its own in
        the backward pass); metrics likewise, as share-weighted means, so every rank sees the whole
        minibatch's (and stops early, or not, with the others)."""
        with_grad = [p for p in self.params if p.grad is not None]  # the same on every rank: the same graph
        if with_grad and not self.fsdp:
            flat = torch.cat([p.grad.flatten() for p in with_grad])
            dist.all_reduce(flat)
            offset = 0
            for p in with_grad:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        names = sorted(metrics)  # the same on every rank: each computed the same loss on a non-empty share
        values = torch.tensor([metrics[n] * float(share) for n in names], dtype=torch.float64)
        dist.all_reduce(values)
        return dict(zip(names, values.tolist(), strict=True))

    def _micro_batches(self, idx: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, count: int | None = None):
        """(micro-batch, its share of the minibatch's loss normalizer): weight for the weighted losses,
        counted action elements for filtered_bc's plain masked mean.

        count: exactly that many micro-batches (distributed: the same number on every rank), a rank with
        too few decisions running one of them again at share 0; otherwise micro-batches of
        `microbatch_size`, those that carry no weight skipped.
        """
        normalizer = mask.sum(1) if self.cfg.algo == 'filtered_bc' else weight
        total = normalizer[idx].sum().clamp_min(1e-12)  # a rank whose share weighs nothing: every part 0
        if count is not None:
            for micro in torch.tensor_split(idx, count):
                yield (micro, normalizer[micro].sum() / total) if len(micro) else (idx[:1], total * 0)
            return
        size = self.cfg.microbatch_size or len(idx)
        if len(idx) <= size:
            yield idx, torch.ones((), device=idx.device)
            return
        for start in range(0, len(idx), size):
            micro = idx[start:start + size]
            part = normalizer[micro].sum() / total
            if part > 0:
                yield micro, part

    def _loss(self, obs, prefix, trace: Trace, y, r, weight, mask, idx: torch.Tensor,
              num_steps: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The configured algorithm's loss and metrics on the decisions idx."""
        mb_trace, mb_mask = trace.index(idx), mask[idx]
        if self.cfg.algo == 'filtered_bc':
            loss = flow_matching_loss(self.model, None, mb_trace.x_final, mb_mask, generator=self.generator,
                                      prefix=self._prefix_of(obs, prefix, idx))
            return loss, {'loss': loss.item(), 'policy_loss': loss.item()}
        v_theta = self._velocity(obs, prefix, mb_trace, idx)  # the one forward pass
        if self.cfg.algo == 'grpo':
            return grpo_loss(v_theta, mb_trace, y[idx], weight[idx], self.cfg, num_steps, mb_mask)
        return stepnft_loss(v_theta, mb_trace, y[idx], r[idx], weight[idx], self.cfg, num_steps, mb_mask)

    def _velocity(self, obs, prefix, trace: Trace, idx: torch.Tensor) -> torch.Tensor:
        """v_θ(x_k*, τ_k*, o) of the decisions idx."""
        return self.model.velocity(trace.x_k, grid_at(trace.k, self.model.config.num_steps)[0],
                                   self._prefix_of(obs, prefix, idx))

    def _prefix_of(self, obs, prefix, idx: torch.Tensor):
        """The decisions idx's prefix: rows of the update's cache when there is one, else encoded."""
        if prefix is not None:
            return index_prefix(prefix, idx)
        return self._encode(obs.index(idx.cpu()).to(idx.device))

    def _encode(self, obs):
        """A trained prefix with its graph; a frozen one as the update-wide cache has it (eval mode, no graph)."""
        model = self.model
        if self.cfg.train_prefix:
            return model.encode_prefix(obs)
        mode = model.training
        with torch.no_grad():
            encoded = model.eval().encode_prefix(obs)
        model.train(mode)
        return encoded

    def _holdout(self, batch: DecisionBatch) -> torch.Tensor:
        """(B,) bool: the decisions of the episodes this update keeps out (cfg.holdout_fraction)."""
        n_out = int(round(self.cfg.holdout_fraction * batch.n_episodes))
        if n_out == 0:
            return torch.zeros(len(batch), dtype=torch.bool, device=batch.y.device)
        episodes = torch.randperm(batch.n_episodes, generator=self.generator)[:n_out].to(batch.y.device)
        return torch.isin(batch.episode_index, episodes)

    @torch.no_grad()
    def _preference_accuracy(self, batch: DecisionBatch, prefix, mask: torch.Tensor, held_out: torch.Tensor) -> float:
        """Fraction of held-out decisions with y ≠ 0 that the updated policy ranks right, y·(E⁺ − E⁻) < 0."""
        num_steps = self.model.config.num_steps
        idx_all = torch.nonzero(held_out & (batch.y != 0) & (batch.weight > 0)).flatten()
        correct = []
        for start in range(0, len(idx_all), self.cfg.minibatch_size):
            idx = idx_all[start:start + self.cfg.minibatch_size]
            trace = batch.trace.index(idx)
            v_theta = self._velocity(batch.obs, prefix, trace, idx)
            e_plus, e_minus, _ = branch_errors(v_theta, trace, self.cfg, num_steps, mask[idx])
            correct.append(batch.y[idx] * (e_plus - e_minus) < 0)
        return torch.cat(correct).float().mean().item() if correct else 0.5

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW moments and step counts as flat tensors (safetensors-friendly) for resumable training, and
        the weight average under `ema.` when there is one."""
        out = {}
        for index, state in self.optimizer.state_dict()['state'].items():
            for key, value in state.items():
                out[f'{index}.{key}'] = torch.as_tensor(value).detach().cpu().clone()
        if self.ema is not None:
            out.update({EMA_PREFIX + k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()})
        return out

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of optimizer_tensors (ValueError if they do not fit this trainer's parameters). State saved
        without a weight average leaves this trainer's (a copy of the model) as it is."""
        averaged = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
        if averaged and self.ema is not None:
            self.ema.load_state_dict(averaged)
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith(EMA_PREFIX):
                continue
            index, key = name.split('.', 1)
            state.setdefault(int(index), {})[key] = value
        full = self.optimizer.state_dict()
        if set(state) - set(range(len(self.params))):
            raise ValueError(f'optimizer state for {len(state)} parameters, the trainer has {len(self.params)}')
        full['state'] = state
        self.optimizer.load_state_dict(full)

