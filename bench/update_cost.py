"""Learner cost per sample: π-StepNFT vs a PPO-style flow-policy update (πRL-like).

π-StepNFT evaluates the velocity once per stored decision (at the recorded step k*). A PPO-style
update of a flow policy needs the log-likelihood of the whole K-step SDE chain (K velocity
evaluations per decision, all with gradients) plus a value network. Both updates here use the
same model, batch and optimizer and are timed alternately in one process, so the ratio is
meaningful on a noisy machine.

    python bench/update_cost.py [--batch 256] [--repeats 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepnft_ros.algo.stepnft import StepNFTConfig, stepnft_loss  # noqa: E402
from stepnft_ros.policy import FlowVLA, Observation, PolicyConfig  # noqa: E402
from stepnft_ros.policy.sampler import grid_at, sde_mean, sde_sigma, sde_std  # noqa: E402
from stepnft_ros.policy.types import Trace, stack_observations  # noqa: E402

CONFIGS = {
    # ManiSkill PickCube state observations (42-D), at twice the learning benchmark's width
    'state_pickcube': PolicyConfig(state_dim=42, action_dim=7, horizon=8, d_model=128, n_heads=4),
    # two 64 px cameras + instruction + state: the VLA shape, scaled down for a CPU
    'vision_language': PolicyConfig(state_dim=8, action_dim=7, horizon=8, camera_names=('scene', 'wrist'),
                                    image_size=64, use_language=True, d_model=128, n_heads=4),
}


def synthetic_batch(cfg: PolicyConfig, b: int, a: float, device: torch.device):
    """Observations and a recorded SDE chain x_0..x_K (B, K+1, H, D) from the model itself."""
    g = torch.Generator().manual_seed(0)
    images = {n: torch.randint(0, 255, (cfg.image_size, cfg.image_size, 3), generator=g, dtype=torch.uint8).numpy()
              for n in cfg.camera_names}
    obs = [Observation(state=torch.randn(cfg.state_dim, generator=g).numpy(), images=images,
                       instruction=f'task {i % 4}') for i in range(b)]
    return stack_observations(obs, cfg).to(device)


def record_chain(model: FlowVLA, prefix, b: int, a: float, device) -> torch.Tensor:
    cfg = model.config
    k_steps = cfg.num_steps
    x = torch.randn(b, cfg.horizon, cfg.action_dim, device=device)
    chain = [x]
    with torch.no_grad():
        for k in range(k_steps):
            tau_k, tau_next, delta_k = grid_at(torch.full((b,), k, device=device), k_steps)
            sigma = sde_sigma(tau_k, tau_next, a)
            x = sde_mean(x, model.velocity(x, tau_k, prefix), tau_k, tau_next, sigma) + \
                sde_std(sigma, delta_k)[:, None, None] * torch.randn_like(x)
            chain.append(x)
    return torch.stack(chain, 1)  # (B, K+1, H, D)


def chain_log_prob(model: FlowVLA, prefix, chain: torch.Tensor, a: float) -> torch.Tensor:
    """Σ_k log N(x_{k+1}; μ_k(x_k, v_θ), s_k²): K velocity evaluations per decision -> (B,)."""
    b, k1 = chain.shape[:2]
    k_steps = k1 - 1
    ks = torch.arange(k_steps, device=chain.device).repeat(b)             # (B·K,)
    tau_k, tau_next, delta_k = grid_at(ks, k_steps)
    sigma = sde_sigma(tau_k, tau_next, a)
    x_k = chain[:, :-1].flatten(0, 1)
    prefix_k = tuple(p.repeat_interleave(k_steps, 0) for p in prefix)
    mu = sde_mean(x_k, model.velocity(x_k, tau_k, prefix_k), tau_k, tau_next, sigma)
    logp = torch.distributions.Normal(mu, sde_std(sigma, delta_k)[:, None, None]).log_prob(chain[:, 1:].flatten(0, 1))
    return logp.flatten(1).sum(1).view(b, k_steps).sum(1)


def time_it(fn, repeats: int, device) -> list[float]:
    out = []
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def bench_config(name: str, cfg: PolicyConfig, b: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    a = 0.3
    model = FlowVLA(cfg).to(device)
    critic = nn.Sequential(nn.Linear(cfg.d_model, 256), nn.GELU(), nn.Linear(256, 1)).to(device)
    obs = synthetic_batch(cfg, b, a, device)
    with torch.no_grad():
        prefix = model.encode_prefix(obs)  # frozen prefix in both methods (paper's RL setting)
    chain = record_chain(model, prefix, b, a, device)
    k_star = torch.randint(0, cfg.num_steps, (b,), device=device)
    rows = torch.arange(b, device=device)
    v_old = torch.zeros_like(chain[:, 0])
    with torch.no_grad():
        tau = grid_at(k_star, cfg.num_steps)[0]
        v_old = model.velocity(chain[rows, k_star], tau, prefix)
        old_logp = chain_log_prob(model, prefix, chain, a)
    trace = Trace(x_k=chain[rows, k_star], x_next=chain[rows, k_star + 1], v_old=v_old, k=k_star,
                  a=torch.full((b,), a, device=device), x_final=chain[:, -1])
    y = torch.where(torch.rand(b, device=device) < 0.5, 1.0, -1.0)
    weight = torch.ones(b, device=device)
    stepnft_cfg = StepNFTConfig()
    opt = torch.optim.AdamW(list(model.action_expert.parameters()) + list(critic.parameters()), lr=1e-5)

    def stepnft_update():
        v_theta = model.velocity(trace.x_k, grid_at(trace.k, cfg.num_steps)[0], prefix)
        loss, _ = stepnft_loss(v_theta, trace, y, (y + 1) / 2, weight, stepnft_cfg, cfg.num_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.action_expert.parameters(), 1.0)
        opt.step()

    def ppo_update():
        logp = chain_log_prob(model, prefix, chain, a)
        ratio = torch.exp(logp - old_logp)
        value = critic(prefix[0].mean(1)).squeeze(-1)
        advantage = (y - value).detach()
        policy_loss = -torch.min(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage).mean()
        loss = policy_loss + 0.5 * (value - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.action_expert.parameters()) + list(critic.parameters()), 1.0)
        opt.step()

    for fn in (stepnft_update, ppo_update):  # warm-up
        time_it(fn, 2, device)
    stepnft_t, ppo_t = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        stepnft_t += time_it(stepnft_update, 1, device)
        ppo_t += time_it(ppo_update, 1, device)
    s_med, p_med = statistics.median(stepnft_t), statistics.median(ppo_t)
    return {'config': name, 'batch': b, 'K': cfg.num_steps, 'params': sum(p.numel() for p in model.parameters()),
            'stepnft_ms_per_sample': 1e3 * s_med / b, 'ppo_ms_per_sample': 1e3 * p_med / b,
            'stepnft_update_ms': 1e3 * s_med, 'ppo_update_ms': 1e3 * p_med,
            'ppo_over_stepnft': p_med / s_med}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--configs', default=','.join(CONFIGS))
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = [bench_config(n, CONFIGS[n], args.batch, args.repeats, device) for n in args.configs.split(',')]
    print(json.dumps({'benchmark': 'update_cost', 'device': str(device), 'torch': torch.__version__,
                      'threads': torch.get_num_threads(), 'results': results}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
