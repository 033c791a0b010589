"""The ROS 2 runtime that scripts/setup.sh installs carries our message types over loopback DDS."""

import os
import time

import pytest

rclpy = pytest.importorskip('rclpy', reason='ROS 2 is installed by scripts/setup.sh')


def test_action_chunk_round_trip_over_dds(probe):
    from builtin_interfaces.msg import Time
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    node, executor = probe
    qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
    received = []
    node.create_subscription(JointTrajectory, 'action_chunk', received.append, qos)
    pub = node.create_publisher(JointTrajectory, 'action_chunk', qos)
    msg = JointTrajectory(joint_names=[f'ee_d{i}' for i in range(6)] + ['gripper'])
    msg.header.stamp = Time(sec=12, nanosec=345)
    msg.points = [JointTrajectoryPoint(positions=[0.1 * i] * 7) for i in range(8)]
    deadline = time.monotonic() + 10.0
    while not received and time.monotonic() < deadline:
        pub.publish(msg)
        executor.spin_once(timeout_sec=0.1)
    assert received, f'no message within 10 s on ROS_DOMAIN_ID={os.environ["ROS_DOMAIN_ID"]}'
    got = received[0]
    assert got.header.stamp.sec == 12 and got.header.stamp.nanosec == 345
    assert len(got.points) == 8 and list(got.points[3].positions) == pytest.approx([0.3] * 7)
