"""The learner's logic, ROS-free: episodes from the store -> π-StepNFT updates -> versioned checkpoints.

Restart safety rests on one rule: a checkpoint directory is the only commit point. Each
version's directory (weights, optimizer moments, and in its metadata the ids of every episode
it consumed and the history so far) appears in one rename. On restart the learner loads the
newest readable version and re-reads every stored episode that version has not consumed, so
an episode is never lost and never counted twice.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch

from stepnft_ros.algo.rank_workers import RankWorkers
from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer, require_distributable
from stepnft_ros.atomic import atomic_publish_dir, atomic_write_bytes, atomic_write_text
from stepnft_ros.episodes.schema import Episode, collate_episodes, collate_human_chunks
from stepnft_ros.episodes.store import EpisodeFileError, EpisodeStore
from stepnft_ros.monitoring import EVENTS_DIR, ScalarLog
from stepnft_ros.policy import CheckpointError, load_checkpoint, save_checkpoint

OFF_POLICY_RULES = ('drop', 'downweight')
OPTIMIZER_FILE = 'optimizer.safetensors'
_VERSION_DIR = re.compile(r'^v(\d{6,})$')


def version_dir(checkpoints: Path, version: int) -> Path:
    """Where the learner writes weights version `version` (> 0) under its checkpoints directory."""
    return checkpoints / f'v{version:06d}'


@dataclass(frozen=True)
class LearnerConfig:
    episodes_per_update: int = 16
    """Finished episodes per π-StepNFT update."""
    labels: str = 'terminal_binary'
    """Episode labels: 'terminal_binary' or 'batch_mean' (see algo/labels.py)."""
    max_version_lag: int = 1
    """Episodes whose oldest acting weights are more than this many versions behind are off-policy."""
    off_policy: str = 'drop'
    """What happens to off-policy episodes: 'drop' (logged, counted, never trained on) or
    'downweight' (trained on with weight stale_weight ** (lag - max_version_lag))."""
    stale_weight: float = 0.5
    max_updates: int = 0
    """Stop after this many updates in total (0: never)."""
    replay_updates: int = 1
    """Each update trains on its own episodes and those of the previous replay_updates − 1 updates
    (OnlineConfig.replay_iterations: more decisions behind each gradient, no more robot time)."""
    seed: int = 0
    intervention_negatives: bool = True
    """Decisions that led into a person's takeover (real arms) are trained on as failures."""
    intervention_bc_weight: float = 0.0
    """> 0: each gradient step adds this weight × the flow-matching (behaviour-cloning) loss on what
    people did during takeovers (the episodes' human chunks; StepNFTTrainer.update). 0: the paper's
    π-StepNFT alone; the human chunks are then not used."""
    tensorboard: bool = True
    """Write each update's record as TensorBoard scalars under work_dir/tensorboard (stepnft_ros.monitoring)."""
    ranks: int = 1
    """Processes that share each update (data parallel, algo/rank_workers.py): this one and ranks − 1
    workers it starts, each running a share of every minibatch's forward/backward passes."""

    def __post_init__(self) -> None:
        if (self.episodes_per_update < 1 or self.max_version_lag < 0 or self.max_updates < 0
                or self.replay_updates < 1 or self.ranks < 1):
            raise ValueError(f'bad learner schedule: {self}')
        if self.off_policy not in OFF_POLICY_RULES:
            raise ValueError(f'off_policy must be one of {OFF_POLICY_RULES}, got {self.off_policy!r}')
        if not 0.0 < self.stale_weight <= 1.0:
            raise ValueError(f'stale_weight must be in (0, 1], got {self.stale_weight}')
        if not (self.intervention_bc_weight >= 0.0 and math.isfinite(self.intervention_bc_weight)):
            raise ValueError(f'intervention_bc_weight must be a finite number >= 0, got {self.intervention_bc_weight}')


