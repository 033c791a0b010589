"""Online π-StepNFT training in simulation: ManiSkill bridges, one policy server, one learner.

    ros2 launch stepnft_ros train_sim.launch.py num_envs:=4 run_dir:=runs/train_sim

The node list and parameters come from stepnft_ros.launch_description and config/train_sim.yaml,
which `stepnft launch train_sim` (no ROS installation needed) uses too.
"""

import sys
from pathlib import Path

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration

from launch import LaunchDescription
from stepnft_ros import launch_description as ld
from stepnft_ros.launch_actions import localhost_discovery, node_actions
from stepnft_ros.pipeline import ensure_sft_checkpoint

ARGS = ld.TrainSimArgs()


def _nodes(context):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    graph = ld.TrainSimArgs(run_dir=get('run_dir'), num_envs=int(get('num_envs')), checkpoint=get('checkpoint'),
                            obs_mode=get('obs_mode'), evaluate=get('evaluate').lower() in ('true', '1'))
    checkpoint = graph.checkpoint or str(ensure_sft_checkpoint(
        Path(graph.run_dir) / 'sft_default', log=lambda msg: print(msg, file=sys.stderr)))
    params_file = get('params_file') or str(ld.config_dir() / 'train_sim.yaml')
    return node_actions(ld.train_sim(graph, str(Path(checkpoint).resolve())), params_file)


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument('run_dir', default_value=ARGS.run_dir),
        DeclareLaunchArgument('num_envs', default_value=str(ARGS.num_envs)),
        DeclareLaunchArgument('checkpoint', default_value=ARGS.checkpoint,
                              description="'' builds the embedded default SFT policy on first use"),
        DeclareLaunchArgument('obs_mode', default_value=ARGS.obs_mode),
        DeclareLaunchArgument('params_file', default_value=''),
        DeclareLaunchArgument('evaluate', default_value=str(ARGS.evaluate).lower(),
                              description='score new versions on held-out seeds; the graph ends after the final one'),
        localhost_discovery(),
        OpaqueFunction(function=_nodes),
    ])
