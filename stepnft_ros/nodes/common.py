"""Plumbing every node shares: typed parameters with clear errors, and a main() that spins."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions


class ConfigError(ValueError):
    """A parameter is missing or invalid: the node cannot start."""


_TYPES = {str: Parameter.Type.STRING, int: Parameter.Type.INTEGER, float: Parameter.Type.DOUBLE,
          bool: Parameter.Type.BOOL, list: Parameter.Type.STRING_ARRAY}


class Params:
    """Declares and reads a node's parameters; every read is type-checked."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def get(self, name: str, default: Any) -> Any:
        """An optional parameter. A list default means a string array (empty list allowed)."""
        if isinstance(default, list):
            value = self.node.declare_parameter(name, Parameter.Type.STRING_ARRAY).value
            value = list(default) if value is None else list(value)
        else:
            value = self.node.declare_parameter(name, default).value
        self._check_type(name, value, type(default))
        return value

    def required(self, name: str, kind: type) -> Any:
        value = self.node.declare_parameter(name, _TYPES[kind]).value
        if value is None or value == '':
            raise ConfigError(f"missing parameter '{name}' ({kind.__name__}): set it in the params file "
                              f'or pass --ros-args -p {name}:=...')
        self._check_type(name, value, kind)
        return value

    def untyped(self, name: str) -> Any:
        """An optional parameter of any type (None when unset), for values YAML may write in several forms."""
        return self.node.declare_parameter(name, None, ParameterDescriptor(dynamic_typing=True)).value

    def number_list(self, name: str) -> list[float]:
        """An optional numeric array ([] when unset); YAML may write integers ([0, 1]) or floats."""
        value = self.untyped(name)
        if value is None:
            return []
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in value):
            raise ConfigError(f"parameter '{name}' must be a list of numbers, got {value!r}")
        return [float(v) for v in value]

    @staticmethod
    def _check_type(name: str, value: Any, kind: type) -> None:
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"parameter '{name}' must be {kind.__name__}, got {value!r}")


class ManagedNode(LifecycleNode):
    """A lifecycle (managed) node, as Nav2 and ros2_control drivers are: `lifecycle_manager` (or
    `ros2 lifecycle set`) configures and activates it, and only an active node acts.

    Parameters are read and checked, and checkpoints loaded, when the process starts: a bad one
    exits 2 there, as in every node, so `configure` cannot fail on them. Activation is what the
    lifecycle gates: an inactive node acts on nothing (subclasses check `self.acting`), and
    deactivation calls `on_hold()` (e.g. the safety layer holds the arm). With `managed: false`
    (the default outside deploy_real) a node configures and activates itself at start-up.
    """

    def __init__(self, node_name: str) -> None:
        super().__init__(node_name)
        self.acting = False
        self.managed = False

    def start_lifecycle(self, managed: bool) -> None:
        """Call last in the subclass's __init__, with its `managed` parameter."""
        self.managed = managed
        if managed:
            self.get_logger().info('managed: inactive until lifecycle_manager configures and activates it')
            return
        self.trigger_configure()
        self.trigger_activate()

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.acting = True
        if self.managed:  # a self-activated node has nothing to report
            self.get_logger().info('active')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.acting = False
        self.on_hold()
        self.get_logger().info('inactive: holding')
        return super().on_deactivate(state)

    def on_hold(self) -> None:
        """What deactivation does beyond not acting (default: nothing)."""


def make_executor():
    """rclpy's EventsExecutor: in train_sim it gives 10-15 % more env steps/s than the
    SingleThreadedExecutor, which rebuilds its wait set on every wake-up
    (bench/ros_overhead.py). STEPNFT_EXECUTOR=single selects the classic one."""
    if os.environ.get('STEPNFT_EXECUTOR', 'events') == 'single':
        return SingleThreadedExecutor()
    from rclpy.experimental import EventsExecutor

    return EventsExecutor()


def finish(node: Node, exit_code: int = 0) -> None:
    """Ask run_node to stop spinning once the current callback returns, then exit with `exit_code`.

    How a node ends itself (its work is done): raising SystemExit inside a callback instead would
    be reported by the executor as a FATAL exception in that callback.
    """
    node.exit_code = exit_code
    node.finish_requested = True


def run_node(make_node: Callable[[], Node], args: list[str] | None = None) -> int:
    """rclpy.init, build the node, spin until SIGINT/SIGTERM or `finish(node)`; the exit code is the
    node's `exit_code` (0 by default), 2 on a configuration error.

    The signal handlers only set a flag that the spin loop checks between callbacks, so a
    callback is never cut short (rclpy's own handler would invalidate the context under it,
    and an exception raised mid-callback can surface as an unrelated error from a C
    extension). Shutdown is then orderly: e.g. the policy server finishes writing episodes.
    """
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    rclpy.init(args=sys.argv if args is None else args, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    try:
        node = make_node()
        executor = make_executor()
        executor.add_node(node)
        while not stop and rclpy.ok() and not getattr(node, 'finish_requested', False):
            executor.spin_once(timeout_sec=0.1)
        return getattr(node, 'exit_code', 0)
    except ConfigError as err:
        rclpy.logging.get_logger('stepnft').fatal(str(err))
        return 2
    except ExternalShutdownException:
        return getattr(node, 'exit_code', 0)
    finally:
        if node is not None:
            close = getattr(node, 'close', None)
            if close is not None:
                close()
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
