"""The operator workflow for real-arm episodes: start, stop, label, discard; the labels reach the learner."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import termios
import time

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy', reason='ROS 2 is installed by scripts/setup.sh')

from ros_harness import REPO, Graph, spin_until, tiny_checkpoint  # noqa: E402
from std_msgs.msg import Bool, String  # noqa: E402
from std_srvs.srv import SetBool, Trigger  # noqa: E402

from stepnft_ros import ros_io  # noqa: E402
from stepnft_ros.episodes.store import EpisodeStore  # noqa: E402
from stepnft_ros.nodes.episode_operator import ACTIVE, AWAITING_LABEL, IDLE, EpisodeLedger, format_status  # noqa: E402

pytestmark = pytest.mark.slow

ACTION_DIM = 2
TOOL = [sys.executable, '-m', 'stepnft_ros.cli', 'operator', '--robot', 'arm']


@pytest.fixture
def graph(tmp_path, ros_domain):
    g = Graph(tmp_path / 'logs')
    yield g
    g.stop_all()


class FakeArm:
    """A robot on the policy contract that sends observations and executes chunks only while
    <ns>/episode_active is true and no person has taken it over (<ns>/intervention_active, as the
    arm bridge). Per active period it keeps the stamps it sent and executed."""

    def __init__(self, node, ns: str) -> None:
        self.node, self.active, self.taken_over = node, False, False
        self.sent: list[set[int]] = []
        self.executed: list[list[int]] = []
        self.outstanding: tuple[int, float] | None = None  # (stamp, monotonic time sent)
        self.position = np.zeros(2)
        self.pub = node.create_publisher(ros_io.JointState, f'{ns}/{ros_io.JOINT_STATES}', ros_io.SENSOR_QOS)
        node.create_subscription(Bool, f'{ns}/{ros_io.EPISODE_ACTIVE}', self._on_active, ros_io.LATCHED_QOS)
        node.create_subscription(Bool, f'{ns}/{ros_io.INTERVENTION_ACTIVE}', self._on_takeover, ros_io.LATCHED_QOS)
        node.create_subscription(ros_io.JointTrajectory, f'{ns}/{ros_io.ACTION_CHUNK}', self._on_chunk,
                                 ros_io.RELIABLE_QOS)
        node.create_timer(0.02, self._tick)

    def _on_active(self, msg: Bool) -> None:
        if msg.data and not self.active:
            self.sent.append(set())
            self.executed.append([])
        self.active = bool(msg.data)
        if not self.active:
            self.outstanding = None  # hold still: a chunk that arrives now is not executed

    def _on_takeover(self, msg: Bool) -> None:
        self.taken_over = bool(msg.data)
        if self.taken_over:
            self.outstanding = None  # as the arm bridge: a chunk still in flight is not executed

    def _on_chunk(self, msg) -> None:
        stamp, chunk = ros_io.trajectory_to_chunk(msg, ACTION_DIM)
        if self.active and self.outstanding is not None and stamp == self.outstanding[0]:
            self.position += 0.01 * chunk.sum(axis=0)
            self.executed[-1].append(stamp)
            self.outstanding = None

    def _tick(self) -> None:
        if not self.active or self.taken_over:
            return
        if self.outstanding is None:
            self.outstanding = (self.node.get_clock().now().nanoseconds, time.monotonic())
        elif time.monotonic() - self.outstanding[1] < 0.5:
            return  # waiting for the answer; best-effort observations are re-sent after 0.5 s
        stamp = self.outstanding[0]
        self.sent[-1].add(stamp)
        self.pub.publish(ros_io.arrays_to_joint_state(['j0', 'j1'], self.position, self.position * 0, stamp))
        self.outstanding = (stamp, time.monotonic())


class Operator:
    """The operator's services, called from the test's probe node."""

    def __init__(self, node, executor, ns: str) -> None:
        self.executor = executor
        self.clients = {name: node.create_client(srv, f'{ns}/{topic}') for name, srv, topic in (
            ('start', Trigger, ros_io.OPERATOR_START), ('stop', Trigger, ros_io.OPERATOR_STOP),
            ('label', SetBool, ros_io.OPERATOR_LABEL), ('discard', Trigger, ros_io.OPERATOR_DISCARD),
            ('takeover', Trigger, ros_io.OPERATOR_TAKEOVER), ('hand_back', Trigger, ros_io.OPERATOR_HAND_BACK))}
        self.status: dict = {}
        self.received = 0
        node.create_subscription(String, f'{ns}/{ros_io.OPERATOR_STATUS}', self._on_status, ros_io.LATCHED_QOS)

    def _on_status(self, msg: String) -> None:
        self.status = json.loads(msg.data)
        self.received += 1

    def __call__(self, name: str, data: bool | None = None) -> tuple[bool, str]:
        client = self.clients[name]
        spin_until(self.executor, client.service_is_ready, 30, f'the {client.srv_name} service')
        before = self.received
        future = client.call_async(client.srv_type.Request() if data is None else client.srv_type.Request(data=data))
        spin_until(self.executor, future.done, 20, f'the answer of {client.srv_name}')
        spin_until(self.executor, lambda: self.received > before, 5, 'a status update')
        return future.result().success, future.result().message


def start_recording_server(graph, tmp_path, **params):
    """A tiny policy recording the arm's episodes (joint positions and velocities): (checkpoint, episodes, node)."""
    ckpt = tiny_checkpoint(tmp_path / 'sft', state_dim=4, action_dim=ACTION_DIM)
    episodes = tmp_path / 'episodes'
    server = graph.start('stepnft_ros.nodes.policy_server', 'policy_server', {
        'checkpoint': str(ckpt), 'episode_dir': str(episodes), 'robots': ['arm'], 'mode': 'train',
        'state_sources': ['joint_position', 'joint_velocity'], **params})
    return ckpt, episodes, server


