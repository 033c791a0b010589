"""The evaluation protocol: exact rates from known outcomes, videos, OOD splits, `stepnft eval`, eval_sim."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from ros_harness import REPO, run_launch, tiny_checkpoint

from sim_bridge import maniskill_ood as ood
from sim_bridge.evaluation import EpisodeResult, EvalJob, aggregate, format_table, run_evaluation
from stepnft_ros.cli import main as cli_main
from stepnft_ros.policy import load_checkpoint, save_checkpoint

# ---- a scripted env and policies with known actions -----------------------------------------


class ThresholdEnv:
    """Succeeds at its first step iff action[0] > the seed's threshold; else fails after `steps` steps."""

    action_dim = 1
    state_dim = 2
    camera_names = ('cam',)
    action_low, action_high = np.array([-1.0], np.float32), np.array([1.0], np.float32)

    def __init__(self, thresholds: dict[int, float], steps: int = 3, instruction: str = 'do it') -> None:
        self.thresholds, self.steps, self.instruction = thresholds, steps, instruction
        self.resets, self.actions = 0, []

    def _obs(self):
        image = np.full((16, 16, 3), 40 * self.t, np.uint8)  # frames change with time: a real video
        return {'state': np.array([self.t, 0.0], np.float32), 'images': {'cam': image},
                'instruction': self.instruction}

    def reset(self, seed):
        self.seed, self.t = seed, 0
        self.resets += 1
        return self._obs()

    def step(self, action):
        self.t += 1
        self.actions.append(float(action[0]))
        success = float(action[0]) > self.thresholds[self.seed]
        return self._obs(), success, success or self.t >= self.steps

    def close(self):
        pass


def constant_policy(path: Path, value: float, state_dim: int = 2, action_dim: int = 1, **kw):
    """A checkpoint whose every action is `value`: a zero action spread makes the sample irrelevant."""
    tiny_checkpoint(path, state_dim=state_dim, action_dim=action_dim, **kw)
    model, meta = load_checkpoint(path)
    model.normalizer.action_mean.fill_(value)
    model.normalizer.action_std.fill_(1e-6)
    save_checkpoint(path, model, meta)
    return load_checkpoint(path)[0]


def test_known_outcomes_give_exact_rates_in_json_and_table(tmp_path):
    model = constant_policy(tmp_path / 'plus', 0.5)
    # action 0.5 beats thresholds below it: seeds 0, 1, 3 succeed on task A; seed 5 on task B.
    a = {0: -0.2, 1: 0.4, 2: 0.9, 3: 0.0}
    b = {5: 0.1, 6: 0.7}
    envs = {}

    def make(name, thresholds):
        return lambda: envs.setdefault(name, ThresholdEnv(thresholds, instruction=f'task {name}'))

    jobs = [EvalJob('A', 'suiteX', 'id', (0, 1, 2, 3), make('A', a)),
            EvalJob('B', 'suiteX', 'id', (5, 6), make('B', b)),
            EvalJob('A', 'suiteX', 'vision', (2,), make('Av', a))]
    report = run_evaluation(jobs, model, checkpoint='plus', actions_per_chunk=2)
    assert np.allclose(envs['A'].actions, 0.5, atol=1e-3), 'the policy really drove the env'
    by_task = {(t['task'], t['split']): t for t in report['tasks']}
    assert by_task['A', 'id'] == {'task': 'A', 'suite': 'suiteX', 'split': 'id', 'successes': 3, 'episodes': 4,
                                  'rate': 0.75, 'mean_env_steps': 1.5, 'seeds': [0, 1, 2, 3]}
    assert by_task['B', 'id']['successes'] == 1 and by_task['B', 'id']['rate'] == 0.5
    assert by_task['A', 'vision']['rate'] == 0.0 and by_task['A', 'vision']['mean_env_steps'] == 3.0
    assert report['splits']['id'] == {'successes': 4, 'episodes': 6, 'rate': 4 / 6,
                                      'mean_env_steps': (1 + 1 + 3 + 1 + 1 + 3) / 6}
    assert report['suites']['suiteX']['episodes'] == 7 and report['success_rate'] == 4 / 7
    assert [g['split'] for g in report['groups']] == ['id', 'vision']
    assert report['sampler'] == 'ode' and report['checkpoint'] == 'plus' and report['wall_s'] >= 0
    assert {r['instruction'] for r in report['episode_results']} == {'task A', 'task B', 'task Av'}
    table = format_table(report)
    rows = [re.sub(r'\s+', ' ', line) for line in table.splitlines()]
    assert rows[2:5] == ['suiteX id A 3/4 75.0% 1.5', 'suiteX id B 1/2 50.0% 2.0', 'suiteX vision A 0/1 0.0% 3.0']
    assert rows[-3:] == ['suiteX id (all 2 tasks) 4/6 66.7% 1.7', 'suiteX vision (all 1 tasks) 0/1 0.0% 3.0',
                         'total 4/7 57.1% 1.9'], table

    # The same policy pushed the other way succeeds only where the threshold is below -0.5.
    minus = constant_policy(tmp_path / 'minus', -0.5)
    report = run_evaluation([EvalJob('A', 'suiteX', 'id', (0, 1, 2, 3), lambda: ThresholdEnv(a))], minus, 'minus')
    assert report['successes'] == 0 and report['success_rate'] == 0.0


