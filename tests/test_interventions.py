"""Interventions as demonstrations: the person's commands as policy actions, human chunks in episode
bags, the behaviour-cloning term of the update, and the whole path on a scripted arm."""

import logging
import time

import numpy as np
import pytest
import torch

from stepnft_ros.algo.sft import flow_matching_loss
from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer
from stepnft_ros.control import JointTrajectoryAdapter, TwistAdapter
from stepnft_ros.episodes import Decision, Episode, HumanChunk, collate_episodes, collate_human_chunks
from stepnft_ros.episodes.store import HUMAN_ACTION_TOPIC, read_episode, write_episode
from stepnft_ros.policy import FlowPolicy, FlowVLA, Observation, PolicyConfig

CFG = PolicyConfig(state_dim=2, action_dim=2, horizon=3, d_model=16, n_heads=2)
ROS_STAMP = 1_700_000_000_123_456_789


def demo_action(state: np.ndarray, n: int) -> np.ndarray:
    """What the scripted person does from `state`: a fixed, learnable function of it."""
    return np.stack([np.array([0.8 * state[0] + 0.1 * t, -0.5 * state[1] + 0.3], np.float32) for t in range(n)])


def human_chunks(n: int = 8, stamp0: int = 0) -> list[HumanChunk]:
    rng = np.random.default_rng(1)
    chunks = []
    for i in range(n):
        state = rng.uniform(-1, 1, 2).astype(np.float32)
        length = (2, 3, 5)[i % 3]  # shorter than the horizon (padded), equal, longer (cut)
        chunks.append(HumanChunk(Observation(state=state), demo_action(state, length),
                                 stamp_ns=stamp0 + i * 1000 if stamp0 else 0))
    return chunks


def tiny(with_humans: bool = True):
    """A tiny policy and four labelled episodes of its own decisions; the first holds a person's chunks."""
    torch.manual_seed(0)
    model = FlowVLA(CFG)
    policy = FlowPolicy(model, seed=1)
    episodes = []
    for i in range(4):
        obs = Observation(state=np.array([i, -i], np.float32) / 4)
        decisions = [Decision(obs, *(lambda o: (o.chunks[0], o.trace))(policy.infer(obs))) for _ in range(3)]
        episodes.append(Episode(f'e{i}', 0, decisions, success=i % 2 == 0,
                                human_chunks=human_chunks() if with_humans and i == 0 else []))
    return model, episodes


def human_batch(model, episodes):
    return collate_human_chunks(episodes, CFG, model.normalizer.normalize_action)


def bc_loss(model, human) -> float:
    """The flow-matching loss on the human chunks, over fixed noise (the same before and after)."""
    with torch.no_grad():
        return float(np.mean([flow_matching_loss(model, human.obs, human.actions, human.mask,
                                                 generator=torch.Generator().manual_seed(s)).item()
                              for s in range(16)]))


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---- the learner's BC term -----------------------------------------------------------------------


def test_weight_zero_leaves_the_update_bit_identical_with_or_without_human_chunks():
    cfg = StepNFTConfig(lr=1e-2, epochs=2, minibatch_size=4)
    model_a, episodes_a = tiny(with_humans=False)
    metrics_a = StepNFTTrainer(model_a, cfg, seed=3).update(collate_episodes(episodes_a, CFG))
    model_b, episodes_b = tiny(with_humans=True)
    metrics_b = StepNFTTrainer(model_b, cfg, seed=3).update(collate_episodes(episodes_b, CFG),
                                                           human=human_batch(model_b, episodes_b), bc_weight=0.0)
    assert torch.equal(params(model_a), params(model_b))
    assert metrics_a == metrics_b and 'bc_loss' not in metrics_b


def test_the_bc_term_clones_the_human_chunks_over_a_few_updates():
    cfg = StepNFTConfig(lr=1e-2, epochs=2, minibatch_size=4)

    def train(weight: float) -> tuple[float, float, list[dict]]:
        model, episodes = tiny()
        batch, human = collate_episodes(episodes, CFG), human_batch(model, episodes)
        before = bc_loss(model, human)
        trainer = StepNFTTrainer(model, cfg, seed=3)
        records = [trainer.update(batch, human=human, bc_weight=weight) for _ in range(6)]
        return before, bc_loss(model, human), records
    before, after, records = train(1.0)
    assert len(human_batch(*tiny())) == 8
    assert after < 0.7 * before, (before, after)
    assert all(r['bc_loss'] > 0 for r in records) and records[-1]['bc_loss'] < records[0]['bc_loss']
    _, after_without, _ = train(0.0)
    assert after < after_without, 'the demonstrations are what the policy moved toward'


