"""Demonstrations as a chunked flow-matching dataset for SFT."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stepnft_ros.policy.modeling import FlowVLA
from stepnft_ros.policy.types import ObservationBatch

IMAGE_KEY_PREFIX = 'image_'
"""In a demo .npz, camera <name>'s frames are the array `image_<name>`."""


@dataclass(frozen=True)
class DemoSet:
    """Demonstrations, concatenated over episodes.

    states: (T, S) float32 (S may be 0: no state); actions: (T, D) float32; episode_lengths: (N,)
    int64 with sum T; instruction: one instruction for every episode, or instructions: one per
    episode (N strings; given, it wins); images: camera name -> (T, h, w, 3) uint8 RGB, the same
    square size for every camera. Arrays are kept as given (no copies): a demo set with images
    holds them once, as uint8.
    """

    states: np.ndarray
    actions: np.ndarray
    episode_lengths: np.ndarray
    instruction: str = ''
    images: Mapping[str, np.ndarray] = field(default_factory=dict)
    instructions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        t = self.states.shape[0]
        if self.states.ndim != 2 or self.actions.ndim != 2:
            raise ValueError(f'demo states and actions must be 2-D, got {self.states.shape}, {self.actions.shape}')
        if self.actions.shape[0] != t or int(self.episode_lengths.sum()) != t:
            raise ValueError(f'demo arrays disagree: states {self.states.shape}, actions {self.actions.shape}, '
                             f'episode lengths sum {int(self.episode_lengths.sum())}')
        if (self.episode_lengths < 1).any():
            raise ValueError('every demo episode needs at least one step')
        if not (np.isfinite(self.states).all() and np.isfinite(self.actions).all()):
            raise ValueError('demos contain non-finite values')
        sizes = set()
        for name, frames in self.images.items():
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != t or frames.shape[3] != 3:
                raise ValueError(f'camera {name!r}: frames are {frames.dtype} {frames.shape}, expected ({t}, h, w, 3) '
                                 'uint8 RGB')
            if frames.shape[1] != frames.shape[2]:
                raise ValueError(f'camera {name!r}: frames are {frames.shape[2]}x{frames.shape[1]}, expected square')
            sizes.add(frames.shape[1])
        if len(sizes) > 1:
            raise ValueError(f'cameras have different image sizes {sorted(sizes)}; resize them to one size')
        if self.instructions:
            object.__setattr__(self, 'instructions', tuple(str(s) for s in self.instructions))
            if len(self.instructions) != self.num_episodes:
                raise ValueError(f'{len(self.instructions)} instructions for {self.num_episodes} episodes')
        else:
            object.__setattr__(self, 'instructions', (self.instruction,) * self.num_episodes)

    @classmethod
    def load(cls, path: str | Path, max_episodes: int | None = None) -> DemoSet:
        """Read an .npz of plain arrays (no pickle): obs, actions, episode_lengths; optionally
        instruction (one string) or instructions (N strings), and image_<camera> (T, h, w, 3) uint8."""
        with np.load(path, allow_pickle=False) as data:
            missing = {'obs', 'actions', 'episode_lengths'} - set(data.files)
            if missing:
                raise ValueError(f'{path}: missing arrays {sorted(missing)}')
            states, actions = data['obs'].astype(np.float32), data['actions'].astype(np.float32)
            lengths = data['episode_lengths'].astype(np.int64)
            instruction = str(data['instruction']) if 'instruction' in data.files else ''
            instructions = tuple(str(s) for s in data['instructions']) if 'instructions' in data.files else ()
            images = {key[len(IMAGE_KEY_PREFIX):]: data[key] for key in data.files if key.startswith(IMAGE_KEY_PREFIX)}
        if max_episodes is not None:
            lengths = lengths[:max_episodes]
            instructions = instructions[:max_episodes]
            t = int(lengths.sum())
            states, actions = states[:t], actions[:t]
            images = {name: frames[:t] for name, frames in images.items()}
        return cls(states, actions, lengths, instruction, images, instructions)

    def save(self, path: str | Path) -> Path:
        """Write the .npz that `load` reads (uncompressed, atomically)."""
        import io

        from stepnft_ros.atomic import atomic_write_bytes

        buffer = io.BytesIO()
        np.savez(buffer, obs=self.states, actions=self.actions, episode_lengths=self.episode_lengths,
                 instructions=np.asarray(self.instructions, dtype=str),
                 **{IMAGE_KEY_PREFIX + name: frames for name, frames in self.images.items()})
        return atomic_write_bytes(path, buffer.getvalue())

    @property
    def num_episodes(self) -> int:
        return int(self.episode_lengths.shape[0])

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(self.images)

    @property
    def image_size(self) -> int | None:
        """Side of the square camera images, None without cameras."""
        return next((int(frames.shape[1]) for frames in self.images.values()), None)


