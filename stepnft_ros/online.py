"""The ROS-free online RL loop: SDE rollouts (an EnvPool) -> episode labels -> π-StepNFT update.

The learner node runs the same steps on episodes that arrive over ROS; this loop is what the
benchmarks, the toy-task test and `stepnft` use directly.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer
from stepnft_ros.env_pool import EnvPool
from stepnft_ros.episodes.schema import collate_episodes
from stepnft_ros.policy.backend import FlowBackend
from stepnft_ros.policy.policy import FlowPolicy
from stepnft_ros.policy.sampler import schedule_progress, scheduled_noise_level
from stepnft_ros.rollout import Env


@dataclass(frozen=True)
class OnlineConfig:
    """Schedule of the online loop."""

    iterations: int = 10
    """RL iterations (collect, then update), unless a budget ends first."""
    episodes_per_iteration: int = 16
    """On-policy episodes per update (a multiple of group_size)."""
    group_size: int = 1
    """Episodes per initial state (reset seed): G > 1 gives 'group_mean' labels their groups."""
    actions_per_chunk: int = 8
    """Actions of each chunk executed before re-planning."""
    eval_seeds: tuple[int, ...] = tuple(range(10_000, 10_020))
    """Held-out reset seeds for the ODE evaluations."""
    eval_every: int = 1
    """Evaluate after every this many iterations (and always after the last one)."""
    labels: str = 'terminal_binary'
    """Episode labels: a scheme of algo/labels.py ('terminal_binary', 'batch_mean', 'group_mean')."""
    noise_level: float | None = None
    """a for the Flow-SDE rollouts; None uses the policy config's."""
    noise_level_final: float | None = None
    """If set, a falls linearly with training env steps from noise_level to this value, reached at
    noise_decay_env_steps, and holds there. Wide noise finds successes early; once the policy nears
    the goal, its failures are near misses that wide noise turns into misses (docs/benchmarks-and-results.md)."""
    noise_decay_env_steps: int = 0
    """Training env steps over which noise_level_final is reached."""
    lr_final: float | None = None
    """If set (with a noise schedule), the update's lr moves linearly from the algorithm's lr to this value
    over the same noise_decay_env_steps, then holds: with less noise each update moves the policy less (KL
    per update fell threefold as a fell from 0.8 to 0.3), and a larger lr restores the step."""
    sde_noise: str = 'every_step'
    """Flow-SDE noise at every solver step, or only at the recorded step k* ('recorded_step')."""
    step_noise_correlation: float = 0.0
    """ρ of each episode's AR(1) stream of SDE step noise over its decisions (0: independent draws)."""
    antithetic: bool = False
    """Explore in mirrored pairs: episodes 2j and 2j+1 of each group share their ε and k* streams and
    take step noise ξ and −ξ (needs step_noise_correlation > 0 and an even group_size)."""
    revisit_fraction: float = 0.0
    """Share of each iteration's groups spent again on initial states whose latest group had mixed
    outcomes, the most balanced first (learnability p·(1 − p)); the rest go to fresh reset seeds. A group
    with one outcome gives group-relative labels nothing, and on PickCube about 30 % of fresh states
    have no success in 8 tries. Needs group_size > 1 (the learnability is a group's success rate)."""
    max_revisits: int = 2
    """Times one initial state may be revisited after its first group (keeps the states diverse)."""
    replay_iterations: int = 1
    """Each update trains on the rollouts of the last this many iterations (1: this iteration's only).
    Each trace keeps the v_old of the policy that sampled it, so older decisions stay valid ranking
    pairs; while one update moves the policy little, a window multiplies the decisions behind each
    gradient at no env-step cost. A resumed run refills its window."""
    time_budget_s: float = float('inf')
    """Stop after the iteration that crosses this wall-clock budget (rollouts + updates)."""
    env_step_budget: int = 0
    """Stop after the iteration that crosses this many training env steps (0: no limit)."""
    first_train_seed: int = 1_000_000
    """Training episodes reset with consecutive seeds from here (keep them apart from demo/eval seeds)."""
    seed: int = 0
    """Seeds the sampler and the update's shuffling."""

    def __post_init__(self) -> None:
        if (self.iterations < 0 or self.episodes_per_iteration < 1 or self.actions_per_chunk < 1
                or self.group_size < 1 or self.episodes_per_iteration % self.group_size or self.eval_every < 1
                or self.replay_iterations < 1):
            raise ValueError(f'bad online schedule: iterations={self.iterations}, '
                             f'episodes_per_iteration={self.episodes_per_iteration}, group_size={self.group_size}, '
                             f'actions_per_chunk={self.actions_per_chunk}, eval_every={self.eval_every}, '
                             f'replay_iterations={self.replay_iterations}')
        if not 0.0 <= self.revisit_fraction <= 1.0 or self.max_revisits < 0 or (
                self.revisit_fraction > 0.0 and self.group_size < 2):
            raise ValueError(f'revisits need 0 <= revisit_fraction <= 1, max_revisits >= 0 and group_size > 1, got '
                             f'revisit_fraction={self.revisit_fraction}, max_revisits={self.max_revisits}, '
                             f'group_size={self.group_size}')
        if self.noise_level_final is not None:
            if self.noise_level is None:
                raise ValueError('a noise schedule needs noise_level, its start: got None')
            # the schedule's own check (the policy server's too)
            scheduled_noise_level(self.noise_level, self.noise_level_final, self.noise_decay_env_steps, 0)
        if self.lr_final is not None and not (self.lr_final > 0.0 and self.noise_level_final is not None):
            raise ValueError(f'lr_final must be > 0 and follows the noise schedule (noise_level_final), got '
                             f'lr_final={self.lr_final}, noise_level_final={self.noise_level_final}')
        if self.antithetic and (self.group_size % 2 or self.step_noise_correlation <= 0.0):
            raise ValueError(f'antithetic pairs need an even group_size and step_noise_correlation > 0, got '
                             f'group_size={self.group_size}, step_noise_correlation={self.step_noise_correlation}')

    def noise_at(self, env_steps: int) -> float | None:
        """a for the rollouts that start after `env_steps` training env steps."""
        if self.noise_level is None:
            return None
        return scheduled_noise_level(self.noise_level, self.noise_level_final, self.noise_decay_env_steps, env_steps)

    def lr_at(self, env_steps: int, lr: float) -> float:
        """The update's lr after `env_steps` training env steps, from the algorithm's `lr`."""
        if self.lr_final is None:
            return lr
        return lr + (self.lr_final - lr) * schedule_progress(self.noise_decay_env_steps, env_steps)


