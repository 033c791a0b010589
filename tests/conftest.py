import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests import toy_env directly


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    # One intra-op thread for every test, whatever an earlier in-process test set (gpu_check's CPU
    # smoke run sets all cores): the models are tiny and spinning threads only contend.
    torch.set_num_threads(1)
    yield


@pytest.fixture
def ros_domain(monkeypatch):
    """A ROS_DOMAIN_ID no concurrent test holds, discovery on loopback only (inherited by node processes)."""
    from domain_coordinator import domain_id

    with domain_id() as did:
        monkeypatch.setenv('ROS_DOMAIN_ID', str(did))
        monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
        yield did


@pytest.fixture
def probe(ros_domain):
    """An in-test rclpy node on the test's domain (own context): publishes like a robot, listens like one."""
    import rclpy

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=ros_domain)
    node = rclpy.create_node('test_probe', context=context)
    executor = rclpy.executors.SingleThreadedExecutor(context=context)
    executor.add_node(node)
    yield node, executor
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)
