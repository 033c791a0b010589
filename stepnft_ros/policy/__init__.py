"""Flow-matching VLA policy: config, network, samplers, normalization, checkpoints, ONNX backend (no ROS)."""

# ruff: noqa: E402
# First, before anything imports transformers or LeRobot: both import torchvision when it is installed.
from stepnft_ros.policy.torchvision_shim import ensure_torchvision_importable

ensure_torchvision_importable()

from stepnft_ros.policy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from stepnft_ros.policy.config import PolicyConfig
from stepnft_ros.policy.modeling import FlowVLA
from stepnft_ros.policy.onnx_backend import BACKENDS, OnnxExportError, OnnxFlowPolicy, export_onnx, make_policy
from stepnft_ros.policy.policy import FlowPolicy, PolicyOutput
from stepnft_ros.policy.types import Observation, ObservationBatch, ObservationError, Trace

__all__ = [
    'BACKENDS', 'CheckpointError', 'FlowPolicy', 'FlowVLA', 'Observation', 'ObservationBatch', 'ObservationError',
    'OnnxExportError', 'OnnxFlowPolicy', 'PolicyConfig', 'PolicyOutput', 'Trace', 'export_onnx', 'load_checkpoint',
    'make_policy', 'save_checkpoint',
]
