"""Plumbing every node shares: typed parameters with clear errors, and a main() that spins."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
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

    @staticmethod
    def _check_type(name: str, value: Any, kind: type) -> None:
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"parameter '{name}' must be {kind.__name__}, got {value!r}")


def run_node(make_node: Callable[[], Node], args: list[str] | None = None) -> int:
    """rclpy.init, build the node, spin until shutdown. Exit 2 on a configuration error.

    SIGINT/SIGTERM raise in Python instead of rclpy's handler invalidating the context under
    running callbacks: the node then shuts down in order (e.g. the policy server finishes
    writing the episodes it has outcomes for).
    """
    def terminate(signum, _frame):
        raise KeyboardInterrupt(f'signal {signum}')

    signal.signal(signal.SIGTERM, terminate)
    rclpy.init(args=sys.argv if args is None else args, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    try:
        node = make_node()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
        return getattr(node, 'exit_code', 0)
    except ConfigError as err:
        rclpy.logging.get_logger('stepnft').fatal(str(err))
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        return getattr(node, 'exit_code', 0)
    finally:
        if node is not None:
            close = getattr(node, 'close', None)
            if close is not None:
                close()
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
