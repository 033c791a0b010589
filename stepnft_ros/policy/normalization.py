"""State/action normalization statistics, stored as buffers so they travel with the weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# Dimensions that barely vary in the demos (e.g. a gripper held closed) must not blow up.
MIN_STD = 1e-2


class Normalizer(nn.Module):
    """z-scores states and actions: the flow model works on normalized actions."""

    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__()
        self.register_buffer('state_mean', torch.zeros(state_dim))
        self.register_buffer('state_std', torch.ones(state_dim))
        self.register_buffer('action_mean', torch.zeros(action_dim))
        self.register_buffer('action_std', torch.ones(action_dim))

    @torch.no_grad()
    def fit(self, states: np.ndarray | None, actions: np.ndarray) -> None:
        """Set statistics from demonstrations: states (N, S), actions (N, D)."""
        if states is not None and self.state_mean.numel():
            s = torch.as_tensor(states, dtype=torch.float32)
            self.state_mean.copy_(s.mean(0))
            self.state_std.copy_(s.std(0).clamp_min(MIN_STD))
        a = torch.as_tensor(actions, dtype=torch.float32)
        self.action_mean.copy_(a.mean(0))
        self.action_std.copy_(a.std(0).clamp_min(MIN_STD))

    def normalize_state(self, state: torch.Tensor) -> torch.Tensor:  # (..., S)
        return (state - self.state_mean) / self.state_std

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:  # (..., D)
        return (action - self.action_mean) / self.action_std

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:  # (..., D)
        return action * self.action_std + self.action_mean
