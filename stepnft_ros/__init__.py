"""stepnft_ros: pi-StepNFT online RL for flow-based VLA policies, as ROS 2 nodes."""
