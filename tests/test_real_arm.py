"""The real-arm path: control core (scheduling, adapters, joiner, safety) and the full loop with the stand-in arm."""

from __future__ import annotations

import math
import signal
import time

import numpy as np
import pytest

from stepnft_ros.control import (
    ChunkScheduler,
    JointCommand,
    JointTrajectoryAdapter,
    ObservationJoiner,
    SafetyConfig,
    SafetyFilter,
    TwistAdapter,
    TwistCommand,
)
from stepnft_ros.policy.types import ObservationError

# ---- chunk scheduling ---------------------------------------------------------------------------


def chunk(start: float, horizon: int = 4, dim: int = 2) -> np.ndarray:
    """Rows start, start+1, ... (the same value in every dim): easy to recognize."""
    return np.repeat(np.arange(start, start + horizon, dtype=np.float64)[:, None], dim, axis=1)


def test_chunked_schedule_executes_n_actions_then_replans_without_a_gap():
    s = ChunkScheduler(actions_per_chunk=3)
    assert s.should_request(0) and s.action(0) is None
    s.requested(0)
    assert not s.should_request(1)
    assert s.add_chunk(0, chunk(10))
    assert [s.action(k)[0] for k in (1, 2, 3)] == [10, 11, 12]  # action i at tick 0 + 1 + i
    assert not s.should_request(2) and s.should_request(3)      # observe while the last action runs
    s.requested(3)
    assert s.action(4) is None                                  # the old chunk's 4th action is never used
    assert not s.add_chunk(0, chunk(99)), 'an answer nobody waits for is ignored'
    assert s.add_chunk(3, chunk(20)) and s.action(4)[0] == 20


def test_a_late_chunk_skips_the_actions_whose_tick_has_passed_and_overdue_requests_are_repeated():
    s = ChunkScheduler(actions_per_chunk=4, request_timeout_ticks=5)
    s.requested(0)
    assert [s.should_request(k) for k in (1, 4, 5)] == [False, False, True]
    s.add_chunk(0, chunk(10))
    assert s.action(3)[0] == 12 and s.action(4)[0] == 13 and s.action(5) is None
    with pytest.raises(ValueError, match='non-finite'):
        s.add_chunk(0, np.full((4, 2), np.nan))


def test_temporal_ensembling_averages_overlapping_chunks_with_exponential_weights():
    m = 0.5
    s = ChunkScheduler(actions_per_chunk=1, temporal_ensemble=True, ensemble_decay=m)
    for k, start in ((0, 10.0), (1, 20.0), (2, 30.0)):
        assert s.should_request(k)
        s.requested(k)
        s.add_chunk(k, chunk(start, horizon=3))
    # Tick 3: chunk@0 predicts its 3rd action (12), chunk@1 its 2nd (21), chunk@2 its 1st (30); oldest weighs most.
    w = np.exp(-m * np.arange(3))
    assert s.action(3) == pytest.approx(np.full(2, (w @ [12, 21, 30]) / w.sum()))
    # Tick 4: chunk@0 has run out (horizon 3); chunk@1 -> 22, chunk@2 -> 31, re-weighted from the oldest left.
    assert s.action(4) == pytest.approx(np.full(2, (22 + math.exp(-m) * 31) / (1 + math.exp(-m))))
    assert s.action(6) is None
    plain = ChunkScheduler(actions_per_chunk=1, temporal_ensemble=True, ensemble_decay=0.0)
    for k in (0, 1):
        plain.requested(k)
        plain.add_chunk(k, chunk(10.0 * (k + 1), horizon=3))
    assert plain.action(2)[0] == pytest.approx((11 + 20) / 2)  # m = 0: a plain mean


def test_executed_ranges_are_the_actions_each_chunk_ran_and_final_once_it_leaves():
    s = ChunkScheduler(actions_per_chunk=3)
    s.requested(0)
    s.add_chunk(0, chunk(10))
    assert [s.action(k)[0] for k in (1, 2, 3)] == [10, 11, 12] and s.finished() == []  # still scheduled
    s.requested(3)
    s.add_chunk(3, chunk(20))  # replaces chunk@0: 3 of its 4 actions ran
    assert s.finished() == [(0, 0, 3)]
    assert s.action(4)[0] == 20
    s.reset()  # the episode ends one action into chunk@3
    assert s.finished() == [(3, 0, 1)] and s.finished() == []
    s.requested(10)
    s.add_chunk(10, chunk(30))
    assert s.action(12)[0] == 31  # late: action 0's tick passed, so it never ran and is not counted
    s.reset()
    assert s.finished() == [(10, 1, 1)]

    ensemble = ChunkScheduler(actions_per_chunk=1, temporal_ensemble=True)
    for k in (0, 1):
        ensemble.requested(k)
        ensemble.add_chunk(k, chunk(10.0 * (k + 1), horizon=3))
    for k in (2, 3, 4):
        ensemble.action(k)
    assert ensemble.finished() == [(0, 1, 2)]  # ran out after predicting ticks 1..3 (used for 2, 3)
    ensemble.reset()
    assert ensemble.finished() == [(1, 0, 3)]


def test_latency_hiding_observes_early_so_the_arm_never_waits_and_records_what_ran():
    s = ChunkScheduler(actions_per_chunk=4, latency_hiding=True)
    s.set_latency(1.6)  # measured: under 2 ticks -> observe 1 tick before the last planned action
    assert s.lead == 1
    s.requested(0)
    s.add_chunk(0, chunk(0, horizon=8))
    assert [s.action(k)[0] for k in (1, 2)] == [0, 1]
    assert not s.should_request(2) and s.should_request(3)  # 1 tick before tick 4, the last planned one
    s.requested(3)
    assert s.action(3)[0] == 2 and s.action(4)[0] == 3  # the running chunk goes on while the policy thinks
    s.add_chunk(3, chunk(100, horizon=8))  # arrives in time: waits for the running chunk's plan to end
    assert s.finished() == []
    assert s.action(5)[0] == 101  # tick 5 = action 1 of chunk@3; its action 0 (tick 4) never ran
    assert s.finished() == [(0, 0, 4)]
    assert [s.action(k)[0] for k in (6, 7, 8)] == [102, 103, 104]
    s.reset()
    assert s.finished() == [(3, 1, 4)]


def test_a_minimum_lead_observes_that_early_even_when_answers_are_fast():
    s = ChunkScheduler(actions_per_chunk=4, latency_hiding=True, min_lead=2)
    assert s.lead == 2
    s.set_latency(0.4)  # fast answers alone would observe at the last planned action
    assert s.lead == 2
    s.set_latency(5.0)
    assert s.lead == 3, 'at most actions_per_chunk - 1'
    s.set_latency(0.4)
    s.requested(0)
    s.add_chunk(0, chunk(0, horizon=8))
    assert s.action(1)[0] == 0 and s.should_request(2), '2 ticks before tick 4, the last planned one'
    for bad in ({'min_lead': 4}, {'min_lead': -1}):
        with pytest.raises(ValueError, match='min_lead'):
            ChunkScheduler(actions_per_chunk=4, latency_hiding=True, **bad)
    with pytest.raises(ValueError, match='needs latency_hiding'):
        ChunkScheduler(actions_per_chunk=4, min_lead=1)