def test_human_chunks_are_cut_or_padded_to_the_horizon_and_bad_ones_are_left_out_with_a_warning(caplog):
    model, _ = tiny()
    good = human_chunks(3)
    bad = [HumanChunk(Observation(state=np.zeros(2, np.float32)), np.array([[0.0, np.nan]], np.float32), 11),
           HumanChunk(Observation(state=np.zeros(2, np.float32)), np.zeros((3, 3), np.float32), 12),
           HumanChunk(Observation(state=np.zeros(5, np.float32)), np.zeros((3, 2), np.float32), 13)]
    episode = Episode('e', 0, [], success=True, human_chunks=[good[0], *bad, good[1], good[2]])
    with caplog.at_level(logging.WARNING, logger='stepnft_ros.episodes.schema'):
        human = human_batch(model, [episode])
    assert len(human) == 3, 'only the three good chunks are trained on'
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and all('not trained on' in w for w in warnings)
    assert 'non-finite' in warnings[0] and '(3, 3)' in warnings[1] and 'state has shape (5,)' in warnings[2]
    assert human.mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1]], 'lengths 2 (padded), 3, 5 (cut to 3)'
    expected = model.normalizer.normalize_action(torch.from_numpy(good[0].actions[[0, 1, 1]]))
    assert torch.allclose(human.actions[0], expected), 'padding repeats the last action, as SFT does'
    assert human_batch(model, [Episode('x', 0, [], success=True)]) is None


# ---- episode bags ---------------------------------------------------------------------------------


def decision_with(policy, obs: Observation, stamp: int) -> Decision:
    out = policy.infer(obs)
    return Decision(obs, out.chunks[0], out.trace, stamp_ns=stamp)


def test_human_chunks_round_trip_through_the_episode_bag(tmp_path):
    cfg = PolicyConfig(state_dim=2, action_dim=2, horizon=3, d_model=16, n_heads=2, camera_names=('wrist',),
                       image_size=8, vision_patch=4)
    policy = FlowPolicy(FlowVLA(cfg), seed=0)
    rng = np.random.default_rng(0)

    def obs():
        return Observation(state=rng.standard_normal(2).astype(np.float32),
                           images={'wrist': rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)}, instruction='lift ✓')
    decisions = [decision_with(policy, obs(), ROS_STAMP + i * 10**8) for i in range(3)]
    humans = [HumanChunk(obs(), rng.standard_normal((n, 2)).astype(np.float32), ROS_STAMP + 25 * 10**7 + i * 10**8)
              for i, n in enumerate((3, 3, 1))]
    episode = Episode('with-humans', 0, decisions, success=False, robot='arm', human_chunks=humans,
                      interventions=[(ROS_STAMP + 2 * 10**8, ROS_STAMP + 6 * 10**8)])
    got = read_episode(write_episode(episode, tmp_path, action_names=['j1', 'j2'], control_period=0.1))
    assert len(got.decisions) == 3 and got.interventions == episode.interventions
    assert [h.stamp_ns for h in got.human_chunks] == [h.stamp_ns for h in humans]
    for g, w in zip(got.human_chunks, humans, strict=True):
        assert np.array_equal(g.actions, w.actions) and g.actions.dtype == np.float32
        assert np.array_equal(g.observation.state, w.observation.state)
        assert np.array_equal(g.observation.images['wrist'], w.observation.images['wrist'])
        assert g.observation.instruction == 'lift ✓'

    # Without ROS time (every stamp 0) they read back as 0, like decisions; an episode of a person alone loads too.
    alone = Episode('alone', 0, [], success=True, human_chunks=human_chunks(4))
    got = read_episode(write_episode(alone, tmp_path))
    assert [h.stamp_ns for h in got.human_chunks] == [0] * 4 and not got.decisions
    assert all(np.array_equal(g.actions, w.actions) for g, w in zip(got.human_chunks, alone.human_chunks,
                                                                   strict=True))
    with pytest.raises(ValueError, match='human chunk 0: actions have non-finite values'):
        write_episode(Episode('nan', 0, [], success=True, human_chunks=[
            HumanChunk(Observation(state=np.zeros(2, np.float32)), np.full((2, 2), np.nan, np.float32))]), tmp_path)


