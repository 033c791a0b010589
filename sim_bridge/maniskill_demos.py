"""Generate expert demonstrations for a ManiSkill task, offline, as one compact .npz.

Pipeline per seed (all in-process, CPU physics):
  1. ManiSkill's motion-planning solution drives a pd_joint_pos env and we log its actions.
  2. ManiSkill's action converter re-executes them closed-loop in a second env with the
     target control mode (e.g. pd_ee_delta_pose) and we log the converted actions.
  3. The converted actions are replayed open-loop in ``ManiSkillEnv`` from the same seed;
     the observations stored are the ones that adapter returns, so demos and the RL env
     share the exact obs layout. The episode ends as ``ManiSkillEnv`` ends it (first success).

Output arrays (no pickle): obs (T, S) float32 observation before each action,
actions (T, D) float32, final_obs (N, S) float32 observation after each episode's last
action, episode_starts / episode_lengths / seeds (N,) int64, success (N,) bool, plus 0-d
string/int metadata (env_id, control_mode, instruction, max_episode_steps).

    python -m sim_bridge.maniskill_demos -n 20 -o /tmp/pickcube_demos.npz --verify
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault('MS_SKIP_ASSET_DOWNLOAD_PROMPT', '1')

from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig

# The motion planner commands joint positions; every other mode is obtained by conversion.
_PLANNER_CONTROL_MODE = 'pd_joint_pos'
# 0-d entries every part of a merged demo file must agree on (files older than joint_units lack it: False)
META_KEYS = ('env_id', 'control_mode', 'instruction', 'max_episode_steps', 'joint_units')


def _make_raw_env(env_id: str, control_mode: str, obs_mode: str, max_steps: int):
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    return gym.make(env_id, num_envs=1, obs_mode=obs_mode, control_mode=control_mode,
                    sim_backend='physx_cpu', render_mode=None, reward_mode='none',
                    max_episode_steps=max_steps)


def _action_logger(env):
    """Wrap ``env`` so that every action passed to step() is appended to ``wrapper.actions``."""
    import gymnasium as gym

    class _ActionLog(gym.Wrapper):
        def __init__(self, inner):
            super().__init__(inner)
            self.actions = []

        def step(self, action):
            a = action.detach().cpu().numpy() if hasattr(action, 'detach') else np.asarray(action)
            self.actions.append(np.asarray(a, dtype=np.float32).reshape(-1))
            return self.env.step(action)

    return _ActionLog(env)


def _plan(planner_env, solve, seed: int):
    """Run the motion-planning solution; returns the pd_joint_pos actions or None on failure."""
    # A rebuilt scene makes planning independent of the previous seed (solve() then resets
    # again with the seed, with no physics step in between).
    planner_env.reset(seed=seed, options={'reconfigure': True})
    planner_env.actions = []
    try:
        res = solve(planner_env, seed=seed, debug=False, vis=False)
    except Exception as exc:  # mplib/planner errors vary (unreachable grasp...): skip the seed
        print(f'seed {seed}: motion planning raised {exc!r}', file=sys.stderr)
        return None
    if isinstance(res, int) or not bool(res[-1]['success'].item()):
        return None
    return np.stack(planner_env.actions)


def generate_demos(env_id: str = 'PickCube-v1', n: int = 10, out_path: str = 'demos.npz',
                   seed: int = 0, control_mode: str = 'pd_ee_delta_pose', max_steps: int = 150,
                   only_success: bool = True, max_attempts: int | None = None,
                   verbose: bool = True, joint_units: bool = False) -> str:
    """Write ``n`` expert demos of ``env_id`` to ``out_path`` (.npz) and return the path.

    Seeds are tried in order from ``seed``. With ``only_success`` a seed is kept only if
    its open-loop replay in ``ManiSkillEnv`` succeeds within ``max_steps``; otherwise every
    planned seed is kept and ``success`` records the outcome. ``joint_units`` (pd_joint_pos only)
    stores the actions as ``ManiSkillEnvConfig.joint_units`` envs take them.
    """
    from mani_skill.examples.motionplanning.panda.run import MP_SOLUTIONS
    from mani_skill.trajectory.utils.actions import conversion

    if env_id not in MP_SOLUTIONS:
        raise ValueError(f'no motion-planning solution for {env_id!r}; have {sorted(MP_SOLUTIONS)}')
    if n < 1:
        raise ValueError(f'n must be >= 1, got {n}')
    max_attempts = max_attempts or 3 * n + 10
    # Generous horizons for planning/conversion: the episode cut is decided by ManiSkillEnv.
    long_horizon = 10 * max_steps
    planner_env = _action_logger(_make_raw_env(env_id, _PLANNER_CONTROL_MODE, 'none', long_horizon))
    convert_env = (None if control_mode == _PLANNER_CONTROL_MODE else
                   _action_logger(_make_raw_env(env_id, control_mode, 'none', long_horizon)))
    # reconfigure_on_reset: stored obs are what a fresh scene gives for the seed, not
    # something tainted by PhysX state left over from the previous demo.
    replay_env = ManiSkillEnv(ManiSkillEnvConfig(env_id=env_id, control_mode=control_mode,
                                                 obs_mode='state', max_episode_steps=max_steps,
                                                 reconfigure_on_reset=True, joint_units=joint_units))
    episodes, t0, attempts = [], time.perf_counter(), 0
    try:
        for s in range(seed, seed + max_attempts):
            if len(episodes) == n:
                break
            attempts += 1
            joint_actions = _plan(planner_env, MP_SOLUTIONS[env_id], s)
            if joint_actions is None:
                if verbose:
                    print(f'seed {s}: motion planning failed, skipped', file=sys.stderr)
                continue
            if convert_env is None:
                actions = replay_env.to_joint_units(joint_actions)
            else:
                # The converter steps the original env alongside the target env and picks
                # target-mode actions that track the planner's joint targets (closed loop).
                planner_env.reset(seed=s, options={'reconfigure': True})
                convert_env.reset(seed=s, options={'reconfigure': True})
                convert_env.actions = []
                conversion.from_pd_joint_pos(control_mode, joint_actions, planner_env.env,
                                             convert_env)
                actions = np.stack(convert_env.actions)
            o, success = replay_env.reset(seed=s)['state'], False
            obs, used = [], []
            for a in actions:
                obs.append(o)
                used.append(a)
                step_obs, success, done = replay_env.step(a)
                o = step_obs['state']
                if done:
                    break
            final = o
            if verbose:
                print(f'seed {s}: planner {len(joint_actions)} steps -> {len(actions)} '
                      f'{control_mode} steps, open-loop replay success={success} '
                      f'after {len(used)} steps', file=sys.stderr)
            if only_success and not success:
                continue
            episodes.append({'seed': s, 'obs': np.stack(obs), 'actions': np.stack(used),
                             'final_obs': final, 'success': success})
    finally:
        planner_env.close()
        if convert_env is not None:
            convert_env.close()
        replay_env.close()
    elapsed = time.perf_counter() - t0
    if not episodes:
        raise RuntimeError(f'no demos produced for {env_id} in {attempts} attempts')
    if len(episodes) < n:
        print(f'warning: only {len(episodes)} of {n} demos after {attempts} attempts', file=sys.stderr)

    lengths = np.array([len(e['actions']) for e in episodes], dtype=np.int64)
    out_path = str(out_path)
    if not out_path.endswith('.npz'):
        out_path += '.npz'  # numpy would append it anyway; return the real name
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: a crash never leaves a truncated file that a
    # caller caching on "file exists" would pick up.
    tmp_path = out_path[:-len('.npz')] + f'.tmp{os.getpid()}.npz'
    np.savez_compressed(
        tmp_path,
        obs=np.concatenate([e['obs'] for e in episodes]).astype(np.float32),
        actions=np.concatenate([e['actions'] for e in episodes]).astype(np.float32),
        final_obs=np.stack([e['final_obs'] for e in episodes]).astype(np.float32),
        episode_starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
        episode_lengths=lengths,
        seeds=np.array([e['seed'] for e in episodes], dtype=np.int64),
        success=np.array([e['success'] for e in episodes], dtype=bool),
        env_id=np.array(env_id),
        control_mode=np.array(control_mode),
        instruction=np.array(replay_env.instruction),
        max_episode_steps=np.array(max_steps, dtype=np.int64),
        joint_units=np.array(joint_units),
    )
    os.replace(tmp_path, out_path)
    if verbose:
        print(f'{len(episodes)} demos ({attempts} seeds tried) in {elapsed:.1f} s '
              f'({elapsed / attempts:.2f} s/seed); length mean {lengths.mean():.1f} '
              f'min {lengths.min()} max {lengths.max()} -> {out_path}', file=sys.stderr)
    return out_path


def merge_demos(parts: list[str], out_path: str) -> str:
    """Concatenate demo files of one task and control mode (e.g. written by parallel workers)."""
    loaded = []
    for part in parts:
        with np.load(part, allow_pickle=False) as data:
            loaded.append({'joint_units': np.array(False), **{k: data[k] for k in data.files}})
    for key in META_KEYS:
        values = {str(d[key]) for d in loaded}
        if len(values) != 1:
            raise ValueError(f'cannot merge demos with different {key}: {sorted(values)}')
    lengths = np.concatenate([d['episode_lengths'] for d in loaded])
    merged = {key: np.concatenate([d[key] for d in loaded])
              for key in ('obs', 'actions', 'final_obs', 'episode_lengths', 'seeds', 'success')}
    merged['episode_starts'] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    merged.update({key: loaded[0][key] for key in META_KEYS})
    tmp_path = out_path[:-len('.npz')] + f'.tmp{os.getpid()}.npz'
    np.savez_compressed(tmp_path, **merged)
    os.replace(tmp_path, out_path)
    return out_path


def verify_demos(path: str, reconfigure_on_reset: bool = True) -> dict:
    """Replay a demo file open-loop in a new ManiSkillEnv; compare states and success.

    With ``reconfigure_on_reset=False`` this measures how far plain (faster, slightly
    history-dependent) resets drift from the stored states.
    """
    with np.load(path, allow_pickle=False) as f:
        d = {k: f[k] for k in f.files}
    env = ManiSkillEnv(ManiSkillEnvConfig(env_id=str(d['env_id']), control_mode=str(d['control_mode']),
                                          max_episode_steps=int(d['max_episode_steps']),
                                          joint_units=bool(d.get('joint_units', False)),
                                          reconfigure_on_reset=reconfigure_on_reset))
    max_diff, n_success, early = 0.0, 0, 0
    try:
        for i, (start, length, seed) in enumerate(
                zip(d['episode_starts'], d['episode_lengths'], d['seeds'], strict=True)):
            obs, success = env.reset(seed=int(seed))['state'], False
            for t in range(length):
                max_diff = max(max_diff, float(np.abs(obs - d['obs'][start + t]).max()))
                step_obs, success, done = env.step(d['actions'][start + t])
                obs = step_obs['state']
                if done and t < length - 1:
                    early += 1
                    break
            else:
                max_diff = max(max_diff, float(np.abs(obs - d['final_obs'][i]).max()))
            n_success += int(success)
    finally:
        env.close()
    return {'episodes': len(d['seeds']), 'replay_success': n_success, 'ended_early': early,
            'max_abs_state_diff': max_diff, 'steps': int(d['episode_lengths'].sum())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('-e', '--env-id', default='PickCube-v1')
    p.add_argument('-n', '--num', type=int, default=10, help='number of demos to write')
    p.add_argument('-o', '--out', default='demos/pickcube_demos.npz')
    p.add_argument('--seed', type=int, default=0, help='first seed to try')
    p.add_argument('-c', '--control-mode', default='pd_ee_delta_pose')
    p.add_argument('--max-steps', type=int, default=150,
                   help='episode horizon of the replay env (demos that do not succeed within it are dropped)')
    p.add_argument('--joint-units', action='store_true',
                   help='pd_joint_pos: store every action dim in its joint\'s units (the gripper in m)')
    p.add_argument('--keep-failures', action='store_true', help='also keep seeds whose replay fails')
    p.add_argument('--verify', action='store_true', help='replay the written file open-loop afterwards')
    args = p.parse_args(argv)
    path = generate_demos(args.env_id, args.num, args.out, seed=args.seed,
                          control_mode=args.control_mode, max_steps=args.max_steps,
                          only_success=not args.keep_failures, joint_units=args.joint_units)
    if args.verify:
        t0 = time.perf_counter()
        print('open-loop replay, rebuilt scene per reset:', verify_demos(path), file=sys.stderr)
        print('open-loop replay, plain resets:', verify_demos(path, reconfigure_on_reset=False),
              f'({time.perf_counter() - t0:.1f} s both)', file=sys.stderr)


if __name__ == '__main__':
    main()
