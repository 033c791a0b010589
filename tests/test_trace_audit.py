"""bench/trace_audit.py: passes the bags a policy really recorded, and catches a mis-filed trace or outcome."""

from __future__ import annotations

import dataclasses

import torch
from ros_harness import bench_module
from test_episode_store import TOY, rollout_store
from toy_env import PointReach

from stepnft_ros.episodes.store import EpisodeStore
from stepnft_ros.policy import FlowPolicy, FlowVLA, save_checkpoint
from stepnft_ros.rollout import run_episode


def test_the_audit_passes_real_rollouts_and_flags_misfiled_traces_and_outcomes(tmp_path):
    torch.manual_seed(0)
    model = FlowVLA(TOY)
    save_checkpoint(tmp_path / 'sft', model, {'weights_version': 0})
    store = rollout_store(tmp_path / 'run' / 'episodes', model, seeds=range(40))
    audit = bench_module('trace_audit').audit
    clean = audit(tmp_path / 'run', tmp_path / 'sft', episodes=40, actions_per_chunk=4, step_cap=8,
                  recorded_step=False)
    (version0,) = clean['per_version']
    assert version0['episodes'] == 40 and clean['outcome_length_inconsistent_count'] == 0
    assert clean['max_abs_v_minus_v_old'] < 1e-4 and version0['max_abs_chunk_minus_x_K'] < 1e-5
    for step in clean['sde_step']:  # the toy's noise level 0.5, a few dozen decisions per step
        assert abs(step['residual_std'] / step['sde_std'] - 1) < 0.25, step

    # Mis-file: the first two episodes swap their decisions' observations, and a success is relabelled.
    episodes = [store.load(i) for i in store.episode_ids()]
    a, b = episodes[0], episodes[1]
    swapped_a = [dataclasses.replace(d, observation=b.decisions[0].observation) for d in a.decisions]
    bad = EpisodeStore(tmp_path / 'bad' / 'episodes')
    bad.write(dataclasses.replace(a, decisions=swapped_a))
    short = next(e for e in episodes if e.success and e.env_steps < 8)
    bad.write(dataclasses.replace(short, episode_id=short.episode_id + '-relabelled', success=False))
    flagged = audit(tmp_path / 'bad', tmp_path / 'sft', episodes=10, actions_per_chunk=4, step_cap=8,
                    recorded_step=False)
    assert flagged['max_abs_v_minus_v_old'] > 1e-3
    assert flagged['outcome_length_inconsistent_count'] == 1


def test_the_audit_checks_each_version_against_its_own_checkpoint_and_the_chunk_against_its_trace(tmp_path):
    torch.manual_seed(0)
    start, later = FlowVLA(TOY), FlowVLA(TOY)
    save_checkpoint(tmp_path / 'sft', start, {'weights_version': 0})
    save_checkpoint(tmp_path / 'run' / 'learner' / 'checkpoints' / 'v000001', later,
                    {'weights_version': 1, 'learner': {'consumed': [f'v0s{seed}' for seed in range(10)]}})
    store = EpisodeStore(tmp_path / 'run' / 'episodes')
    for version, model in ((0, start), (1, later)):  # noise at k* only: x_K continues x_k*+1 by ODE steps
        policy = FlowPolicy(model, mode='sde', seed=version, sde_noise='recorded_step')
        for seed in range(10):
            store.write(run_episode(PointReach(), policy, seed, 4, weights_version=version,
                                    episode_id=f'v{version}s{seed}'))
    audit = bench_module('trace_audit').audit
    clean = audit(tmp_path / 'run', tmp_path / 'sft', episodes=20, actions_per_chunk=4, step_cap=8)
    assert [r['weights_version'] for r in clean['per_version']] == [0, 1]
    for row in clean['per_version']:
        assert row['max_abs_v_minus_v_old'] < 1e-4 and row['max_abs_chunk_minus_x_K'] < 1e-5, row
        assert row['max_abs_x_K_minus_ode_continuation'] < 1e-4, row

    # a stale hot swap (version 1's decisions sampled by the start's weights), a chunk from another decision
    swapped = EpisodeStore(tmp_path / 'swapped' / 'episodes')
    (tmp_path / 'swapped' / 'learner').mkdir()
    (tmp_path / 'swapped' / 'learner' / 'checkpoints').symlink_to(tmp_path / 'run' / 'learner' / 'checkpoints')
    for i in store.episode_ids():
        e = store.load(i)
        if e.weights_version == 0:
            first = dataclasses.replace(e.decisions[0], chunk=e.decisions[-1].chunk)
            e = dataclasses.replace(e, weights_version=1, decisions=[first, *e.decisions[1:]])
        swapped.write(e)
    flagged = audit(tmp_path / 'swapped', tmp_path / 'sft', episodes=20, actions_per_chunk=4, step_cap=8)
    (row,) = flagged['per_version']
    assert row['max_abs_v_minus_v_old'] > 1e-3 and row['max_abs_chunk_minus_x_K'] > 1e-3


def test_replay_reproduces_recorded_episodes_and_flags_a_chunk_the_robot_did_not_run(tmp_path):
    torch.manual_seed(0)
    store = rollout_store(tmp_path / 'episodes', FlowVLA(TOY), seeds=range(12))
    episodes = [store.load(i) for i in store.episode_ids()]
    replay = bench_module('trace_audit').replay
    clean = replay(episodes, PointReach, actions_per_chunk=4)
    assert clean['episodes'] == 12 and clean['max_abs_state_difference'] == 0.0
    assert clean['length_or_outcome_mismatched'] == []

    e = episodes[0]
    flipped = dataclasses.replace(e.decisions[0], chunk=-e.decisions[0].chunk)
    tampered = replay([dataclasses.replace(e, decisions=[flipped, *e.decisions[1:]])], PointReach, actions_per_chunk=4)
    assert tampered['max_abs_state_difference'] > 0.1