def test_a_late_answer_under_latency_hiding_continues_the_old_plan_then_skips_and_blends():
    s = ChunkScheduler(actions_per_chunk=2, latency_hiding=True, blend_actions=2)
    s.requested(0)
    s.add_chunk(0, chunk(0, horizon=6))
    assert [s.action(k)[0] for k in (1, 2)] == [0, 1] and s.should_request(2)
    s.requested(2)
    assert s.action(3)[0] == 2 and s.action(4)[0] == 3  # answer late: chunk@0 goes past its plan, no pause
    s.add_chunk(2, chunk(100, horizon=6))
    # Tick 5: chunk@2's action 2 (its actions 0, 1 had their ticks pass) cross-faded with chunk@0's action 4.
    assert s.action(5)[0] == pytest.approx(2 / 3 * 4 + 1 / 3 * 102)
    assert s.action(6)[0] == pytest.approx(1 / 3 * 5 + 2 / 3 * 103)
    assert s.should_request(6)
    s.requested(6)
    assert s.action(7)[0] == 104 and s.finished() == [(0, 0, 4)]  # chunk@0 left after the blend: 0..3 ran
    s.reset()
    assert s.finished() == [(2, 2, 3)]
    s.requested(8)
    assert s.add_chunk(8, chunk(200, horizon=6)) and s.action(20) is None  # ticks 9..14 all passed
    assert s.stale_chunks == 1 and (8, 0, 0) in s.finished(), 'skipped, and recorded as never run'
    without = ChunkScheduler(actions_per_chunk=2)
    without.requested(0)
    without.add_chunk(0, chunk(0, horizon=6))
    assert [without.action(k)[0] for k in (1, 2)] == [0, 1] and without.action(3) is None  # synchronous: it holds
    with pytest.raises(ValueError, match='needs latency_hiding'):
        ChunkScheduler(actions_per_chunk=2, blend_actions=1)


def test_a_late_chunk_with_fewer_actions_left_than_a_chunk_plans_its_next_request_from_its_last_one():
    s = ChunkScheduler(actions_per_chunk=4, latency_hiding=True)
    s.set_latency(2.0)
    s.requested(0)
    s.add_chunk(0, chunk(0, horizon=4))  # horizon = actions_per_chunk: no spare actions to run on
    assert [s.action(k)[0] for k in (1, 2)] == [0, 1] and s.should_request(2)
    s.requested(2)
    assert [s.action(k)[0] for k in (3, 4)] == [2, 3]
    s.add_chunk(2, chunk(100, horizon=4))  # its actions for ticks 3, 4 have passed: 2 of 4 are left
    assert s.action(5)[0] == 102 and s.should_request(5)  # not 2 ticks after its last action, as before
    s.requested(5)
    assert s.action(6)[0] == 103
    s.add_chunk(5, chunk(200, horizon=4))
    assert s.action(7)[0] == 201  # no tick without an action


# ---- command adapters ---------------------------------------------------------------------------


def test_twist_adapter_scales_the_end_effector_delta_and_keeps_the_gripper_apart():
    adapter = TwistAdapter(action_dim=7, frame_id='fr3_link0', linear_scale=0.1, angular_scale=0.5)
    twist, rest = adapter.command(np.array([1.0, -0.5, 0.2, 0.4, 0.0, -1.0, 0.9]))
    assert twist.frame_id == 'fr3_link0'
    assert twist.linear == pytest.approx([0.1, -0.05, 0.02]) and twist.angular == pytest.approx([0.2, 0.0, -0.5])
    assert rest == pytest.approx([0.9])
    with pytest.raises(ValueError, match='non-finite'):
        adapter.command(np.array([np.nan] * 7))
    with pytest.raises(ValueError, match='7'):
        adapter.command(np.zeros(6))
    with pytest.raises(ValueError, match='6 action dims'):
        TwistAdapter(action_dim=3, frame_id='base')


def test_joint_adapter_absolute_and_delta_targets():
    absolute = JointTrajectoryAdapter(['j1', 'j2', 'grip'], control_period=0.1)
    cmd = absolute.command(np.array([0.1, 0.2, 0.03]))
    assert cmd.names == ('j1', 'j2', 'grip') and cmd.positions.tolist() == [[0.1, 0.2, 0.03]]
    assert cmd.times.tolist() == [0.1]
    delta = JointTrajectoryAdapter(['j1', 'j2', 'grip'], control_period=0.05, targets='delta',
                                   absolute_joints=['grip'])
    cmd = delta.command(np.array([0.1, -0.2, 0.03]), measured=np.array([1.0, 1.0, 0.0]))
    assert cmd.positions[0] == pytest.approx([1.1, 0.8, 0.03])  # the gripper stays absolute
    with pytest.raises(ValueError, match='measured'):
        delta.command(np.zeros(3))


# ---- observation join ---------------------------------------------------------------------------


def test_joiner_makes_one_observation_from_the_latest_parts_and_refuses_stale_or_bad_ones():
    j = ObservationJoiner(['a', 'b'], ['wrist'], image_size=16, max_age_s=0.5)
    with pytest.raises(ObservationError, match='no joint state'):
        j.join(0)
    j.update_joints(['b', 'x', 'a'], np.array([2.0, 9.0, 1.0]), np.array([]), stamp_ns=1_000_000_000)
    with pytest.raises(ObservationError, match='camera'):
        j.join(1_000_000_000)
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:, 8:56] = 200  # the centre square survives the crop
    j.update_image('wrist', frame, stamp_ns=1_200_000_000)
    obs = j.join(1_300_000_000)
    assert obs.position.tolist() == [1.0, 2.0] and obs.velocity.tolist() == [0.0, 0.0]
    assert obs.images['wrist'].shape == (16, 16, 3) and (obs.images['wrist'] == 200).all()
    with pytest.raises(ObservationError, match="joint a is 0.6.. s old"):
        j.join(1_600_000_000)
    j.update_joints(['a', 'b'], np.array([np.nan, 0.0]), np.array([]), stamp_ns=1_600_000_000)
    with pytest.raises(ObservationError, match='non-finite'):
        j.join(1_600_000_000)
    needs_velocity = ObservationJoiner(['a'], [], 16, 0.0, require_velocity=True)
    needs_velocity.update_joints(['a'], np.array([0.0]), np.array([]), 0)
    with pytest.raises(ObservationError, match='velocities'):
        needs_velocity.join(0)


