"""Which action to execute at each control tick, from the action chunks the policy returns.

Ticks are counted by the caller (one per control period). A chunk answers the observation
taken at tick s; its action i is meant for tick s + 1 + i. Actions whose tick has already
passed when the chunk takes over (inference latency) are skipped, never executed late.

Two schedules:
- chunked (default): a chunk takes over at some tick and executes `actions_per_chunk` actions
  from there, then the next one takes over. The next observation is taken `lead` ticks before
  the running chunk's last planned action (lead 0: at that action's tick).
  With `latency_hiding`, the lead follows the measured inference latency (`set_latency`, at
  least `min_lead`), so the answer is usually there before the running chunk runs out; if it
  is late all the same, the running chunk goes on with its further predictions (up to its
  horizon) instead of holding the arm; and the first `blend_actions` actions of the new chunk are cross-faded
  from the old chunk's predictions for the same ticks, so a new plan never makes the
  commands jump. Without it, the arm holds while it waits (the classic synchronous loop).
- temporal ensembling (ACT): observe at every tick; the action for tick k averages every
  stored chunk's prediction for k with weights exp(-m·j), j = 0 for the oldest chunk, so a
  positive `ensemble_decay` m favours older predictions and smooths the motion.

For the record of each decision the scheduler reports which of a chunk's actions ran: the
contiguous range from the first to the last action it handed out from that chunk (ensembling:
whose prediction went into a handed-out average; latency hiding: a cross-faded action counts
for the new chunk). Actions skipped because their tick had passed are not in it: the policy's
update must not credit the outcome to actions the robot never ran. `finished()` hands each
range over once the chunk has left the schedule (replaced, run out, or a reset), when it can
no longer grow.
"""

from __future__ import annotations

import math

import numpy as np


