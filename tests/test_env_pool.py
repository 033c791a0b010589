"""EnvPool: worker processes feeding one batched policy, crash recovery, executed-action counts."""

import itertools
import os
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_env import PointReach

from stepnft_ros.env_pool import EnvPool
from stepnft_ros.policy import FlowPolicy, FlowVLA, PolicyConfig
from stepnft_ros.policy.sampler import recorded_noise
from stepnft_ros.rollout import run_episode


class CrashOnce(PointReach):
    """Dies (as a simulator segfault would) on its first reset with `crash_seed`, if `flag` is absent."""

    def __init__(self, flag: str, crash_seed: int) -> None:
        super().__init__()
        self.flag, self.crash_seed = Path(flag), crash_seed

    def reset(self, seed: int) -> dict:
        if seed == self.crash_seed and not self.flag.exists():
            self.flag.write_text('crashed')
            os._exit(1)
        return super().reset(seed)


def small_model() -> FlowVLA:
    torch.manual_seed(0)
    return FlowVLA(PolicyConfig(state_dim=4, action_dim=2, horizon=4, d_model=16, n_heads=2, prefix_layers=0,
                                expert_layers=1, num_steps=4))


def test_ode_outcomes_do_not_depend_on_how_many_workers_run_them():
    model = small_model()
    seeds = list(range(100, 112))
    with EnvPool(PointReach) as inline:
        inline_episodes = inline.run_episodes(FlowPolicy(model, mode='ode'), seeds, actions_per_chunk=2)
    with EnvPool(PointReach, num_workers=2) as pool:
        pooled = pool.run_episodes(FlowPolicy(model, mode='ode'), seeds, actions_per_chunk=2)
    assert [e.seed for e in pooled] == seeds
    for a, b in zip(inline_episodes, pooled, strict=True):
        assert a.success == b.success and a.env_steps == b.env_steps
        # equal up to float rounding: a batch of two multiplies in another order than a batch of one
        assert all(np.allclose(da.chunk, db.chunk, atol=1e-5) for da, db in zip(a.decisions, b.decisions, strict=True))
    for e in pooled:  # every decision says how many of its actions ran; together they are the episode
        assert all(1 <= d.executed <= 2 for d in e.decisions)
        assert sum(d.executed for d in e.decisions) == e.env_steps


def test_a_crashed_worker_is_restarted_and_its_episode_rerun(tmp_path):
    flag = tmp_path / 'crashed'
    logs = []
    with EnvPool(partial(CrashOnce, str(flag), 5), num_workers=2, log=logs.append) as pool:
        episodes = pool.run_episodes(FlowPolicy(small_model(), mode='sde'), [3, 4, 5, 6, 5], actions_per_chunk=2)
        assert pool.restarts == 1
    assert flag.exists() and any('restarting' in line for line in logs)
    assert [e.seed for e in episodes] == [3, 4, 5, 6, 5]
    assert all(e.finished and e.decisions for e in episodes)
    assert len({e.episode_id for e in episodes}) == 5  # the group's two seed-5 episodes stay apart


def test_online_loop_with_groups_resumes_where_it_stopped():
    from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer
    from stepnft_ros.online import OnlineConfig, run_online

    model = small_model()
    online = OnlineConfig(iterations=2, episodes_per_iteration=4, group_size=2, labels="group_mean",
                          actions_per_chunk=4, eval_seeds=(500, 501, 502), eval_every=2)
    algo = StepNFTConfig(minibatch_size=64)
    trainer = StepNFTTrainer(model, algo)
    seen = []
    history = run_online(PointReach(), model, online, algo, trainer=trainer,
                         on_iteration=lambda h, _: seen.append(h[-1]['iteration']))
    assert seen == [0, 1, 2]
    assert [('eval_success' in h) for h in history] == [True, False, True]  # start, every 2nd, last
    assert len(history[-1]['eval_outcomes']) == 3 and history[2]['env_steps'] > history[1]['env_steps'] > 0
    more = run_online(PointReach(), model, replace(online, iterations=3), algo, history=history, trainer=trainer)
    assert [h['iteration'] for h in more] == [0, 1, 2, 3] and trainer.updates == 3
    assert more[3]['env_steps'] > more[2]['env_steps']


def test_online_loop_explores_in_antithetic_pairs():
    from stepnft_ros.algo.stepnft import StepNFTConfig
    from stepnft_ros.online import OnlineConfig, run_online

    online = OnlineConfig(iterations=1, episodes_per_iteration=4, group_size=4, labels='group_mean', noise_level=0.5,
                          sde_noise='recorded_step', step_noise_correlation=1.0, antithetic=True,
                          actions_per_chunk=4, eval_seeds=(500,))
    history = run_online(PointReach(), small_model(), online, StepNFTConfig(minibatch_size=64))
    assert history[1]['episodes'] == 4 and np.isfinite(history[1]['loss'])
    for bad in (dict(group_size=1, episodes_per_iteration=4), dict(step_noise_correlation=0.0)):
        with pytest.raises(ValueError, match='antithetic pairs need an even group_size'):
            replace(online, **bad)


