"""episode_operator: a person starts, stops, labels and discards a real arm's episodes.

Per robot namespace <ns> (parameter `robots`, as the policy server's):
  srv  <ns>/operator/start, <ns>/operator/stop, <ns>/operator/discard (std_srvs/Trigger),
       <ns>/operator/label (std_srvs/SetBool, true = success; stops the episode first if active),
       <ns>/operator/takeover, <ns>/operator/hand_back (std_srvs/Trigger): a person takes the arm
       over during an episode (teleop into <ns>/safety/*) and gives it back
  out  <ns>/episode_active (std_msgs/Bool, latched): the arm may act only while it is true
       <ns>/intervention_active (std_msgs/Bool, latched): a person has the arm (the policy is not
       asked); it ends with the episode at the latest
       <ns>/operator/status (std_msgs/String JSON, latched): phase, counts, success rate
  calls the policy server's <ns>/episode_outcome (SetBool: it writes the episode) and
       <ns>/episode_discard (Trigger: it forgets the episode)

A label or discard counts only once the policy server confirms it; until then the episode
keeps awaiting its label, so a server that is down loses nothing silently. Start first asks
the server to drop anything it recorded while no episode was active (an observation in
flight when the last episode stopped), so each bag holds exactly one operator episode.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial

from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.task import Future
from std_msgs.msg import Bool, String
from std_srvs.srv import SetBool, Trigger

from stepnft_ros import ros_io
from stepnft_ros.nodes.common import ConfigError, Params, run_node

IDLE, ACTIVE, AWAITING_LABEL = 'idle', 'active', 'awaiting_label'


@dataclass
class EpisodeLedger:
    """One robot's episode phase and counts (no ROS: the node only moves it along)."""

    robot: str
    phase: str = IDLE
    busy: str = ''
    """The policy-server call in flight ('start', 'label', 'discard'); other requests are refused meanwhile."""
    episode: int = 0
    successes: int = 0
    failures: int = 0
    discarded: int = 0
    last_label: str = ''
    last_episode_id: str = ''
    seq: int = 0
    intervening: bool = False
    interventions: int = 0
    """Takeovers over all episodes."""

    def refuse_start(self) -> str:
        if self.busy:
            return f'{self.robot}: busy ({self.busy} in progress), try again'
        if self.phase == ACTIVE:
            return f'{self.robot}: episode {self.episode} is already active: stop, label or discard it first'
        if self.phase == AWAITING_LABEL:
            return (f'{self.robot}: episode {self.episode} awaits its label: label it success or failure, '
                    f'or discard it, first')
        return ''

    def refuse_end(self, action: str) -> str:
        """Why `action` (stop, label, discard) cannot apply now; '' if it can."""
        if self.busy:
            return f'{self.robot}: busy ({self.busy} in progress), try again'
        if self.phase == IDLE:
            return f'{self.robot}: no episode to {action}: start one first'
        if action == 'stop' and self.phase != ACTIVE:
            return f'{self.robot}: episode {self.episode} is already stopped: label or discard it'
        return ''

    def refuse_takeover(self, take: bool) -> str:
        """Why a takeover (take) or hand-back cannot apply now; '' if it can."""
        if take and self.phase != ACTIVE:
            return f'{self.robot}: no active episode to take over: start one first'
        if take and self.intervening:
            return f'{self.robot}: already taken over: hand it back first'
        if not take and not self.intervening:
            return f'{self.robot}: nothing to hand back: no takeover is active'
        return ''

    def took_over(self, take: bool) -> None:
        self.intervening = take
        self.interventions += take

    def started(self) -> None:
        self.phase, self.episode = ACTIVE, self.episode + 1

    def stopped(self) -> None:
        self.phase, self.intervening = AWAITING_LABEL, False  # the person's segment ends with the episode

    def labelled(self, success: bool, episode_id: str) -> None:
        self.phase = IDLE
        self.successes += success
        self.failures += not success
        self.last_label, self.last_episode_id = ('success' if success else 'failure'), episode_id

    def thrown_away(self) -> None:
        self.phase = IDLE
        self.discarded += 1
        self.last_label, self.last_episode_id = 'discarded', ''

    @property
    def labelled_count(self) -> int:
        return self.successes + self.failures

    def status(self) -> dict:
        n = self.labelled_count
        return {'robot': self.robot, 'seq': self.seq, 'phase': self.phase, 'active': self.phase == ACTIVE,
                'awaiting_label': self.phase == AWAITING_LABEL, 'busy': self.busy, 'episode': self.episode,
                'labelled': n, 'successes': self.successes, 'failures': self.failures,
                'discarded': self.discarded, 'success_rate': self.successes / n if n else None,
                'last_label': self.last_label, 'last_episode_id': self.last_episode_id,
                'intervening': self.intervening, 'interventions': self.interventions}


