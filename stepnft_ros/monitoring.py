"""Live TensorBoard scalars of a training run (ROS-free): `tensorboard --logdir <run dir>`.

The learner writes every numeric field of each update's record under `train/` at its weights
version, the evaluator each held-out score under `eval/` (with its Wilson interval), and the
ROS-free benchmark loop both at its iteration. The JSON histories stay the record of the run;
these event files are the live view of it.
"""

from __future__ import annotations

import math
from pathlib import Path

EVENTS_DIR = 'tensorboard'


class ScalarLog:
    """Scalars of records into TensorBoard event files under `log_dir`.

    `resume_after`: the last step a resumed run kept (its last checkpoint); events a crashed
    predecessor wrote past it are purged when the first new one lands, so the curves never show a
    step twice."""

    def __init__(self, log_dir: str | Path, resume_after: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.purge_step = None if resume_after is None else resume_after + 1
        self._writer = None

    @property
    def writer(self):
        """Made at the first write: importing tensorboard takes seconds, which a node's start-up (e.g.
        the evaluator's subscription to the first weights version) must not wait for."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def write(self, prefix: str, record: dict, step: int) -> int:
        """Every finite int/float field of `record` as `<prefix>/<key>` at `step`; returns how many."""
        written = 0
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self.writer.add_scalar(f'{prefix}/{key}', value, step)
            written += 1
        self.writer.flush()  # a live view: each record is on disk when its line is printed
        return written

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar event under `log_dir` (for tests and scripts)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(log_dir), size_guidance={'scalars': 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()['scalars']}