def test_the_noise_level_falls_with_env_steps_and_a_resumed_run_continues_the_schedule():  # the lr with it
    from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer
    from stepnft_ros.online import OnlineConfig, run_online

    schedule = OnlineConfig(noise_level=0.8, noise_level_final=0.2, noise_decay_env_steps=100)
    assert [schedule.noise_at(n) for n in (0, 50, 100, 500)] == pytest.approx([0.8, 0.5, 0.2, 0.2])
    assert OnlineConfig(noise_level=0.8).noise_at(10**9) == 0.8
    rising = replace(schedule, lr_final=3e-4)
    assert [rising.lr_at(n, 1e-4) for n in (0, 50, 100, 500)] == pytest.approx([1e-4, 2e-4, 3e-4, 3e-4])
    assert schedule.lr_at(50, 1e-4) == 1e-4
    for bad in (dict(lr_final=0.0), dict(lr_final=1e-4, noise_level_final=None)):
        with pytest.raises(ValueError, match='lr_final must be > 0 and follows the noise schedule'):
            replace(schedule, **bad)
    for bad in (dict(noise_level=None), dict(noise_decay_env_steps=0), dict(noise_level_final=-0.1)):
        with pytest.raises(ValueError, match='a noise schedule needs'):
            replace(schedule, **bad)

    model = small_model()
    online = replace(schedule, iterations=2, episodes_per_iteration=2, actions_per_chunk=4, eval_seeds=(500,),
                     eval_every=2, noise_decay_env_steps=60, lr_final=3e-4)
    algo = StepNFTConfig(minibatch_size=64)
    trainer = StepNFTTrainer(model, algo)
    history = run_online(PointReach(), model, online, algo, trainer=trainer)
    more = run_online(PointReach(), model, replace(online, iterations=3), algo, history=history, trainer=trainer)
    for before, entry in itertools.pairwise(more):  # each iteration's rollouts use a at the env steps before it
        assert entry['noise_level'] == pytest.approx(online.noise_at(before['env_steps']), abs=1e-4)
        assert entry['lr'] == pytest.approx(online.lr_at(before['env_steps'], algo.lr))  # and its update's lr
    assert more[1]['noise_level'] == 0.8 and more[3]['noise_level'] < more[2]['noise_level'] < 0.8
    assert more[1]['lr'] == algo.lr < more[2]['lr'] < more[3]['lr'] <= 3e-4
    assert trainer.optimizer.param_groups[0]['lr'] == more[3]['lr']


def test_revisits_go_to_the_most_balanced_mixed_states_and_survive_a_resume():
    from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer
    from stepnft_ros.online import OnlineConfig, StateRecord, plan_groups, run_online, states_from_history

    online = OnlineConfig(episodes_per_iteration=16, group_size=4, revisit_fraction=0.5, max_revisits=1)
    states = {10: StateRecord(1, 4, 1, 1), 11: StateRecord(2, 4, 1, 1), 12: StateRecord(0, 4, 1, 1),
              13: StateRecord(4, 4, 1, 1), 14: StateRecord(2, 4, 2, 1), 15: StateRecord(3, 4, 1, 2)}
    # 2 of 4 groups revisit: 11 (p = 0.5) first, then 15 (newer) before 10 (same p(1 - p)); 12 and 13 have one
    # outcome, 14 has used its revisit
    assert plan_groups(online, states, next_fresh=100) == ([11, 15, 100, 101], 102)
    assert plan_groups(replace(online, revisit_fraction=0.0), states, 100) == ([100, 101, 102, 103], 104)
    assert plan_groups(online, {}, 100) == ([100, 101, 102, 103], 104)  # nothing to revisit yet
    with pytest.raises(ValueError, match='revisits need'):
        OnlineConfig(revisit_fraction=0.5, group_size=1)

    model = small_model()
    loop = OnlineConfig(iterations=2, episodes_per_iteration=8, group_size=2, labels='group_mean', noise_level=0.8,
                        revisit_fraction=0.5, actions_per_chunk=4, eval_seeds=(500,), eval_every=2)
    algo = StepNFTConfig(minibatch_size=64)
    trainer = StepNFTTrainer(model, algo)
    history = run_online(PointReach(), model, loop, algo, trainer=trainer)
    for h in history[1:]:
        assert sum(n for _, _, n in h['groups']) == 8 and 0.0 <= h['mixed_group_fraction'] <= 1.0
    # a resumed run plans from the same records as an uninterrupted one would
    rebuilt = states_from_history(history)
    assert {seed for seed, _, _ in history[2]['groups']} <= set(rebuilt)
    assert history[2]['revisited_groups'] <= 2
    more = run_online(PointReach(), model, replace(loop, iterations=3), algo, history=history, trainer=trainer)
    assert more[3]['next_fresh_seed'] == history[2]['next_fresh_seed'] + 4 - more[3]['revisited_groups']


