"""ROS-free control core for real arms: observation join, chunk scheduling, command adapters, safety.

The nodes `arm_bridge` and `safety_layer` are thin adapters around these classes; everything
here works on numpy arrays and explicit times, so it is unit-tested without ROS.
"""

from stepnft_ros.control.adapters import JointCommand, JointTrajectoryAdapter, TwistAdapter, TwistCommand
from stepnft_ros.control.observation import JoinedObservation, ObservationJoiner
from stepnft_ros.control.safety import Intervention, SafetyConfig, SafetyFilter
from stepnft_ros.control.scheduler import ChunkScheduler

__all__ = [
    'ChunkScheduler', 'Intervention', 'JoinedObservation', 'JointCommand', 'JointTrajectoryAdapter',
    'ObservationJoiner', 'SafetyConfig', 'SafetyFilter', 'TwistAdapter', 'TwistCommand',
]