def test_operator_labels_reach_the_policy_server_and_the_learner(tmp_path, graph, probe):
    node, executor = probe
    ckpt, episodes, server = start_recording_server(graph, tmp_path)
    learner = graph.start('stepnft_ros.nodes.learner', 'learner', {
        'checkpoint': str(ckpt), 'episode_dir': str(episodes), 'work_dir': str(tmp_path / 'learner'),
        'episodes_per_update': 2, 'scan_period_s': 0.5, 'epochs': 1})
    operator_node = graph.start('stepnft_ros.nodes.episode_operator', 'episode_operator',
                                {'robots': ['arm'], 'server_timeout_s': 2.0})
    arm, op = FakeArm(node, 'arm'), Operator(node, executor, 'arm')
    weights = []
    node.create_subscription(String, ros_io.POLICY_WEIGHTS,
                             lambda m: weights.append(ros_io.WeightsAnnouncement.from_msg(m)), ros_io.LATCHED_QOS)
    server.wait_for('serving 1 robot')
    operator_node.wait_for('arm: policy server found')

    def act_for_three_chunks():
        spin_until(executor, lambda: arm.active and len(arm.executed[-1]) >= 3, 30, 'the arm to execute 3 chunks')

    # Misuse answers false with a reason, and changes nothing.
    assert op('label', True) == (False, 'arm: no episode to label: start one first')
    assert op('stop')[0] is False and op('discard')[0] is False
    assert not arm.active and op.status['phase'] == IDLE

    # Episode 1: success, labelled while active (the label stops it first).
    ok, msg = op('start')
    assert ok and 'episode 1 started' in msg
    ok, msg = op('start')
    assert not ok and 'episode 1 is already active' in msg
    act_for_three_chunks()
    ok, msg = op('label', True)
    assert ok and 'episode 1 labelled success' in msg and not arm.active
    first_id = msg.rsplit(': ', 1)[1]

    # Episode 2: stopped, a start is refused while it awaits its label, then failure.
    assert op('start')[0]
    act_for_three_chunks()
    assert op('stop')[0] and not arm.active and op.status['phase'] == AWAITING_LABEL
    ok, msg = op('start')
    assert not ok and 'episode 2 awaits its label' in msg
    ok, msg = op('label', False)
    assert ok and 'episode 2 labelled failure' in msg
    second_id = msg.rsplit(': ', 1)[1]

    # Episode 3: discarded; the server drops what it recorded and writes nothing.
    assert op('start')[0]
    act_for_three_chunks()
    ok, msg = op('discard')
    assert ok and 'episode 3 discarded: dropped' in msg and int(msg.split('dropped ')[1].split()[0]) >= 3
    server.wait_for(r'discarded episode \S+ \(\d+ decisions, not written\)')

    # Episode 4: through the terminal tool, keys from a pipe.
    tool = subprocess.Popen(TOOL, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO)
    try:
        tool.stdin.write('s')
        tool.stdin.flush()
        act_for_three_chunks()
        tool.stdin.write('y\nq')
        tool.stdin.close()
        spin_until(executor, lambda: tool.poll() is not None, 30, 'the operator tool to quit')
    finally:
        if tool.poll() is None:
            tool.kill()
    out = tool.stdout.read()
    assert tool.returncode == 0, out
    assert 'start: ok: arm: episode 4 started' in out and 'success: ok: arm: episode 4 labelled success' in out
    assert 'arm: 3 labelled (2 success, 1 failure), success rate 67 %, 1 discarded; idle' in out, out

    # The server wrote exactly the labelled episodes, with their outcomes and only their own decisions.
    store = EpisodeStore(episodes)
    spin_until(executor, lambda: len(store.episode_ids()) >= 3, 20, 'three episode bags')
    ids = store.episode_ids()
    assert len(ids) == 3 and ids[:2] == [first_id, second_id]
    stored = [store.load(i) for i in ids]
    assert [e.success for e in stored] == [True, False, True]
    discarded_sent = arm.sent[2]
    for e, sent, executed in zip(stored, [arm.sent[0], arm.sent[1], arm.sent[3]],
                                 [arm.executed[0], arm.executed[1], arm.executed[3]], strict=True):
        stamps = [d.stamp_ns for d in e.decisions]
        assert set(executed) <= set(stamps) <= sent, 'each bag holds the decisions of its own episode'
        assert not set(stamps) & discarded_sent
        assert e.robot == 'arm' and all(d.observation.state.shape == (4,) for d in e.decisions)

    # The learner consumed two of them and announced a new version; the server swapped to it.
    spin_until(executor, lambda: weights and weights[-1].version >= 1, 60, 'weights version 1 on /policy_weights')
    learner.wait_for(r'update 1: success 0\.50 over 2(\.0)? episodes')
    server.wait_for('hot-swapped to weights version 1')

    status = op.status
    assert {k: status[k] for k in ('phase', 'labelled', 'successes', 'failures', 'discarded', 'last_label')} == {
        'phase': IDLE, 'labelled': 3, 'successes': 2, 'failures': 1, 'discarded': 1, 'last_label': 'success'}
    assert status['success_rate'] == pytest.approx(2 / 3) and status['last_episode_id'] == ids[2]

    # The operator shutting down mid-episode tells the arm to stop. Restarted, it drops what the
    # server recorded of that episode (never labelled) before the next one starts.
    assert op('start')[0]
    act_for_three_chunks()
    operator_node.stop()
    spin_until(executor, lambda: not arm.active, 10, 'the arm to be told to stop')
    assert 'shutting down during episode 5' in operator_node.output()
    operator_node = graph.start('stepnft_ros.nodes.episode_operator', 'episode_operator',
                                {'robots': ['arm'], 'server_timeout_s': 2.0})
    operator_node.wait_for('arm: policy server found')
    assert op('start') == (True, 'arm: episode 1 started: the arm may act')
    server.wait_for(r'discarded episode \S+ \(\d+ decisions, not written\)', count=2)

    # With the policy server gone a label is refused and the episode keeps awaiting it.
    act_for_three_chunks()
    server.stop()
    ok, msg = op('label', True)
    assert not ok and 'NOT labelled success' in msg and 'still awaits its label' in msg
    assert not arm.active and op.status['phase'] == AWAITING_LABEL and op.status['labelled'] == 0
    ok, msg = op('start')
    assert not ok and 'awaits its label' in msg
    assert operator_node.proc.poll() is None and len(store.episode_ids()) == 3


