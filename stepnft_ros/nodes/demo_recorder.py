"""demo_recorder (`stepnft record`): teleoperated demonstrations as one rosbag2 MCAP bag per demo.

Subscribes to the topics of a DemoTopics file (joint states, cameras, the teleop command and the
instruction) and, while a demo is being recorded, writes every message as it arrived: its own
CDR bytes (the subscriptions are raw, so nothing is decoded and re-encoded) with the receive
time as log time. A demo starts and stops with Enter on the terminal, the `~/start` and
`~/stop` services (std_srvs/Trigger), or `--duration`. Each bag is written into a hidden temp
directory and renamed into place when the demo stops, so `stepnft sft --bags` never reads a
partial one. The same bags come from `ros2 bag record -s mcap <topics>` where ROS 2 is installed.
"""

from __future__ import annotations

import importlib
import os
import queue
import re
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from rclpy.node import Node
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from std_srvs.srv import Trigger

from stepnft_ros import ros_io
from stepnft_ros.atomic import atomic_publish_dir
from stepnft_ros.episodes.demo_formats import INSTRUCTION_KEY, DemoTopics
from stepnft_ros.nodes.common import finish, run_node

BAG_VERSION = 9  # rosbag2 metadata version of Jazzy/Kilted
FORMAT_KEY = 'stepnft_ros.demo_format'
TEMP_PREFIX = '.tmp-'
_DEMO_NAME = re.compile(r'demo_(\d+)')


def message_class(msgtype: str) -> type:
    """'sensor_msgs/msg/JointState' -> the rclpy message class."""
    package, _, name = msgtype.split('/')
    return getattr(importlib.import_module(f'{package}.msg'), name)


class DemoRecorder(Node):
    def __init__(self, topics: DemoTopics, out: Path, duration_s: float | None = None, instruction: str = '',
                 keyboard: bool = True) -> None:
        super().__init__('demo_recorder')
        self.topics, self.out, self.duration_s, self.instruction = topics, out, duration_s, instruction
        self.out.mkdir(parents=True, exist_ok=True)
        self.typestore = get_typestore(Stores.ROS2_KILTED)
        self.exit_code = 0
        self._writer: Writer | None = None
        self._connections: dict[str, Any] = {}
        self._counts: Counter[str] = Counter()
        self._bag: Path | None = None
        self._started = 0.0
        self._latched: tuple[str, bytes] | None = None  # the instruction arrives once: replayed into each demo
        self.demos_written = 0
        for topic, msgtype in topics.topics().items():
            qos = ros_io.LATCHED_QOS if topic == topics.instruction_topic else ros_io.RECORD_QOS
            self.create_subscription(message_class(msgtype), topic,
                                     lambda data, topic=topic: self._on_message(topic, data), qos, raw=True)
        self.create_service(Trigger, '~/start', self._on_start)
        self.create_service(Trigger, '~/stop', self._on_stop)
        self._events: queue.Queue[str] = queue.Queue()
        if keyboard and duration_s is None:
            threading.Thread(target=self._read_keys, daemon=True).start()
        self.create_timer(0.05, self._tick)
        how = (f'recording one demo of {duration_s:.1f} s' if duration_s is not None
               else 'Enter starts/stops a demo, q quits; or call ~/start and ~/stop')
        self.get_logger().info(f'ready: {len(topics.topics())} topics -> {out} ({how})')
        if duration_s is not None:
            self.start()

    # ---- control

    def start(self) -> str:
        if self._writer is not None:
            raise RuntimeError(f'already recording {self._bag.name}')
        name = self._next_name()
        temp = self.out / f'{TEMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
        self._bag = temp / name  # rosbags names the .mcap after the bag directory: give it its final name
        writer = Writer(self._bag, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
        writer.set_custom_data(FORMAT_KEY, '1')
        if self.instruction:
            writer.set_custom_data(INSTRUCTION_KEY, self.instruction)
        writer.open()
        self._connections = {topic: writer.add_connection(topic, msgtype, typestore=self.typestore)
                             for topic, msgtype in self.topics.topics().items()}
        self._writer, self._counts, self._started = writer, Counter(), time.monotonic()
        if self._latched is not None:
            self._write(*self._latched)
        self.get_logger().info(f'recording {name}')
        return name

    def stop(self) -> Path:
        if self._writer is None:
            raise RuntimeError('not recording')
        writer, bag = self._writer, self._bag
        self._writer = None
        writer.close()
        final = atomic_publish_dir(bag, self.out / bag.name)
        shutil.rmtree(bag.parent, ignore_errors=True)
        self.demos_written += 1
        counts = ', '.join(f'{t}: {self._counts[t]}' for t in self.topics.topics())
        self.get_logger().info(f'wrote {final} ({time.monotonic() - self._started:.1f} s; {counts})')
        silent = [t for t in self.topics.topics() if not self._counts[t]]
        if silent:
            self.get_logger().warning(f'{bag.name}: nothing received on {silent}')
        return final

    def close(self) -> None:
        """Called on shutdown: a running demo is kept."""
        if self._writer is not None:
            self.stop()

    def _next_name(self) -> str:
        taken = [int(m.group(1)) for p in self.out.iterdir() if (m := _DEMO_NAME.fullmatch(p.name))]
        return f'demo_{max(taken, default=-1) + 1:04d}'

    # ---- callbacks

    def _on_message(self, topic: str, data: bytes) -> None:
        if topic == self.topics.instruction_topic:
            self._latched = (topic, data)
        if self._writer is not None:
            self._write(topic, data)

    def _write(self, topic: str, data: bytes) -> None:
        self._writer.write(self._connections[topic], self.get_clock().now().nanoseconds, data)
        self._counts[topic] += 1

    def _on_start(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        try:
            response.message, response.success = self.start(), True
        except (RuntimeError, OSError) as err:
            response.message, response.success = str(err), False
        return response

    def _on_stop(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        try:
            response.message, response.success = str(self.stop()), True
        except (RuntimeError, OSError) as err:
            response.message, response.success = str(err), False
        return response

    def _read_keys(self) -> None:
        for line in sys.stdin:  # ends at EOF (stdin closed or /dev/null): services still work
            self._events.put('quit' if line.strip().lower() in ('q', 'quit') else 'toggle')

    def _tick(self) -> None:
        while not self._events.empty():
            event = self._events.get()
            if event == 'quit':
                finish(self)  # run_node's shutdown keeps a running demo
                return
            if self._writer is None:
                self.start()
            else:
                self.stop()
        if self.duration_s is not None and self._writer is not None \
                and time.monotonic() - self._started >= self.duration_s:
            self.stop()
            finish(self)


def record(topics: DemoTopics, out: str | Path, duration_s: float | None = None, instruction: str = '',
           keyboard: bool = True, ros_args: list[str] | None = None) -> int:
    """Run the recorder until Ctrl-C, `q`, or the end of a --duration demo."""
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f'duration must be > 0 seconds, got {duration_s}')
    args = ['stepnft_record', '--ros-args', *ros_args] if ros_args else ['stepnft_record']
    return run_node(lambda: DemoRecorder(topics, Path(out), duration_s, instruction, keyboard), args)


def main(argv: list[str] | None = None) -> int:
    """`ros2 run stepnft_ros demo_recorder --out DIR --config YAML ...`: the same as `stepnft record`."""
    from stepnft_ros.cli import main as cli_main

    return cli_main(['record', *(sys.argv[1:] if argv is None else argv)])


if __name__ == '__main__':
    sys.exit(main())