def test_each_update_trains_on_the_replay_window_of_recent_iterations():
    from stepnft_ros.algo.stepnft import StepNFTConfig
    from stepnft_ros.online import OnlineConfig, run_online

    online = OnlineConfig(iterations=4, episodes_per_iteration=3, actions_per_chunk=4, eval_seeds=(500,),
                          eval_every=4, labels='batch_mean', replay_iterations=2)
    history = run_online(PointReach(), small_model(), online, StepNFTConfig(minibatch_size=64))
    # the first update sees its own 3 episodes, every later one also the previous iteration's 3
    assert [h['episodes'] for h in history[1:]] == [3, 6, 6, 6]
    assert all(0.0 <= h['train_success'] <= 1.0 for h in history[1:])


def test_correlated_step_noise_leans_each_episode_one_way():
    model = small_model()
    seeds = [100, 100, 101]
    with EnvPool(PointReach, num_workers=2) as pool:
        policy = FlowPolicy(model, mode='sde', noise_level=0.5, sde_noise='recorded_step', step_noise_correlation=1.0)
        episodes = pool.run_episodes(policy, seeds, actions_per_chunk=2)
        independent = pool.run_episodes(FlowPolicy(model, mode='sde', noise_level=0.5, sde_noise='recorded_step'),
                                        seeds, actions_per_chunk=2)
    first = []
    for e in episodes:
        xi = [recorded_noise(d.trace, 4) for d in e.decisions]
        assert len(xi) > 2 and all(torch.allclose(x, xi[0], atol=1e-4) for x in xi)  # ρ = 1: one ξ per episode
        first.append(xi[0])
    assert not torch.allclose(first[0], first[1], atol=1e-2)  # the group's episodes lean different ways
    xi = [recorded_noise(d.trace, 4) for d in independent[0].decisions]
    assert not torch.allclose(xi[0], xi[1], atol=1e-2)


def test_one_episode_on_its_own_streams_is_the_pool_rollout_from_its_seed():
    """run_episode(episode_streams=True), one env in this process (failure analyses), draws what an
    EnvPool training rollout from the same seed draws: its ε stream and its correlated step noise."""
    model = small_model()

    def policy() -> FlowPolicy:
        return FlowPolicy(model, mode='sde', noise_level=0.5, sde_noise='recorded_step', step_noise_correlation=0.5)

    with EnvPool(PointReach) as inline:
        pooled = inline.run_episodes(policy(), [103], actions_per_chunk=2)[0]
    alone = run_episode(PointReach(), policy(), 103, actions_per_chunk=2, episode_streams=True)
    assert (alone.success, alone.env_steps) == (pooled.success, pooled.env_steps) and len(alone.decisions) > 2
    for a, b in zip(alone.decisions, pooled.decisions, strict=True):
        assert a.executed == b.executed and np.allclose(a.chunk, b.chunk, atol=1e-6)
        assert torch.allclose(recorded_noise(a.trace, 4), recorded_noise(b.trace, 4), atol=1e-4)
    on_policy_generator = run_episode(PointReach(), policy(), 103, actions_per_chunk=2)
    assert not np.allclose(on_policy_generator.decisions[0].chunk, alone.decisions[0].chunk, atol=1e-3)


def test_antithetic_pairs_share_their_draws_and_mirror_the_step_noise():
    model = small_model()
    policy = FlowPolicy(model, mode='sde', noise_level=0.5, sde_noise='recorded_step', step_noise_correlation=1.0)
    with EnvPool(PointReach, num_workers=2) as pool:
        episodes = pool.run_episodes(policy, [100] * 4 + [101] * 2, actions_per_chunk=2, antithetic=True)
        with pytest.raises(ValueError, match='antithetic'):  # nothing to mirror without an episode's ξ
            pool.run_episodes(FlowPolicy(model, mode='sde', noise_level=0.5), [100, 100], 2, antithetic=True)

    def first(e):
        return e.decisions[0].trace

    for plus, minus in ((episodes[0], episodes[1]), (episodes[2], episodes[3]), (episodes[4], episodes[5])):
        a, b = first(plus), first(minus)
        # same state, ε and k*: the chains agree up to the recorded step, then split by ±ξ
        assert torch.equal(a.k, b.k) and torch.allclose(a.x_k, b.x_k, atol=1e-6)
        assert torch.allclose(recorded_noise(a, 4), -recorded_noise(b, 4), atol=1e-4)  # ξ and −ξ
        n = min(len(plus.decisions), len(minus.decisions))
        assert [int(d.trace.k) for d in plus.decisions[:n]] == [int(d.trace.k) for d in minus.decisions[:n]]
    # pairs of one group explore different directions
    assert not torch.allclose(recorded_noise(first(episodes[0]), 4), recorded_noise(first(episodes[2]), 4), atol=1e-2)