def test_joiner_adds_named_task_features_in_the_policys_order_and_refuses_missing_stale_or_bad_ones():
    j = ObservationJoiner(['a'], [], 16, max_age_s=0.5, task_state_names=['goal.0', 'cube.0'])
    j.update_joints(['a'], np.array([1.0]), np.array([]), stamp_ns=1_000_000_000)
    with pytest.raises(ObservationError, match=r"no task state yet for \['goal.0', 'cube.0'\]"):
        j.join(1_000_000_000)
    j.update_task_state(['cube.0', 'other', 'goal.0'], np.array([3.0, 9.0, 2.0]), stamp_ns=1_100_000_000)
    obs = j.join(1_200_000_000)
    assert obs.task_state.tolist() == [2.0, 3.0] and obs.oldest_stamp_ns == 1_000_000_000
    j.update_joints(['a'], np.array([1.0]), np.array([]), stamp_ns=1_700_000_000)
    with pytest.raises(ObservationError, match=r'task feature goal.0 is 0.6.. s old'):
        j.join(1_700_000_000)
    j.update_task_state(['goal.0', 'cube.0'], np.array([np.inf, 0.0]), stamp_ns=1_700_000_000)
    with pytest.raises(ObservationError, match=r"task state is non-finite for \['goal.0'\]"):
        j.join(1_700_000_000)
    with pytest.raises(ObservationError, match='2 features but carries 1'):
        j.update_task_state(['goal.0', 'cube.0'], np.array([0.0]), stamp_ns=0)
    with pytest.raises(ValueError, match='duplicates'):
        ObservationJoiner(['a'], [], 16, 0.5, task_state_names=['x', 'x'])
    assert ObservationJoiner(['a'], [], 16, 0.5).task_state_names == ()


# ---- safety filter ------------------------------------------------------------------------------

JOINTS = ('j1', 'j2')


def safety(**overrides) -> SafetyFilter:
    cfg = dict(joint_names=JOINTS, position_lower=[-1.0, -1.0], position_upper=[1.0, 0.5], max_velocity=[1.0, 1.0],
               command_timeout_s=0.5, joint_state_timeout_s=0.5, max_rate_hz=0.0)
    cfg.update(overrides)
    f = SafetyFilter(SafetyConfig(**cfg))
    f.update_joint_state(['j1', 'j2', 'other'], np.array([0.0, 0.4, 5.0]), now=0.0)
    return f


def kinds(verdict) -> list[str]:
    return [i.kind for i in verdict.interventions]


def test_safety_clips_position_limits_and_joint_speed_against_the_measured_state():
    f = safety()
    v = f.filter_joint(JointCommand(JOINTS, [[0.05, 0.9]], [0.1]), now=0.01)
    assert kinds(v) == ['position_limit'] and v.command.positions.tolist() == [[0.05, 0.5]]
    v = f.filter_joint(JointCommand(JOINTS, [[0.5, 0.4], [0.6, 0.4]], [0.1, 0.3]), now=0.02)
    assert kinds(v) == ['velocity_limit']  # 1 rad/s: 0.1 rad by t=0.1 s, then 0.2 rad more by t=0.3 s
    assert v.command.positions[:, 0] == pytest.approx([0.1, 0.3])
    assert kinds(f.filter_joint(JointCommand(('j1', 'nope'), [[0, 0]], [0.1]), now=0.03)) == ['unknown_joint']
    assert kinds(f.filter_joint(JointCommand(JOINTS, [[0, 0]], [0.0]), now=0.03)) == ['bad_timing']
    stepped = safety(max_joint_step=0.05).filter_joint(JointCommand(JOINTS, [[0.5, 0.4]], [1.0]), now=0.01)
    assert stepped.command.positions[0, 0] == pytest.approx(0.05)


def test_emergency_stop_holds_and_blocks_everything_until_cleared():
    f = safety()
    assert f.filter_joint(JointCommand(JOINTS, [[0.05, 0.4]], [0.1]), now=0.1).command is not None
    v = f.set_estop(True, now=0.2)
    assert v.hold and kinds(v) == ['emergency_stop'] and v.interventions[0].level == 'error'
    assert f.hold_joint().positions.tolist() == [[0.0, 0.4]]  # the measured position
    blocked = f.filter_joint(JointCommand(JOINTS, [[0.05, 0.4]], [0.1]), now=0.3)
    assert blocked.command is None and kinds(blocked) == ['emergency_stop']
    assert f.watchdog(now=5.0).hold is False, 'already holding: no second hold'
    assert not f.set_estop(False, now=5.1).hold
    f.update_joint_state(JOINTS, np.array([0.0, 0.4]), now=5.1)
    assert f.filter_joint(JointCommand(JOINTS, [[0.05, 0.4]], [0.1]), now=5.2).command is not None


def test_watchdog_holds_once_when_commands_or_joint_states_stop():
    f = safety()
    assert f.watchdog(now=0.1).hold is False, 'nothing commanded yet: nothing to hold'
    f.filter_joint(JointCommand(JOINTS, [[0.05, 0.4]], [0.1]), now=0.1)
    f.update_joint_state(JOINTS, np.array([0.05, 0.4]), now=0.3)
    assert f.watchdog(now=0.5).hold is False
    v = f.watchdog(now=0.7)
    assert v.hold and kinds(v) == ['watchdog'] and f.watchdog(now=0.8).hold is False
    f.filter_joint(JointCommand(JOINTS, [[0.06, 0.4]], [0.1]), now=0.75)
    v = f.watchdog(now=0.85)  # joint states last arrived at 0.3 s
    assert v.hold and kinds(v) == ['stale_joint_state']
    late = f.filter_joint(JointCommand(JOINTS, [[0.06, 0.4]], [0.1]), now=0.9)
    assert late.command is None and kinds(late) == ['stale_joint_state']


def test_rate_limit_drops_commands_that_come_too_fast():
    f = safety(max_rate_hz=10.0)
    assert f.filter_joint(JointCommand(JOINTS, [[0.0, 0.4]], [0.1]), now=0.1).command is not None
    assert kinds(f.filter_joint(JointCommand(JOINTS, [[0.0, 0.4]], [0.1]), now=0.15)) == ['rate_limit']
    assert f.filter_joint(JointCommand(JOINTS, [[0.0, 0.4]], [0.1]), now=0.21).command is not None


def test_workspace_box_bounds_twists_and_stops_joint_motion_that_leaves_it():
    box = dict(workspace_lower=[0.0, -0.5, 0.0], workspace_upper=[1.0, 0.5, 1.0], max_linear=[0.5, 0.5, 0.5],
               workspace_lookahead_s=0.1)
    f = safety(**box)
    assert kinds(f.filter_twist(TwistCommand('base', [0.1, 0, 0], [0, 0, 0]), now=0.01)) == ['stale_pose']
    f.update_pose(np.array([0.5, 0.48, 0.5]), 'base', now=0.02)
    v = f.filter_twist(TwistCommand('base', [2.0, 0.4, 0.0], [0.0, 0.0, 1.0]), now=0.03)
    assert kinds(v) == ['twist_limit', 'workspace']
    assert v.command.linear == pytest.approx([0.5, 0.2, 0.0])  # 0.02 m to the wall in 0.1 s
    assert kinds(f.filter_twist(TwistCommand('tool', [0.1, 0, 0], [0, 0, 0]), now=0.04)) == ['frame_mismatch']
    f.update_pose(np.array([0.5, 0.6, 0.5]), 'base', now=0.05)  # outside: only motion back in passes
    v = f.filter_twist(TwistCommand('base', [0.1, 0.3, 0.0], [0, 0, 0]), now=0.06)
    assert v.command.linear == pytest.approx([0.1, 0.0, 0.0])
    assert f.filter_twist(TwistCommand('base', [0, -0.3, 0], [0, 0, 0]), now=0.07).command.linear[1] == -0.3

    g = safety(**box)
    g.update_pose(np.array([0.5, 0.4, 0.5]), 'base', now=0.01)  # inside at q = (0, 0.4)
    assert g.filter_joint(JointCommand(JOINTS, [[0.1, 0.4]], [0.1]), now=0.02).command is not None
    g.update_joint_state(JOINTS, np.array([0.1, 0.4]), now=0.1)
    left = g.update_pose(np.array([0.5, 0.55, 0.5]), 'base', now=0.1)
    assert left.hold and kinds(left) == ['workspace']
    onward = g.filter_joint(JointCommand(JOINTS, [[0.2, 0.4]], [0.1]), now=0.15)
    assert onward.command is None and 'workspace' in kinds(onward)
    back = g.filter_joint(JointCommand(JOINTS, [[0.05, 0.4]], [0.1]), now=0.2)
    assert back.command is not None and back.command.positions[0, 0] == pytest.approx(0.05)


