"""Episode outcomes -> per-decision labels (ALGORITHM.md §3)."""

from __future__ import annotations

import math


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
