"""ODE (Euler) and Flow-SDE samplers with the per-decision trace (ALGORITHM.md §2).

Grid: τ_k = 1 − k/K, k = 0..K; Δ_k = τ_k − τ_{k+1}. τ = 1 is noise, τ = 0 is data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stepnft_ros.policy.types import Trace

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,H,D), τ (B,)) -> v (B,H,D)

# Which solver steps of a Flow-SDE chunk get noise: every step (ALGORITHM.md §2), or only the
# recorded step k* (the others are Euler steps). The update credits the outcome to k*'s noise
# alone, so noise at the other steps only adds outcome variance the loss cannot attribute.
SDE_NOISE = ('every_step', 'recorded_step')


def recorded_step(step_selection: str, num_steps: int) -> int | None:
    """The fixed k* a step selection names, None for 'uniform' (a random k* per decision).

    'last' is K − 1, the step whose noise lands on the executed action itself; a digit string is
    that step. ValueError for anything else or a step outside the K solver steps.
    """
    check_step_selection(step_selection)
    if step_selection == 'uniform':
        return None
    if step_selection == 'last':
        return num_steps - 1
    if int(step_selection) >= num_steps:
        raise ValueError(f'step_selection {step_selection} is outside the K = {num_steps} solver steps')
    return int(step_selection)


def check_step_selection(step_selection: str) -> None:
    """ValueError unless 'uniform', 'last' or a step index (checked against K by recorded_step)."""
    if step_selection not in ('uniform', 'last') and not step_selection.isdigit():
        raise ValueError(f"step_selection must be 'uniform', 'last' or a step index, got {step_selection!r}")


def check_sde_noise(sde_noise: str) -> None:
    if sde_noise not in SDE_NOISE:
        raise ValueError(f'sde_noise must be one of {SDE_NOISE}, got {sde_noise!r}')


def time_grid(num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """τ_k = 1 − k/K for k = 0..K: (K+1,)."""
    return 1.0 - torch.arange(num_steps + 1, dtype=torch.float32, device=device) / num_steps


def grid_at(k: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(τ_k, τ_{k+1}, Δ_k) for integer steps k (any shape)."""
    tau_k = 1.0 - k.float() / num_steps
    tau_next = 1.0 - (k.float() + 1.0) / num_steps
    return tau_k, tau_next, tau_k - tau_next