def test_a_bag_without_human_chunks_has_no_human_topics_and_loads_with_none(tmp_path):
    """Bags before format 6 have no /episode/human/* topics: they load with no human chunks."""
    from rosbags.rosbag2 import Reader

    _, episodes = tiny(with_humans=False)
    path = write_episode(episodes[1], tmp_path)
    with Reader(path) as reader:
        assert not [c.topic for c in reader.connections if c.topic.startswith('/episode/human/')]
    assert read_episode(path).human_chunks == []
    assert HUMAN_ACTION_TOPIC.startswith('/episode/human/')


# ---- the person's commands as policy actions ------------------------------------------------------


def test_adapters_invert_their_commands():
    joint = JointTrajectoryAdapter(['a', 'b', 'g'], 0.1, 'delta', absolute_joints=['g'])
    measured = np.array([0.5, -0.2, 0.01])
    action = np.array([0.1, 0.2, 0.03])
    target = joint.command(action, measured).positions[0]
    np.testing.assert_allclose(joint.action_of(target, measured), action)
    np.testing.assert_allclose(JointTrajectoryAdapter(['a'], 0.1).action_of(np.array([0.7])), [0.7])
    twist = TwistAdapter(7, 'base', linear_scale=0.1, angular_scale=0.2)
    cmd, _ = twist.command(np.array([1.0, 2, 3, 4, 5, 6, 0.9]))
    np.testing.assert_allclose(twist.action_of(np.concatenate([cmd.linear, cmd.angular])), [1, 2, 3, 4, 5, 6, 0])
    with pytest.raises(ValueError, match='measured'):
        joint.action_of(target)


# ---- the whole path: takeover -> demonstrations in the bag -> a learner update clones them ---------


