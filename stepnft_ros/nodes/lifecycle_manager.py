"""lifecycle_manager: brings managed nodes up in order, and down in reverse (Nav2's lifecycle manager, in small).

Parameter `node_names`: fully qualified names of lifecycle nodes (stepnft_ros.nodes.common.ManagedNode,
or any ROS 2 lifecycle node), in the order they must come up. For each in turn it waits for its
`<node>/change_state` service (lifecycle_msgs/srv/ChangeState), then configures and activates it,
so a node later in the list never acts before the ones before it are active: deploy_real lists
the safety layer first, and nothing can command the arm before it filters. A node that does not
come up within `service_timeout_s`, or refuses a transition, stops the bring-up: the manager logs
which and why, and exits 1, which ends the graph. On SIGINT/SIGTERM it deactivates the nodes in
reverse order (the arm bridge stops, the safety layer holds) before exiting.

out  /lifecycle_manager/ready (std_msgs/Bool, latched): true once every node is active
"""

from __future__ import annotations

import time

import rclpy
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from rclpy.node import Node
from std_msgs.msg import Bool

from stepnft_ros import ros_io
from stepnft_ros.nodes.common import ConfigError, Params, finish, run_node

READY = 'ready'


class LifecycleManager(Node):
    def __init__(self) -> None:
        super().__init__('lifecycle_manager')
        p = Params(self)
        self.node_names = p.required('node_names', list)
        self.service_timeout_s = p.get('service_timeout_s', 60.0)
        if not all(n.startswith('/') for n in self.node_names) or len(set(self.node_names)) != len(self.node_names):
            raise ConfigError(f"parameter 'node_names' must list distinct fully qualified names, got {self.node_names}")
        self.ready_pub = self.create_publisher(Bool, f'~/{READY}', ros_io.LATCHED_QOS)
        self.ready_pub.publish(Bool(data=False))
        self.change_state = {n: self.create_client(ChangeState, f'{n}/change_state') for n in self.node_names}
        self.active: list[str] = []
        self.exit_code = 0
        self.get_logger().info(f'bringing up {self.node_names} in this order')
        self._step = self._bring_up()
        self.create_timer(0.05, self._advance)

    def _bring_up(self):
        """A generator: one transition request at a time, resumed by the timer until it is answered."""
        for name in self.node_names:
            client, deadline = self.change_state[name], time.monotonic() + self.service_timeout_s
            while not client.service_is_ready():
                if time.monotonic() > deadline:
                    raise RuntimeError(f'{name} did not come up within {self.service_timeout_s:g} s '
                                       f'(no {name}/change_state service)')
                yield
            for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
                future = client.call_async(ChangeState.Request(transition=Transition(id=transition)))
                while not future.done():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f'{name} did not answer transition {transition} within '
                                           f'{self.service_timeout_s:g} s')
                    yield
                if not future.result().success:
                    raise RuntimeError(f'{name} refused transition {transition} (see its log)')
            self.active.append(name)
            self.get_logger().info(f'{name} active')
        self.ready_pub.publish(Bool(data=True))
        self.get_logger().info(f'all {len(self.node_names)} nodes active')

    def _advance(self) -> None:
        if self._step is None:
            return
        try:
            next(self._step)
        except StopIteration:
            self._step = None
        except RuntimeError as err:
            self._step = None
            self.get_logger().fatal(f'bring-up stopped: {err}')
            finish(self, exit_code=1)

    def close(self) -> None:
        """Deactivate what is active, last first, on this node's executor while the context still runs
        (run_node calls this on the way out; nodes stopped at the same time simply do not answer)."""
        for name in reversed(self.active):
            future = self.change_state[name].call_async(
                ChangeState.Request(transition=Transition(id=Transition.TRANSITION_DEACTIVATE)))
            deadline = time.monotonic() + 2.0
            while not future.done() and time.monotonic() < deadline and rclpy.ok():
                self.executor.spin_once(timeout_sec=0.05)
            ok = future.done() and future.result() is not None and future.result().success
            self.get_logger().info(f'{name} {"deactivated" if ok else "did not answer the deactivation"}')


def main(args: list[str] | None = None) -> int:
    return run_node(LifecycleManager, args)


if __name__ == '__main__':
    raise SystemExit(main())