def sde_sigma(tau_k: torch.Tensor, tau_next: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
    """σ_k = a·sqrt(τ_k / (1 − τ_k)); at τ_k = 1 the denominator uses τ_{k+1}: a·sqrt(1 / (1 − τ_1))."""
    at_noise = tau_k >= 1.0
    denominator = torch.where(at_noise, 1.0 - tau_next, 1.0 - tau_k)
    return a * torch.sqrt(tau_k / denominator)


def sde_mean(x: torch.Tensor, v: torch.Tensor, tau_k: torch.Tensor, tau_next: torch.Tensor,
             sigma_k: torch.Tensor) -> torch.Tensor:
    """μ_k(x, v) = x̂0·(1 − τ_{k+1}) + x̂1·(τ_{k+1} − σ_k²·Δ_k / (2·τ_k)).

    x, v: (B, H, D); tau_k, tau_next, sigma_k: (B,) (or broadcastable). With σ_k = 0 this is
    exactly the Euler step x − Δ_k·v.
    """
    tau_k, tau_next, sigma_k = (t.reshape(-1, 1, 1) for t in (tau_k, tau_next, sigma_k))
    delta_k = tau_k - tau_next
    x0_hat = x - tau_k * v
    x1_hat = x + (1.0 - tau_k) * v
    return x0_hat * (1.0 - tau_next) + x1_hat * (tau_next - sigma_k ** 2 * delta_k / (2.0 * tau_k))


def sde_std(sigma_k: torch.Tensor, delta_k: torch.Tensor) -> torch.Tensor:
    """s_k = sqrt(Δ_k)·σ_k: (B,)."""
    return torch.sqrt(delta_k) * sigma_k


def euler_step(x: torch.Tensor, v: torch.Tensor, delta_k: torch.Tensor) -> torch.Tensor:
    """ODE step x_{k+1} = x − Δ_k·v; x, v (B, H, D), Δ_k (B,)."""
    return x - delta_k.reshape(-1, 1, 1) * v


@torch.no_grad()
def sample_chunk(velocity: VelocityFn, noise: torch.Tensor, num_steps: int, a: float,
                 generator: torch.Generator | None = None,
                 k_star: torch.Tensor | None = None,
                 sde_noise: str = 'every_step',
                 step_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, Trace]:
    """Integrate from x_0 = ε (τ = 1) to x_K (τ = 0); a = 0 is the ODE sampler, a > 0 the Flow-SDE.

    noise: (B, H, D) the initial ε; k_star: (B,) steps to record (default: uniform per decision,
    the paper's best choice); sde_noise: see SDE_NOISE; step_noise: (B, H, D) standard normal ξ for
    step k* instead of a fresh draw (CorrelatedStepNoise). Returns x_K (B, H, D) and the trace of k*.
    """
    if step_noise is not None and tuple(step_noise.shape) != tuple(noise.shape):
        raise ValueError(f'step_noise has shape {tuple(step_noise.shape)}, expected {tuple(noise.shape)}')
    check_sde_noise(sde_noise)
    b = noise.shape[0]
    device = noise.device
    if k_star is None:
        k_star = torch.randint(0, num_steps, (b,), generator=generator, device=device)
    x = noise
    x_k = torch.empty_like(x)
    x_next = torch.empty_like(x)
    v_old = torch.empty_like(x)
    for k in range(num_steps):
        ks = torch.full((b,), k, device=device)
        tau_k, tau_next, delta_k = grid_at(ks, num_steps)
        v = velocity(x, tau_k)
        if a > 0.0:
            sigma_k = sde_sigma(tau_k, tau_next, a)
            mu = sde_mean(x, v, tau_k, tau_next, sigma_k)
            xi = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
            if step_noise is not None:
                xi = torch.where((k_star == k).reshape(-1, 1, 1), step_noise.to(xi), xi)
            x_new = mu + sde_std(sigma_k, delta_k).reshape(-1, 1, 1) * xi
        else:
            x_new = euler_step(x, v, delta_k)
        chosen = (k_star == k).reshape(-1, 1, 1)
        if a > 0.0 and sde_noise == 'recorded_step':
            x_new = torch.where(chosen, x_new, euler_step(x, v, delta_k))
        x_k = torch.where(chosen, x, x_k)
        x_next = torch.where(chosen, x_new, x_next)
        v_old = torch.where(chosen, v, v_old)
        x = x_new
    trace = Trace(x_k=x_k, x_next=x_next, v_old=v_old, k=k_star.long(),
                  a=torch.full((b,), float(a), device=device), x_final=x.clone())
    return x, trace


def recorded_noise(trace: Trace, num_steps: int) -> torch.Tensor:
    """The standard-normal ξ each trace's recorded step drew: (x_{k*+1} − μ(x_{k*}, v_old)) / s_{k*}."""
    tau_k, tau_next, delta_k = grid_at(trace.k, num_steps)
    sigma = sde_sigma(tau_k, tau_next, trace.a)
    mu = sde_mean(trace.x_k, trace.v_old, tau_k, tau_next, sigma)
    return (trace.x_next - mu) / sde_std(sigma, delta_k).reshape(-1, 1, 1)


class CorrelatedStepNoise:
    """One episode's step noise ξ as an AR(1) stream over its decisions: ξ_t = ρ·ξ_{t−1} + √(1−ρ²)·η_t.

    Each ξ_t is still standard normal, so every recorded step keeps the Flow-SDE transition the
    loss assumes; only successive decisions of one episode lean the same way (ρ = 1: one direction
    for the whole episode), so exploration moves the trajectory instead of jittering around it.
    """

    def __init__(self, correlation: float, generator: torch.Generator, sign: float = 1.0) -> None:
        """sign −1 gives the mirror image of the stream `generator` would give (an antithetic partner)."""
        check_step_noise_correlation(correlation)
        if sign not in (1.0, -1.0):
            raise ValueError(f'sign must be 1 or -1, got {sign}')
        self.correlation, self.generator, self.sign = float(correlation), generator, float(sign)
        self.previous: torch.Tensor | None = None

    def next(self, shape: tuple[int, ...]) -> torch.Tensor:
        fresh = torch.randn(shape, generator=self.generator)
        if self.previous is None:
            self.previous = fresh
        else:
            rho = self.correlation
            self.previous = rho * self.previous + (1.0 - rho * rho) ** 0.5 * fresh
        return self.sign * self.previous


def check_step_noise_correlation(correlation: float) -> None:
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f'step_noise_correlation must be in [0, 1], got {correlation}')


def scheduled_noise_level(start: float, final: float | None, decay_env_steps: int, env_steps: int) -> float:
    """a after `env_steps` training env steps: linear from start to final over decay_env_steps, then final.

    final None keeps a at start. Wide noise finds successes early; once most failures are near misses,
    wide noise turns them into misses (docs/benchmarks-and-results.md, noise that falls).
    """
    if final is None:
        return start
    if not (start >= 0.0 and final >= 0.0 and decay_env_steps >= 1):
        raise ValueError(f'a noise schedule needs noise_level >= 0, noise_level_final >= 0 and '
                         f'noise_decay_env_steps >= 1, got {start}, {final} and {decay_env_steps}')
    return start + (final - start) * schedule_progress(decay_env_steps, env_steps)


def schedule_progress(decay_env_steps: int, env_steps: int) -> float:
    """How far a linear schedule over decay_env_steps has gone after env_steps: 0 at the start, 1 from its end."""
    return min(max(env_steps, 0) / decay_env_steps, 1.0)
