"""A real learning test: π-StepNFT raises the success of a deliberately weak SFT policy.

The demonstrations come from a miscalibrated teleoperator (a constant bias on every action),
so behaviour cloning reproduces the bias and succeeds only sometimes; online RL from
success/failure alone must correct it. Seeded; takes well under a minute on one CPU core.
"""

import numpy as np
import torch
from toy_env import PointReach, expert_demos

from stepnft_ros.algo import SFTConfig, StepNFTConfig, train_sft
from stepnft_ros.episodes.demos import ChunkDataset, DemoSet
from stepnft_ros.online import OnlineConfig, run_online
from stepnft_ros.policy import FlowVLA, PolicyConfig


def test_stepnft_improves_a_weak_sft_policy_on_point_reach():
    torch.manual_seed(0)
    states, actions, lengths = expert_demos(30, seed=0, action_noise=0.3, bias=(1.0, 0.0))
    cfg = PolicyConfig(state_dim=4, action_dim=2, horizon=4, d_model=64, n_heads=4, prefix_layers=0,
                       expert_layers=2, num_steps=4, noise_level=0.5)
    model = FlowVLA(cfg)
    model.normalizer.fit(states, actions)
    data = ChunkDataset(DemoSet(states, actions, lengths), model)
    train_sft(model, len(data), data.get_batch, SFTConfig(steps=300, batch_size=128, lr=1e-3))
    history = run_online(PointReach(), model,
                         OnlineConfig(iterations=24, episodes_per_iteration=64, actions_per_chunk=4,
                                      eval_seeds=tuple(range(1000, 1064))),
                         StepNFTConfig(lr=1e-4, epochs=2, minibatch_size=64))
    sft_success = history[0]['eval_success']
    final_success = np.mean([h['eval_success'] for h in history[-3:]])
    assert sft_success < 0.4, 'the SFT policy should be weak, or the test proves nothing'
    assert final_success >= sft_success + 0.15, [round(h['eval_success'], 3) for h in history]
    assert all(np.isfinite(h['loss']) for h in history[1:])


def test_the_weight_average_is_evaluated_beside_the_trained_weights_on_the_same_seeds():
    torch.manual_seed(0)
    cfg = PolicyConfig(state_dim=4, action_dim=2, horizon=4, d_model=16, n_heads=2, prefix_layers=0,
                       expert_layers=1, num_steps=4, noise_level=0.5)
    seeds = tuple(range(1000, 1008))
    history = run_online(PointReach(), FlowVLA(cfg),
                         OnlineConfig(iterations=2, episodes_per_iteration=8, actions_per_chunk=4, eval_seeds=seeds),
                         StepNFTConfig(lr=1e-2, epochs=1, minibatch_size=64, ema_decay=0.5))
    assert 'ema_eval_success' not in history[0]  # before any update the average is the start itself
    for entry in history[1:]:
        assert len(entry['ema_eval_outcomes']) == len(seeds)
        assert entry['ema_eval_success'] == np.mean(entry['ema_eval_outcomes'])
