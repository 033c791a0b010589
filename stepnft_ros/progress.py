"""A train_sim run as the console shows it: one line per learner update, one summary at the end.

ROS-free: it reads the files the nodes keep (the learner's learner/history.json, the evaluator's
eval_history.json, both written atomically), so the launcher needs no DDS participant and the
numbers are the ones on disk, whether or not anyone watched the run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from stepnft_ros.atomic import atomic_write_text

HISTORY = Path('learner') / 'history.json'
EVAL_HISTORY = Path('eval_history.json')
SUMMARY = Path('summary.json')


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (95 % for z = 1.96); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes on the same seeds: `gained` seeds
    fail before and succeed after, `lost` the reverse (under no change both are equally likely).
    Far more sensitive than comparing two intervals: the seeds that go the same way both times
    carry no noise."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def rate_interval(rate: float, n: int) -> list[float]:
    """The 95 % Wilson interval of a success rate measured over n episodes, rounded for reports."""
    n = int(n)
    return [round(x, 4) for x in wilson(round(rate * n), n)]


class JsonList:
    """A JSON list of records, re-read only when the file changes; [] while it does not exist.
    Records that lack a `required` key are skipped: a display must not stop the run it shows."""

    def __init__(self, path: Path, required: tuple[str, ...]) -> None:
        self.path, self.required, self.stamp, self.items = path, required, None, []

    def read(self) -> list[dict]:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self.stamp:
                items = json.loads(self.path.read_text())
                self.stamp = stamp
                self.items = [r for r in (items if isinstance(items, list) else [])
                              if isinstance(r, dict) and all(k in r for k in self.required)]
        except (OSError, ValueError):  # not there yet; keep what was read last
            pass
        return self.items


def _minutes(seconds: float) -> str:
    return f'{seconds / 60:.1f} min'


class Progress:
    """Call poll() now and then (the launcher does, between process checks): it prints a line for
    each update the learner has written since this object was made (a resumed run's earlier
    updates are not repeated), with the newest held-out score the evaluator has written."""

    def __init__(self, run_dir: str | Path, max_updates: int = 0, out: Callable[[str], None] = print) -> None:
        self.run_dir = Path(run_dir)
        self.max_updates, self.out = max_updates, out
        self.history = JsonList(self.run_dir / HISTORY, ('weights_version', 'episodes', 'train_success'))
        self.evals = JsonList(self.run_dir / EVAL_HISTORY, ('weights_version', 'eval_success', 'episodes'))
        self.shown = {r['weights_version'] for r in self.history.read()}
        self.new_updates = 0
        self.started = time.monotonic()

    def poll(self) -> None:
        for record in self.history.read():
            if record['weights_version'] not in self.shown:
                self.shown.add(record['weights_version'])
                self.new_updates += 1
                self.out(self.update_line(record, time.monotonic() - self.started))

    def update_line(self, record: dict, elapsed_s: float) -> str:
        version = record['weights_version']
        parts = [f'update {version}/{self.max_updates}' if self.max_updates else f'update {version}',
                 f"{int(record['episodes'])} episodes ({record.get('episodes_consumed', '?')} total)",
                 f"train success {record['train_success']:.2f}", f"loss {record.get('loss', float('nan')):.4f}"]
        if 'holdout_preference_accuracy' in record:  # > 0.5: the update generalizes to episodes it did not see
            parts.append(f"held-out pref acc {record['holdout_preference_accuracy']:.2f}")
        scored = [e for e in self.evals.read() if e['weights_version'] <= version]
        if scored:
            latest = max(scored, key=lambda e: e['weights_version'])
            parts.append(f"eval {latest['eval_success']:.2f}"
                         + ('' if latest['weights_version'] == version else f" (v{latest['weights_version']})"))
        parts.append(_minutes(elapsed_s))
        if self.max_updates and self.new_updates:
            remaining = max(0, self.max_updates - version)
            parts.append(f'ETA {_minutes(elapsed_s / self.new_updates * remaining)}')
        return '[train] ' + ', '.join(parts)

    def summarize(self, wall_s: float | None = None) -> dict:
        """Write <run_dir>/summary.json: held-out success of the first and last evaluated versions with
        Wilson 95 % intervals (None without an evaluator), updates, env steps of the episodes the
        updates trained on, and this launch's wall-clock minutes."""
        history = self.history.read()
        evals = sorted(self.evals.read(), key=lambda e: e['weights_version'])
        summary = {key: None for key in ('start', 'final', 'start_interval', 'final_interval', 'start_version',
                                         'final_version')}
        summary['eval_episodes'] = 0
        if evals:
            for key, record in (('start', evals[0]), ('final', evals[-1])):
                summary.update({key: record['eval_success'],
                                f'{key}_interval': rate_interval(record['eval_success'], record['episodes']),
                                f'{key}_version': record['weights_version']})
            summary['eval_episodes'] = evals[-1]['episodes']
        summary.update({
            'wall_min': round((time.monotonic() - self.started if wall_s is None else wall_s) / 60, 2),
            'updates': max((r['weights_version'] for r in history), default=0),
            'env_steps': sum(int(r.get('env_steps', 0)) for r in history),
        })
        atomic_write_text(self.run_dir / SUMMARY, json.dumps(summary, indent=1) + '\n')
        return summary

    def summary_line(self, summary: dict) -> str:
        tail = (f"{summary['updates']} updates, {summary['env_steps']} env steps, {summary['wall_min']:.1f} min; "
                f'{self.run_dir / SUMMARY}')
        if summary['start'] is None:
            return f'[summary] no held-out evaluation; {tail}'
        lo0, hi0 = summary['start_interval']
        lo1, hi1 = summary['final_interval']
        return (f"[summary] held-out success {summary['start']:.3f} [{lo0:.3f}, {hi0:.3f}] -> "
                f"{summary['final']:.3f} [{lo1:.3f}, {hi1:.3f}] (v{summary['start_version']} -> "
                f"v{summary['final_version']}, {summary['eval_episodes']} episodes, Wilson 95 %), {tail}")