@pytest.mark.slow
def test_a_persons_teleop_during_a_takeover_is_recorded_and_cloned(tmp_path, probe):
    """arm_bridge + policy_server (train) + episode_operator, a scripted arm and a scripted person who
    drives the arm through the safety layer's input during a takeover: the bag holds the person's
    chunks (one per actions_per_chunk ticks of the takeover, observation stamps inside it, actions =
    the person's targets), and a learner update with intervention_bc_weight trains on them."""
    from ros_harness import Graph, spin_until, tiny_checkpoint
    from std_msgs.msg import String
    from std_srvs.srv import SetBool, Trigger

    from stepnft_ros import ros_io
    from stepnft_ros.episodes.store import EpisodeStore
    from stepnft_ros.learner import Learner, LearnerConfig

    node, executor = probe
    joints = ['j1', 'j2']
    ckpt = tiny_checkpoint(tmp_path / 'sft', state_dim=2, action_dim=2)  # horizon 4
    episodes_dir = tmp_path / 'episodes'
    graph = Graph(tmp_path / 'logs')
    try:
        server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
            'checkpoint': str(ckpt), 'episode_dir': str(episodes_dir), 'robots': ['arm'], 'mode': 'train',
            'state_sources': ['joint_position'], 'action_names': joints, 'control_period': 0.1})
        bridge = graph.start('stepnft_ros.nodes.arm_bridge', 'arm_bridge', {
            'joint_names': joints, 'control_rate_hz': 10.0, 'actions_per_chunk': 2, 'request_timeout_s': 1.0,
            'max_observation_age_s': 1.0}, namespace='arm')
        operator = graph.start('stepnft_ros.nodes.episode_operator', 'episode_operator', {'robots': ['arm']})
        position = np.zeros(2)
        joint_pub = node.create_publisher(ros_io.JointState, '/joint_states', ros_io.SENSOR_QOS)
        node.create_timer(0.03, lambda: joint_pub.publish(
            ros_io.arrays_to_joint_state(joints, position, None, time.time_ns())))
        teleop = node.create_publisher(ros_io.JointTrajectory, '/arm/' + ros_io.SAFETY_JOINT_TRAJECTORY_IN,
                                       ros_io.RELIABLE_QOS)
        person = {'on': False, 'targets': []}

        def drive() -> None:  # the person: a ramp on j1, j2 fixed, 20 Hz
            if person['on']:
                target = [0.01 * len(person['targets']), -0.3]
                person['targets'].append(target[0])
                msg = ros_io.JointTrajectory(joint_names=['j2', 'j1'])  # any order: read by name
                msg.points.append(ros_io.JointTrajectoryPoint(positions=[target[1], target[0]],
                                                              time_from_start=ros_io.seconds_to_duration(0.1)))
                teleop.publish(msg)
        node.create_timer(0.05, drive)
        written = []
        node.create_subscription(String, ros_io.EPISODE_WRITTEN, lambda m: written.append(m.data), ros_io.EVENTS_QOS)
        policy_commands = []
        node.create_subscription(ros_io.JointTrajectory, '/arm/' + ros_io.SAFETY_JOINT_TRAJECTORY_IN,
                                 lambda m: policy_commands.append(m) if not person['on'] else None,
                                 ros_io.RELIABLE_QOS)

        def call(srv, name, data=None):
            client = node.create_client(srv, f'/arm/{name}')
            spin_until(executor, client.service_is_ready, 60, name)
            future = client.call_async(srv.Request() if data is None else srv.Request(data=data))
            spin_until(executor, future.done, 20, f'the answer of {name}')
            assert future.result().success, (name, future.result().message)

        for n, pattern in ((server, 'serving 1 robot'), (bridge, 'waiting for episode_active'),
                           (operator, 'arm: policy server found')):
            n.wait_for(pattern, timeout=90)
        call(Trigger, ros_io.OPERATOR_START)
        spin_until(executor, lambda: len(policy_commands) >= 4, 30, 'the policy to command the arm')
        call(Trigger, ros_io.OPERATOR_TAKEOVER)
        bridge.wait_for('TAKEN OVER', timeout=10)
        person['on'] = True
        t_on = time.monotonic()
        spin_until(executor, lambda: time.monotonic() > t_on + 2.5, 10, 'the person to drive for 2.5 s')
        call(SetBool, ros_io.OPERATOR_LABEL, True)  # stops the episode, hands back, writes the bag
        person['on'] = False
        spin_until(executor, lambda: written, 20, 'the episode bag')

        episode = read_episode(episodes_dir / written[0])
        [(start, end)] = episode.interventions
        humans = episode.human_chunks
        # 2.5 s at 10 Hz, a new chunk every 2 ticks: ~12 (the first command and the label's timing cost some)
        assert 8 <= len(humans) <= 14, len(humans)
        stamps = [h.stamp_ns for h in humans]
        # a chunk stamped at the takeover's first or last tick is still the person's (the bounds are those ticks)
        assert stamps == sorted(stamps) and all(start <= s <= end for s in stamps), \
            ('inside the takeover', start, end, stamps)
        assert all(0.15e9 < b - a < 0.25e9 for a, b in zip(stamps, stamps[1:], strict=False)), \
            'one observation per 2 control ticks (0.2 s)'
        assert all(len(h.actions) == 4 for h in humans[:-2]), 'as long as the policy\'s chunks (horizon 4)'
        assert all(1 <= len(h.actions) <= 4 for h in humans[-2:]), 'the last ones end at the hand-back'
        ramp = set(np.round(person['targets'], 6))
        for h in humans:
            assert np.allclose(h.actions[:, 1], -0.3) and set(np.round(h.actions[:, 0].astype(float), 6)) <= ramp
            assert np.all(np.diff(h.actions[:, 0]) >= 0), 'the ramp, in order'
        assert all(d.stamp_ns < start or d.stamp_ns > end for d in episode.decisions), \
            'no policy decision during the takeover'

        learner = Learner(tmp_path / 'learner', ckpt, EpisodeStore(episodes_dir),
                          LearnerConfig(episodes_per_update=1, intervention_bc_weight=1.0, tensorboard=False),
                          StepNFTConfig(lr=1e-3, epochs=1), log=lambda _: None)
        [record] = learner.poll()
        assert record['human_chunks'] == record['bc_chunks'] == len(humans) and record['bc_loss'] > 0
    finally:
        graph.stop_all()