def test_each_seed_scores_the_same_in_any_order(tmp_path):
    """policy.reset(seed) per episode: an episode does not depend on what ran before it."""
    tiny_checkpoint(tmp_path / 'c', state_dim=2, action_dim=1)
    model = load_checkpoint(tmp_path / 'c')[0]
    thresholds = dict(enumerate(np.linspace(-0.8, 0.8, 8)))
    runs = []
    for seeds in (tuple(range(8)), tuple(reversed(range(8)))):
        env = ThresholdEnv(thresholds)
        report = run_evaluation([EvalJob('A', 's', 'id', seeds, lambda env=env: env)], model, 'c')
        per_seed = {}
        for r in report['episode_results']:
            per_seed[r['seed']] = (r['success'], r['env_steps'])
        runs.append(per_seed)
    assert runs[0] == runs[1]
    assert 0 < sum(ok for ok, _ in runs[0].values()) < 8, 'mixed outcomes: the comparison means something'


def test_videos_one_per_episode_named_by_outcome_and_readable(tmp_path):
    model = constant_policy(tmp_path / 'p', 0.5)
    videos = tmp_path / 'videos'
    run_evaluation([EvalJob('suite/7', 'suite', 'id', (0, 1), lambda: ThresholdEnv({0: 0.0, 1: 0.9}))],
                   model, 'p', actions_per_chunk=4, video_dir=videos)
    files = sorted(p.name for p in videos.iterdir())
    assert files == ['suite-7_id_seed0_success.mp4', 'suite-7_id_seed1_failure.mp4']
    cap = cv2.VideoCapture(str(videos / 'suite-7_id_seed1_failure.mp4'))
    frames = []
    while (ok := cap.read())[0]:
        frames.append(ok[1])
    cap.release()
    assert len(frames) == 4 and frames[0].shape == (16, 16, 3)  # reset + 3 steps
    assert frames[0].mean() < frames[-1].mean(), 'the frames are the episode, in order'


def test_mismatched_policy_fails_before_any_episode(tmp_path):
    tiny_checkpoint(tmp_path / 'c', state_dim=5, action_dim=1)
    model = load_checkpoint(tmp_path / 'c')[0]
    env = ThresholdEnv({0: 0.0})
    with pytest.raises(ValueError, match=r'state size 2 \(policy expects 5\)'):
        run_evaluation([EvalJob('A', 's', 'id', (0,), lambda: env)], model, 'c')
    assert env.resets == 0
    tiny_checkpoint(tmp_path / 'cam', state_dim=2, action_dim=1, camera_names=('wrist',), image_size=16)
    with pytest.raises(ValueError, match=r"cameras \['cam'\] \(policy expects \['wrist'\]\)"):
        run_evaluation([EvalJob('A', 's', 'id', (0,), lambda: env)], load_checkpoint(tmp_path / 'cam')[0], 'c')


def test_episode_summaries_are_validated():
    good = {'task': 'libero_spatial/3', 'suite': 'libero_spatial', 'split': 'id', 'seed': 4, 'success': True,
            'env_steps': 17, 'wall_s': 1.5, 'instruction': 'x'}
    assert EpisodeResult.from_dict(good).key == ('libero_spatial/3', 'id', 4)
    for field, bad in (('seed', '4'), ('success', 1), ('env_steps', -1), ('task', ''), ('split', None)):
        with pytest.raises(ValueError, match=field):
            EpisodeResult.from_dict({**good, field: bad})
    report = aggregate([EpisodeResult.from_dict(good)], checkpoint='c', wall_s=1.0)
    assert report['tasks'][0]['rate'] == 1.0


