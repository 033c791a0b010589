"""`stepnft operator`: single-key control of a real arm's episodes (talks to the episode_operator node).

    s start   x stop   y success   n failure   d discard   q quit

On a terminal each key acts at once (no Enter); the terminal is restored on exit and on
Ctrl-C. Keys can also come from `--keys sxy` or a pipe (`echo sy | stepnft operator`), which
ends at the end of the input. After each action the tool prints the node's answer and the
running count of labelled episodes with the success rate, as published on <ns>/operator/status.
Exit status: 0 if every action was accepted, 1 if one was refused or unanswered, 130 on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions
from std_msgs.msg import String
from std_srvs.srv import SetBool, Trigger

from stepnft_ros import ros_io
from stepnft_ros.nodes.episode_operator import format_status

KEYS = {'s': ('start', Trigger, ros_io.OPERATOR_START, None),
        'x': ('stop', Trigger, ros_io.OPERATOR_STOP, None),
        'y': ('success', SetBool, ros_io.OPERATOR_LABEL, True),
        'n': ('failure', SetBool, ros_io.OPERATOR_LABEL, False),
        'd': ('discard', Trigger, ros_io.OPERATOR_DISCARD, None),
        't': ('takeover', Trigger, ros_io.OPERATOR_TAKEOVER, None),
        'h': ('hand back', Trigger, ros_io.OPERATOR_HAND_BACK, None)}
HELP = 'keys: s start, x stop, y success, n failure, d discard, t take over, h hand back, q quit'
QUIT = ('q', '\x03', '\x04')  # q, and Ctrl-C / Ctrl-D should a terminal deliver them as characters


class OperatorClient:
    """The tool's rclpy node: one client per operator service, the latest status."""

    def __init__(self, robot: str, timeout_s: float) -> None:
        self.robot, self.timeout_s = robot.strip('/'), timeout_s
        self.context = rclpy.Context()
        # No rclpy signal handler: `run` owns Ctrl-C (see `interrupt`).
        rclpy.init(context=self.context, signal_handler_options=SignalHandlerOptions.NO)
        self.interrupted = False
        self.node = rclpy.create_node(f'stepnft_operator_{os.getpid()}', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.status: dict | None = None
        self.received = 0  # status messages so far (a restarted node counts its seq from 1 again)
        self.node.create_subscription(String, f'{self.robot}/{ros_io.OPERATOR_STATUS}', self._on_status,
                                      ros_io.LATCHED_QOS)
        self.clients = {name: self.node.create_client(srv, f'{self.robot}/{topic}')
                        for name, srv, topic, _ in KEYS.values()}

    def _on_status(self, msg: String) -> None:
        try:
            self.status = json.loads(msg.data)
            self.received += 1
        except ValueError:
            self.node.get_logger().warning(f'unreadable status {msg.data[:200]!r}', throttle_duration_sec=5.0)

    def interrupt(self, *_) -> None:
        """SIGINT handler: only set a flag. A KeyboardInterrupt raised inside rclpy's executor can be
        swallowed by a callback or leave it half-way through a wait, so the tool then never exits."""
        self.interrupted = True

    def _spin_once(self, timeout_s: float) -> None:
        self.executor.spin_once(timeout_sec=timeout_s)
        if self.interrupted:  # the one place Ctrl-C surfaces: between executor calls, never inside one
            raise KeyboardInterrupt

    def spin(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self._spin_once(max(0.0, min(0.05, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                return

    def wait_for_status(self, received_before: int, timeout_s: float) -> dict | None:
        """The first status published after `received_before` messages, or None on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.received <= received_before and time.monotonic() < deadline:
            self._spin_once(0.05)
        return self.status if self.received > received_before else None

    def act(self, key: str) -> tuple[bool, str]:
        """Send one key's request; (accepted, the node's message)."""
        name, srv, _, data = KEYS[key]
        client = self.clients[name]
        deadline = time.monotonic() + self.timeout_s
        while not client.service_is_ready():
            if time.monotonic() > deadline:
                return False, (f'no {client.srv_name} service after {self.timeout_s:g} s: is episode_operator '
                               f'running with {self.robot!r} in its robots?')
            self._spin_once(0.05)
        future = client.call_async(srv.Request() if data is None else srv.Request(data=data))
        # The node may wait on the policy server (its own timeout, default 5 s) before answering.
        deadline = time.monotonic() + self.timeout_s + 10.0
        while not future.done():
            if time.monotonic() > deadline:
                client.remove_pending_request(future)
                return False, f'{client.srv_name}: no answer'
            self._spin_once(0.05)
        result = future.result()
        return bool(result.success), str(result.message)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        if self.context.ok():
            rclpy.shutdown(context=self.context)


def _keys_from_fd(fd: int, idle) -> Iterator[str]:
    """Characters from a terminal or pipe as they arrive; `idle` runs while none is waiting."""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            idle()
            continue
        data = os.read(fd, 1)
        if not data:  # end of a pipe
            return
        yield data.decode(errors='replace')


def run(robot: str, keys: str | None, timeout_s: float, out=sys.stdout) -> int:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    client = OperatorClient(robot, timeout_s)
    fd, saved = sys.stdin.fileno(), None
    failed = False
    previous_handler = signal.signal(signal.SIGINT, client.interrupt)
    try:
        if keys is None and os.isatty(fd):
            saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)  # one key at a time, no echo; Ctrl-C still interrupts
        say(f'{client.robot}: {HELP}')
        status = client.wait_for_status(0, min(timeout_s, 3.0))
        say(format_status(status) if status else f'{client.robot}: no status on {client.robot}/'
            f'{ros_io.OPERATOR_STATUS} yet (is episode_operator running?)')
        source = iter(keys) if keys is not None else _keys_from_fd(fd, lambda: client.spin(0.0))
        for key in source:
            key = key.lower()
            if key in QUIT:
                break
            if key.isspace():
                continue
            if key not in KEYS:
                say(f'unknown key {key!r}; {HELP}')
                continue
            before = client.received
            ok, message = client.act(key)
            failed |= not ok
            say(f"{KEYS[key][0]}: {'ok' if ok else 'REFUSED'}: {message}")
            status = client.wait_for_status(before, 2.0)
            if status:
                say(format_status(status))
        return 1 if failed else 0
    except KeyboardInterrupt:
        say('interrupted')
        return 130
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        client.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m stepnft_ros.operator_tool` (the same as `stepnft operator`)."""
    from stepnft_ros.cli import main as cli_main

    return cli_main(['operator', *(sys.argv[1:] if argv is None else argv)])


if __name__ == '__main__':
    sys.exit(main())
