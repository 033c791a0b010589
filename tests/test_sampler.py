"""Sampler identities (ALGORITHM.md §2)."""

import math

import numpy as np
import pytest
import torch

from stepnft_ros.policy import FlowPolicy, FlowVLA, Observation, PolicyConfig
from stepnft_ros.policy.sampler import (
    CorrelatedStepNoise,
    euler_step,
    grid_at,
    recorded_noise,
    sample_chunk,
    sde_mean,
    sde_sigma,
    sde_std,
    time_grid,
)


def test_time_grid_matches_formula():
    assert torch.equal(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


@pytest.mark.parametrize('k', [0, 1, 2, 3])
def test_sde_mean_with_zero_noise_is_the_euler_step(k):
    x, v = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    tau_k, tau_next, delta_k = grid_at(torch.full((3,), k), 4)
    sigma = sde_sigma(tau_k, tau_next, 0.0)
    assert torch.allclose(sde_mean(x, v, tau_k, tau_next, sigma), euler_step(x, v, delta_k), atol=1e-6)


def test_sigma_formula_including_the_first_step():
    tau_k, tau_next, _ = grid_at(torch.arange(4), 4)
    sigma = sde_sigma(tau_k, tau_next, 0.4)
    expected = [0.4 * math.sqrt(1 / (1 - 0.75))] + [0.4 * math.sqrt(t / (1 - t)) for t in (0.75, 0.5, 0.25)]
    assert torch.allclose(sigma, torch.tensor(expected), rtol=1e-6)


def test_sde_mean_matches_the_written_formula():
    x, v = torch.randn(2, 3, 2), torch.randn(2, 3, 2)
    tau_k, tau_next, delta = 0.5, 0.25, 0.25
    sigma = 0.3 * math.sqrt(tau_k / (1 - tau_k))
    x0_hat, x1_hat = x - tau_k * v, x + (1 - tau_k) * v
    expected = x0_hat * (1 - tau_next) + x1_hat * (tau_next - sigma ** 2 * delta / (2 * tau_k))
    got = sde_mean(x, v, torch.full((2,), tau_k), torch.full((2,), tau_next), torch.full((2,), sigma))
    assert torch.allclose(got, expected, atol=1e-6)


def test_euler_is_exact_for_a_constant_velocity():
    # with v ≡ ε − A the ODE lands exactly on A from x_0 = ε
    target, noise = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
    x_final, _ = sample_chunk(lambda x, tau: noise - target, noise, 4, a=0.0)
    assert torch.allclose(x_final, target, atol=1e-5)


def test_trace_records_the_chosen_step_of_the_sde_chain():
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(6, 5, 2, generator=g)
    velocity = lambda x, tau: 0.5 * x + tau[:, None, None]  # noqa: E731
    x_final, trace = sample_chunk(velocity, noise, 4, a=0.4, generator=g)
    # replay the chain with the same generator stream to find every x_k
    g2 = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 2, generator=g2)
    k_star = torch.randint(0, 4, (6,), generator=g2)
    assert torch.equal(k_star, trace.k)
    states = [x]
    for k in range(4):
        tau_k, tau_next, delta_k = grid_at(torch.full((6,), k), 4)
        sigma = sde_sigma(tau_k, tau_next, 0.4)
        x = sde_mean(x, velocity(x, tau_k), tau_k, tau_next, sigma) + \
            sde_std(sigma, delta_k)[:, None, None] * torch.randn(x.shape, generator=g2)
        states.append(x)
    for i, k in enumerate(trace.k.tolist()):
        assert torch.allclose(trace.x_k[i], states[k][i])
        assert torch.allclose(trace.x_next[i], states[k + 1][i])
        tau = torch.tensor([1 - k / 4])
        assert torch.allclose(trace.v_old[i], velocity(states[k][i:i + 1], tau)[0])
    assert torch.allclose(trace.x_final, x_final) and torch.allclose(x_final, states[-1])
    assert torch.all(trace.a == 0.4)


def _policy(mode: str, seed: int = 0) -> FlowPolicy:
    torch.manual_seed(0)
    cfg = PolicyConfig(state_dim=3, action_dim=2, horizon=4, d_model=32, n_heads=2)
    return FlowPolicy(FlowVLA(cfg), mode=mode, seed=seed)


@pytest.mark.parametrize('mode', ['ode', 'sde'])
def test_policy_shapes_and_determinism(mode):
    obs = [Observation(state=np.array([0.1, -0.2, 0.3], np.float32)) for _ in range(5)]
    first = _policy(mode).infer_batch(obs)
    again = _policy(mode).infer_batch(obs)
    assert first.chunks.shape == (5, 4, 2) and first.trace.x_k.shape == (5, 4, 2)
    assert np.array_equal(first.chunks, again.chunks)
    assert first.trace.k.min() >= 0 and first.trace.k.max() < 4


def test_sde_explores_and_ode_does_not_inject_noise():
    obs = [Observation(state=np.zeros(3, np.float32))]
    ode, sde = _policy('ode'), _policy('sde')
    assert ode.a == 0.0 and sde.a > 0.0
    # same initial noise (same seed) -> the SDE chunk differs only by the injected noise
    assert not np.allclose(ode.infer_batch(obs).chunks, sde.infer_batch(obs).chunks)