# ---- ManiSkill: OOD splits really change what they claim, deterministically ------------------

maniskill = pytest.mark.slow


@pytest.fixture(scope='module')
def ms_envs():
    from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig

    envs = {}
    try:
        for split, mode in (('id', 'rgb'), ('vision', 'rgb'), ('semantic', 'state'), ('execution', 'state')):
            envs[split] = ManiSkillEnv(ManiSkillEnvConfig(obs_mode=mode, image_size=32, split=split,
                                                          max_episode_steps=30, reconfigure_on_reset=False))
        yield envs
    finally:
        for env in envs.values():
            env.close()


@maniskill
def test_vision_split_changes_pixels_not_physics_and_is_deterministic(ms_envs):
    ref, vis = ms_envs['id'].reset(11), ms_envs['vision'].reset(11)
    img_ref, img_vis = ref['images']['base_camera'].astype(int), vis['images']['base_camera'].astype(int)
    assert np.abs(img_ref - img_vis).mean() > 10, 'lights, object and table colours changed the image'
    assert np.array_equal(ref['state'], vis['state']), 'only appearance changed'
    other = ms_envs['vision'].reset(12)['images']['base_camera']
    again = ms_envs['vision'].reset(11)['images']['base_camera']
    assert np.array_equal(again, img_vis) and not np.array_equal(other, img_vis)
    assert np.array_equal(ms_envs['id'].reset(11)['images']['base_camera'], img_ref), 'id is untouched'


@maniskill
def test_semantic_split_rephrases_the_instruction_per_seed(ms_envs):
    env = ms_envs['semantic']
    phrasings = [env.reset(s)['instruction'] for s in range(8)]
    trained = ms_envs['id'].reset(0)['instruction']
    assert all(p in ood.PARAPHRASES['PickCube-v1'] and p != trained for p in phrasings)
    assert len(set(phrasings)) > 1 and phrasings == [env.reset(s)['instruction'] for s in range(8)]
    # Known before the reset, so the bridge can publish it ahead of the first observation.
    assert [env.instruction_for(s) for s in range(8)] == phrasings


@maniskill
def test_execution_split_spawns_outside_training_and_displaces_mid_episode(ms_envs):
    env, base = ms_envs['execution'], ms_envs['execution']._env.unwrapped
    starts = []
    for seed in (3, 4, 5):
        env.reset(seed)
        xy = ood.object_position(base, 'PickCube-v1')[:2]
        assert np.abs(xy).max() > 0.1, f'seed {seed}: cube at {xy} lies inside the training square'
        starts.append(xy)
    env.reset(3)
    assert np.allclose(ood.object_position(base, 'PickCube-v1')[:2], starts[0]), 'deterministic per seed'
    change = ood.execution_change('PickCube-v1', 3, 30)
    positions = [ood.object_position(base, 'PickCube-v1')]
    for _ in range(change.disturb_step + 2):
        obs, _, _ = env.step(np.zeros(7, np.float32))
        positions.append(ood.object_position(base, 'PickCube-v1'))
    jumps = np.linalg.norm(np.diff(np.array(positions)[:, :2], axis=0), axis=1)
    assert np.argmax(jumps) == change.disturb_step - 1 and np.isclose(jumps.max(), np.hypot(*change.disturb_offset),
                                                                      atol=2e-3)
    assert jumps[np.arange(len(jumps)) != change.disturb_step - 1].max() < 1e-3, 'at rest otherwise'
    # The observation after the disturbance shows the cube where it now is (obj_pose in the state).
    n = len(env.joint_names)
    assert np.allclose(obs['state'][2 * n:][env.task_state_names.index('obj_pose.0'):][:3], positions[-1], atol=1e-4)


# ---- `stepnft eval` on ManiSkill and LIBERO ------------------------------------------------


