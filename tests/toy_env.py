"""A 2-D point-reach task for fast, seeded learning tests (no simulator needed).

State (4,): point position p and goal g. Action (2,): velocity in [-1, 1]², p += SPEED·a.
Success: ||p − g|| < RADIUS within MAX_STEPS steps (the episode ends there).
"""

from __future__ import annotations

import numpy as np

SPEED = 0.15
RADIUS = 0.08
MAX_STEPS = 8


class PointReach:
    action_low = -np.ones(2, dtype=np.float32)
    action_high = np.ones(2, dtype=np.float32)

    def __init__(self) -> None:
        self.pos = np.zeros(2, np.float32)
        self.goal = np.zeros(2, np.float32)
        self.steps = 0

    def _obs(self) -> dict:
        return {'state': np.concatenate([self.pos, self.goal]).astype(np.float32), 'instruction': 'reach the goal'}

    def reset(self, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        self.pos = rng.uniform(-0.3, 0.3, 2).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        self.goal = (self.pos + 0.45 * np.array([np.cos(angle), np.sin(angle)])).astype(np.float32)
        self.steps = 0
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[dict, bool, bool]:
        self.pos = (self.pos + SPEED * np.clip(action, -1, 1)).astype(np.float32)
        self.steps += 1
        success = bool(np.linalg.norm(self.pos - self.goal) < RADIUS)
        return self._obs(), success, success or self.steps >= MAX_STEPS


def expert_demos(n: int, seed: int, action_noise: float,
                 bias: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Straight-line demos with Gaussian noise and a constant `bias` (a miscalibrated teleoperator):
    states (T, 4), actions (T, 2), episode lengths (n,)."""
    rng = np.random.default_rng(seed)
    env = PointReach()
    states, actions, lengths = [], [], []
    for i in range(n):
        obs = env.reset(seed + i)
        done, t = False, 0
        while not done:
            direction = env.goal - env.pos
            heading = direction / max(np.linalg.norm(direction), 1e-6)
            act = np.clip(heading + np.asarray(bias) + rng.normal(0, action_noise, 2), -1, 1)
            states.append(obs['state'])
            actions.append(act.astype(np.float32))
            obs, _, done = env.step(act)
            t += 1
        lengths.append(t)
    return np.asarray(states), np.asarray(actions), np.asarray(lengths)
