"""Which action to execute at each control tick, from the action chunks the policy returns.

Ticks are counted by the caller (one per control period). A chunk answers the observation
taken at tick s; its action i is meant for tick s + 1 + i. Actions whose tick has already
passed when the chunk arrives (inference latency) are skipped, never executed late.

Two schedules:
- chunked (default): execute `actions_per_chunk` actions of a chunk, then re-plan. The next
  observation is taken at the tick that executes the last of them, so with less than one tick
  of latency the arm never waits.
- temporal ensembling (ACT): observe at every tick; the action for tick k averages every
  stored chunk's prediction for k with weights exp(-m·j), j = 0 for the oldest chunk, so a
  positive `ensemble_decay` m favours older predictions and smooths the motion.

For the record of each decision the scheduler counts how many of a chunk's actions were executed:
the length of the prefix up to the last action it handed out from that chunk (ensembling: whose
prediction went into a handed-out average). Actions skipped for latency before that count too:
an executed count describes a prefix of the chunk. `finished()` hands each count over once the
chunk has left the schedule (replaced, run out, or a reset), when it can no longer grow.
"""

from __future__ import annotations

import math

import numpy as np


class ChunkScheduler:
    def __init__(self, actions_per_chunk: int, temporal_ensemble: bool = False, ensemble_decay: float = 0.01,
                 request_timeout_ticks: int = 10) -> None:
        if actions_per_chunk < 1:
            raise ValueError(f'actions_per_chunk must be >= 1, got {actions_per_chunk}')
        if ensemble_decay < 0:
            raise ValueError(f'ensemble_decay must be >= 0, got {ensemble_decay}')
        if request_timeout_ticks < 1:
            raise ValueError(f'request_timeout_ticks must be >= 1, got {request_timeout_ticks}')
        self.actions_per_chunk = actions_per_chunk
        self.temporal_ensemble = temporal_ensemble
        self.ensemble_decay = ensemble_decay
        self.request_timeout_ticks = request_timeout_ticks
        self._chunks: dict[int, np.ndarray] = {}  # observation tick -> (H, D) chunk
        self._executed: dict[int, int] = {}       # observation tick -> executed prefix so far
        self._finished: list[tuple[int, int]] = []
        self.reset()

    def reset(self) -> None:
        """Forget every chunk and request (episode start, pause, e-stop); their executed counts are final."""
        self._retire(list(self._chunks))
        self._requests: list[int] = []            # ticks of observations still unanswered
        self._dim: int | None = None

    def _retire(self, ticks) -> None:
        for s in ticks:
            del self._chunks[s]
            self._finished.append((s, self._executed.pop(s, 0)))

    def finished(self) -> list[tuple[int, int]]:
        """(observation tick, executed actions) of each chunk that left the schedule since the last call."""
        done, self._finished = self._finished, []
        return done

    # ---- requests ----------------------------------------------------------------------------

    def should_request(self, tick: int) -> bool:
        """Take and send an observation at this tick?"""
        if self.temporal_ensemble:
            return True
        if self._requests:  # re-plan if the answer is overdue (a lost message, a restarted server)
            return tick - self._requests[-1] >= self.request_timeout_ticks
        if not self._chunks:
            return True
        s = max(self._chunks)
        return tick >= s + min(self.actions_per_chunk, len(self._chunks[s]))

    def requested(self, tick: int) -> None:
        if self.temporal_ensemble:
            self._requests.append(tick)
            # Answers to requests older than the longest horizon would be useless anyway.
            self._requests = [t for t in self._requests if tick - t < 64]
        else:
            self._requests = [tick]  # a re-request supersedes the overdue one

    @property
    def outstanding(self) -> tuple[int, ...]:
        return tuple(self._requests)

    def add_chunk(self, obs_tick: int, chunk: np.ndarray) -> bool:
        """Store the answer to the observation of `obs_tick`; False if no request awaits it."""
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] < 1:
            raise ValueError(f'a chunk must be (H, D) with H >= 1, got shape {chunk.shape}')
        if not np.all(np.isfinite(chunk)):
            raise ValueError('chunk contains non-finite values')
        if self._dim is not None and chunk.shape[1] != self._dim:
            raise ValueError(f'chunk has {chunk.shape[1]} action dims, earlier chunks had {self._dim}')
        if obs_tick not in self._requests:
            return False
        self._dim = chunk.shape[1]
        self._requests.remove(obs_tick)
        if not self.temporal_ensemble:
            self._retire(list(self._chunks))
        self._chunks[obs_tick] = chunk
        return True

    # ---- actions ---------------------------------------------------------------------------

    def action(self, tick: int) -> np.ndarray | None:
        """The action for this tick, or None (nothing to execute: the arm holds)."""
        self._retire([s for s, c in self._chunks.items() if tick - s - 1 >= len(c)
                      and (self.temporal_ensemble or s != max(self._chunks))])
        if not self.temporal_ensemble:
            if not self._chunks:
                return None
            s = max(self._chunks)
            i = tick - s - 1
            if 0 <= i < min(self.actions_per_chunk, len(self._chunks[s])):
                self._executed[s] = max(self._executed.get(s, 0), i + 1)
                return self._chunks[s][i].copy()
            return None
        covering = sorted((s, c) for s, c in self._chunks.items() if 0 <= tick - s - 1 < len(c))
        if not covering:
            return None
        for s, _ in covering:
            self._executed[s] = max(self._executed.get(s, 0), tick - s)
        weights = np.array([math.exp(-self.ensemble_decay * j) for j in range(len(covering))])
        predictions = np.stack([c[tick - s - 1] for s, c in covering])
        return (weights[:, None] * predictions).sum(axis=0) / weights.sum()
