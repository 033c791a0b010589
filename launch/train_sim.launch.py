"""Online π-StepNFT training in simulation: ManiSkill (or LIBERO) bridges, one policy server, one learner.

    ros2 launch stepnft_ros train_sim.launch.py num_envs:=4 run_dir:=runs/train_sim
    ros2 launch stepnft_ros train_sim.launch.py suite:=libero_goal task_ids:=0,1 checkpoint:=runs/sft_libero

The node list and parameters come from stepnft_ros.launch_description and config/train_sim.yaml,
which `stepnft launch train_sim` (no ROS installation needed) uses too.
"""

import sys

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration

from launch import LaunchDescription
from stepnft_ros import launch_description as ld
from stepnft_ros.launch_actions import localhost_discovery, node_actions

ARGS = ld.TrainSimArgs()


def _nodes(context):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    params_file = get('params_file') or str(ld.config_dir() / 'train_sim.yaml')
    if get('suite'):  # LIBERO: the checkpoint decides cameras and image size; no ManiSkill evaluator
        checkpoint, policy = ld.checked_checkpoint(get('checkpoint'), 'train_sim on LIBERO')
        graph = ld.TrainSimArgs(run_dir=get('run_dir'), num_envs=int(get('num_envs')), checkpoint=checkpoint,
                                obs_mode='rgb' if policy.camera_names else 'state', evaluate=False,
                                suite=get('suite'), task_ids=tuple(int(t) for t in ld.comma_list(get('task_ids'))),
                                image_size=policy.image_size if policy.camera_names else 0)
        return node_actions(ld.train_sim(graph, checkpoint), params_file)
    checkpoint = get('checkpoint') or str(ld.default_start(get('run_dir'), params_file,
                                                           log=lambda msg: print(msg, file=sys.stderr)))
    checkpoint, _ = ld.checked_checkpoint(checkpoint, 'train_sim')
    graph = ld.TrainSimArgs(run_dir=get('run_dir'), num_envs=int(get('num_envs')), checkpoint=checkpoint,
                            obs_mode=get('obs_mode'), evaluate=get('evaluate').lower() in ('true', '1'))
    return node_actions(ld.train_sim(graph, checkpoint), params_file)


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument('run_dir', default_value=ARGS.run_dir),
        DeclareLaunchArgument('num_envs', default_value=str(ARGS.num_envs)),
        DeclareLaunchArgument('checkpoint', default_value=ARGS.checkpoint,
                              description="'' builds the embedded default SFT policy on first use"),
        DeclareLaunchArgument('obs_mode', default_value=ARGS.obs_mode),
        DeclareLaunchArgument('params_file', default_value=''),
        DeclareLaunchArgument('suite', default_value='',
                              description='a LIBERO suite instead of ManiSkill (needs checkpoint; no evaluator)'),
        DeclareLaunchArgument('task_ids', default_value='0', description='LIBERO: env<i> runs task i mod this list'),
        DeclareLaunchArgument('evaluate', default_value=str(ARGS.evaluate).lower(),
                              description='score new versions on held-out seeds; the graph ends after the final one'),
        localhost_discovery(),
        OpaqueFunction(function=_nodes),
    ])