@maniskill
def test_stepnft_eval_zero_policy_on_pickcube_scores_zero_with_videos(tmp_path, capsys):
    constant_policy(tmp_path / 'zero', 0.0, state_dim=42, action_dim=7)
    out, videos = tmp_path / 'results.json', tmp_path / 'videos'
    code = cli_main(['eval', '--checkpoint', str(tmp_path / 'zero'), '--env-id', 'PickCube-v1',
                     '--splits', 'id,execution', '--episodes', '2', '--max-episode-steps', '8',
                     '--video-dir', str(videos), '--video-size', '32', '--out', str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report['success_rate'] == 0.0 and report['episodes'] == 4
    assert set(report['splits']) == {'id', 'execution'} and report['splits']['id']['mean_env_steps'] == 8.0
    assert [r['seed'] for r in report['episode_results']] == [10000, 10001, 10000, 10001]
    names = sorted(p.name for p in videos.iterdir())
    assert names[0] == 'PickCube-v1_execution_seed10000_failure.mp4' and len(names) == 4
    cap = cv2.VideoCapture(str(videos / names[0]))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 9 and cap.read()[1].shape == (32, 32, 3)
    cap.release()
    assert '0/2' in capsys.readouterr().out
    # A policy for another robot is refused before any episode.
    tiny_checkpoint(tmp_path / 'other', state_dim=9, action_dim=7)
    assert cli_main(['eval', '--checkpoint', str(tmp_path / 'other'), '--episodes', '1']) == 2
    assert 'state size 42 (policy expects 9)' in capsys.readouterr().err


@pytest.mark.slow
def test_stepnft_eval_on_a_libero_task(tmp_path, capsys):
    from sim_bridge.libero_env import LiberoEnv

    state_dim = 2 * len(LiberoEnv.joint_names) + len(LiberoEnv.task_state_names)
    tiny_checkpoint(tmp_path / 'vla', state_dim=state_dim, action_dim=7, camera_names=('agentview', 'wrist'),
                    image_size=32)
    out = tmp_path / 'libero.json'
    code = cli_main(['eval', '--checkpoint', str(tmp_path / 'vla'), '--suite', 'libero_spatial', '--tasks', '0',
                     '--episodes-per-task', '1', '--max-episode-steps', '3', '--video-dir', str(tmp_path / 'v'),
                     '--out', str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report['tasks'][0]['task'] == 'libero_spatial/0' and report['episodes'] == 1
    assert report['suites']['libero_spatial']['episodes'] == 1 and report['episode_results'][0]['instruction']
    (video,) = (tmp_path / 'v').iterdir()
    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    assert ok and frame.shape == (32, 64, 3)  # agentview | wrist
    cap.release()


# ---- the eval_sim graph -------------------------------------------------------------------


@pytest.mark.slow
def test_eval_sim_graph_writes_the_results_json(tmp_path, ros_domain):
    """`stepnft launch eval_sim`: two ManiSkill bridges (id, execution), an ODE policy server and the recorder."""
    params = yaml.safe_load((REPO / 'config/eval_sim.yaml').read_text())
    params['/**/maniskill_bridge']['ros__parameters'].update(max_episode_steps=6, reconfigure_on_reset=False)
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(yaml.safe_dump(params))
    ckpt = tiny_checkpoint(tmp_path / 'tiny')
    out = tmp_path / 'results.json'
    proc = run_launch(['eval_sim', '--checkpoint', str(ckpt), '--run-dir', str(tmp_path / 'run'), '--splits',
                       'id,execution', '--episodes', '2', '--out', str(out), '--params-file', str(params_file)],
                      180, tmp_path / 'launch.log')
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    report = json.loads(out.read_text())
    assert report['episodes'] == 4 and report['source'] == 'eval_sim' and report['sampler'] == 'ode'
    assert {s: b['episodes'] for s, b in report['splits'].items()} == {'id': 2, 'execution': 2}
    assert sorted(r['seed'] for r in report['episode_results']) == [10000, 10000, 10001, 10001]
    assert all(r['env_steps'] <= 6 and r['task'] == 'PickCube-v1' for r in report['episode_results'])
    assert 'total' in proc.stdout and f'results: {out}' in proc.stdout


@pytest.mark.slow
def test_eval_recorder_drops_bad_summaries_and_counts_each_episode_once(tmp_path, ros_domain, probe):
    from ros_harness import Graph, spin_until
    from std_msgs.msg import String

    from stepnft_ros import ros_io

    node, executor = probe
    graph = Graph(tmp_path / 'logs')
    out = tmp_path / 'results.json'
    try:
        recorder = graph.start('sim_bridge.eval_recorder', 'eval_recorder', {
            'out': str(out), 'expected_episodes': 3, 'robots': ['a', 'b'], 'checkpoint': 'ck'})
        pubs = [node.create_publisher(String, f'{ns}/episode_summary', ros_io.SUMMARY_QOS) for ns in 'ab']
        spin_until(executor, lambda: all(p.get_subscription_count() for p in pubs), 20, 'the recorder')
        summary = {'task': 'PickCube-v1', 'suite': 'PickCube-v1', 'split': 'id', 'seed': 1, 'success': True,
                   'env_steps': 30, 'wall_s': 0.5, 'instruction': 'pick'}
        for pub, data in ((pubs[0], 'not json'), (pubs[0], json.dumps({**summary, 'success': 'yes'})),
                          (pubs[0], json.dumps(summary)), (pubs[1], json.dumps(summary)),
                          (pubs[1], json.dumps({**summary, 'seed': 2, 'success': False, 'env_steps': 50}))):
            pub.publish(String(data=data))
        recorder.wait_for('reported twice')
        assert recorder.proc.poll() is None and 'malformed' in recorder.output(), 'logged, still running'
        pubs[1].publish(String(data=json.dumps({**summary, 'split': 'execution', 'seed': 1, 'success': False,
                                                'env_steps': 40})))
        recorder.wait_for('all 3 episodes in')
        assert recorder.proc.wait(timeout=20) == 0
    finally:
        graph.stop_all()
    report = json.loads(out.read_text())
    assert report['splits'] == {'id': {'successes': 1, 'episodes': 2, 'rate': 0.5, 'mean_env_steps': 40.0},
                                'execution': {'successes': 0, 'episodes': 1, 'rate': 0.0, 'mean_env_steps': 40.0}}
    assert report['checkpoint'] == 'ck' and report['source'] == 'eval_sim'


@pytest.mark.slow
def test_eval_recorder_that_starts_late_still_gets_the_summaries_already_published(tmp_path, ros_domain, probe):
    """A loaded machine can discover the recorder after a bridge reported: transient-local summaries."""
    from ros_harness import Graph
    from std_msgs.msg import String

    from stepnft_ros import ros_io

    node, executor = probe
    pub = node.create_publisher(String, 'a/episode_summary', ros_io.SUMMARY_QOS)
    for seed, success in ((1, True), (2, False)):
        pub.publish(String(data=json.dumps({'task': 'PickCube-v1', 'suite': 'PickCube-v1', 'split': 'id',
                                            'seed': seed, 'success': success, 'env_steps': 30, 'wall_s': 0.5,
                                            'instruction': 'pick'})))
    graph = Graph(tmp_path / 'logs')
    out = tmp_path / 'results.json'
    try:
        recorder = graph.start('sim_bridge.eval_recorder', 'eval_recorder', {
            'out': str(out), 'expected_episodes': 2, 'robots': ['a'], 'checkpoint': 'ck'})
        deadline = time.monotonic() + 30
        while recorder.proc.poll() is None and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)  # the probe serves the recorder the history
        assert recorder.proc.poll() == 0, recorder.output()[-2000:]
    finally:
        graph.stop_all()
    assert json.loads(out.read_text())['splits']['id']['successes'] == 1


def test_eval_sim_graph_spreads_seeds_over_bridges():
    from stepnft_ros import launch_description as ld

    specs = ld.eval_sim(ld.EvalSimArgs(checkpoint='/ck', splits=('id', 'vision'), episodes=5, envs_per_split=2,
                                       out='/tmp/r.json'))
    recorder, server, *bridges = specs
    ranges = {b.namespace: (b.parameters['split'], b.parameters['first_seed'], b.parameters['max_episodes'])
              for b in bridges}
    assert ranges == {'id0': ('id', 10000, 3), 'id1': ('id', 10003, 2),
                      'vision0': ('vision', 10000, 3), 'vision1': ('vision', 10003, 2)}
    assert recorder.parameters['expected_episodes'] == 10 and recorder.ends_graph == 'exit'
    assert server.parameters['mode'] == 'eval' and server.parameters['robots'] == list(ranges)
    assert [b.parameters['publish_clock'] for b in bridges] == [True, False, False, False]
    with pytest.raises(ValueError, match='LIBERO suites have the id split only'):
        ld.EvalSimArgs(checkpoint='/ck', suite='libero_goal', splits=('vision',))


def test_unknown_split_is_refused():
    from sim_bridge.maniskill_env import ManiSkillEnvConfig

    with pytest.raises(ValueError, match='split must be one of'):
        ManiSkillEnvConfig(split='weather')
    with pytest.raises(ValueError, match='execution split'):
        ManiSkillEnvConfig(env_id='PushT-v1', split='execution')
