"""Demonstrations as a chunked flow-matching dataset for SFT."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stepnft_ros.policy.modeling import FlowVLA
from stepnft_ros.policy.types import ObservationBatch


@dataclass(frozen=True)
class DemoSet:
    """State-based demonstrations, concatenated.

    states: (T, S) float32; actions: (T, D) float32; episode_lengths: (N,) int64 with sum T.
    """

    states: np.ndarray
    actions: np.ndarray
    episode_lengths: np.ndarray
    instruction: str = ''

    def __post_init__(self) -> None:
        t = self.states.shape[0]
        if self.actions.shape[0] != t or int(self.episode_lengths.sum()) != t:
            raise ValueError(f'demo arrays disagree: states {self.states.shape}, actions {self.actions.shape}, '
                             f'episode lengths sum {int(self.episode_lengths.sum())}')
        if not (np.isfinite(self.states).all() and np.isfinite(self.actions).all()):
            raise ValueError('demos contain non-finite values')

    @classmethod
    def load(cls, path: str | Path, max_episodes: int | None = None) -> DemoSet:
        """Read an .npz of plain arrays (no pickle): obs, actions, episode_lengths."""
        with np.load(path, allow_pickle=False) as data:
            missing = {'obs', 'actions', 'episode_lengths'} - set(data.files)
            if missing:
                raise ValueError(f'{path}: missing arrays {sorted(missing)}')
            states, actions = data['obs'].astype(np.float32), data['actions'].astype(np.float32)
            lengths = data['episode_lengths'].astype(np.int64)
            instruction = str(data['instruction']) if 'instruction' in data.files else ''
        if max_episodes is not None:
            lengths = lengths[:max_episodes]
            t = int(lengths.sum())
            states, actions = states[:t], actions[:t]
        return cls(states, actions, lengths, instruction)

    @property
    def num_episodes(self) -> int:
        return int(self.episode_lengths.shape[0])


class ChunkDataset:
    """Every timestep t of every demo as a training pair (o_t, A_t = a_t..a_{t+H−1}).

    Chunks running past the episode end repeat its last action and are masked out of the loss.
    """

    def __init__(self, demos: DemoSet, model: FlowVLA) -> None:
        cfg = model.config
        h = cfg.horizon
        index, mask = [], []
        start = 0
        for length in demos.episode_lengths.tolist():
            for t in range(length):
                steps = np.arange(t, t + h)
                mask.append(steps < length)
                index.append(start + np.minimum(steps, length - 1))
            start += length
        self.chunk_index = torch.from_numpy(np.asarray(index))         # (N, H) rows of `actions`
        self.mask = torch.from_numpy(np.asarray(mask, dtype=np.float32))  # (N, H)
        self.states = torch.from_numpy(demos.states)
        self.actions = model.normalizer.normalize_action(torch.from_numpy(demos.actions))
        self.obs_row = self.chunk_index[:, 0]
        self.instruction = demos.instruction

    def __len__(self) -> int:
        return int(self.chunk_index.shape[0])

    def get_batch(self, idx: torch.Tensor) -> tuple[ObservationBatch, torch.Tensor, torch.Tensor]:
        """(obs, actions (B, H, D) normalized, mask (B, H))."""
        obs = ObservationBatch(state=self.states[self.obs_row[idx]], images=None,
                               instructions=(self.instruction,) * len(idx))
        return obs, self.actions[self.chunk_index[idx]], self.mask[idx]
