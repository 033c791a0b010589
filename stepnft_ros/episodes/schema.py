"""Episodes: what a rollout records per decision, and their collation into training batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from stepnft_ros.algo.labels import episode_labels
from stepnft_ros.policy.config import PolicyConfig
from stepnft_ros.policy.types import (
    Observation,
    ObservationBatch,
    ObservationError,
    Trace,
    stack_observations,
    validate_observation,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """One decision: the observation answered, the chunk (H, D) sent (un-normalized, unclipped),
    and its single-row trace (batch dimension 1)."""

    observation: Observation
    chunk: np.ndarray
    trace: Trace
    valid: bool = True
    """False masks the decision out of updates (e.g. the robot rejected or never executed it)."""
    stamp_ns: int = 0
    """Stamp of the answered observation (ROS time in ns); joins a decision's records in an episode bag."""
    weights_version: int | None = None
    """Weights version that sampled this decision; None: the episode's `weights_version`."""
    executed: int | None = None
    """How many actions of the chunk the robot executed, from action `executed_from` on; None: unknown
    (bags written before the count was recorded), treated as the whole chunk."""
    executed_from: int = 0
    """The first executed action: > 0 when the chunk took over late (inference latency; a robot that
    hides it runs the previous chunk meanwhile) and its leading actions' ticks had passed."""
    robot_messages: tuple[tuple[str, str, bytes], ...] = ()
    """The robot's own messages this observation was made of, as they arrived: (topic relative to
    the robot's namespace, ROS type name, CDR bytes). Episode bags replay them on /<robot>/<topic>."""
    led_to_intervention: bool = False
    """A person took the arm over shortly after this decision (within the policy server's
    `intervention_window_s`): the update counts it as a failure whatever the episode's outcome."""


@dataclass(frozen=True)
class HumanChunk:
    """A person's demonstration during a takeover: the observation at a decision point and the
    actions (n, D) the person executed from it, in the policy's action space (un-normalized), one
    per control period; n may differ from the policy's horizon (cut or padded when trained on)."""

    observation: Observation
    actions: np.ndarray
    stamp_ns: int = 0
    """Stamp of the observation (ROS time in ns); its actions follow it one control period apart."""


@dataclass
class Episode:
    """A finished (or running) episode; `success` is None until the outcome is known."""

    episode_id: str
    weights_version: int
    """Weights version the episode started with (decisions may carry newer ones after a hot swap)."""
    decisions: list[Decision] = field(default_factory=list)
    success: bool | None = None
    env_steps: int = 0
    seed: int | None = None
    robot: str = ''
    """Namespace of the robot/env that produced it ('' outside ROS)."""
    interventions: list[tuple[int, int]] = field(default_factory=list)
    """(start, end) stamps in ns of each span a person had the arm (end -1: until the episode ended)."""
    human_chunks: list[HumanChunk] = field(default_factory=list)
    """What the person did during those spans (real arms; bags before format 5 have none)."""

    @property
    def finished(self) -> bool:
        return self.success is not None

    def decision_version(self, decision: Decision) -> int:
        return self.weights_version if decision.weights_version is None else decision.weights_version

    @property
    def oldest_version(self) -> int:
        """The oldest weights version that acted in this episode (what off-policy checks compare)."""
        return min((self.decision_version(d) for d in self.decisions), default=self.weights_version)


@dataclass(frozen=True)
class DecisionBatch:
    """Decisions of several episodes, flattened for the update.

    obs: B observations; trace: Trace (B, ...); y: (B,) labels ±1; r: (B,) preference in [0, 1];
    weight: (B,) per-episode averaging weights: mask / (valid decisions of its episode), so that
    Σ weight·ℓ / n_episodes averages over decisions within each episode, then over episodes;
    episode_index: (B,) which episode each decision came from; executed_from, executed: (B,) int64 the
    first executed action of each chunk and how many ran from there (0 and the whole horizon where
    unknown).
    """

    obs: ObservationBatch
    trace: Trace
    y: torch.Tensor
    r: torch.Tensor
    weight: torch.Tensor
    episode_index: torch.Tensor
    n_episodes: int
    executed: torch.Tensor
    executed_from: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def index(self, idx: torch.Tensor) -> DecisionBatch:
        return DecisionBatch(self.obs.index(idx), self.trace.index(idx), self.y[idx], self.r[idx],
                             self.weight[idx], self.episode_index[idx], self.n_episodes, self.executed[idx],
                             self.executed_from[idx])

    def to(self, device: torch.device | str) -> DecisionBatch:
        return DecisionBatch(self.obs.to(device), self.trace.to(device), self.y.to(device), self.r.to(device),
                             self.weight.to(device), self.episode_index.to(device), self.n_episodes,
                             self.executed.to(device), self.executed_from.to(device))