def test_safety_config_rejects_inconsistent_limits():
    with pytest.raises(ValueError, match='2 values'):
        SafetyConfig(joint_names=JOINTS, position_lower=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match='lower < upper'):
        SafetyConfig(workspace_lower=[0, 0, 1], workspace_upper=[1, 1, 0.5])
    with pytest.raises(ValueError, match='must not exceed'):
        SafetyConfig(joint_names=JOINTS, position_lower=[1.0, 0.0], position_upper=[0.0, 1.0])


# ---- message conversions ------------------------------------------------------------------------


def test_arm_message_conversions_round_trip():
    pytest.importorskip('rclpy', reason='ROS 2 is installed by scripts/setup.sh')
    from diagnostic_msgs.msg import DiagnosticStatus

    from stepnft_ros import ros_io_arm
    from stepnft_ros.control import Intervention

    cmd = JointCommand(('a', 'b'), [[0.1, 0.2], [0.3, 0.4]], [0.05, 1.25])
    msg = ros_io_arm.command_to_joint_trajectory(cmd)
    assert msg.header.stamp.sec == 0 and msg.points[1].time_from_start.sec == 1
    back = ros_io_arm.joint_trajectory_to_command(msg)
    assert back.names == ('a', 'b') and back.positions.tolist() == cmd.positions.tolist()
    assert back.times == pytest.approx([0.05, 1.25])
    msg.points[0].positions = [0.1]
    with pytest.raises(ObservationError, match='2 positions'):
        ros_io_arm.joint_trajectory_to_command(msg)
    twist = ros_io_arm.twist_to_command(ros_io_arm.command_to_twist(TwistCommand('tcp', [1, 2, 3], [4, 5, 6]), 7))
    assert twist.frame_id == 'tcp' and twist.linear.tolist() == [1, 2, 3] and twist.angular.tolist() == [4, 5, 6]
    pose = ros_io_arm.position_to_pose(np.array([0.5, 0.0, 0.2]), np.array([0, 0, 0, 1.0]), 'base', 10)
    position, frame, stamp = ros_io_arm.pose_to_position(pose)
    assert position.tolist() == [0.5, 0.0, 0.2] and frame == 'base' and stamp == 10
    diag = ros_io_arm.interventions_to_diagnostics('safety_layer', [
        Intervention('watchdog', 'no command', values={'s': '0.5'}), Intervention('emergency_stop', 'on', 'error')], 0)
    assert [(s.name, s.level) for s in diag.status] == [('safety_layer: watchdog', DiagnosticStatus.WARN),
                                                       ('safety_layer: emergency_stop', DiagnosticStatus.ERROR)]
    assert diag.status[0].values[0].key == 's'


# ---- the full loop: stand-in arm -> arm_bridge -> policy_server -> arm_bridge -> safety_layer -> arm --------

PANDA_ARM = [f'panda_joint{i}' for i in range(1, 8)]
COMMAND_JOINTS = [*PANDA_ARM, 'panda_finger_joint1']  # 7 arm joints + the gripper (one finger, mimicked)
CONTROLLER_TOPIC = '/joint_trajectory_controller/joint_trajectory'
REST = np.array([0.0, np.pi / 8, 0.0, -5 * np.pi / 8, 0.0, 3 * np.pi / 4, np.pi / 4, 0.04])  # PickCube's start


def steady_policy(tmp_path, target: np.ndarray):
    """The harness's tiny policy, its action statistics set so that it always asks for `target`
    (within ~0.03 rad): the arm then keeps moving for a while, so stillness is the safety layer's doing."""
    import torch
    from ros_harness import tiny_checkpoint

    from stepnft_ros.policy import load_checkpoint, save_checkpoint

    src = tiny_checkpoint(tmp_path / 'tiny', state_dim=8, action_dim=8, camera_names=('base_camera',), image_size=32)
    model, meta = load_checkpoint(src)
    model.normalizer.action_mean.copy_(torch.as_tensor(target, dtype=torch.float32))
    model.normalizer.action_std.fill_(0.01)
    save_checkpoint(tmp_path / 'steady', model, meta)
    return tmp_path / 'steady'


