"""Building blocks shared by the CLI, the launchers and the benchmarks: SFT from demos, the default checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from stepnft_ros.algo.sft import SFTConfig, train_sft
from stepnft_ros.atomic import atomic_write_text
from stepnft_ros.episodes.demos import ChunkDataset, DemoSet
from stepnft_ros.policy.backend import FlowBackend
from stepnft_ros.policy.checkpoint import load_checkpoint, save_checkpoint
from stepnft_ros.policy.config import PolicyConfig
from stepnft_ros.policy.modeling import FlowVLA


def sft_from_demos(demos: DemoSet, policy: PolicyConfig, sft: SFTConfig,
                   log: Callable[[int, float], None] | None = None,
                   language: bool | None = None) -> tuple[FlowVLA, list[float]]:
    """A policy cloned from `demos`. The demos set its inputs: state/action sizes, cameras and
    image size; language is used if `language` says so, or (None) when the demos carry more than
    one distinct instruction (a single one tells the episodes nothing apart)."""
    if language is None:
        language = len(set(demos.instructions)) > 1
    if language and not any(demos.instructions):
        raise ValueError('a language-conditioned policy needs demos with instructions')
    cfg = replace(policy, state_dim=demos.states.shape[1], action_dim=demos.actions.shape[1],
                  camera_names=demos.camera_names, image_size=demos.image_size or policy.image_size,
                  use_language=language)
    torch.manual_seed(sft.seed)
    model = FlowVLA(cfg)
    model.normalizer.fit(demos.states, demos.actions)
    data = ChunkDataset(demos, model, sft.observation_lag, sft.state_dropout, sft.state_dropout_dims, sft.seed)
    losses = train_sft(model, len(data), data.get_batch, sft, log=log)
    return model, losses


def sft_from_checkpoint(demos: DemoSet, checkpoint: str | Path, sft: SFTConfig,
                        log: Callable[[int, float], None] | None = None) -> tuple[FlowBackend, list[float]]:
    """Continue behaviour cloning of an existing policy of any backend (a FlowVLA, a LeRobot SmolVLA
    directory) on `demos`. Its architecture and normalization stay, so the demos must speak its
    interface; what trains is what the backend leaves trainable (SmolVLA: its expert and state
    projection, as LeRobot's own fine-tuning)."""
    model, _ = load_checkpoint(checkpoint)
    cfg = model.config
    if demos.actions.shape[1] != cfg.action_dim:
        raise ValueError(f'demo actions have {demos.actions.shape[1]} dims, {checkpoint} has {cfg.action_dim}')
    if cfg.use_language and not any(demos.instructions):
        raise ValueError(f'{checkpoint} is language-conditioned: the demos need instructions')
    # checks cameras, image size and state size
    data = ChunkDataset(demos, model, sft.observation_lag, sft.state_dropout, sft.state_dropout_dims, sft.seed)
    torch.manual_seed(sft.seed)
    return model, train_sft(model, len(data), data.get_batch, sft, log=log)


@dataclass(frozen=True)
class DefaultSFT:
    """The embedded default starting point: a small state policy cloned from ManiSkill planner demos."""

    env_id: str = 'PickCube-v1'
    control_mode: str = 'pd_ee_delta_pose'
    joint_units: bool = False
    """pd_joint_pos: actions in joint units (sim_bridge.maniskill_env.ManiSkillEnvConfig.joint_units)."""
    max_episode_steps: int = 100
    num_demos: int = 300
    sft_steps: int = 8000
    sft_batch: int = 128
    d_model: int = 64
    horizon: int = 8
    noise_level: float = 0.7
    seed: int = 0
    observation_lag: int = 0
    """Clone for observations this many control steps old (algo.sft.SFTConfig.observation_lag)."""
    state_dropout: float = 0.0
    state_dropout_dims: tuple[int, ...] = ()
    """Zero these state dims of a training sample with this probability (algo.sft.SFTConfig.state_dropout)."""
    demo_seeds: tuple[int, ...] = (200, 3000)
    """One demo-generating process per entry, each trying seeds upward from it (kept apart from the
    held-out evaluation seeds at 10000 and the training seeds at 1000000)."""


PANDA_JOINT_VELOCITIES = tuple(range(9, 18))
"""Where a ManiSkill Panda's joint velocities sit in its flat state: [qpos (9), qvel (9), task extras]."""

EMBEDDED_STARTS = {spec.env_id: spec for spec in (
    # PushCube, the main job's task: 10 demos and 1000 steps leave a partial policy (43-45 % held-out).
    # Cloned with the joint velocities zeroed in half the samples, as PickCube, it fine-tunes further
    # than the plain clone: the main job went 43.0 -> 82.5 % against 46.5 -> 73.0 % from the plain clone
    # (docs/benchmarks-and-results.md).
    DefaultSFT(env_id='PushCube-v1', num_demos=10, sft_steps=1000, state_dropout=0.5,
               state_dropout_dims=PANDA_JOINT_VELOCITIES),
    # PickCube: cloned with the joint velocities zeroed in half the samples. Cloned with them, the policy
    # learns to continue its own motion, stalls near the goal, and fine-tuning levels off near 50 %;
    # without that shortcut it clones lower (10-16 %) and fine-tunes to 60-70 % on three training seeds
    # (docs/benchmarks-and-results.md).
    DefaultSFT(state_dropout=0.5, state_dropout_dims=PANDA_JOINT_VELOCITIES),
)}


def embedded_start(env_id: str, control_mode: str) -> DefaultSFT:
    """The embedded default start of a train_sim task, or a ValueError naming what to pass instead."""
    spec = EMBEDDED_STARTS.get(env_id)
    if spec is None:
        raise ValueError(f"no embedded default policy for env_id {env_id!r} (there are {sorted(EMBEDDED_STARTS)}): "
                         'pass a checkpoint of your own (stepnft sft makes one)')
    if spec.control_mode != control_mode:
        raise ValueError(f'the embedded default policy of {env_id} acts in control_mode {spec.control_mode!r}, '
                         f'the graph is configured for {control_mode!r}: pass a checkpoint of your own')
    return spec


def generate_demos_in_parallel(spec: DefaultSFT, demo_path: Path) -> Path:
    """spec.num_demos demos split over len(spec.demo_seeds) processes, merged into `demo_path`."""
    from sim_bridge.maniskill_demos import merge_demos

    counts = [spec.num_demos // len(spec.demo_seeds) + (i < spec.num_demos % len(spec.demo_seeds))
              for i in range(len(spec.demo_seeds))]
    parts = [demo_path.with_name(f'{demo_path.stem}.part{i}.npz') for i in range(len(counts))]
    procs = [subprocess.Popen([sys.executable, '-m', 'sim_bridge.maniskill_demos', '-e', spec.env_id,
                               '-n', str(n), '--seed', str(seed), '-c', spec.control_mode,
                               '--max-steps', str(spec.max_episode_steps), '-o', str(part)]
                              + ['--joint-units'] * spec.joint_units,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for n, seed, part in zip(counts, spec.demo_seeds, parts, strict=True)]
    failures = [(p.args, err[-2000:]) for p in procs if (err := p.communicate()[1]) is not None and p.returncode]
    if failures:
        raise RuntimeError(f'demo generation failed: {failures}')
    merge_demos([str(p) for p in parts], str(demo_path))
    for part in parts:
        part.unlink()
    return demo_path


def ensure_sft_checkpoint(out: str | Path, spec: DefaultSFT = DefaultSFT(),
                          log: Callable[[str], None] = print) -> Path:
    """`out`/sft built on first use (demos cached in `out`/demos.npz); reused when built from the same spec."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, spec_path = out / 'sft', out / 'sft_spec.json'
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if (ckpt / 'model.safetensors').exists() and spec_path.exists():
        # a spec written before a field existed was built with that field's default
        try:
            built = json.dumps({**asdict(DefaultSFT()), **json.loads(spec_path.read_text())}, sort_keys=True)
        except (ValueError, TypeError):
            built = None  # unreadable: not known to match
        if built != wanted:
            raise ValueError(f'{out} holds an SFT checkpoint built from {spec_path.read_text().strip()}, '
                             f'not {wanted}: use another directory')
        return ckpt
    demo_path = out / 'demos.npz'
    if not demo_path.exists():
        start = time.perf_counter()
        log(f'generating {spec.num_demos} motion-planner demos of {spec.env_id} in {len(spec.demo_seeds)} '
            f'processes (first use only)')
        generate_demos_in_parallel(spec, demo_path)
        log(f'demos: {spec.num_demos} in {time.perf_counter() - start:.0f} s -> {demo_path}')
    demos = DemoSet.load(demo_path, max_episodes=spec.num_demos)
    if demos.num_episodes < spec.num_demos:
        raise ValueError(f'{demo_path} has {demos.num_episodes} demos, fewer than the {spec.num_demos} wanted')
    policy_cfg = PolicyConfig(state_dim=1, action_dim=1, horizon=spec.horizon, d_model=spec.d_model, n_heads=4,
                              prefix_layers=1, expert_layers=2, num_steps=4, noise_level=spec.noise_level)
    model, losses = sft_from_demos(demos, policy_cfg, SFTConfig(steps=spec.sft_steps, batch_size=spec.sft_batch,
                                                                lr=1e-3, seed=spec.seed,
                                                                observation_lag=spec.observation_lag,
                                                                state_dropout=spec.state_dropout,
                                                                state_dropout_dims=spec.state_dropout_dims),
                                   log=lambda step, loss: log(f'sft step {step} loss {loss:.4f}')
                                   if step % 500 == 0 else None)
    save_checkpoint(ckpt, model, {'stage': 'sft', 'env_id': spec.env_id, 'demos': demos.num_episodes,
                                  'final_loss': losses[-1], 'weights_version': 0})
    atomic_write_text(spec_path, wanted + '\n')
    return ckpt
