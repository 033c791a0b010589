"""Flow-matching VLA policy: config, network, samplers, normalization, checkpoints (no ROS)."""

from stepnft_ros.policy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from stepnft_ros.policy.config import PolicyConfig
from stepnft_ros.policy.modeling import FlowVLA
from stepnft_ros.policy.policy import FlowPolicy, PolicyOutput
from stepnft_ros.policy.types import Observation, ObservationBatch, ObservationError, Trace

__all__ = [
    'CheckpointError', 'FlowPolicy', 'FlowVLA', 'Observation', 'ObservationBatch', 'ObservationError',
    'PolicyConfig', 'PolicyOutput', 'Trace', 'load_checkpoint', 'save_checkpoint',
]