@pytest.mark.slow
def test_policy_drives_the_standin_arm_through_the_safety_layer(tmp_path, probe):
    """Moves; limits clip; e-stop holds until cleared; a dead policy trips the watchdog; diagnostics for each.

    The bridge ensembles chunks here (a request every tick); the launch test below runs it chunked."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from ros_harness import Graph, spin_until
    from std_msgs.msg import Bool

    from stepnft_ros import ros_io

    node, executor = probe
    target = REST.copy()
    target[0] += 1.0   # joint 1 swings slowly (velocity-limited) toward a far target
    target[6] += 1.0   # joint 7 asks past its (test) upper limit: clipped
    lower = np.array([-2.9, -1.76, -2.9, -3.07, -2.9, -0.02, -2.9, 0.0])
    upper = np.array([2.9, 1.76, 2.9, -0.07, 2.9, 3.75, REST[6] + 0.15, 0.04])
    graph = Graph(tmp_path / 'logs')
    try:
        arm = graph.start('sim_bridge.standin_arm', 'standin_arm', {
            'image_size': 32, 'sim_rate_hz': 20.0, 'joint_state_rate_hz': 20.0, 'camera_rate_hz': 10.0})
        safety_node = graph.start('stepnft_ros.nodes.safety_layer', 'safety_layer', {
            'joint_names': COMMAND_JOINTS, 'position_lower': lower.tolist(), 'position_upper': upper.tolist(),
            'max_velocity': [0.25] * 7 + [0.1], 'ee_pose_topic': '/ee_pose',
            'workspace_lower': [-0.2, -0.9, -0.1], 'workspace_upper': [1.0, 0.9, 1.0],
            'command_timeout_s': 0.6, 'joint_state_timeout_s': 1.0, 'pose_timeout_s': 1.0}, namespace='arm')
        server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
            'checkpoint': str(steady_policy(tmp_path, target)), 'robots': ['arm'], 'mode': 'deploy',
            'state_sources': ['joint_position'], 'action_names': COMMAND_JOINTS, 'control_period': 0.1})
        bridge = graph.start('stepnft_ros.nodes.arm_bridge', 'arm_bridge', {
            'joint_names': COMMAND_JOINTS, 'camera_names': ['base_camera'],
            'camera_topics': ['/camera/base_camera/image_raw'], 'image_size': 32, 'control_rate_hz': 10.0,
            'temporal_ensemble': True, 'max_observation_age_s': 1.0, 'request_timeout_s': 1.0}, namespace='arm')

        joints, diagnostics, commands, observations = [], [], [], []
        node.create_subscription(ros_io.JointState, '/joint_states',
                                 lambda m: joints.append((time.monotonic(), np.array(m.position))), ros_io.SENSOR_QOS)
        node.create_subscription(DiagnosticArray, ros_io.DIAGNOSTICS,
                                 lambda m: diagnostics.extend((time.monotonic(), s) for s in m.status),
                                 ros_io.RELIABLE_QOS)
        node.create_subscription(ros_io.JointTrajectory, CONTROLLER_TOPIC,
                                 lambda m: commands.append((time.monotonic(), m)), ros_io.RELIABLE_QOS)
        node.create_subscription(ros_io.JointState, '/arm/joint_states', observations.append, ros_io.SENSOR_QOS)
        active = node.create_publisher(Bool, '/arm/' + ros_io.EPISODE_ACTIVE, ros_io.LATCHED_QOS)
        estop = node.create_publisher(Bool, ros_io.EMERGENCY_STOP, ros_io.LATCHED_QOS)

        for n, pattern in ((arm, 'stand-in arm'), (safety_node, 'guarding 8 joints'), (server, 'serving 1 robot'),
                           (bridge, 'waiting for episode_active')):
            n.wait_for(pattern, timeout=90)
        spin_until(executor, lambda: len(joints) > 5, 30, 'joint states from the stand-in arm')
        t_quiet = time.monotonic()
        spin_until(executor, lambda: time.monotonic() > t_quiet + 1.0, 5, 'a second without an active episode')
        assert not observations and not commands, 'no episode is active: no observation sent, nothing commanded'

        def q1_moved_by(delta: float, start: np.ndarray) -> bool:
            return abs(joints[-1][1][0] - start[0]) > delta

        def range_over(seconds: float) -> np.ndarray:
            t0 = time.monotonic()
            spin_until(executor, lambda: time.monotonic() > t0 + seconds, seconds + 5, 'the sampling window')
            window = np.stack([q for t, q in joints if t >= t0])
            return window.max(axis=0) - window.min(axis=0)

        def diag(kind: str, since: float) -> list:
            return [s for t, s in diagnostics if t >= since and s.name.endswith(f': {kind}')]

        # 1. The loop moves the arm, within the limits.
        t_active, q_active = time.monotonic(), joints[-1][1]
        active.publish(Bool(data=True))
        spin_until(executor, lambda: len(joints) and q1_moved_by(0.05, q_active), 60, 'the policy to move joint 1')
        assert observations and commands
        sent = np.stack([np.array(m.points[0].positions) for _, m in commands])
        assert np.all(sent >= lower - 1e-9) and np.all(sent <= upper + 1e-9), 'every command within the limits'
        spin_until(executor, lambda: diag('position_limit', t_active) and diag('velocity_limit', t_active), 20,
                   'diagnostics for the clipped joint 7 target and the slowed joint 1')
        assert np.all(joints[-1][1][:7] <= upper[:7] + 0.02), 'the measured arm stays inside the limits'

        # 2. E-stop: the arm holds, nothing is forwarded until it is cleared.
        t_stop = time.monotonic()
        estop.publish(Bool(data=True))
        spin_until(executor, lambda: diag('emergency_stop', t_stop), 10, 'the e-stop diagnostic')
        assert diag('emergency_stop', t_stop)[0].level == DiagnosticStatus.ERROR
        spin_until(executor, lambda: time.monotonic() > t_stop + 0.7, 5, 'the hold to settle')
        n_commands = len(commands)
        assert range_over(1.5)[:7].max() < 5e-3, 'e-stopped: the arm does not move'
        assert len(commands) == n_commands, 'nothing forwarded while the e-stop is engaged'
        q_clear = joints[-1][1]
        estop.publish(Bool(data=False))
        spin_until(executor, lambda: len(commands) > n_commands and q1_moved_by(0.03, q_clear), 30,
                   'motion to resume after the e-stop is cleared')

        # 3. The policy dies: the bridge stops commanding, the watchdog holds the arm.
        t_kill = time.monotonic()
        server.stop(signal.SIGKILL)
        spin_until(executor, lambda: diag('watchdog', t_kill), 10, 'the watchdog diagnostic')
        hold_at = next(t for t, s in diagnostics if t >= t_kill and s.name.endswith(': watchdog'))
        spin_until(executor, lambda: time.monotonic() > hold_at + 0.7, 5, 'the hold to settle')
        assert range_over(1.5)[:7].max() < 5e-3, 'no policy: the arm holds still'
        holds = [m for t, m in commands if t >= hold_at - 0.2]
        assert holds, 'the watchdog published a hold command'
        measured = joints[-1][1][:8]
        assert np.abs(np.array(holds[-1].points[0].positions) - measured).max() < 5e-3, 'hold = measured position'
        assert 'HOLD at the measured position' in safety_node.output()
        assert bridge.proc.poll() is None and arm.proc.poll() is None and safety_node.proc.poll() is None
    finally:
        graph.stop_all()


def test_deploy_real_graph_description():
    from stepnft_ros import launch_description as ld

    specs = {s.full_name: s for s in ld.deploy_real(ld.DeployRealArgs(checkpoint='/c', robot='fr3', image_size=64))}
    assert set(specs) == {'/fr3/safety_layer', '/fr3/arm_bridge', '/policy_server', '/episode_operator',
                          '/lifecycle_manager'}
    assert specs['/fr3/safety_layer'].ends_graph == 'exit', 'the arm is never driven without its safety layer'
    assert specs['/policy_server'].parameters == {'checkpoint': '/c', 'robots': ['fr3'], 'mode': 'deploy',
                                                  'managed': True}
    assert specs['/fr3/arm_bridge'].parameters == {'image_size': 64, 'managed': True}
    manager = specs['/lifecycle_manager']
    assert manager.parameters['node_names'] == ['/fr3/safety_layer', '/policy_server', '/fr3/arm_bridge'], \
        'the safety layer is active before anything that can command the arm'
    assert manager.stops_first and manager.ends_graph == 'failure'
    learning = ld.deploy_real(ld.DeployRealArgs(checkpoint='/c', mode='train', learn=True, standin=True))
    assert {s.name for s in learning} >= {'learner', 'standin_arm'}
    assert next(s for s in learning if s.name == 'policy_server').parameters['episode_dir'].endswith('episodes')
    with pytest.raises(ValueError, match='train'):
        ld.DeployRealArgs(checkpoint='/c', learn=True)


@pytest.mark.slow
def test_stepnft_launch_deploy_real_standin_dry_run(tmp_path, probe):
    """`stepnft launch deploy_real --standin` with config/deploy_real.yaml: an operator-started episode moves it."""
    import subprocess
    import sys

    from ros_harness import REPO, spin_until, tiny_checkpoint
    from std_srvs.srv import Trigger

    from stepnft_ros import ros_io
    from stepnft_ros.launcher import stop_processes

    node, executor = probe
    ckpt = tiny_checkpoint(tmp_path / 'fr3', state_dim=8, action_dim=8, camera_names=('wrist', 'scene'),
                           image_size=32)
    joints = []
    node.create_subscription(ros_io.JointState, '/joint_states', lambda m: joints.append(np.array(m.position)),
                             ros_io.SENSOR_QOS)
    start = node.create_client(Trigger, '/arm/' + ros_io.OPERATOR_START)
    log = open(tmp_path / 'launch.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'stepnft_ros.cli', 'launch', 'deploy_real', '--standin',
                             '--checkpoint', str(ckpt), '--run-dir', str(tmp_path / 'run')],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    failure = None
    try:
        spin_until(executor, lambda: len(joints) > 3 and start.service_is_ready(), 90,
                   'the stand-in arm and the operator')
        future = start.call_async(Trigger.Request())
        spin_until(executor, future.done, 20, 'the operator to start the episode')
        assert future.result().success, future.result().message
        before = joints[-1]
        spin_until(executor, lambda: np.abs(joints[-1][:7] - before[:7]).max() > 0.02, 60,
                   'the policy to move the stand-in FR3 through the safety layer')
    except AssertionError as err:
        failure = err
    finally:
        stop_processes([proc], 20)
        log.close()
    out = (tmp_path / 'launch.log').read_text()
    assert failure is None, f'{failure} ({len(joints)} joint states seen); the launch log:\n{out[-4000:]}'
    assert proc.returncode == 0, out[-3000:]
    for name in ('/arm/safety_layer', '/arm/arm_bridge', '/policy_server', '/episode_operator', '/standin_arm'):
        assert f'started {name}' in out
    assert 'guarding 8 joints' in out and "'fr3_joint1'" in out
    # Managed bring-up: the safety layer is active before anything that can command the arm.
    order = [out.index(f'[lifecycle_manager]: {name} active')
             for name in ('/arm/safety_layer', '/policy_server', '/arm/arm_bridge')]
    assert order == sorted(order) and '[lifecycle_manager]: all 3 nodes active' in out, out[-3000:]
    # Stopped: the manager goes first and deactivates them, last first; the safety layer then holds.
    deactivated = [out.index(f'[lifecycle_manager]: {name} deactivated')
                   for name in ('/arm/arm_bridge', '/policy_server', '/arm/safety_layer')]
    assert deactivated == sorted(deactivated), out[-3000:]



@pytest.mark.slow
def test_bad_configuration_stops_the_node_with_one_clear_line(tmp_path, ros_domain):
    from ros_harness import Graph

    graph = Graph(tmp_path / 'logs')
    try:
        safety_node = graph.start('stepnft_ros.nodes.safety_layer', 'safety_layer', {
            'joint_names': ['j1'], 'workspace_lower': [0, 0, 0], 'workspace_upper': [1, 1, 1]}, namespace='arm')
        limits = graph.start('stepnft_ros.nodes.safety_layer', 'limits', {
            'joint_names': ['j1', 'j2'], 'max_velocity': [1.0, 1.0, 1.0]}, namespace='arm')
        bridge = graph.start('stepnft_ros.nodes.arm_bridge', 'arm_bridge', {'joint_names': ['j1']})
        assert safety_node.proc.wait(60) == 2 and "'ee_pose_topic' is required" in safety_node.output()
        assert limits.proc.wait(60) == 2 and 'max_velocity must have 2 values' in limits.output()
        assert bridge.proc.wait(60) == 2 and 'needs a robot namespace' in bridge.output()
    finally:
        graph.stop_all()


def test_an_operator_that_stops_repeating_episode_active_stops_the_episode(tmp_path, probe):
    """The operator repeats episode_active; when the repeats stop (operator killed), the arm bridge
    ends the episode after active_timeout_s: no more observations, so nothing more is commanded.
    The camera here streams jpeg (image_transport's /compressed), decoded by the bridge."""
    import cv2
    from ros_harness import Graph, spin_until
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import Bool

    from stepnft_ros import ros_io

    node, executor = probe
    graph = Graph(tmp_path / 'logs')
    try:
        operator = graph.start('stepnft_ros.nodes.episode_operator', 'episode_operator',
                               {'robots': ['arm'], 'heartbeat_s': 0.2})
        bridge = graph.start('stepnft_ros.nodes.arm_bridge', 'arm_bridge', {
            'joint_names': ['j1', 'j2'], 'control_rate_hz': 10.0, 'request_timeout_s': 0.2,
            'active_timeout_s': 1.0, 'max_observation_age_s': 1.0, 'camera_names': ['wrist'],
            'camera_topics': ['/wrist/image_raw/compressed'], 'image_size': 16}, namespace='arm')
        repeats, observations, frames = [], [], []
        node.create_subscription(ros_io.Image, '/arm/camera/wrist/image_raw', frames.append, ros_io.SENSOR_QOS)
        camera = node.create_publisher(CompressedImage, '/wrist/image_raw/compressed', ros_io.SENSOR_QOS)
        picture = np.zeros((32, 32, 3), np.uint8)
        picture[:] = (200, 30, 10)
        jpeg = cv2.imencode('.jpg', picture[:, :, ::-1])[1].tobytes()
        node.create_subscription(Bool, '/arm/' + ros_io.EPISODE_ACTIVE, repeats.append, ros_io.LATCHED_QOS)
        node.create_subscription(ros_io.JointState, '/arm/joint_states', observations.append, ros_io.SENSOR_QOS)
        joints = node.create_publisher(ros_io.JointState, '/joint_states', ros_io.SENSOR_QOS)
        active = node.create_publisher(Bool, '/arm/' + ros_io.EPISODE_ACTIVE, ros_io.LATCHED_QOS)
        bridge.wait_for('waiting for episode_active', timeout=60)
        operator.wait_for('operating 1 robot', timeout=60)

        def spin_for(seconds: float, heartbeat: bool, until=lambda: False) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end and not until():
                joints.publish(ros_io.arrays_to_joint_state(['j1', 'j2'], np.zeros(2), None, time.time_ns()))
                frame = CompressedImage(format='jpeg', data=jpeg)
                frame.header.stamp = ros_io.ns_to_stamp(time.time_ns())
                camera.publish(frame)
                if heartbeat:
                    active.publish(Bool(data=True))
                for _ in range(2):
                    executor.spin_once(timeout_sec=0.05)

        spin_until(executor, lambda: len(repeats) >= 4, 10, 'the idle operator to repeat episode_active')
        assert not any(m.data for m in repeats), 'no episode started: the operator repeats false'
        operator.stop(signal.SIGKILL)  # from here on only the test speaks for the operator
        spin_for(30.0, heartbeat=True, until=lambda: len(observations) >= 3)  # discovery can be slow under load
        assert observations, 'episode active: the bridge sends observations'
        spin_until(executor, lambda: frames, 5, 'the decoded camera frame')
        seen = ros_io.image_to_numpy(frames[-1], 16).astype(int)
        assert np.abs(seen - picture[:16, :16]).max() <= 4, 'the jpeg frame, decoded to RGB and resized'
        spin_for(1.5, heartbeat=False)
        bridge.wait_for('no episode_active from the operator for 1 s: episode stopped, holding', timeout=10)
        n = len(observations)
        spin_for(1.5, heartbeat=False)
        assert len(observations) == n, 'the episode stopped: no more observations'
        assert bridge.proc.poll() is None
    finally:
        graph.stop_all()


def test_arm_bridge_reports_the_executed_prefix_of_each_chunk(tmp_path, probe):
    """The test answers observations with chunks of 4; the bridge runs 2 of each and says so on
    executed_chunk once a chunk is replaced, and for the last one when the episode stops."""
    from ros_harness import Graph, spin_until
    from std_msgs.msg import Bool

    from stepnft_ros import ros_io

    node, executor = probe
    graph = Graph(tmp_path / 'logs')
    try:
        bridge = graph.start('stepnft_ros.nodes.arm_bridge', 'arm_bridge', {
            'joint_names': ['j1', 'j2'], 'control_rate_hz': 10.0, 'actions_per_chunk': 2,
            'request_timeout_s': 1.0, 'max_observation_age_s': 1.0}, namespace='arm')
        joints = node.create_publisher(ros_io.JointState, '/joint_states', ros_io.SENSOR_QOS)
        node.create_timer(0.05, lambda: joints.publish(
            ros_io.arrays_to_joint_state(['j1', 'j2'], np.zeros(2), None, time.time_ns())))
        chunks = node.create_publisher(ros_io.JointTrajectory, '/arm/' + ros_io.ACTION_CHUNK, ros_io.RELIABLE_QOS)
        answered, reports = [], []
        policy_up = [True]

        def answer(observation) -> None:
            if not policy_up[0]:
                return
            stamp = ros_io.stamp_to_ns(observation.header.stamp)
            answered.append(stamp)
            chunks.publish(ros_io.chunk_to_trajectory(np.zeros((4, 2)), ['j1', 'j2'], stamp, 0.1))

        node.create_subscription(ros_io.JointState, '/arm/joint_states', answer, ros_io.SENSOR_QOS)
        node.create_subscription(ros_io.JointTrajectory, '/arm/' + ros_io.EXECUTED_CHUNK,
                                 lambda m: reports.append(ros_io.executed_range(m, 0.1)), ros_io.RELIABLE_QOS)
        active = node.create_publisher(Bool, '/arm/' + ros_io.EPISODE_ACTIVE, ros_io.LATCHED_QOS)
        bridge.wait_for('waiting for episode_active', timeout=60)
        active.publish(Bool(data=True))
        spin_until(executor, lambda: len(reports) >= 4, 60, 'four chunks run and replaced')
        policy_up[0] = False  # the last chunk runs out and stays in the schedule, unreported ...
        quiet = time.monotonic()
        spin_until(executor, lambda: time.monotonic() > quiet + 1.0, 5, 'the last chunk to run out')
        before = len(reports)
        active.publish(Bool(data=False))  # ... until the episode stops
        spin_until(executor, lambda: len(reports) > before, 10, 'the last chunk\'s report')
        stamps = [s for s, _, _ in reports]
        assert stamps == sorted(set(stamps)) and set(stamps) <= set(answered), 'one report per answered chunk'
        # each chunk ran 2 actions, from its first unless its answer came after that action's tick
        assert stamps[-1] == answered[-1] and [n for _, _, n in reports] == [2] * len(reports), reports
        assert all(first in (0, 1) for _, first, _ in reports), reports
    finally:
        graph.stop_all()


def test_a_managed_safety_layer_forwards_nothing_until_active_and_holds_when_deactivated(tmp_path, probe):
    """Lifecycle: inactive, a command is dropped; active, it passes (filtered); deactivated, the arm holds."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from ros_harness import Graph, spin_until

    from stepnft_ros import ros_io

    node, executor = probe
    graph = Graph(tmp_path / 'logs')
    out = []
    try:
        safety = graph.start('stepnft_ros.nodes.safety_layer', 'safety_layer', {
            'joint_names': ['j1', 'j2'], 'managed': True, 'command_timeout_s': 30.0}, namespace='arm')
        joints = node.create_publisher(ros_io.JointState, '/joint_states', ros_io.SENSOR_QOS)
        node.create_timer(0.05, lambda: joints.publish(
            ros_io.arrays_to_joint_state(['j1', 'j2'], np.array([0.1, 0.2]), None, time.time_ns())))
        node.create_subscription(ros_io.JointTrajectory, '/joint_trajectory_controller/joint_trajectory',
                                 out.append, ros_io.RELIABLE_QOS)
        commands = node.create_publisher(ros_io.JointTrajectory, '/arm/' + ros_io.SAFETY_JOINT_TRAJECTORY_IN,
                                         ros_io.RELIABLE_QOS)
        change = node.create_client(ChangeState, '/arm/safety_layer/change_state')
        safety.wait_for('managed: inactive until lifecycle_manager', timeout=60)
        spin_until(executor, lambda: change.service_is_ready() and commands.get_subscription_count() > 0, 30,
                   'the safety layer')

        def command():
            msg = ros_io.JointTrajectory(joint_names=['j1', 'j2'])
            msg.points.append(ros_io.JointTrajectoryPoint(positions=[0.11, 0.21],
                                                          time_from_start=ros_io.seconds_to_duration(0.1)))
            commands.publish(msg)

        def transition(tid):
            future = change.call_async(ChangeState.Request(transition=Transition(id=tid)))
            spin_until(executor, future.done, 10, f'transition {tid}')
            assert future.result().success

        for _ in range(5):
            command()
            executor.spin_once(timeout_sec=0.1)
        assert out == [], 'inactive: nothing reaches the controllers'
        transition(Transition.TRANSITION_CONFIGURE)
        transition(Transition.TRANSITION_ACTIVATE)
        spin_until(executor, lambda: (command(), bool(out))[1], 10, 'a forwarded command')
        assert out[-1].points[0].positions.tolist() == pytest.approx([0.11, 0.21])
        forwarded = len(out)
        transition(Transition.TRANSITION_DEACTIVATE)
        spin_until(executor, lambda: len(out) > forwarded, 10, 'the hold on deactivation')
        assert out[-1].points[0].positions.tolist() == pytest.approx([0.1, 0.2]), 'held at the measured position'
    finally:
        graph.stop_all()


def test_lifecycle_manager_stops_the_bring_up_when_a_node_never_comes(tmp_path, ros_domain):
    from ros_harness import Graph

    graph = Graph(tmp_path / 'logs')
    try:
        manager = graph.start('stepnft_ros.nodes.lifecycle_manager', 'lifecycle_manager', {
            'node_names': ['/arm/safety_layer'], 'service_timeout_s': 2.0})
        assert manager.proc.wait(60) == 1
        assert 'bring-up stopped: /arm/safety_layer did not come up within 2 s' in manager.output()
    finally:
        graph.stop_all()


def test_a_taken_over_arm_bridge_neither_asks_the_policy_nor_commands_until_handed_back(tmp_path, probe):
    from ros_harness import Graph, spin_until
    from std_msgs.msg import Bool

    from stepnft_ros import ros_io

    node, executor = probe
    graph = Graph(tmp_path / 'logs')
    try:
        bridge = graph.start('stepnft_ros.nodes.arm_bridge', 'arm_bridge', {
            'joint_names': ['j1', 'j2'], 'control_rate_hz': 20.0, 'actions_per_chunk': 2,
            'require_active': False, 'max_observation_age_s': 1.0}, namespace='arm')
        joints = node.create_publisher(ros_io.JointState, '/joint_states', ros_io.SENSOR_QOS)
        node.create_timer(0.02, lambda: joints.publish(
            ros_io.arrays_to_joint_state(['j1', 'j2'], np.zeros(2), None, time.time_ns())))
        chunks = node.create_publisher(ros_io.JointTrajectory, '/arm/' + ros_io.ACTION_CHUNK, ros_io.RELIABLE_QOS)
        observed, commanded = [], []

        def answer(observation) -> None:
            stamp = ros_io.stamp_to_ns(observation.header.stamp)
            observed.append(stamp)
            chunks.publish(ros_io.chunk_to_trajectory(np.zeros((4, 2)), ['j1', 'j2'], stamp, 0.05))

        node.create_subscription(ros_io.JointState, '/arm/joint_states', answer, ros_io.SENSOR_QOS)
        node.create_subscription(ros_io.JointTrajectory, '/arm/' + ros_io.SAFETY_JOINT_TRAJECTORY_IN,
                                 commanded.append, ros_io.RELIABLE_QOS)
        takeover = node.create_publisher(Bool, '/arm/' + ros_io.INTERVENTION_ACTIVE, ros_io.LATCHED_QOS)
        spin_until(executor, lambda: len(commanded) >= 5, 60, 'the policy to command the arm')
        takeover.publish(Bool(data=True))
        bridge.wait_for('TAKEN OVER', timeout=10)
        seen, sent = len(observed), len(commanded)
        quiet_until = time.monotonic() + 1.0
        spin_until(executor, lambda: time.monotonic() > quiet_until, 5, 'a second of takeover')
        assert len(observed) <= seen + 1 and len(commanded) <= sent + 1, 'at most what was in flight'
        takeover.publish(Bool(data=False))
        spin_until(executor, lambda: len(commanded) >= sent + 5, 30, 'the policy to command again')
    finally:
        graph.stop_all()


def test_the_standin_plays_perception_and_scene_resets_and_the_bridge_joins_its_task_state(tmp_path, probe):
    """The stand-in publishes the task's object state as named features and reports each scene's end;
    without auto_reset the scene stays over until ~/reset gives the next seed's. The arm bridge joins
    the features into each observation: <ns>/task_state in the policy's order, stamped like <ns>/joint_states."""
    import json

    from ros_harness import Graph, spin_until
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from stepnft_ros import ros_io

    node, executor = probe
    features = ['goal_pos.2', 'obj_pose.0', 'is_grasped']  # a subset, in an order of the policy's own
    graph = Graph(tmp_path / 'logs')
    try:
        arm = graph.start('sim_bridge.standin_arm', 'standin_arm', {
            'obs_mode': 'state', 'task_state_topic': '/perception/task_state', 'auto_reset': False,
            'max_scene_steps': 10, 'seed': 9, 'sim_rate_hz': 20.0, 'joint_state_rate_hz': 20.0})
        bridge = graph.start('stepnft_ros.nodes.arm_bridge', 'arm_bridge', {
            'joint_names': COMMAND_JOINTS, 'state_sources': ['joint_position', 'task_state'],
            'task_state_topic': '/perception/task_state', 'task_state_names': features, 'control_rate_hz': 10.0,
            'require_active': False, 'max_observation_age_s': 1.0, 'request_timeout_s': 0.2}, namespace='arm')
        perceived, outcomes, task_obs, joint_obs, positions = [], [], {}, {}, []
        node.create_subscription(ros_io.JointState, '/perception/task_state', perceived.append, ros_io.RELIABLE_QOS)
        node.create_subscription(String, '/standin_arm/scene_outcome', lambda m: outcomes.append(json.loads(m.data)),
                                 ros_io.SUMMARY_QOS)  # the first scene may end before this subscription is matched
        node.create_subscription(ros_io.JointState, '/arm/' + ros_io.TASK_STATE,
                                 lambda m: task_obs.__setitem__(ros_io.stamp_to_ns(m.header.stamp), m),
                                 ros_io.SENSOR_QOS)
        node.create_subscription(ros_io.JointState, '/arm/' + ros_io.JOINT_STATES,
                                 lambda m: joint_obs.__setitem__(ros_io.stamp_to_ns(m.header.stamp), m),
                                 ros_io.SENSOR_QOS)
        node.create_subscription(ros_io.JointState, '/joint_states', lambda m: positions.append(np.array(m.position)),
                                 ros_io.SENSOR_QOS)
        reset = node.create_client(Trigger, '/standin_arm/reset')
        arm.wait_for('task state /perception/task_state', timeout=90)
        bridge.wait_for('active without an operator', timeout=60)

        # The scene may end before discovery completes; the stand-in goes on publishing its frozen state.
        spin_until(executor, lambda: outcomes and perceived, 30, 'the first scene to time out, and its task state')
        assert outcomes[0] == {'seed': 9, 'success': False, 'steps': 10}  # (seed 8's goal is at its cube)
        names = list(perceived[-1].name)
        assert {'is_grasped', 'goal_pos.2', 'obj_pose.0', 'tcp_to_obj_pos.0'} <= set(names)
        ended_ns = time.time_ns()
        spin_until(executor, lambda: max(set(task_obs) & set(joint_obs), default=0) > ended_ns, 30,
                   'an observation of the ended scene, with task state')
        stamp = max(set(task_obs) & set(joint_obs))
        assert list(task_obs[stamp].name) == features, 'the policy\'s features, in its order'
        frozen = perceived[-1]
        expected = [frozen.position[names.index(f)] for f in features]
        assert np.allclose(task_obs[stamp].position, expected, atol=1e-6), 'the scene is over: values stay as it ended'
        n_states = len(positions)
        t0 = time.monotonic()
        spin_until(executor, lambda: time.monotonic() > t0 + 0.5, 5, 'half a second of the ended scene')
        assert len(positions) > n_states and len(outcomes) == 1, 'sensors go on; no new scene without a reset'
        assert np.allclose(positions[-1], positions[n_states - 1]), 'the ended scene does not move'

        future = reset.call_async(Trigger.Request())
        spin_until(executor, future.done, 30, 'the reset')
        assert future.result().success and future.result().message == 'scene of seed 10'
        spin_until(executor, lambda: len(outcomes) == 2, 30, 'the next scene to time out')
        assert outcomes[1] == {'seed': 10, 'success': False, 'steps': 10}
        assert bridge.proc.poll() is None and arm.proc.poll() is None
    finally:
        graph.stop_all()
