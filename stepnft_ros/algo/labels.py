"""Episode outcomes -> per-decision labels (ALGORITHM.md §3)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence


def terminal_binary_label(success: bool) -> float:
    """y = +1 for every decision of a successful episode, −1 for a failed one."""
    return 1.0 if success else -1.0


def advantage_to_preference(advantage: float, clip: float) -> tuple[float, float]:
    """General form: r = (clip(A, −c, c)/c)/2 + 1/2 ∈ [0, 1], y = 2r − 1. Returns (r, y)."""
    if not clip > 0.0:
        raise ValueError(f'advantage clip c must be > 0, got {clip}')
    if not math.isfinite(advantage):
        raise ValueError(f'advantage must be finite, got {advantage}')
    r = (max(-clip, min(clip, advantage)) / clip) / 2.0 + 0.5
    return r, 2.0 * r - 1.0


LABEL_SCHEMES = ('terminal_binary', 'batch_mean', 'group_mean')


def episode_labels(successes: list[bool], scheme: str = 'terminal_binary',
                   groups: Sequence[Hashable] | None = None) -> list[tuple[float, float]]:
    """(r, y) for each episode of a batch.

    'terminal_binary': y = ±1 (the paper's default). 'batch_mean': the general form with the
    advantage A = success − (batch success rate), c = 1, so y = A: rare successes are pulled
    hard and the many failures pushed gently, which lowers the variance when success is rare.
    'group_mean': A = success − (success rate of the episodes with the same group key, i.e. the
    same initial state), c = 1: how hard the start was cancels out, and a group whose episodes
    all agree gives y = 0 (no gradient) instead of noise.
    """
    if scheme == 'terminal_binary':
        return [((terminal_binary_label(s) + 1.0) / 2.0, terminal_binary_label(s)) for s in successes]
    if scheme == 'batch_mean':
        rate = sum(successes) / max(len(successes), 1)
        return [advantage_to_preference(float(s) - rate, 1.0) for s in successes]
    if scheme == 'group_mean':
        if groups is None or len(groups) != len(successes):
            raise ValueError('group_mean labels need one group key per episode')
        members: dict[Hashable, list[bool]] = {}
        for key, s in zip(groups, successes, strict=True):
            members.setdefault(key, []).append(s)
        rates = {key: sum(v) / len(v) for key, v in members.items()}
        return [advantage_to_preference(float(s) - rates[key], 1.0) for key, s in zip(groups, successes, strict=True)]
    raise ValueError(f'label scheme must be one of {LABEL_SCHEMES}, got {scheme!r}')
