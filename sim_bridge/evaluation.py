"""The evaluation protocol, ROS-free: success rates of a checkpoint per task, suite and split.

As in the paper: the deterministic ODE sampler, re-seeded per episode (`policy.reset(seed)`),
so a checkpoint scores the same every time; LIBERO runs the benchmark's initial states
0..n-1 of each task, ManiSkill a fixed range of reset seeds under each split
(sim_bridge/maniskill_ood.py: 'id' and the OOD 'vision', 'semantic', 'execution').

Results are one JSON (per task, per suite/split group, per split and per suite: successes,
episodes, rate, mean_env_steps; plus checkpoint, sampler and wall time) and a printed table.
The eval_sim graph's recorder (sim_bridge/eval_recorder.py) builds the same report from the
bridges' episode summaries with `aggregate` and `format_table`, so both paths agree.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim_bridge.maniskill_ood import SPLITS
from stepnft_ros.atomic import atomic_write_text

SAMPLER = 'ode'
MANISKILL_MAX_EPISODE_STEPS = 100


@dataclass(frozen=True)
class EpisodeResult:
    """One evaluated episode; the fields of a bridge's `episode_summary` JSON."""

    task: str
    """'PickCube-v1' or 'libero_spatial/3'."""
    suite: str
    """The env id (ManiSkill) or the LIBERO suite."""
    split: str
    seed: int
    success: bool
    env_steps: int
    wall_s: float = 0.0
    instruction: str = ''

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpisodeResult:
        """Validated: ValueError names the first missing or mistyped field."""
        if not isinstance(data, Mapping):
            raise ValueError(f'episode summary must be a JSON object, got {type(data).__name__}')
        for name, kinds in (('task', str), ('suite', str), ('split', str), ('seed', int), ('success', bool),
                            ('env_steps', int)):
            value = data.get(name)
            if not isinstance(value, kinds) or (kinds is int and isinstance(value, bool)) or value == '':
                raise ValueError(f'episode summary field {name!r} must be a {kinds.__name__}, got {value!r}')
        if data['env_steps'] < 0:
            raise ValueError(f"episode summary env_steps must be >= 0, got {data['env_steps']}")
        wall = data.get('wall_s', 0.0)
        if isinstance(wall, bool) or not isinstance(wall, int | float):
            raise ValueError(f'episode summary field wall_s must be a number, got {wall!r}')
        return cls(task=data['task'], suite=data['suite'], split=data['split'], seed=data['seed'],
                   success=data['success'], env_steps=data['env_steps'], wall_s=float(wall),
                   instruction=str(data.get('instruction', '')))

    @property
    def key(self) -> tuple[str, str, int]:
        """One evaluated episode per (task, split, seed): repeats are the same episode."""
        return self.task, self.split, self.seed


