"""The real simulator: ManiSkill3 PickCube through the adapter, demos, and a tiny learning run."""

import json

import numpy as np
import pytest
from ros_harness import bench_module

from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def env():
    with ManiSkillEnv(ManiSkillEnvConfig(max_episode_steps=20)) as e:
        yield e


def test_reset_is_deterministic_per_seed_and_shapes_match(env):
    first = env.reset(seed=3)
    again = env.reset(seed=3)
    other = env.reset(seed=4)
    assert first['state'].shape == (env.state_dim,) and first['state'].dtype == np.float32
    assert np.array_equal(first['state'], again['state'])
    assert not np.array_equal(first['state'], other['state'])
    assert env.action_dim == 7 and first['instruction']


def test_step_runs_until_the_step_cap_and_then_refuses(env):
    env.reset(seed=0)
    done, steps = False, 0
    while not done:
        obs, success, done = env.step(np.zeros(7, np.float32))
        steps += 1
    assert steps <= 20 and isinstance(success, bool)
    with pytest.raises(RuntimeError, match='reset'):
        env.step(np.zeros(7, np.float32))


def test_bad_actions_are_refused(env):
    env.reset(seed=0)
    with pytest.raises(ValueError, match='non-finite'):
        env.step(np.full(7, np.nan, np.float32))
    with pytest.raises(ValueError, match='shape'):
        env.step(np.zeros(3, np.float32))


def test_bad_env_config_names_the_field():
    with pytest.raises(ValueError, match='control_mode'):
        ManiSkillEnvConfig(control_mode='teleport')


def test_joint_units_take_the_gripper_in_metres_and_step_exactly_as_the_normalized_action(tmp_path):
    """pd_joint_pos with joint_units: the finger target in m (a real gripper controller's units) maps onto
    ManiSkill's [-1, 1]; planner demos stored that way replay to success."""
    from sim_bridge.maniskill_demos import generate_demos, verify_demos

    def make(units: bool) -> ManiSkillEnv:
        return ManiSkillEnv(ManiSkillEnvConfig(control_mode='pd_joint_pos', joint_units=units, max_episode_steps=20))

    with make(False) as normalized, make(True) as units:
        assert (units.action_low[7], units.action_high[7]) == pytest.approx((-0.01, 0.04))
        assert np.array_equal(units.action_low[:7], normalized.action_low[:7])
        start = normalized.reset(seed=3)['state']
        assert np.array_equal(start, units.reset(seed=3)['state'])
        action = np.append(start[:7] + 0.05, -0.5).astype(np.float32)  # the gripper half-way to closed
        in_metres = units.to_joint_units(action)
        assert in_metres[7] == pytest.approx(-0.01 + 0.25 * 0.05) and np.array_equal(in_metres[:7], action[:7])
        for _ in range(3):
            a, _, _ = normalized.step(action)
            b, _, _ = units.step(in_metres)
        assert np.allclose(a['state'], b['state'], atol=1e-6)
    with pytest.raises(ValueError, match='joint_units=True needs control_mode pd_joint_pos'):
        ManiSkillEnvConfig(joint_units=True)
    path = generate_demos('PickCube-v1', n=1, out_path=str(tmp_path / 'demos.npz'), seed=200,
                          control_mode='pd_joint_pos', max_steps=100, joint_units=True, verbose=False)
    with np.load(path) as demos:
        finger = demos['actions'][:, 7]
        assert bool(demos['joint_units']) and -0.01 <= finger.min() < finger.max() <= 0.04
    assert verify_demos(path)['replay_success'] == 1


def test_learning_benchmark_smoke_run(tmp_path):
    """The whole pipeline on a tiny budget: planner demos, SFT, one π-StepNFT iteration, JSON."""
    bench = bench_module('learning_pickcube')
    code = bench.main(['--out', str(tmp_path), '--variants', 'stepnft', '--num-demos', '2', '--sft-steps', '20',
                       '--rl-minutes', '0.001', '--episodes-per-iteration', '2', '--eval-episodes', '2',
                       '--max-episode-steps', '100'])
    assert code == 0
    report = json.loads((tmp_path / 'learning_pickcube.json').read_text())
    result = report['variants']['stepnft']
    assert result['iterations'] == 1 and result['env_steps'] > 0
    assert np.isfinite(result['history'][1]['loss'])
    assert (tmp_path / 'sft' / 'model.safetensors').exists()
    assert (tmp_path / 'rl_stepnft' / 'model.safetensors').exists()
    with np.load(tmp_path / 'demos.npz', allow_pickle=False) as demos:
        assert demos['success'].all() and len(demos['episode_lengths']) == 2