def collate_episodes(episodes: Sequence[Episode], cfg: PolicyConfig, labels: str = 'terminal_binary',
                     episode_scale: Sequence[float] | None = None,
                     intervention_negatives: bool = True) -> DecisionBatch:
    """Flatten finished episodes into one batch; every decision gets its episode's label (ALGORITHM.md §3).

    labels: a scheme of algo/labels.py; 'group_mean' groups episodes by their reset seed (the same
    initial state).
    episode_scale: optional per-episode factor on the averaging weights (e.g. < 1 down-weights
    episodes collected with older weights).
    intervention_negatives: decisions that led into a person's takeover get the failure label
    (y = -1, r = 0) whatever their episode's.
    """
    if episode_scale is not None and len(episode_scale) != len(episodes):
        raise ValueError(f'episode_scale has {len(episode_scale)} entries for {len(episodes)} episodes')
    unfinished = [e.episode_id for e in episodes if not e.finished]
    if unfinished:
        raise ValueError(f'episodes without an outcome cannot be trained on: {unfinished[:5]}')
    factors = [1.0] * len(episodes) if episode_scale is None else [float(f) for f in episode_scale]
    scale = dict(zip((e.episode_id for e in episodes), factors, strict=True))
    kept = [e for e in episodes if any(d.valid for d in e.decisions)]
    if not kept:
        raise ValueError('no episode has a valid decision')
    if labels == 'group_mean' and (unseeded := [e.episode_id for e in kept if e.seed is None]):
        raise ValueError(f'group_mean labels group episodes by reset seed; these have none: {unseeded[:5]}')
    decisions, y, r, weight, ep_index, executed, executed_from = [], [], [], [], [], [], []
    ep_labels = episode_labels([bool(e.success) for e in kept], labels,
                               groups=[e.seed for e in kept])
    for i, (ep, (ep_r, ep_y)) in enumerate(zip(kept, ep_labels, strict=True)):
        n_valid = sum(d.valid for d in ep.decisions)
        for d in ep.decisions:
            decisions.append(d)
            negative = intervention_negatives and d.led_to_intervention
            y.append(-1.0 if negative else ep_y)
            r.append(0.0 if negative else ep_r)
            weight.append((scale[ep.episode_id] / n_valid) if d.valid else 0.0)
            ep_index.append(i)
            first = 0 if d.executed is None else min(int(d.executed_from), cfg.horizon)
            executed_from.append(first)
            executed.append(cfg.horizon if d.executed is None else min(int(d.executed), cfg.horizon - first))
    return DecisionBatch(
        obs=stack_observations([d.observation for d in decisions], cfg),
        trace=Trace.cat([d.trace for d in decisions]),
        y=torch.tensor(y), r=torch.tensor(r), weight=torch.tensor(weight),
        episode_index=torch.tensor(ep_index), n_episodes=len(kept), executed=torch.tensor(executed),
        executed_from=torch.tensor(executed_from))


@dataclass(frozen=True)
class HumanBatch:
    """Human demonstration chunks ready for the flow-matching (behaviour-cloning) loss:
    obs: N observations; actions: (N, H, D) normalized; mask: (N, H) 1 for recorded actions, 0 for
    the padding of chunks shorter than the horizon (their last action repeated, as in SFT)."""

    obs: ObservationBatch
    actions: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def index(self, idx: torch.Tensor) -> HumanBatch:
        return HumanBatch(self.obs.index(idx.cpu()), self.actions[idx], self.mask[idx])

    def to(self, device: torch.device | str) -> HumanBatch:
        return HumanBatch(self.obs.to(device), self.actions.to(device), self.mask.to(device))


def collate_human_chunks(episodes: Sequence[Episode], cfg: PolicyConfig,
                         normalize_action: Callable[[torch.Tensor], torch.Tensor]) -> HumanBatch | None:
    """The episodes' human chunks as one batch, None if there are none. Chunks longer than the
    horizon are cut to it, shorter ones padded and masked. A chunk with the wrong action size,
    non-finite actions or an observation the policy cannot take is left out with a logged warning."""
    observations, actions, masks = [], [], []
    for episode in episodes:
        for i, chunk in enumerate(episode.human_chunks):
            where = f'episode {episode.episode_id}, human chunk {i} (stamp {chunk.stamp_ns})'
            a = np.asarray(chunk.actions, dtype=np.float32)
            try:
                if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] != cfg.action_dim:
                    raise ObservationError(f'actions have shape {a.shape}, expected (n >= 1, {cfg.action_dim})')
                if not np.isfinite(a).all():
                    raise ObservationError('actions have non-finite values')
                validate_observation(chunk.observation, cfg)
            except ObservationError as err:
                log.warning('%s: not trained on: %s', where, err)
                continue
            n = min(a.shape[0], cfg.horizon)
            padded = np.concatenate([a[:n], np.repeat(a[n - 1:n], cfg.horizon - n, axis=0)])
            observations.append(chunk.observation)
            actions.append(padded)
            masks.append(np.arange(cfg.horizon) < n)
    if not observations:
        return None
    with torch.no_grad():
        normalized = normalize_action(torch.from_numpy(np.stack(actions)))
    return HumanBatch(obs=stack_observations(observations, cfg), actions=normalized,
                      mask=torch.from_numpy(np.stack(masks).astype(np.float32)))