@dataclass
class StateRecord:
    """The latest group of one training initial state (reset seed)."""

    successes: int
    episodes: int
    visits: int
    iteration: int

    @property
    def learnability(self) -> float:
        p = self.successes / self.episodes
        return p * (1.0 - p)


def plan_groups(online: OnlineConfig, states: dict[int, StateRecord], next_fresh: int) -> tuple[list[int], int]:
    """Reset seeds of one iteration's groups: up to revisit_fraction of them revisit the states whose
    latest group had mixed outcomes (highest learnability, then the most recent), the rest are fresh
    consecutive seeds from next_fresh. Returns the seeds and the next fresh seed."""
    groups = online.episodes_per_iteration // online.group_size
    wanted = round(online.revisit_fraction * groups)
    mixed = [(seed, r) for seed, r in states.items()
             if 0 < r.successes < r.episodes and r.visits <= online.max_revisits]
    mixed.sort(key=lambda item: (-item[1].learnability, -item[1].iteration, item[0]))
    revisit = [seed for seed, _ in mixed[:wanted]]
    fresh = list(range(next_fresh, next_fresh + groups - len(revisit)))
    return revisit + fresh, next_fresh + len(fresh)


def group_outcomes(episodes: list) -> list[list[int]]:
    """[seed, successes, episodes] of each group (reset seed) of one iteration, in first-seen order."""
    outcomes: dict[int, list[bool]] = {}
    for e in episodes:
        outcomes.setdefault(int(e.seed), []).append(bool(e.success))
    return [[seed, sum(r), len(r)] for seed, r in outcomes.items()]


def fold_groups(states: dict[int, StateRecord], groups: list[list[int]], iteration: int) -> None:
    """Record one iteration's groups as the latest of their states, counting the visits."""
    for seed, successes, episodes in groups:
        visits = states[seed].visits + 1 if seed in states else 1
        states[seed] = StateRecord(successes, episodes, visits, iteration)


def states_from_history(history: list[dict]) -> dict[int, StateRecord]:
    """Rebuild the per-state records of a resumed run from its history's 'groups' entries."""
    states: dict[int, StateRecord] = {}
    for entry in history:
        fold_groups(states, entry.get('groups', ()), entry['iteration'])
    return states