class Learner:
    """Consumes finished episodes from an EpisodeStore and writes checkpoints work_dir/checkpoints/vNNNNNN."""

    def __init__(self, work_dir: str | Path, initial_checkpoint: str | Path, store: EpisodeStore,
                 cfg: LearnerConfig, algo: StepNFTConfig, device: str = 'cpu',
                 log: Callable[[str], None] = print) -> None:
        self.work_dir = Path(work_dir)
        self.checkpoints = self.work_dir / 'checkpoints'
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.initial_checkpoint = Path(initial_checkpoint)
        self.store, self.cfg, self.algo, self.log = store, cfg, algo, log
        for stale in self.checkpoints.glob('.staging-*'):  # a crash mid-write left it; its version never existed
            shutil.rmtree(stale, ignore_errors=True)
        self.consumed: set[str] = set()
        self.history: list[dict] = []
        self.dropped = 0
        self.version = 0
        # the previous updates' (episodes, weights) that the next update trains on again
        self.recent: deque[tuple[list[Episode], list[float]]] = deque(maxlen=cfg.replay_updates - 1)
        model, opt = self._resume(device)
        self.workers: RankWorkers | None = None
        if cfg.ranks > 1:
            require_distributable(algo)  # before any worker starts
            path = self.checkpoint_path()  # the workers start from the very weights and moments loaded here
            self.workers = RankWorkers(cfg.ranks, path, None if opt is None else path / OPTIMIZER_FILE, algo,
                                       seed=cfg.seed + self.version, device=device,
                                       torch_threads=torch.get_num_threads())
            self.log(f'{cfg.ranks} ranks share each update (worker pids '
                     f'{" ".join(str(p.pid) for p in self.workers.processes)})')
        self.trainer = StepNFTTrainer(model, algo, seed=cfg.seed + self.version, distributed=cfg.ranks > 1)
        if opt is not None:
            self.trainer.load_optimizer_tensors(opt)
        self.seen: set[str] = set(self.consumed)
        self.buffer: list[Episode] = []
        self.started = self._last_update = time.monotonic()
        self.scalars = ScalarLog(self.work_dir / EVENTS_DIR, resume_after=self.version) if cfg.tensorboard else None

    # ---- checkpoints -----------------------------------------------------------------------

    def checkpoint_path(self, version: int | None = None) -> Path:
        version = self.version if version is None else version
        return self.initial_checkpoint if version == 0 else version_dir(self.checkpoints, version)

    def _resume(self, device: str):
        versions = sorted((int(m.group(1)) for p in self.checkpoints.iterdir()
                           if (m := _VERSION_DIR.match(p.name))), reverse=True)
        for version in versions:
            path = version_dir(self.checkpoints, version)
            try:
                model, meta = load_checkpoint(path, device=device)
                opt = safetensors.torch.load_file(str(path / OPTIMIZER_FILE))
                state = meta['learner']
            except (CheckpointError, OSError, KeyError, ValueError, RuntimeError) as err:
                # Set aside, not deleted: its version number is reissued by the next update.
                aside = path.with_name(f'{path.name}.unusable-{time.strftime("%Y%m%dT%H%M%S")}')
                path.rename(aside)
                self.log(f'checkpoint {path} unusable (moved to {aside.name}), trying an older one: {err}')
                continue
            self.version = version
            self.consumed = set(state['consumed'])
            self.history = list(state['history'])
            self.dropped = int(state['dropped'])
            self._reload_recent(state.get('recent', []))
            self.log(f'resumed at weights version {version} ({len(self.consumed)} episodes consumed)')
            return model, opt
        model, _ = load_checkpoint(self.initial_checkpoint, device=device)
        self.log(f'starting from {self.initial_checkpoint} (weights version 0)')
        return model, None

    def _reload_recent(self, batches: list[list[list]]) -> None:
        """The replay window saved with a checkpoint: [[episode_id, weight], ...] per update."""
        for batch in batches[-self.recent.maxlen:] if self.recent.maxlen else []:
            episodes, scale = [], []
            for episode_id, weight in batch:
                try:
                    episodes.append(self.store.load(episode_id))
                    scale.append(float(weight))
                except (EpisodeFileError, OSError) as err:  # a lost bag only shrinks the window
                    self.log(f'replay window: episode {episode_id} unreadable, left out: {err}')
            self.recent.append((episodes, scale))

    def _save(self, record: dict) -> Path:
        staging = self.checkpoints / f'.staging-v{self.version:06d}-{os.getpid()}'
        shutil.rmtree(staging, ignore_errors=True)
        meta = {'stage': 'stepnft', 'weights_version': self.version, 'initial': str(self.initial_checkpoint),
                'algo': asdict(self.algo), 'learner_config': asdict(self.cfg), 'record': record,
                'learner': {'consumed': sorted(self.consumed), 'history': self.history, 'dropped': self.dropped,
                            'recent': [[[e.episode_id, w] for e, w in zip(eps, scale, strict=True)]
                                       for eps, scale in self.recent]}}
        save_checkpoint(staging, self.trainer.model, meta)
        atomic_write_bytes(staging / OPTIMIZER_FILE, safetensors.torch.save(self.trainer.optimizer_tensors()))
        path = atomic_publish_dir(staging, self.checkpoint_path())
        atomic_write_text(self.work_dir / 'history.json', json.dumps(self.history, indent=1) + '\n')
        return path

    # ---- episodes --------------------------------------------------------------------------

    @property
    def env_steps(self) -> int:
        """Env steps of the episodes trained on so far (each once, replays not counted)."""
        return sum(int(record.get('env_steps', 0)) for record in self.history)

    @property
    def done(self) -> bool:
        return self.cfg.max_updates > 0 and self.version >= self.cfg.max_updates

    def poll(self, max_updates: int | None = None) -> list[dict]:
        """Read newly stored episodes and run the updates they complete (at most `max_updates`)."""
        def unreadable(episode_id: str, err: Exception) -> None:
            self.log(f'skipping unreadable episode {episode_id}: {err}')
            self.consumed.add(episode_id)  # counted as handled once the next checkpoint lands
        self.buffer += self.store.load_new(self.seen, on_error=unreadable)
        records = []
        while not self.done and (max_updates is None or len(records) < max_updates):
            batch, scale = self._take_batch()
            if batch is None:
                break
            records.append(self._update(batch, scale))
        return records

    def _take_batch(self) -> tuple[list[Episode] | None, list[float]]:
        accepted, scale, keep = [], [], []
        for episode in self.buffer:
            if len(accepted) == self.cfg.episodes_per_update:
                keep.append(episode)
                continue
            lag = self.version - episode.oldest_version
            if lag <= self.cfg.max_version_lag:
                accepted.append(episode)
                scale.append(1.0)
            elif self.cfg.off_policy == 'downweight':
                accepted.append(episode)
                scale.append(self.cfg.stale_weight ** (lag - self.cfg.max_version_lag))
            else:
                self.dropped += 1
                self.consumed.add(episode.episode_id)
                self.log(f'dropped off-policy episode {episode.episode_id}: weights version '
                         f'{episode.oldest_version} is {lag} behind {self.version} (max_version_lag '
                         f'{self.cfg.max_version_lag})')
        if len(accepted) < self.cfg.episodes_per_update:
            self.buffer = accepted + keep
            return None, []
        self.buffer = keep
        return accepted, scale

    def _warn_about_lone_episodes(self, episodes: list[Episode]) -> None:
        """group_mean labels an episode alone with its reset seed 0 (nothing to compare it with), so a graph
        whose bridges run group_size 1 trains on nothing, silently unless this says so."""
        seeds = Counter(e.seed for e in episodes)
        alone = sum(seeds[e.seed] == 1 for e in episodes)
        if alone > len(episodes) // 2:
            self.log(f'warning: {alone} of {len(episodes)} episodes are the only one with their reset seed, and '
                     "group_mean labels give them y = 0 (no gradient): set the bridges' group_size > 1 (e.g. 8)")

    def _update(self, episodes: list[Episode], scale: list[float]) -> dict:
        start = time.perf_counter()
        replayed = [e for eps, _ in self.recent for e in eps]
        if self.cfg.labels == 'group_mean':
            self._warn_about_lone_episodes(replayed + episodes)
        batch = collate_episodes(replayed + episodes, self.trainer.model.config, self.cfg.labels,
                                 episode_scale=[w for _, ws in self.recent for w in ws] + scale,
                                 intervention_negatives=self.cfg.intervention_negatives)
        human = None
        if self.cfg.intervention_bc_weight > 0:
            model = self.trainer.model
            device = next(model.parameters()).device
            human = collate_human_chunks(replayed + episodes, model.config,
                                         lambda a: model.normalizer.normalize_action(a.to(device)).cpu())
        if self.workers is not None:
            metrics = self.workers.update(self.trainer, batch, human=human, bc_weight=self.cfg.intervention_bc_weight)
        else:
            metrics = self.trainer.update(batch, human=human, bc_weight=self.cfg.intervention_bc_weight)
        if self.recent.maxlen:
            self.recent.append((episodes, scale))
        self.version += 1
        self.consumed.update(e.episode_id for e in episodes)
        record = {
            'weights_version': self.version,
            'train_success': sum(bool(e.success) for e in episodes) / len(episodes),
            'episodes': len(replayed) + len(episodes),  # what the update trained on
            'episodes_replayed': len(replayed),
            'episodes_consumed': len(self.consumed),
            'dropped_off_policy': self.dropped,
            'downweighted': sum(s < 1.0 for s in scale),
            'env_steps': sum(e.env_steps for e in episodes),
            'human_chunks': sum(len(e.human_chunks) for e in replayed + episodes),  # a person's, recorded
            **({'bc_chunks': 0 if human is None else len(human)} if self.cfg.intervention_bc_weight > 0 else {}),
            'update_s': round(time.perf_counter() - start, 3),
            'wall_s': round(time.monotonic() - self.started, 1),
            'episodes_per_s': round(len(episodes) / max(time.monotonic() - self._last_update, 1e-9), 3),
            **{k: round(v, 6) for k, v in metrics.items()},
        }
        self.history.append(record)
        self._save(record)
        self._last_update = time.monotonic()
        if self.scalars is not None:  # after the commit: the curves never show an update a restart would redo
            self.scalars.write('train', record, self.version)
        return record

    def close(self) -> None:
        if self.scalars is not None:
            self.scalars.close()
        if self.workers is not None:
            self.workers.close()
            self.workers = None


def plot_history(history: list[dict], path: str | Path, title: str = 'π-StepNFT online training',
                 eval_history: list[dict] | None = None) -> Path:
    """Success over weights versions as a PNG: each update's training episodes (Flow-SDE) with a
    running mean, and, when given, held-out ODE evaluations."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    history = list(history)
    versions = [h['weights_version'] for h in history]
    success = [h['train_success'] for h in history]
    running = [sum(success[max(0, i - 4):i + 1]) / len(success[max(0, i - 4):i + 1]) for i in range(len(success))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(versions, success, 'o', alpha=0.5, label='training episodes of each update (Flow-SDE)')
    ax.plot(versions, running, '-', label='running mean (5 updates)')
    if eval_history:
        ax.plot([h['weights_version'] for h in eval_history], [h['eval_success'] for h in eval_history], 's-',
                color='black', label='held-out evaluation (ODE)')
    ax.set_xlabel('weights version (updates)')
    ax.set_ylabel('success rate')
    highest = max([*success, *(h['eval_success'] for h in eval_history or [])], default=0.0)
    ax.set_ylim(-0.02, min(1.02, max(0.25, 1.3 * highest)))  # low rates stay readable
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc='best', fontsize=7, framealpha=0.8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format='png')
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
