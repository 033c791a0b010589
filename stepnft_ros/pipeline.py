"""Building blocks shared by the CLI and the benchmarks: SFT from a demo file, evaluation of a checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from stepnft_ros.algo.sft import SFTConfig, train_sft
from stepnft_ros.episodes.demos import ChunkDataset, DemoSet
from stepnft_ros.policy.config import PolicyConfig
from stepnft_ros.policy.modeling import FlowVLA


def sft_from_demos(demos: DemoSet, policy: PolicyConfig, sft: SFTConfig,
                   log: Callable[[int, float], None] | None = None) -> tuple[FlowVLA, list[float]]:
    """A state-based policy cloned from `demos`; state/action sizes come from the demos."""
    cfg = replace(policy, state_dim=demos.states.shape[1], action_dim=demos.actions.shape[1])
    torch.manual_seed(sft.seed)
    model = FlowVLA(cfg)
    model.normalizer.fit(demos.states, demos.actions)
    data = ChunkDataset(demos, model)
    losses = train_sft(model, len(data), data.get_batch, sft, log=log)
    return model, losses