def _block(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    n = len(results)
    successes = sum(r.success for r in results)
    return {'successes': successes, 'episodes': n, 'rate': successes / n if n else 0.0,
            'mean_env_steps': float(np.mean([r.env_steps for r in results])) if n else 0.0}


def _order(value: Any) -> tuple:
    """Sort key: splits in SPLITS order ('id' first), numbers in names numerically (task 2 < 10)."""
    if isinstance(value, tuple):
        return tuple(_order(v) for v in value)
    if isinstance(value, str):
        rank = SPLITS.index(value) if value in SPLITS else len(SPLITS)
        return (rank, [(0, int(t), '') if t.isdigit() else (1, 0, t) for t in re.split(r'(\d+)', value)])
    return (0, value)


def _grouped(results: Iterable[EpisodeResult], key: Callable[[EpisodeResult], Any]) -> dict[Any, list]:
    groups: dict[Any, list[EpisodeResult]] = {}
    for r in results:
        groups.setdefault(key(r), []).append(r)
    return dict(sorted(groups.items(), key=lambda item: _order(item[0])))


def aggregate(results: Sequence[EpisodeResult], checkpoint: str, wall_s: float, sampler: str = SAMPLER,
              **extra: Any) -> dict[str, Any]:
    """The results JSON: per task (and split), per suite/split group, per split, per suite, overall."""
    results = sorted(results, key=lambda r: _order((r.suite, r.split, r.task, r.seed)))
    tasks = [{'task': task, 'suite': suite, 'split': split, **_block(rs), 'seeds': [r.seed for r in rs]}
             for (suite, split, task), rs in _grouped(results, lambda r: (r.suite, r.split, r.task)).items()]
    groups = [{'suite': suite, 'split': split, **_block(rs), 'tasks': len({r.task for r in rs})}
              for (suite, split), rs in _grouped(results, lambda r: (r.suite, r.split)).items()]
    return {
        'checkpoint': checkpoint, 'sampler': sampler, 'wall_s': round(float(wall_s), 2), **extra,
        **{k: v for k, v in _block(results).items() if k != 'rate'}, 'success_rate': _block(results)['rate'],
        'splits': {split: _block(rs) for split, rs in _grouped(results, lambda r: r.split).items()},
        'suites': {suite: _block(rs) for suite, rs in _grouped(results, lambda r: r.suite).items()},
        'groups': groups, 'tasks': tasks,
        'episode_results': [asdict(r) for r in results],
    }


def format_table(report: Mapping[str, Any]) -> str:
    """A fixed-width table: one row per task, then one per suite/split group, then the total."""
    header = f'{"suite":<16} {"split":<10} {"task":<22} {"success":>9} {"rate":>7} {"steps":>7}'
    lines = [header, '-' * len(header)]

    def row(suite, split, task, b):
        return (f'{suite:<16} {split:<10} {task:<22} {b["successes"]:>4}/{b["episodes"]:<4} '
                f'{100 * b["rate"]:>6.1f}% {b["mean_env_steps"]:>7.1f}')

    lines += [row(t['suite'], t['split'], t['task'], t) for t in report['tasks']]
    lines.append('-' * len(header))
    lines += [row(g['suite'], g['split'], f'(all {g["tasks"]} tasks)', g) for g in report['groups']]
    total = {'successes': report['successes'], 'episodes': report['episodes'], 'rate': report['success_rate'],
             'mean_env_steps': report['mean_env_steps']}
    lines.append(row('total', '', '', total))
    return '\n'.join(lines)


def write_report(path: str | Path, report: Mapping[str, Any]) -> Path:
    import json

    return atomic_write_text(Path(path), json.dumps(report, indent=1) + '\n')


# ---- running episodes -----------------------------------------------------------------------


@dataclass(frozen=True)
class EvalJob:
    """One task under one split: how to build its env, and the seeds to run on it."""

    task: str
    suite: str
    split: str
    seeds: tuple[int, ...]
    make_env: Callable[[], Any]


def check_compatible(policy_cfg, env, what: str) -> None:
    """ValueError before any episode runs if the policy cannot act in `env`."""
    problems = []
    state_dim = getattr(env, 'state_dim', None)
    if policy_cfg.state_dim and state_dim != policy_cfg.state_dim:
        problems.append(f'state size {state_dim} (policy expects {policy_cfg.state_dim})')
    if env.action_dim != policy_cfg.action_dim:
        problems.append(f'action size {env.action_dim} (policy expects {policy_cfg.action_dim})')
    missing = [c for c in policy_cfg.camera_names if c not in env.camera_names]
    if missing:
        problems.append(f'cameras {list(env.camera_names)} (policy expects {list(policy_cfg.camera_names)})')
    image_size = getattr(getattr(env, 'cfg', None), 'image_size', None)
    if policy_cfg.camera_names and not missing and image_size is not None and image_size != policy_cfg.image_size:
        problems.append(f'{image_size} px images (policy expects {policy_cfg.image_size})')
    if problems:
        raise ValueError(f'the policy does not fit {what}: it gives ' + '; '.join(problems))


def _frame(env, raw: Mapping[str, Any]) -> np.ndarray:
    """The video frame: the env's render camera if it has one, else its cameras side by side."""
    if getattr(getattr(env, 'cfg', None), 'render_size', 0):
        return env.render_frame()
    images = raw.get('images') or {}
    if not images:
        raise ValueError('videos need images: this env renders no camera')
    frames = [np.asarray(images[name], dtype=np.uint8) for name in sorted(images)]
    height = max(f.shape[0] for f in frames)
    return np.concatenate([np.pad(f, ((0, height - f.shape[0]), (0, 0), (0, 0))) for f in frames], axis=1)


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float) -> Path:
    """RGB frames -> mp4 (opencv); written beside the target and renamed so no torn file is seen."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.stem}.tmp.mp4')
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*'mp4v'), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f'opencv cannot write mp4 video to {tmp}')
    try:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # opencv wants BGR
    finally:
        writer.release()
    tmp.replace(path)
    return path


def video_name(result: EpisodeResult) -> str:
    task = re.sub(r'[^A-Za-z0-9_.-]+', '-', result.task)
    return f'{task}_{result.split}_seed{result.seed}_{"success" if result.success else "failure"}.mp4'


def run_evaluation(jobs: Sequence[EvalJob], model, checkpoint: str, actions_per_chunk: int = 4,
                   video_dir: str | Path | None = None, video_fps: float = 20.0, device: str = 'cpu',
                   log: Callable[[str], None] | None = None, sampler: str = SAMPLER) -> dict[str, Any]:
    """Runs every job's seeds with the ODE sampler (the protocol; 'sde' for exploration studies)
    and returns the report of `aggregate`.

    Each env is built and checked against the policy before its first episode, so a mismatch
    fails fast with a clear message.
    """
    from stepnft_ros.policy import FlowPolicy
    from stepnft_ros.rollout import run_episode

    if actions_per_chunk < 1:
        raise ValueError(f'actions_per_chunk must be >= 1, got {actions_per_chunk}')
    policy = FlowPolicy(model, mode=sampler, device=device)
    start = time.perf_counter()
    results: list[EpisodeResult] = []
    for job in jobs:
        env = job.make_env()
        try:
            check_compatible(model.config, env, f'{job.task} ({job.split})')
            if video_dir is not None and not (getattr(getattr(env, 'cfg', None), 'render_size', 0)
                                              or env.camera_names):
                raise ValueError(f'{job.task}: videos need images, and this env renders no camera')
            for seed in job.seeds:
                frames: list[np.ndarray] = []
                seen: dict[str, str] = {}

                def on_step(raw, frames=frames, seen=seen, env=env):
                    seen.setdefault('instruction', str(raw.get('instruction', '')))
                    if video_dir is not None:
                        frames.append(_frame(env, raw))

                policy.reset(seed)  # the same seed, the same sampler noise: repeatable scores
                t0 = time.perf_counter()
                episode = run_episode(env, policy, seed, actions_per_chunk, on_step=on_step)
                result = EpisodeResult(task=job.task, suite=job.suite, split=job.split, seed=seed,
                                       success=episode.success, env_steps=episode.env_steps,
                                       wall_s=round(time.perf_counter() - t0, 3),
                                       instruction=seen.get('instruction', ''))
                results.append(result)
                if video_dir is not None:
                    write_video(Path(video_dir) / video_name(result), frames, video_fps)
                if log is not None:
                    log(f'{job.task} [{job.split}] seed {seed}: {"success" if result.success else "failure"} '
                        f'after {result.env_steps} steps ({result.wall_s:.1f} s)')
        finally:
            env.close()
    return aggregate(results, checkpoint=checkpoint, wall_s=time.perf_counter() - start, sampler=sampler,
                     actions_per_chunk=actions_per_chunk)


def policy_obs(policy_cfg) -> tuple[str, int]:
    """(obs_mode, image_size) the env must give for this policy."""
    return ('rgb' if policy_cfg.camera_names else 'state'), policy_cfg.image_size


def maniskill_jobs(policy_cfg, env_id: str = 'PickCube-v1', splits: Sequence[str] = ('id',), episodes: int = 50,
                   first_seed: int = 10_000, control_mode: str = 'pd_ee_delta_pose',
                   max_episode_steps: int | None = None, render_size: int = 0) -> list[EvalJob]:
    """One job per split, each on seeds first_seed .. first_seed + episodes - 1 (the same seeds per split)."""
    from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig

    if episodes < 1:
        raise ValueError(f'episodes must be >= 1, got {episodes}')
    obs_mode, image_size = policy_obs(policy_cfg)
    configs = [ManiSkillEnvConfig(env_id=env_id, control_mode=control_mode, obs_mode=obs_mode,
                                  image_size=image_size, split=split, render_size=render_size,
                                  max_episode_steps=max_episode_steps or MANISKILL_MAX_EPISODE_STEPS,
                                  reconfigure_on_reset=True)  # bit-exact seeds: comparable scores
               for split in splits]  # ValueError on a bad split before any env is built
    seeds = tuple(range(first_seed, first_seed + episodes))
    return [EvalJob(task=env_id, suite=env_id, split=cfg.split, seeds=seeds,
                    make_env=lambda cfg=cfg: ManiSkillEnv(cfg)) for cfg in configs]


def libero_jobs(policy_cfg, suite: str, task_ids: Sequence[int] | None = None, episodes_per_task: int = 50,
                first_seed: int = 0, max_episode_steps: int | None = None) -> list[EvalJob]:
    """One job per task; the seeds are the benchmark's initial-state indices first_seed .. +n-1."""
    from sim_bridge.libero_env import SUITES, LiberoEnv, LiberoEnvConfig, suite_tasks

    if suite not in SUITES:
        raise ValueError(f'suite must be one of {SUITES}, got {suite!r}')
    if episodes_per_task < 1:
        raise ValueError(f'episodes_per_task must be >= 1, got {episodes_per_task}')
    known = [t[0] for t in suite_tasks(suite)]
    task_ids = list(known if not task_ids else task_ids)
    unknown = [t for t in task_ids if t not in known]
    if unknown:
        raise ValueError(f'{suite} has tasks {known[0]}..{known[-1]}, not {unknown}')
    obs_mode, image_size = policy_obs(policy_cfg)
    seeds = tuple(range(first_seed, first_seed + episodes_per_task))
    jobs = []
    for task_id in task_ids:
        cfg = LiberoEnvConfig(suite=suite, task_id=task_id, obs_mode=obs_mode, image_size=image_size,
                              max_episode_steps=max_episode_steps)
        jobs.append(EvalJob(task=f'{suite}/{task_id}', suite=suite, split='id', seeds=seeds,
                            make_env=lambda cfg=cfg: LiberoEnv(cfg)))
    return jobs
