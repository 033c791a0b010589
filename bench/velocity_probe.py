"""Does a checkpoint move because of where the goal is, or because the arm is already moving?

A policy cloned from demonstrations whose state includes the joint velocities can learn to continue
its own motion (the velocities predict the demonstrator's next move almost perfectly) instead of
reading the goal. Such a policy moves firmly toward the goal while it is moving, and once the arm
slows, say on contact or near the goal, it asks for almost nothing and stays where it is. This probe
feeds the ODE policy demonstration states near the goal, object in hand, twice, once as recorded and once with the
joint velocities set to zero, and compares the size and direction (cosine with the object-goal
vector) of the position part of the executed actions (pd_ee_delta_pose's first three dimensions).
The demonstrator's own actions on the same states are the reference.

    python bench/velocity_probe.py --task PickCube-v1 \\
        --checkpoint start=runs/learning/PickCube-v1/sft_start/sft \\
        --checkpoint anneal_s0=runs/learning/PickCube-v1/stepnft_correlated_noise_lr5e-5_anneal/s0/state

Writes bench/results/velocity_probe_<task>.json: per band of object-goal distances, the demonstrator's
moves and one entry per checkpoint, merged with earlier runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.failure_modes import size_and_cosine  # noqa: E402
from bench.learning import RESULTS, make_env  # noqa: E402
from stepnft_ros.atomic import atomic_write_text  # noqa: E402
from stepnft_ros.policy import FlowPolicy, load_checkpoint  # noqa: E402
from stepnft_ros.policy.types import Observation  # noqa: E402

OBJECT_TO_GOAL = 'obj_to_goal_pos'  # ManiSkill's names among a task's state extras: the object-goal vector ...
GRASPED = 'is_grasped'  # ... and whether the gripper holds the object


def state_layout(task: str) -> tuple[slice, slice | None, int | None]:
    """Where the joint velocities, the object-goal vector and the grasp flag sit in the task's flat state
    ([qpos, qvel, extras]; the last two are None for tasks without them)."""
    env = make_env(task, 10)
    try:
        joints = len(env.joint_names)
        names = env.task_state_names
    finally:
        env.close()
    velocity = slice(joints, 2 * joints)
    first = f'{OBJECT_TO_GOAL}.0'
    goal = slice(2 * joints + names.index(first), 2 * joints + names.index(first) + 3) if first in names else None
    grasped = 2 * joints + names.index(GRASPED) if GRASPED in names else None
    return velocity, goal, grasped


def moves(chunks: np.ndarray, to_goal: np.ndarray | None) -> dict:
    """Median size and cosine with the object-goal vector of each state's mean executed position move."""
    move = chunks[..., :3].mean(axis=1)
    size, cos = size_and_cosine(move, move if to_goal is None else to_goal)  # no goal: cos unused
    out = {'size_median': round(float(np.median(size)), 4)}
    if to_goal is not None:
        out['cos_to_goal_median'] = round(float(np.median(cos)), 3)
    return out


def probe(model, states: np.ndarray, velocity: slice, to_goal: np.ndarray | None, actions_per_chunk: int) -> dict:
    """The ODE policy's executed moves on `states` as recorded and with the joint velocities zeroed."""
    policy = FlowPolicy(model, mode='ode')
    out = {}
    for variant in ('as_recorded', 'velocity_zeroed'):
        batch = states.copy()
        if variant == 'velocity_zeroed':
            batch[:, velocity] = 0.0
        policy.reset(0)  # the same initial noise for both variants
        with torch.no_grad():
            chunks = policy.infer_batch([Observation(state=s) for s in batch]).chunks
        out[variant] = moves(np.asarray(chunks)[:, :actions_per_chunk], to_goal)
    out['size_ratio'] = round(out['velocity_zeroed']['size_median'] / max(out['as_recorded']['size_median'], 1e-12), 3)
    return out


def select_states(demos: dict, goal: slice | None, grasped: int | None, near_cm: tuple[float, float], count: int,
                  seed: int = 0) -> np.ndarray:
    """Indices of up to `count` demonstration states, drawn without replacement, whose object is held (for
    tasks that say) and near_cm from the goal (every state for a task without an object-goal vector)."""
    obs = demos['obs']
    keep = np.ones(len(obs), dtype=bool) if grasped is None else obs[:, grasped] > 0.5
    if goal is not None:
        distance = np.linalg.norm(obs[:, goal], axis=1) * 100
        keep &= (distance >= near_cm[0]) & (distance < near_cm[1])
    candidates = np.flatnonzero(keep)
    if not len(candidates):
        raise SystemExit(f'no demonstration state is {near_cm[0]}-{near_cm[1]} cm from the goal')
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, min(count, len(candidates)), replace=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--task', default='PickCube-v1')
    p.add_argument('--checkpoint', action='append', required=True, help='NAME=PATH (repeatable)')
    p.add_argument('--demos', help="demos.npz (default: the task's SFT start under runs/learning)")
    p.add_argument('--near-cm', nargs=2, type=float, default=(2.5, 5.0), metavar=('FROM', 'TO'),
                   help='object-goal distances of the probed states (default: just outside a 2.5 cm success radius)')
    p.add_argument('--states', type=int, default=200)
    p.add_argument('--actions-per-chunk', type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    checkpoints = dict(c.split('=', 1) for c in args.checkpoint)
    demos_path = Path(args.demos or f'runs/learning/{args.task}/sft_start/demos.npz')
    demos = dict(np.load(demos_path))
    velocity, goal, grasped = state_layout(args.task)
    idx = select_states(demos, goal, grasped, tuple(args.near_cm), args.states)
    states = demos['obs'][idx].astype(np.float32)
    to_goal = states[:, goal] if goal is not None else None
    out = RESULTS / f'velocity_probe_{args.task}.json'
    result = json.loads(out.read_text()) if out.exists() else {'task': args.task, 'bands': {}}
    band = f'{args.near_cm[0]:g}-{args.near_cm[1]:g}cm' if goal is not None else 'all_states'
    entry = result['bands'].setdefault(band, {'runs': {}})
    entry.update(demos=str(demos_path), states=len(idx),
                 demonstrator=moves(demos['actions'][idx][:, None], to_goal))  # its one action at each state
    print(json.dumps({'band': band, 'states': len(idx), 'demonstrator': entry['demonstrator']}), flush=True)
    for name, path in checkpoints.items():
        model, _ = load_checkpoint(path)
        entry['runs'][name] = {'checkpoint': path, **probe(model, states, velocity, to_goal, args.actions_per_chunk)}
        print(json.dumps({'run': name, **entry['runs'][name]}), flush=True)
    atomic_write_text(out, json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