class ChunkDataset:
    """Every timestep t of every demo as a training pair (o_{t−lag}, A_t = a_t..a_{t+H−1}).

    Chunks running past the episode end repeat its last action and are masked out of the loss. With
    `observation_lag` > 0 each chunk is paired with an older observation (the episode's first one
    while t < lag), as a loop with that delay would show it to the policy.
    Images are gathered per batch from the demo arrays (uint8, no copy of the whole set).
    """

    def __init__(self, demos: DemoSet, model: FlowVLA, observation_lag: int = 0, state_dropout: float = 0.0,
                 state_dropout_dims: tuple[int, ...] = (), seed: int = 0) -> None:
        cfg = model.config
        if observation_lag < 0:
            raise ValueError(f'observation_lag must be >= 0, got {observation_lag}')
        if state_dropout_dims and not all(0 <= d < cfg.state_dim for d in state_dropout_dims):
            raise ValueError(f'state_dropout_dims {state_dropout_dims} are not all dims of the '
                             f'{cfg.state_dim}-dim state')
        missing = [c for c in cfg.camera_names if c not in demos.images]
        if missing:
            raise ValueError(f'the policy expects cameras {missing} that the demos do not have '
                             f'(demos have {list(demos.images)})')
        if cfg.camera_names and demos.image_size != cfg.image_size:
            raise ValueError(f'demo images are {demos.image_size} px, the policy expects {cfg.image_size}')
        if demos.states.shape[1] != cfg.state_dim:
            raise ValueError(f'demo states have {demos.states.shape[1]} dims, the policy expects {cfg.state_dim}')
        h = cfg.horizon
        index, mask, obs_row = [], [], []
        start = 0
        for length in demos.episode_lengths.tolist():
            for t in range(length):
                steps = np.arange(t, t + h)
                mask.append(steps < length)
                index.append(start + np.minimum(steps, length - 1))
                obs_row.append(start + max(t - observation_lag, 0))
            start += length
        self.chunk_index = torch.from_numpy(np.asarray(index))         # (N, H) rows of `actions`
        self.mask = torch.from_numpy(np.asarray(mask, dtype=np.float32))  # (N, H)
        self.states = torch.from_numpy(demos.states) if cfg.state_dim else None
        self.actions = model.normalizer.normalize_action(torch.from_numpy(demos.actions))
        self.obs_row = torch.tensor(obs_row, dtype=torch.long)
        self.frames = [demos.images[c] for c in cfg.camera_names]
        self.instructions = demos.instructions
        self.episode_of_row = np.repeat(np.arange(demos.num_episodes), demos.episode_lengths)
        self.state_dropout = state_dropout
        self.state_dropout_dims = torch.tensor(state_dropout_dims, dtype=torch.long)
        self.dropout_generator = torch.Generator().manual_seed(seed)  # its own stream: batches stay as they were

    def __len__(self) -> int:
        return int(self.chunk_index.shape[0])

    def get_batch(self, idx: torch.Tensor) -> tuple[ObservationBatch, torch.Tensor, torch.Tensor]:
        """(obs, actions (B, H, D) normalized, mask (B, H)); obs.images is (B, C, 3, h, w) uint8."""
        rows = self.obs_row[idx]
        images = None
        if self.frames:
            picked = rows.numpy()
            # (B, C, h, w, 3) -> (B, C, 3, h, w): only the batch's frames are copied
            stacked = np.stack([frames[picked] for frames in self.frames], axis=1)
            images = torch.from_numpy(stacked).permute(0, 1, 4, 2, 3).contiguous()
        episodes = self.episode_of_row[rows.numpy()]
        state = None if self.states is None else self.states[rows]  # a copy: indexing gathers
        if state is not None and self.state_dropout > 0:
            dropped = torch.rand(len(rows), generator=self.dropout_generator) < self.state_dropout
            state[dropped.nonzero()[:, :1], self.state_dropout_dims] = 0.0
        obs = ObservationBatch(state=state, images=images,
                               instructions=tuple(self.instructions[e] for e in episodes))
        return obs, self.actions[self.chunk_index[idx]], self.mask[idx]
