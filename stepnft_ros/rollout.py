"""The ROS-free rollout loop: a policy acting in an environment, recorded as Episodes.

The ROS pipeline does the same across processes; this loop is the reference it is measured
against, and what benchmarks and the CLI use directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch

from stepnft_ros.episodes.schema import Decision, Episode
from stepnft_ros.policy.policy import FlowPolicy
from stepnft_ros.policy.sampler import CorrelatedStepNoise
from stepnft_ros.policy.types import Observation


class Env(Protocol):
    """What the loop needs of an environment (sim_bridge adapters and test envs provide it)."""

    action_low: np.ndarray   # (D,)
    action_high: np.ndarray  # (D,)

    def reset(self, seed: int) -> Mapping[str, Any]: ...

    def step(self, action: np.ndarray) -> tuple[Mapping[str, Any], bool, bool]: ...


def to_observation(raw: Mapping[str, Any]) -> Observation:
    """Env dict {state, images, instruction} -> Observation."""
    return Observation(state=raw.get('state'), images=raw.get('images') or {},
                       instruction=raw.get('instruction', ''))


def episode_noise(seed: int, occurrence: int = 0, stream: str = 'initial') -> torch.Generator:
    """The generator of one noise stream of the `occurrence`-th episode from `seed`: 'initial' (every
    decision's ε), 'step' (its correlated SDE step noise, apart so that ε does not depend on it) or
    'recorded_step' (its k* draws, for antithetic pairs)."""
    offset = {'initial': 0, 'step': 1 << 40, 'recorded_step': 2 << 40}[stream]
    return torch.Generator().manual_seed(int(seed) * 1009 + occurrence + offset)


def run_episode(env: Env, policy: FlowPolicy, seed: int, actions_per_chunk: int,
                weights_version: int = 0, episode_id: str | None = None,
                on_step: Callable[[Mapping[str, Any]], None] | None = None,
                episode_streams: bool = False) -> Episode:
    """Reset with `seed`, act chunk by chunk until the env reports done; outcome = success.

    Executes the first `actions_per_chunk` actions of each chunk, clipped to the env's bounds
    (the trace keeps the unclipped sample, ALGORITHM.md §2). `on_step` sees the env's raw
    observation after the reset and after every step (e.g. to record a video). episode_streams:
    the noise comes from the episode's own streams (episode_noise(seed), and a correlated SDE
    policy's step noise), as in EnvPool's rollouts, instead of the policy's generator: the
    same seed then gives the episode a training rollout from it would (the k* draws still come
    from the policy's generator, as they do there).
    """
    episode = Episode(episode_id=episode_id or f'seed{seed}', weights_version=weights_version, seed=seed)
    cfg = policy.model.config
    shape = (cfg.horizon, cfg.action_dim)
    initial = episode_noise(seed) if episode_streams else None
    step_noise = CorrelatedStepNoise(policy.step_noise_correlation, episode_noise(seed, 0, 'step')) \
        if episode_streams and policy.correlates_step_noise else None
    raw = env.reset(seed)
    if on_step is not None:
        on_step(raw)
    obs = to_observation(raw)
    success = done = False
    while not done:
        if initial is None:
            out = policy.infer(obs)
        else:
            out = policy.infer_batch([obs], initial_noise=torch.randn(shape, generator=initial)[None],
                                     step_noise=None if step_noise is None else step_noise.next(shape)[None])
        executed = 0
        for action in out.chunks[0][:actions_per_chunk]:
            raw, success, done = env.step(np.clip(action, env.action_low, env.action_high))
            executed += 1
            if on_step is not None:
                on_step(raw)
            if done:
                break
        episode.env_steps += executed
        episode.decisions.append(Decision(observation=obs, chunk=out.chunks[0], trace=out.trace, executed=executed))
        obs = to_observation(raw)
    episode.success = bool(success)
    return episode


def evaluate(env: Env, policy: FlowPolicy, seeds: list[int], actions_per_chunk: int) -> tuple[float, list[Episode]]:
    """Success rate over `seeds` (use an ODE policy for the paper's evaluation protocol)."""
    episodes = []
    for seed in seeds:
        policy.reset(seed)  # the same seed gives the same sampler noise: evaluations are repeatable
        episodes.append(run_episode(env, policy, seed, actions_per_chunk))
    return float(np.mean([e.success for e in episodes])), episodes