def format_status(status: dict) -> str:
    """One line for a person: what the status topic says."""
    rate = status.get('success_rate')
    line = (f"{status['robot']}: {status['labelled']} labelled ({status['successes']} success, "
            f"{status['failures']} failure), success rate {'-' if rate is None else f'{100 * rate:.0f} %'}, "
            f"{status['discarded']} discarded")
    phase = {ACTIVE: f"episode {status['episode']} ACTIVE" + (' (TAKEN OVER)' if status.get('intervening') else ''),
             AWAITING_LABEL: f"episode {status['episode']} awaits "
             'its label', IDLE: 'idle'}.get(status['phase'], status['phase'])
    return f'{line}; {phase}'


class _Robot:
    def __init__(self, node: EpisodeOperator, ns: str, group: ReentrantCallbackGroup) -> None:
        self.ledger = EpisodeLedger(ns)
        self.active_pub = node.create_publisher(Bool, f'{ns}/{ros_io.EPISODE_ACTIVE}', ros_io.LATCHED_QOS)
        self.intervention_pub = node.create_publisher(Bool, f'{ns}/{ros_io.INTERVENTION_ACTIVE}', ros_io.LATCHED_QOS)
        self.status_pub = node.create_publisher(String, f'{ns}/{ros_io.OPERATOR_STATUS}', ros_io.LATCHED_QOS)
        self.outcome = node.create_client(SetBool, f'{ns}/{ros_io.EPISODE_OUTCOME}', callback_group=group)
        self.discard = node.create_client(Trigger, f'{ns}/{ros_io.EPISODE_DISCARD}', callback_group=group)
        self.server_seen = False

    def server_ready(self) -> bool:
        return self.outcome.service_is_ready() and self.discard.service_is_ready()


