"""What every simulator adapter shares: action checks before stepping, closing, `with` support."""

from __future__ import annotations

import numpy as np


class SimEnv:
    """Base of the numpy reset/step adapters (ManiSkillEnv, LiberoEnv); `_env` is the wrapped simulator."""

    _env = None
    action_dim: int
    _done: bool

    instruction: str

    def instruction_for(self, seed: int) -> str:
        """The instruction of the episode `seed` starts; known before the reset, so a bridge can
        publish it ahead of the episode's first observation (they travel on different topics)."""
        return self.instruction

    def _checked_action(self, action: np.ndarray, dtype=np.float32) -> np.ndarray:
        """`action` as a flat array of action_dim finite values; raises before the sim sees garbage."""
        if self._done:
            raise RuntimeError('episode is over: call reset() before step()')
        a = np.asarray(action, dtype=dtype).reshape(-1)
        if a.shape != (self.action_dim,):
            raise ValueError(f'action must have shape ({self.action_dim},), got {np.shape(action)}')
        if not np.all(np.isfinite(a)):
            raise ValueError(f'action contains non-finite values: {a}')
        return a

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