def run_online(env: Env | EnvPool, model: FlowBackend, online: OnlineConfig, algo: StepNFTConfig,
               log: Callable[[dict], None] | None = None, history: list[dict] | None = None,
               trainer: StepNFTTrainer | None = None,
               on_iteration: Callable[[list[dict], StepNFTTrainer], None] | None = None) -> list[dict]:
    """Evaluate (ODE), then alternate SDE rollouts and updates; one record per iteration.

    env: one environment (run in this process) or an EnvPool of worker processes. Record keys:
    iteration, env_steps (cumulative training steps), rl_wall_s (cumulative rollout + update
    time, evaluation excluded), train_success, eval_success on the iterations that evaluate
    (with eval_outcomes, one bool per eval seed; the trainer's weight average, if it keeps one, as
    ema_eval_success and ema_eval_outcomes), plus the update metrics. `history` and `trainer`
    resume an interrupted run (the model must be the trainer's); `on_iteration` sees the history
    after every iteration (e.g. to checkpoint it).
    """
    pool = env if isinstance(env, EnvPool) else EnvPool(lambda: env)
    trainer = trainer or StepNFTTrainer(model, algo, seed=online.seed)
    history = list(history or [])
    done_iterations = history[-1]['iteration'] if history else 0
    explore = FlowPolicy(model, mode=algo.rollout, seed=online.seed + 7919 * done_iterations,
                         noise_level=online.noise_level, fixed_step=algo.fixed_step(model.config.num_steps),
                         sde_noise=online.sde_noise, step_noise_correlation=online.step_noise_correlation)
    evaluator = FlowPolicy(model, mode='ode')

    averaged = trainer.averaged_model
    averaged_evaluator = FlowPolicy(averaged, mode='ode') if averaged is not None else None

    def evaluate_into(entry: dict) -> None:
        entry['eval_success'], entry['eval_outcomes'] = pool.evaluate(evaluator, online.eval_seeds,
                                                                      online.actions_per_chunk)
        if averaged_evaluator is not None and entry['iteration'] > 0:  # before the first update it is the start
            entry['ema_eval_success'], entry['ema_eval_outcomes'] = pool.evaluate(
                averaged_evaluator, online.eval_seeds, online.actions_per_chunk)

    def record(entry: dict) -> None:
        history.append(entry)
        if log is not None:
            log(entry)
        if on_iteration is not None:
            on_iteration(history, trainer)

    if not history:
        entry = {'iteration': 0, 'env_steps': 0, 'rl_wall_s': 0.0}
        evaluate_into(entry)
        record(entry)
    last = history[-1]
    env_steps, wall = last['env_steps'], last['rl_wall_s']
    groups = online.episodes_per_iteration // online.group_size
    next_fresh = last.get('next_fresh_seed', online.first_train_seed + done_iterations * groups)
    states = states_from_history(history)
    window: deque[list] = deque(maxlen=online.replay_iterations)
    for it in range(done_iterations + 1, online.iterations + 1):
        if wall >= online.time_budget_s or (online.env_step_budget and env_steps >= online.env_step_budget):
            break
        start = time.perf_counter()
        group_seeds, next_fresh = plan_groups(online, states, next_fresh)
        if online.noise_level_final is not None:  # a function of env steps, so a resumed run continues it
            explore.noise_level = online.noise_at(env_steps)
        if online.lr_final is not None:  # likewise; the optimizer's saved state keeps the last lr, so set it each time
            for group in trainer.optimizer.param_groups:
                group['lr'] = online.lr_at(env_steps, algo.lr)
        revisited = set(group_seeds) & set(states)
        seeds = [seed for seed in group_seeds for _ in range(online.group_size)]
        episodes = pool.run_episodes(explore, seeds, online.actions_per_chunk, weights_version=trainer.updates,
                                     antithetic=online.antithetic,
                                     id_prefix=f'it{it}')
        rollout_s = time.perf_counter() - start
        window.append(episodes)
        metrics = trainer.update(collate_episodes([e for batch in window for e in batch], model.config, online.labels))
        wall += time.perf_counter() - start
        steps = sum(e.env_steps for e in episodes)
        env_steps += steps
        entry = {'iteration': it, 'env_steps': env_steps, 'rl_wall_s': round(wall, 2),
                 'rollout_s': round(rollout_s, 2), 'rollout_steps_per_s': round(steps / max(rollout_s, 1e-9), 1),
                 'train_success': sum(bool(e.success) for e in episodes) / len(episodes), **metrics}
        if online.noise_level_final is not None:
            entry['noise_level'] = round(explore.noise_level, 4)
        if online.lr_final is not None:
            entry['lr'] = trainer.optimizer.param_groups[0]['lr']
        if online.group_size > 1:
            outcomes = group_outcomes(episodes)
            entry['mixed_group_fraction'] = sum(0 < k < n for _, k, n in outcomes) / len(outcomes)
            if online.revisit_fraction > 0.0:  # what a resumed run needs to rebuild its state records
                fold_groups(states, outcomes, it)
                fresh = [e for e in episodes if e.seed not in revisited]
                entry.update(groups=outcomes, next_fresh_seed=next_fresh,
                             revisited_groups=len(revisited),
                             train_success_fresh=sum(bool(e.success) for e in fresh) / max(len(fresh), 1))
        last_one = it == online.iterations or wall >= online.time_budget_s or (
            online.env_step_budget and env_steps >= online.env_step_budget)
        if it % online.eval_every == 0 or last_one:
            evaluate_into(entry)
        record(entry)
    return history
