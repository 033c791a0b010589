"""π-StepNFT and SFT objectives, labels and trainers (no ROS)."""

from stepnft_ros.algo.labels import advantage_to_preference, terminal_binary_label
from stepnft_ros.algo.sft import SFTConfig, flow_matching_loss, sample_flow_time, train_sft
from stepnft_ros.algo.stepnft import StepNFTConfig, StepNFTTrainer, stepnft_loss

__all__ = [
    'SFTConfig', 'StepNFTConfig', 'StepNFTTrainer', 'advantage_to_preference', 'flow_matching_loss',
    'sample_flow_time', 'stepnft_loss', 'terminal_binary_label', 'train_sft',
]