class ChunkScheduler:
    def __init__(self, actions_per_chunk: int, temporal_ensemble: bool = False, ensemble_decay: float = 0.01,
                 request_timeout_ticks: int = 10, latency_hiding: bool = False, blend_actions: int = 0,
                 min_lead: int = 0) -> None:
        if actions_per_chunk < 1:
            raise ValueError(f'actions_per_chunk must be >= 1, got {actions_per_chunk}')
        if ensemble_decay < 0:
            raise ValueError(f'ensemble_decay must be >= 0, got {ensemble_decay}')
        if request_timeout_ticks < 1:
            raise ValueError(f'request_timeout_ticks must be >= 1, got {request_timeout_ticks}')
        if blend_actions < 0 or (blend_actions and not latency_hiding):
            raise ValueError(f'blend_actions must be >= 0 and needs latency_hiding, got {blend_actions}')
        if not 0 <= min_lead < actions_per_chunk or (min_lead and not latency_hiding):
            raise ValueError(f'min_lead must be in [0, actions_per_chunk) and needs latency_hiding, got {min_lead}')
        if latency_hiding and temporal_ensemble:
            raise ValueError('latency_hiding is for the chunked schedule (temporal ensembling observes every tick)')
        self.actions_per_chunk = actions_per_chunk
        self.temporal_ensemble = temporal_ensemble
        self.ensemble_decay = ensemble_decay
        self.request_timeout_ticks = request_timeout_ticks
        self.latency_hiding = latency_hiding
        self.blend_actions = blend_actions
        self.min_lead = min_lead
        self.lead = min_lead                      # ticks before the planned end at which to observe
        self.stale_chunks = 0                     # chunks that arrived after their whole horizon: never ran
        self._chunks: dict[int, np.ndarray] = {}  # observation tick -> (H, D) chunk
        self._used: dict[int, list[int]] = {}     # observation tick -> [first, last] action index handed out
        self._finished: list[tuple[int, int, int]] = []
        self.reset()

    def reset(self) -> None:
        """Forget every chunk and request (episode start, pause, e-stop); their executed ranges are final."""
        self._retire(list(self._chunks))
        self._requests: list[int] = []            # ticks of observations still unanswered
        self._dim: int | None = None
        self._active: int | None = None           # chunked: the chunk being executed
        self._waiting: int | None = None          # chunked: the arrived chunk that takes over next
        self._plan_end = -1                       # chunked: the tick of the active chunk's last planned action
        self._blend: tuple[int, int] | None = None  # chunked: (replaced chunk, tick it was replaced at)

    def _retire(self, ticks) -> None:
        for s in ticks:
            del self._chunks[s]
            first, last = self._used.pop(s, (0, -1))
            self._finished.append((s, first, last - first + 1))

    def finished(self) -> list[tuple[int, int, int]]:
        """(observation tick, first executed action, executed actions) of each chunk that left the schedule
        since the last call; executed 0 for a chunk that never ran."""
        done, self._finished = self._finished, []
        return done

    def set_latency(self, ticks: float) -> None:
        """The observation -> chunk latency the caller measures, in ticks. With latency_hiding the next
        observation is taken floor(ticks) ticks before the synchronous loop would (at least min_lead, at
        most actions_per_chunk - 1): an answer that takes under that many ticks + 1 is there in time."""
        if self.latency_hiding:
            self.lead = min(max(self.min_lead, math.floor(ticks)), self.actions_per_chunk - 1)

    # ---- requests ----------------------------------------------------------------------------

    def should_request(self, tick: int) -> bool:
        """Take and send an observation at this tick?"""
        if self.temporal_ensemble:
            return True
        if self._requests:  # re-plan if the answer is overdue (a lost message, a restarted server)
            return tick - self._requests[-1] >= self.request_timeout_ticks
        if self._waiting is not None:
            return False
        return self._active is None or tick >= self._plan_end - self.lead

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
        self._chunks[obs_tick] = chunk
        if not self.temporal_ensemble:
            if self._waiting is not None:  # superseded before it ever ran
                self._retire([self._waiting])
            self._waiting = obs_tick
            if not self.latency_hiding and self._active is not None:
                self._retire([self._active])  # the synchronous loop re-plans from the newest observation
                self._active = None
        return True

    # ---- actions ---------------------------------------------------------------------------

    def _use(self, s: int, i: int) -> None:
        used = self._used.setdefault(s, [i, i])
        used[0], used[1] = min(used[0], i), max(used[1], i)

    def action(self, tick: int) -> np.ndarray | None:
        """The action for this tick, or None (nothing to execute: the arm holds)."""
        if self.temporal_ensemble:
            return self._ensembled(tick)
        if self._waiting is not None and (self._active is None or tick > self._plan_end):
            self._take_over(tick)
        if self._active is None:
            return None
        s, chunk = self._active, self._chunks[self._active]
        i = tick - s - 1
        past_plan = tick > self._plan_end
        if i >= len(chunk) or (past_plan and not (self.latency_hiding and self._requests)):
            return None  # hold: nothing planned for this tick
        self._use(s, i)
        action = chunk[i].copy()
        if self._blend is not None:
            old, since = self._blend
            m, j = tick - since, tick - old - 1
            if m < self.blend_actions and old in self._chunks and j < len(self._chunks[old]):
                alpha = (self.blend_actions - m) / (self.blend_actions + 1)
                action = alpha * self._chunks[old][j] + (1 - alpha) * action
            else:
                self._drop_blend()
        return action

    def _take_over(self, tick: int) -> None:
        new = self._waiting
        self._waiting = None
        if tick - new - 1 >= len(self._chunks[new]):  # every action's tick has passed
            self._retire([new])
            self.stale_chunks += 1
            return
        old = self._active
        self._drop_blend()
        if old is not None:
            if self.blend_actions and tick - old - 1 < len(self._chunks[old]):
                self._blend = (old, tick)  # kept (not retired) while its predictions are cross-faded in
            else:
                self._retire([old])
        self._active = new
        # a late chunk has fewer actions left than actions_per_chunk: the plan (and the next request's
        # timing) ends with its last one, not after it
        self._plan_end = min(tick + self.actions_per_chunk - 1, new + len(self._chunks[new]))

    def _drop_blend(self) -> None:
        if self._blend is not None:
            self._retire([self._blend[0]])
            self._blend = None

    def _ensembled(self, tick: int) -> np.ndarray | None:
        self._retire([s for s, c in self._chunks.items() if tick - s - 1 >= len(c)])
        covering = sorted((s, c) for s, c in self._chunks.items() if 0 <= tick - s - 1 < len(c))
        if not covering:
            return None
        for s, _ in covering:
            self._use(s, tick - s - 1)
        weights = np.array([math.exp(-self.ensemble_decay * j) for j in range(len(covering))])
        predictions = np.stack([c[tick - s - 1] for s, c in covering])
        return (weights[:, None] * predictions).sum(axis=0) / weights.sum()