def test_recorded_step_noise_is_euler_everywhere_but_k_star():
    velocity = lambda x, tau: 0.5 * x + tau[:, None, None]  # noqa: E731
    noise = torch.randn(8, 5, 2, generator=torch.Generator().manual_seed(1))
    k_star = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    x_final, trace = sample_chunk(velocity, noise, 4, a=0.4, generator=torch.Generator().manual_seed(2),
                                  k_star=k_star, sde_noise='recorded_step')
    # Replay: Euler up to k*, the recorded (noisy) step, Euler after it.
    for i, k_i in enumerate(k_star.tolist()):
        x = noise[i:i + 1]
        for k in range(4):
            tau_k, tau_next, delta_k = grid_at(torch.tensor([k]), 4)
            if k == k_i:
                assert torch.allclose(trace.x_k[i], x[0], atol=1e-6)
                sigma = sde_sigma(tau_k, tau_next, 0.4)
                mu = sde_mean(x, velocity(x, tau_k), tau_k, tau_next, sigma)
                xi = (trace.x_next[i] - mu[0]) / sde_std(sigma, delta_k)
                assert xi.abs().max() > 1e-3  # noise was injected at k*
                x = trace.x_next[i:i + 1]
            else:
                x = euler_step(x, velocity(x, tau_k), delta_k)
        assert torch.allclose(x_final[i], x[0], atol=1e-5)
    ode_final, _ = sample_chunk(velocity, noise, 4, a=0.0)
    assert not torch.allclose(x_final, ode_final)


def test_unknown_sde_noise_is_refused():
    with pytest.raises(ValueError, match='sde_noise'):
        sample_chunk(lambda x, tau: x, torch.zeros(1, 2, 2), 4, a=0.3, sde_noise='some_steps')
    with pytest.raises(ValueError, match='sde_noise'):
        FlowPolicy(FlowVLA(PolicyConfig(state_dim=3, action_dim=2, horizon=4, d_model=32, n_heads=2)),
                   sde_noise='some_steps')


def test_initial_noise_scale_shrinks_the_chains_starting_point():
    obs = [Observation(state=np.zeros(3, np.float32))] * 2
    model = _policy('ode').model
    eps = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(3))
    zero_start = FlowPolicy(model, mode='ode', initial_noise_scale=0.0)
    # x_0 = 0 · ε: the ODE chunk no longer depends on ε
    assert np.array_equal(zero_start.infer_batch(obs, initial_noise=eps).chunks,
                          zero_start.infer_batch(obs, initial_noise=2 * eps).chunks)
    half = FlowPolicy(model, mode='ode', initial_noise_scale=0.5).infer_batch(obs, initial_noise=eps)
    full = FlowPolicy(model, mode='ode').infer_batch(obs, initial_noise=0.5 * eps)
    assert np.allclose(half.chunks, full.chunks, atol=1e-6)
    for bad in (-0.1, float('nan')):
        with pytest.raises(ValueError, match='initial_noise_scale'):
            FlowPolicy(model, initial_noise_scale=bad)


@pytest.mark.parametrize('sde_noise', ['recorded_step', 'every_step'])
def test_given_step_noise_is_the_recorded_steps_xi(sde_noise):
    velocity = lambda x, tau: 0.5 * x + tau[:, None, None]  # noqa: E731
    noise = torch.randn(6, 5, 2, generator=torch.Generator().manual_seed(1))
    step_noise = torch.randn(6, 5, 2, generator=torch.Generator().manual_seed(3))
    _, trace = sample_chunk(velocity, noise, 4, a=0.4, generator=torch.Generator().manual_seed(2),
                            sde_noise=sde_noise, step_noise=step_noise)
    assert torch.allclose(recorded_noise(trace, 4), step_noise, atol=1e-4)
    with pytest.raises(ValueError, match='step_noise has shape'):
        sample_chunk(velocity, noise, 4, a=0.4, step_noise=step_noise[:, :4])


def test_correlated_step_noise_is_an_ar1_stream_with_standard_normal_marginals():
    def stream(rho: float, seed: int, n: int = 6) -> torch.Tensor:
        s = CorrelatedStepNoise(rho, torch.Generator().manual_seed(seed))
        return torch.stack([s.next((40000,)) for _ in range(n)])

    same = stream(1.0, 0)
    assert torch.equal(same[0], same[-1])  # ρ = 1: one direction for the whole episode
    for rho in (0.0, 0.5, 0.9):
        xi = stream(rho, 1)
        lag1 = float((xi[-1] * xi[-2]).mean())  # standard error < 0.01
        assert abs(lag1 - rho) < 0.03, (rho, lag1)
        assert abs(float(xi[-1].std()) - 1.0) < 0.02  # still standard normal at every decision
    assert torch.equal(stream(0.9, 4), stream(0.9, 4))  # seeded: episodes repeat
    for bad in (-0.1, 1.5, float('nan')):
        with pytest.raises(ValueError, match='step_noise_correlation'):
            CorrelatedStepNoise(bad, torch.Generator())
    for rho in (0.5, 1.0):  # sign −1: the mirror image of the same stream, draw for draw
        plus = CorrelatedStepNoise(rho, torch.Generator().manual_seed(5))
        minus = CorrelatedStepNoise(rho, torch.Generator().manual_seed(5), sign=-1.0)
        for _ in range(4):
            assert torch.equal(minus.next((8,)), -plus.next((8,)))
    with pytest.raises(ValueError, match='sign'):
        CorrelatedStepNoise(1.0, torch.Generator(), sign=0.5)