def test_a_takeover_marks_the_decisions_that_led_into_it_and_is_recorded_with_the_episode(tmp_path, graph, probe):
    node, executor = probe
    _, episodes, server = start_recording_server(graph, tmp_path, intervention_window_s=0.5)
    operator_node = graph.start('stepnft_ros.nodes.episode_operator', 'episode_operator',
                                {'robots': ['arm'], 'server_timeout_s': 2.0})
    arm, op = FakeArm(node, 'arm'), Operator(node, executor, 'arm')
    server.wait_for('serving 1 robot')
    operator_node.wait_for('arm: policy server found')
    assert op('takeover') == (False, 'arm: no active episode to take over: start one first')
    assert op('start')[0]
    spin_until(executor, lambda: len(arm.executed[-1]) >= 12, 30, 'the policy to act for a while')
    ok, msg = op('takeover')
    assert ok and 'TAKEN OVER in episode 1' in msg and op.status['intervening']
    assert op('takeover')[0] is False, 'already taken over'
    server.wait_for(r'taken over in \S+: \d+ decision\(s\) of the last 0.5 s count as failures')
    spin_until(executor, lambda: arm.taken_over, 10, 'the arm to hear of the takeover')
    during = len(arm.executed[-1])
    quiet_until = time.monotonic() + 0.6
    spin_until(executor, lambda: time.monotonic() > quiet_until, 5, 'the takeover to last a while')
    assert len(arm.executed[-1]) == during, 'taken over: the policy is not asked'
    assert op('hand_back')[0] and not op.status['intervening']
    spin_until(executor, lambda: len(arm.executed[-1]) >= during + 3, 30, 'the policy to act again')
    ok, msg = op('label', True)
    assert ok
    store = EpisodeStore(episodes)
    spin_until(executor, lambda: len(store.episode_ids()) == 1, 20, 'the episode bag')
    episode = store.load(store.episode_ids()[0])
    [(start, end)] = episode.interventions
    assert 0 < start < end, 'the span a person had the arm'
    marked = [d.stamp_ns for d in episode.decisions if d.led_to_intervention]
    assert marked and all(start - 0.5e9 <= s < start for s in marked), 'only the decisions of the window before it'
    assert all(not d.led_to_intervention for d in episode.decisions if d.stamp_ns > end)
    assert op.status['interventions'] == 1


