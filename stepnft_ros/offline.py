"""One π-StepNFT update from recorded episode bags (no ROS): the learner's step, replayable offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stepnft_ros.algo.fsdp import full_state_dict
from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer
from stepnft_ros.episodes.schema import Episode, collate_episodes
from stepnft_ros.episodes.store import EpisodeStore
from stepnft_ros.policy import load_checkpoint, save_checkpoint
from stepnft_ros.policy.config import PolicyConfig


def train_from_bags(bags_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    algo: StepNFTConfig, labels: str = 'terminal_binary', max_version_lag: int | None = None,
                    seed: int = 0, distributed: bool = False, fsdp: bool = False,
                    device: str = 'cpu') -> dict[str, Any]:
    """Update the checkpoint once on every readable episode in `bags_dir`; save it to `out_dir` as version + 1.

    max_version_lag: drop episodes whose oldest acting weights version is more than this many
    versions behind the checkpoint's (too off-policy). Corrupt bags are skipped and counted.
    distributed: a data-parallel update over the initialized torch.distributed group (every rank
    reads the same bags; the ranks split each minibatch); rank 0 writes the checkpoint.
    fsdp: the same, with the weights, gradients and optimizer state sharded over the ranks
    (algo/fsdp.py); rank 0 gathers the updated weights into a fresh copy and writes it.
    Raises FileNotFoundError for a missing `bags_dir`, ValueError when nothing is left to train on.
    """
    bags_dir = Path(bags_dir)
    if not bags_dir.is_dir():
        raise FileNotFoundError(f'no episode bags directory at {bags_dir}')
    if max_version_lag is not None and max_version_lag < 0:
        raise ValueError(f'max_version_lag must be >= 0, got {max_version_lag}')
    model, metadata = load_checkpoint(checkpoint_dir)
    version = int(metadata.get('weights_version', 0))

    corrupt: dict[str, str] = {}
    episodes = EpisodeStore(bags_dir).load_new(set(), on_error=lambda eid, err: corrupt.setdefault(eid, str(err)))
    oldest_allowed = None if max_version_lag is None else version - max_version_lag
    kept = [e for e in episodes if oldest_allowed is None or e.oldest_version >= oldest_allowed]
    if not kept:
        raise ValueError(f'{bags_dir}: no episodes to train on ({len(episodes)} readable, {len(corrupt)} corrupt, '
                         f'{len(episodes) - len(kept)} older than the allowed version lag)')
    _check_fits(kept, model.config)

    trainer = StepNFTTrainer(model.to(device), algo, seed=seed, distributed=distributed, fsdp=fsdp)
    metrics = trainer.update(collate_episodes(kept, model.config, labels))
    path = Path(out_dir)
    if fsdp:
        weights = full_state_dict(model)  # a collective: every rank takes part, rank 0 gets the tensors
        if trainer.rank == 0:
            model, _ = load_checkpoint(checkpoint_dir)
            model.load_state_dict(weights)
    if trainer.rank == 0:
        path = save_checkpoint(out_dir, model, {'stage': 'offline_stepnft', 'weights_version': version + 1,
                                                'episodes': len(kept), 'ranks': trainer.world_size})
    return {'checkpoint': str(path), 'weights_version': version + 1, 'episodes': len(kept),
            'decisions': sum(len(e.decisions) for e in kept), 'dropped_stale': len(episodes) - len(kept),
            'corrupt': len(corrupt), 'corrupt_bags': corrupt, 'metrics': metrics}


def _check_fits(episodes: list[Episode], cfg: PolicyConfig) -> None:
    """Traces from another policy would train silently on nonsense: fail on the first mismatch."""
    for episode in episodes:
        for i, decision in enumerate(episode.decisions):
            shape = tuple(decision.trace.x_k.shape[1:])
            k = int(decision.trace.k[0])
            if shape != (cfg.horizon, cfg.action_dim) or not 0 <= k < cfg.num_steps:
                raise ValueError(f'episode {episode.episode_id!r}, decision {i}: trace (H, D) = {shape}, k = {k} '
                                 f'does not fit the policy (H, D) = {(cfg.horizon, cfg.action_dim)}, '
                                 f'K = {cfg.num_steps}')