class EpisodeOperator(Node):
    def __init__(self) -> None:
        super().__init__('episode_operator')
        p = Params(self)
        robots = p.get('robots', ['env0'])
        self.server_timeout_s = p.get('server_timeout_s', 5.0)
        heartbeat_s = p.get('heartbeat_s', 0.5)
        if not robots or len(set(robots)) != len(robots) or not all(robots):
            raise ConfigError(f"parameter 'robots' must list distinct namespaces, got {robots}")
        if self.server_timeout_s <= 0:
            raise ConfigError(f"parameter 'server_timeout_s' must be > 0, got {self.server_timeout_s}")
        if heartbeat_s < 0:
            raise ConfigError(f"parameter 'heartbeat_s' must be >= 0, got {heartbeat_s}")
        # Service callbacks await the policy server's answer. Everything sits in one reentrant
        # group: with a mutually exclusive group a waiting callback would block the very client
        # response it waits for (a deadlock under the SingleThreadedExecutor), and a request
        # arriving meanwhile is answered at once ("busy") instead of queueing.
        self.group = ReentrantCallbackGroup()
        # Waits on the policy server (its service to appear, its answer): one 10 Hz check, armed
        # only while something waits.
        self.deadlines: dict[Future, tuple[object, float]] = {}
        self.sleepers: list[tuple[float, Future]] = []
        self.watchdog = self.create_timer(0.1, self._on_watchdog, callback_group=self.group)
        self.watchdog.cancel()
        self.robots: dict[str, _Robot] = {}
        for ns in robots:
            robot = self.robots[ns] = _Robot(self, ns, self.group)
            for srv_type, name, handler in ((Trigger, ros_io.OPERATOR_START, self._on_start),
                                            (Trigger, ros_io.OPERATOR_STOP, self._on_stop),
                                            (SetBool, ros_io.OPERATOR_LABEL, self._on_label),
                                            (Trigger, ros_io.OPERATOR_DISCARD, self._on_discard),
                                            (Trigger, ros_io.OPERATOR_TAKEOVER, partial(self._on_takeover, True)),
                                            (Trigger, ros_io.OPERATOR_HAND_BACK, partial(self._on_takeover, False))):
                # partial, not a lambda: executors await a callback only if it is a coroutine function
                self.create_service(srv_type, f'{ns}/{name}', partial(handler, robot), callback_group=self.group)
            self._publish(robot)  # latched "not active": an arm that joins (or an operator restart) holds still
        # Says when each robot's policy server is found or lost, so an operator (or a script) knows
        # before pressing start whether the server can be reached; discovery takes seconds on a busy host.
        self.create_timer(0.2, self._on_discovery, callback_group=self.group)
        if heartbeat_s > 0:
            # episode_active is repeated, not only latched: an arm bridge with active_timeout_s stops
            # its arm when the repeats stop (this process killed, the network to it gone).
            self.create_timer(heartbeat_s, self._on_heartbeat, callback_group=self.group)
        self.get_logger().info(f'operating {len(robots)} robot(s) {robots}: services <ns>/operator/'
                               '{start,stop,label,discard}; the arm acts only while <ns>/episode_active is true')

    # ---- services ---------------------------------------------------------------------------

    async def _on_start(self, robot: _Robot, _req, response: Trigger.Response) -> Trigger.Response:
        led = robot.ledger
        if refusal := led.refuse_start():
            return self._answer(robot, response, False, refusal)
        led.busy = 'start'
        try:
            ok, message = await self._call(robot.discard, Trigger.Request())
        finally:
            led.busy = ''
        if not ok:
            return self._answer(robot, response, False, f'{led.robot}: not started: {message}')
        if message != 'dropped 0 decisions':  # an observation was answered after the last episode ended
            self.get_logger().info(f'{led.robot}: policy server {message} from before this episode')
        led.started()
        return self._answer(robot, response, True, f'{led.robot}: episode {led.episode} started: the arm may act')

    async def _on_stop(self, robot: _Robot, _req, response: Trigger.Response) -> Trigger.Response:
        led = robot.ledger
        if refusal := led.refuse_end('stop'):
            return self._answer(robot, response, False, refusal)
        led.stopped()
        return self._answer(robot, response, True, f'{led.robot}: episode {led.episode} stopped: '
                                                   'label it success or failure, or discard it')

    async def _on_label(self, robot: _Robot, request: SetBool.Request, response: SetBool.Response):
        led, success = robot.ledger, bool(request.data)
        label = 'success' if success else 'failure'
        if refusal := led.refuse_end('label'):
            return self._answer(robot, response, False, refusal)
        ok, message = await self._close_on_server(robot, 'label', robot.outcome, SetBool.Request(data=success))
        if not ok:
            return self._answer(robot, response, False, f'{led.robot}: episode {led.episode} NOT labelled {label}: '
                                f'{message}; it still awaits its label (or discard it)')
        led.labelled(success, message)
        return self._answer(robot, response, True, f'{led.robot}: episode {led.episode} labelled {label}: {message}')

    async def _on_takeover(self, take: bool, robot: _Robot, _req, response: Trigger.Response) -> Trigger.Response:
        led = robot.ledger
        if refusal := led.refuse_takeover(take):
            return self._answer(robot, response, False, refusal)
        led.took_over(take)
        return self._answer(robot, response, True, f'{led.robot}: ' + (
            f'TAKEN OVER in episode {led.episode}: the policy does not command the arm; teleop into '
            f'{led.robot}/safety/*' if take else f'handed back in episode {led.episode}: the policy acts again'))

    async def _on_discard(self, robot: _Robot, _req, response: Trigger.Response) -> Trigger.Response:
        led = robot.ledger
        if refusal := led.refuse_end('discard'):
            return self._answer(robot, response, False, refusal)
        ok, message = await self._close_on_server(robot, 'discard', robot.discard, Trigger.Request())
        if not ok:
            return self._answer(robot, response, False, f'{led.robot}: episode {led.episode} NOT discarded: '
                                f'{message}; it still awaits its label (or discard it)')
        led.thrown_away()
        return self._answer(robot, response, True, f'{led.robot}: episode {led.episode} discarded: {message}')

    # ---- helpers ----------------------------------------------------------------------------

    async def _close_on_server(self, robot: _Robot, what: str, client, request) -> tuple[bool, str]:
        """Stop a still-active episode, then have the policy server close it (label or discard)."""
        led = robot.ledger
        if led.phase == ACTIVE:
            led.stopped()
            self._publish(robot)  # the arm stops before the server is asked anything
        led.busy = what
        try:
            return await self._call(client, request)
        finally:
            led.busy = ''

    async def _call(self, client, request) -> tuple[bool, str]:
        """Call a policy-server service without blocking the executor; (success, message), never raises."""
        deadline = time.monotonic() + self.server_timeout_s
        while not client.service_is_ready():  # e.g. this node or the server has just (re)started
            if time.monotonic() > deadline:
                return False, (f'policy server service {client.srv_name} is not available: is the policy_server '
                               'running with this robot in its robots?')
            await self._after(0.1)
        pending = client.call_async(request)
        self.deadlines[pending] = (client, deadline)
        self._arm_watchdog()
        try:
            result = await pending  # the watchdog cancels it on timeout: then the result is None
        finally:
            self.deadlines.pop(pending, None)
        if result is None:
            return False, f'policy server service {client.srv_name} did not answer within {self.server_timeout_s} s'
        return bool(result.success), str(result.message)

    async def _after(self, seconds: float) -> None:
        wake: Future = Future(executor=self.executor)
        self.sleepers.append((time.monotonic() + seconds, wake))
        self._arm_watchdog()
        await wake

    def _arm_watchdog(self) -> None:
        if self.watchdog.is_canceled():
            self.watchdog.reset()

    def _on_watchdog(self) -> None:
        now = time.monotonic()
        for pending, (client, deadline) in list(self.deadlines.items()):
            if now > deadline:
                del self.deadlines[pending]
                client.remove_pending_request(pending)
                pending.cancel()
        for entry in [e for e in self.sleepers if now >= e[0]]:
            self.sleepers.remove(entry)
            entry[1].set_result(None)
        if not self.deadlines and not self.sleepers:
            self.watchdog.cancel()

    def _answer(self, robot: _Robot, response, ok: bool, message: str):
        if ok:  # one logging call per line: rclpy fixes each call site's severity on first use
            self.get_logger().info(message)
        else:
            self.get_logger().warning(message)
        self._publish(robot)
        response.success, response.message = ok, message
        return response

    def _publish(self, robot: _Robot) -> None:
        led = robot.ledger
        led.seq += 1
        robot.active_pub.publish(Bool(data=led.phase == ACTIVE))
        robot.intervention_pub.publish(Bool(data=led.intervening))
        robot.status_pub.publish(String(data=json.dumps(led.status())))

    def _on_discovery(self) -> None:
        for ns, robot in self.robots.items():
            ready = robot.server_ready()
            if ready and not robot.server_seen:
                self.get_logger().info(f'{ns}: policy server found')
            elif robot.server_seen and not ready:
                self.get_logger().warning(f'{ns}: policy server lost: start and label will be refused until it is back')
            robot.server_seen = ready

    def _on_heartbeat(self) -> None:
        for robot in self.robots.values():
            robot.active_pub.publish(Bool(data=robot.ledger.phase == ACTIVE))

    def close(self) -> None:
        """On shutdown every arm is told to hold still (the topic is latched)."""
        for robot in self.robots.values():
            if robot.ledger.phase == ACTIVE:
                robot.ledger.stopped()
                self.get_logger().warning(f'{robot.ledger.robot}: shutting down during episode '
                                          f'{robot.ledger.episode}: the arm is told to stop')
            self._publish(robot)


def main(args: list[str] | None = None) -> int:
    return run_node(EpisodeOperator, args)


if __name__ == '__main__':
    raise SystemExit(main())