def test_terminal_mode_is_raw_and_restored_on_quit_and_on_ctrl_c(tmp_path, ros_domain):
    """No operator node: the tool still starts, says so, refuses actions, and leaves the terminal as it found it."""
    for ending in ('quit', 'ctrl-c'):
        master, slave = pty.openpty()
        before = termios.tcgetattr(slave)
        log = tmp_path / f'{ending}.log'
        with open(log, 'w') as out:
            proc = subprocess.Popen([*TOOL, '--timeout', '1'], stdin=slave, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=REPO)
        try:
            deadline = time.monotonic() + 30
            while termios.tcgetattr(slave)[3] & termios.ECHO:  # the tool switched to single-key mode
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            assert termios.tcgetattr(slave)[3] & termios.ICANON == 0
            while 'no status on arm/operator/status' not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            if ending == 'quit':
                os.write(master, b'zs')
                while 'REFUSED' not in log.read_text():
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.05)
                os.write(master, b'q')
                assert proc.wait(20) == 1  # an action was refused
                text = log.read_text()
                assert "unknown key 'z'" in text and 'start: REFUSED: no arm/operator/start service after 1 s' in text
            else:
                proc.send_signal(signal.SIGINT)
                assert proc.wait(20) == 130 and 'interrupted' in log.read_text()
            assert termios.tcgetattr(slave) == before
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)
            os.close(slave)


def test_bad_robots_parameter_stops_the_node_with_a_clear_message(tmp_path, graph):
    node = graph.start('stepnft_ros.nodes.episode_operator', 'episode_operator', {'robots': ['arm', 'arm']})
    assert node.proc.wait(60) == 2
    assert "parameter 'robots' must list distinct namespaces" in node.output()


def test_ledger_counts_only_confirmed_outcomes():
    led = EpisodeLedger('arm')
    assert 'no episode to label' in led.refuse_end('label') and not led.refuse_start()
    led.started()
    assert led.phase == ACTIVE and 'already active' in led.refuse_start() and not led.refuse_end('stop')
    led.stopped()
    assert 'already stopped' in led.refuse_end('stop') and 'awaits its label' in led.refuse_start()
    led.busy = 'label'
    assert 'busy' in led.refuse_end('discard') and 'busy' in led.refuse_start()
    led.busy = ''
    led.labelled(False, 'ep1')
    led.started()
    led.thrown_away()
    led.started()
    led.labelled(True, 'ep3')
    status = led.status()
    assert (status['labelled'], status['successes'], status['failures'], status['discarded']) == (2, 1, 1, 1)
    assert status['success_rate'] == 0.5 and status['episode'] == 3 and status['last_episode_id'] == 'ep3'
    assert format_status(status) == 'arm: 2 labelled (1 success, 1 failure), success rate 50 %, 1 discarded; idle'


def test_ledger_takeovers_need_an_active_episode_and_end_with_it():
    led = EpisodeLedger('arm')
    assert 'no active episode to take over' in led.refuse_takeover(True)
    assert 'nothing to hand back' in led.refuse_takeover(False)
    led.started()
    assert not led.refuse_takeover(True)
    led.took_over(True)
    assert 'already taken over' in led.refuse_takeover(True) and not led.refuse_takeover(False)
    assert format_status(led.status()).endswith('episode 1 ACTIVE (TAKEN OVER)')
    led.stopped()  # the person's segment ends with the episode
    assert not led.intervening and led.status()['interventions'] == 1
    assert 'no active episode to take over' in led.refuse_takeover(True)
