"""A real arm (or the ManiSkill stand-in) driven by the policy through the safety layer.

    ros2 launch stepnft_ros deploy_real.launch.py checkpoint:=runs/sft_fr3
    ros2 launch stepnft_ros deploy_real.launch.py checkpoint:=runs/sft_fr3 mode:=train learn:=true
    ros2 launch stepnft_ros deploy_real.launch.py checkpoint:=runs/sft_fr3 standin:=true   # dry run

The node list comes from stepnft_ros.launch_description, the arm's topics, joints and limits from
config/deploy_real.yaml (or params_file:=...); `stepnft launch deploy_real` (no ROS installation
needed) starts the same graph. The graph stops if the safety layer exits, or any node fails.
"""

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration

from launch import LaunchDescription
from stepnft_ros import launch_description as ld
from stepnft_ros.launch_actions import localhost_discovery, node_actions

DEFAULTS = ld.DeployRealArgs(checkpoint='-')


def _flag(text: str) -> bool:
    return text.strip().lower() in ('true', '1', 'yes')


def _nodes(context):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    checkpoint, policy = ld.checked_checkpoint(get('checkpoint'), 'deploy_real')
    graph = ld.DeployRealArgs(checkpoint=checkpoint, run_dir=get('run_dir'), robot=get('robot'), mode=get('mode'),
                              learn=_flag(get('learn')), standin=_flag(get('standin')),
                              image_size=policy.image_size if policy.camera_names else 0)
    params_file = get('params_file') or str(ld.config_dir() / 'deploy_real.yaml')
    return node_actions(ld.deploy_real(graph), params_file)


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument('checkpoint', description='the policy checkpoint directory (required)'),
        DeclareLaunchArgument('run_dir', default_value=DEFAULTS.run_dir),
        DeclareLaunchArgument('robot', default_value=DEFAULTS.robot, description="the arm's namespace"),
        DeclareLaunchArgument('mode', default_value=DEFAULTS.mode,
                              description="'deploy' (ODE, nothing recorded) or 'train' (Flow-SDE, episodes recorded)"),
        DeclareLaunchArgument('learn', default_value=str(DEFAULTS.learn).lower(),
                              description='also run the learner (online fine-tuning; needs mode train)'),
        DeclareLaunchArgument('standin', default_value=str(DEFAULTS.standin).lower(),
                              description='dry run: the ManiSkill stand-in arm plays the arm'),
        DeclareLaunchArgument('params_file', default_value=''),
        localhost_discovery(),
        OpaqueFunction(function=_nodes),
    ])
