"""Online π-StepNFT training in simulation: ManiSkill bridges, one policy server, one learner.

    ros2 launch stepnft_ros train_sim.launch.py num_envs:=4 run_dir:=runs/train_sim

The node list and parameters come from stepnft_ros.launch_description and config/train_sim.yaml,
which `stepnft launch train_sim` (no ROS installation needed) uses too.
"""

import os
import sys
from pathlib import Path

from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    OpaqueFunction,
    RegisterEventHandler,
    SetEnvironmentVariable,
)
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription
from stepnft_ros import launch_description as ld
from stepnft_ros.pipeline import ensure_sft_checkpoint

ARGS = ld.TrainSimArgs()


def _nodes(context):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    graph = ld.TrainSimArgs(run_dir=get('run_dir'), num_envs=int(get('num_envs')), checkpoint=get('checkpoint'),
                            obs_mode=get('obs_mode'), evaluate=get('evaluate').lower() in ('true', '1'))
    checkpoint = graph.checkpoint or str(ensure_sft_checkpoint(
        Path(graph.run_dir) / 'sft_default', log=lambda msg: print(msg, file=sys.stderr)))
    params_file = get('params_file') or str(ld.config_dir() / 'train_sim.yaml')
    actions = []
    for spec in ld.train_sim(graph, str(Path(checkpoint).resolve())):
        node = Node(package=ld.PACKAGE, executable=spec.executable, name=spec.name, namespace=spec.namespace or None,
                    parameters=[params_file, spec.parameters], output='screen')
        actions.append(node)
        if spec.ends_graph != 'never':
            actions.append(RegisterEventHandler(OnProcessExit(
                target_action=node, on_exit=lambda event, _ctx, s=spec: [EmitEvent(event=Shutdown(
                    reason=f'{s.full_name} exited with {event.returncode}'))]
                if s.ends_graph == 'exit' or event.returncode != 0 else [])))
    return actions


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
        SetEnvironmentVariable('ROS_AUTOMATIC_DISCOVERY_RANGE',
                               os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')),
        OpaqueFunction(function=_nodes),
    ])
