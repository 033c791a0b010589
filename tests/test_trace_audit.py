"""bench/trace_audit.py: passes the bags a policy really recorded, and catches a mis-filed trace or outcome."""

from __future__ import annotations

import dataclasses

import torch
from ros_harness import bench_module
from test_episode_store import TOY, rollout_store

from stepnft_ros.episodes.store import EpisodeStore
from stepnft_ros.policy import FlowVLA, save_checkpoint


def test_the_audit_passes_real_rollouts_and_flags_misfiled_traces_and_outcomes(tmp_path):
    torch.manual_seed(0)
    model = FlowVLA(TOY)
    save_checkpoint(tmp_path / 'sft', model, {'weights_version': 0})
    store = rollout_store(tmp_path / 'run' / 'episodes', model, seeds=range(40))
    audit = bench_module('trace_audit').audit
    clean = audit(tmp_path / 'run', tmp_path / 'sft', episodes=40, actions_per_chunk=4, step_cap=8)
    assert clean['version0_episodes'] == 40 and clean['outcome_length_inconsistent_count'] == 0
    assert clean['max_abs_v_minus_v_old'] < 1e-4
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
    flagged = audit(tmp_path / 'bad', tmp_path / 'sft', episodes=10, actions_per_chunk=4, step_cap=8)
    assert flagged['max_abs_v_minus_v_old'] > 1e-3
    assert flagged['outcome_length_inconsistent_count'] == 1
