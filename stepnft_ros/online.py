"""The ROS-free online RL loop: SDE rollouts -> terminal-binary labels -> π-StepNFT update.

The learner node runs the same steps on episodes that arrive over ROS; this loop is what the
benchmarks, the toy-task test and `stepnft` use directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer
from stepnft_ros.episodes.schema import collate_episodes
from stepnft_ros.policy.modeling import FlowVLA
from stepnft_ros.policy.policy import FlowPolicy
from stepnft_ros.rollout import Env, evaluate, run_episode


@dataclass(frozen=True)
class OnlineConfig:
    """Schedule of the online loop."""

    iterations: int = 10
    """RL iterations (collect, then update), unless the time budget ends first."""
    episodes_per_iteration: int = 16
    """On-policy episodes per update."""
    actions_per_chunk: int = 8
    """Actions of each chunk executed before re-planning."""
    eval_seeds: tuple[int, ...] = tuple(range(10_000, 10_020))
    """Held-out reset seeds for ODE evaluation after every iteration."""
    labels: str = 'terminal_binary'
    """Episode labels: 'terminal_binary' (y = ±1) or 'batch_mean' (success minus the batch's rate)."""
    noise_level: float | None = None
    """a for the Flow-SDE rollouts; None uses the policy config's."""
    time_budget_s: float = float('inf')
    """Stop after the iteration that crosses this wall-clock budget (rollouts + updates)."""
    first_train_seed: int = 1_000_000
    """Training episodes reset with consecutive seeds from here (keep them apart from demo/eval seeds)."""
    seed: int = 0
    """Seeds the sampler and the update's shuffling."""

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.episodes_per_iteration < 1 or self.actions_per_chunk < 1:
            raise ValueError(f'bad online schedule: iterations={self.iterations}, '
                             f'episodes_per_iteration={self.episodes_per_iteration}, '
                             f'actions_per_chunk={self.actions_per_chunk}')


def run_online(env: Env, model: FlowVLA, online: OnlineConfig, algo: StepNFTConfig,
               log: Callable[[dict], None] | None = None) -> list[dict]:
    """Evaluate (ODE), then alternate SDE rollouts and π-StepNFT updates; one record per iteration.

    Record keys: iteration, eval_success, train_success, env_steps (cumulative training steps),
    rl_wall_s (cumulative rollout + update time, evaluation excluded), plus the update metrics.
    """
    explore = FlowPolicy(model, mode=algo.rollout, seed=online.seed, noise_level=online.noise_level,
                         fixed_step=algo.fixed_step(model.config.num_steps))
    evaluator = FlowPolicy(model, mode='ode')
    trainer = StepNFTTrainer(model, algo, seed=online.seed)
    history: list[dict] = []

    def record(entry: dict) -> None:
        entry['eval_success'], _ = evaluate(env, evaluator, list(online.eval_seeds), online.actions_per_chunk)
        history.append(entry)
        if log is not None:
            log(entry)

    record({'iteration': 0, 'env_steps': 0, 'rl_wall_s': 0.0})
    env_steps, wall, next_seed = 0, 0.0, online.first_train_seed
    for it in range(1, online.iterations + 1):
        if wall >= online.time_budget_s:
            break
        start = time.perf_counter()
        episodes = []
        for _ in range(online.episodes_per_iteration):
            episodes.append(run_episode(env, explore, next_seed, online.actions_per_chunk,
                                        weights_version=trainer.updates, episode_id=f'it{it}-seed{next_seed}'))
            next_seed += 1
        rollout_s = time.perf_counter() - start
        metrics = trainer.update(collate_episodes(episodes, model.config, online.labels))
        wall += time.perf_counter() - start
        env_steps += sum(e.env_steps for e in episodes)
        record({'iteration': it, 'env_steps': env_steps, 'rl_wall_s': round(wall, 2),
                'rollout_s': round(rollout_s, 2),
                'train_success': sum(bool(e.success) for e in episodes) / len(episodes), **metrics})
    return history
