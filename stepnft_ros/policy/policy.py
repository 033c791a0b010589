"""The policy interface the nodes and rollouts use: `infer(obs) -> chunk` and `reset()`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stepnft_ros.policy.backend import FlowBackend
from stepnft_ros.policy.config import PolicyConfig
from stepnft_ros.policy.cuda_graph import GraphedODE
from stepnft_ros.policy.sampler import check_sde_noise, check_step_noise_correlation, sample_chunk
from stepnft_ros.policy.types import Observation, Trace, stack_observations

SAMPLING_MODES = ('sde', 'ode')


@dataclass(frozen=True)
class PolicyOutput:
    """chunks: (B, H, D) un-normalized actions (not yet clipped to robot bounds);
    trace: the π-StepNFT trace of each decision (normalized action space)."""

    chunks: np.ndarray
    trace: Trace


def check_sampling_mode(mode: str) -> None:
    if mode not in SAMPLING_MODES:
        raise ValueError(f'mode must be one of {SAMPLING_MODES}, got {mode!r}')


class SamplingPolicy:
    """What every backend shares: the sampling mode, the seeded noise and the solver loop.

    A backend supplies the velocity function of one batch and its own (un)normalization;
    infer(observation) and the ODE/SDE math are the same for all of them.
    """

    def _init_sampling(self, cfg: PolicyConfig, mode: str, noise_level: float | None, seed: int,
                       device: str | torch.device, fixed_step: int | None, sde_noise: str = 'every_step',
                       initial_noise_scale: float = 1.0, step_noise_correlation: float = 0.0) -> None:
        check_sampling_mode(mode)
        check_sde_noise(sde_noise)
        check_step_noise_correlation(step_noise_correlation)
        # ρ of each episode's step-noise stream; the caller that knows episodes keeps the streams.
        self.step_noise_correlation = float(step_noise_correlation)
        if not (np.isfinite(initial_noise_scale) and initial_noise_scale >= 0.0):
            raise ValueError(f'initial_noise_scale must be a finite number >= 0, got {initial_noise_scale}')
        self.initial_noise_scale = float(initial_noise_scale)
        self.mode = mode
        self.sde_noise = sde_noise
        self.noise_level = cfg.noise_level if noise_level is None else noise_level
        self.device = torch.device(device)
        self.seed = seed
        if fixed_step is not None and not 0 <= fixed_step < cfg.num_steps:
            raise ValueError(f'fixed_step must be in [0, {cfg.num_steps}), got {fixed_step}')
        self.fixed_step = fixed_step  # None: record a uniformly random solver step k* per decision
        self.generator = torch.Generator(device=self.device)
        self.reset()

    @property
    def a(self) -> float:
        """Noise level actually used: 0 for the ODE sampler."""
        return self.noise_level if self.mode == 'sde' else 0.0

    @property
    def correlates_step_noise(self) -> bool:
        """Whether callers should pass each episode's CorrelatedStepNoise as `step_noise`."""
        return self.a > 0.0 and self.step_noise_correlation > 0.0

    def reset(self, seed: int | None = None) -> None:
        """Re-seed the sampler's noise (default: the construction seed)."""
        self.generator.manual_seed(self.seed if seed is None else seed)

    def _sample(self, velocity, cfg: PolicyConfig, batch_size: int,
                initial_noise: torch.Tensor | None,
                step_noise: torch.Tensor | None = None,
                recorded_steps: torch.Tensor | None = None) -> tuple[torch.Tensor, Trace]:
        """x_K (normalized) and the trace of one batch; initial_noise etc. as in infer_batch."""
        noise, k_star = self._start(cfg, batch_size, initial_noise, recorded_steps)
        return sample_chunk(velocity, noise, cfg.num_steps, self.a, generator=self.generator, k_star=k_star,
                            sde_noise=self.sde_noise, step_noise=step_noise)

    def _start(self, cfg: PolicyConfig, batch_size: int, initial_noise: torch.Tensor | None,
               recorded_steps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's ε (scaled) and recorded step k*, drawn from the policy's generator in this order
        (each only where the caller does not give it)."""
        noise = initial_noise_for(batch_size, cfg, self.generator, self.device, initial_noise)
        if recorded_steps is not None:
            k_star = recorded_steps.to(device=self.device, dtype=torch.long)
            if tuple(k_star.shape) != (batch_size,) or bool(((k_star < 0) | (k_star >= cfg.num_steps)).any()):
                raise ValueError(f'recorded_steps must be {batch_size} solver steps in [0, {cfg.num_steps}), '
                                 f'got {recorded_steps.tolist()}')
        elif self.fixed_step is None:
            k_star = torch.randint(0, cfg.num_steps, (batch_size,), generator=self.generator, device=self.device)
        else:
            k_star = torch.full((batch_size,), self.fixed_step, dtype=torch.long, device=self.device)
        return noise * self.initial_noise_scale, k_star

    def infer_batch(self, observations: Sequence[Observation],
                    initial_noise: torch.Tensor | None = None,
                    step_noise: torch.Tensor | None = None,
                    recorded_steps: torch.Tensor | None = None) -> PolicyOutput:
        raise NotImplementedError

    def infer(self, observation: Observation) -> PolicyOutput:
        return self.infer_batch([observation])


class FlowPolicy(SamplingPolicy):
    """Samples action chunks from a flow backend (FlowVLA, SmolVLA): Flow-SDE (`sde`) to explore,
    Euler ODE (`ode`) to deploy."""

    def __init__(self, model: FlowBackend, mode: str = 'sde', noise_level: float | None = None,
                 seed: int = 0, device: str | torch.device = 'cpu', fixed_step: int | None = None,
                 sde_noise: str = 'every_step', initial_noise_scale: float = 1.0,
                 step_noise_correlation: float = 0.0, cuda_graph: bool = False) -> None:
        """cuda_graph: replay each ODE chunk's K solver steps from a CUDA graph (cuda_graph.py); needs a
        CUDA device and mode 'ode' (the Flow-SDE sampler stays eager)."""
        check_sampling_mode(mode)
        if cuda_graph and (mode != 'ode' or torch.device(device).type != 'cuda'):
            raise ValueError(f"cuda_graph needs mode 'ode' on a CUDA device, got mode {mode!r} on {device}")
        self._graphs = GraphedODE(model.config.num_steps) if cuda_graph else None
        self.model = model.to(device).eval()
        self._init_sampling(model.config, mode, noise_level, seed, device, fixed_step, sde_noise, initial_noise_scale,
                            step_noise_correlation)

    @property
    def model(self) -> FlowBackend:
        return self._model

    @model.setter
    def model(self, model: FlowBackend) -> None:
        """Replacing the model (a hot swap) drops the CUDA graphs captured with the old one's weights."""
        self._model = model
        if self._graphs is not None:
            self._graphs.clear()

    @torch.no_grad()
    def infer_batch(self, observations: Sequence[Observation],
                    initial_noise: torch.Tensor | None = None,
                    step_noise: torch.Tensor | None = None,
                    recorded_steps: torch.Tensor | None = None) -> PolicyOutput:
        """Validates every observation (ObservationError on bad input) and samples one chunk each.

        initial_noise: (B, H, D) ε per observation instead of draws from the policy's generator, so
        a caller can keep one noise stream per robot (an ODE chunk then does not depend on which
        other robots share its batch); step_noise: (B, H, D) ξ of the recorded SDE step per observation
        (each robot's CorrelatedStepNoise stream), fresh draws when None; recorded_steps: (B,) k* per
        observation instead of the policy's draw (antithetic pairs share it).
        """
        cfg = self.model.config
        batch = stack_observations(observations, cfg).to(self.device)
        prefix = self.model.encode_prefix(batch)  # computed once, reused by all K steps
        if self._graphs is not None:
            x_final, trace = self._graphed_sample(prefix, cfg, batch.batch_size, initial_noise, recorded_steps)
        else:
            x_final, trace = self._sample(lambda x, tau: self.model.velocity(x, tau, prefix), cfg,
                                          batch.batch_size, initial_noise, step_noise, recorded_steps)
        chunks = self.model.normalizer.unnormalize_action(x_final)
        return PolicyOutput(chunks=chunks.cpu().numpy(), trace=trace.to('cpu'))

    def _graphed_sample(self, prefix, cfg: PolicyConfig, batch_size: int, initial_noise: torch.Tensor | None,
                        recorded_steps: torch.Tensor | None = None) -> tuple[torch.Tensor, Trace]:
        """_sample's ODE result from a captured graph, on the same draws of ε and k*."""
        noise, k_star = self._start(cfg, batch_size, initial_noise, recorded_steps)
        return self._graphs(self.model.velocity, prefix, noise, k_star)


def initial_noise_for(batch_size: int, cfg: PolicyConfig, generator: torch.Generator, device: torch.device,
                      given: torch.Tensor | None) -> torch.Tensor:
    """The sampler's starting ε: `given` (checked) or fresh draws from `generator`."""
    shape = (batch_size, cfg.horizon, cfg.action_dim)
    if given is None:
        return torch.randn(shape, generator=generator, device=device)
    if tuple(given.shape) != shape:
        raise ValueError(f'initial_noise has shape {tuple(given.shape)}, expected {shape}')
    return given.to(device=device, dtype=torch.float32)
