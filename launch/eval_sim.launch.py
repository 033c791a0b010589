"""Evaluation in simulation: a checkpoint scored by the ODE policy server on fixed seeds / initial states.

    ros2 launch stepnft_ros eval_sim.launch.py checkpoint:=runs/sft splits:=id,vision,semantic,execution
    ros2 launch stepnft_ros eval_sim.launch.py checkpoint:=runs/vla suite:=libero_spatial task_ids:=0,3

The node list and parameters come from stepnft_ros.launch_description and config/eval_sim.yaml,
which `stepnft launch eval_sim` (no ROS installation needed) uses too. The graph ends when the
eval_recorder has every episode and has written the results JSON.
"""

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration

from launch import LaunchDescription
from stepnft_ros import launch_description as ld
from stepnft_ros.launch_actions import localhost_discovery, node_actions

DEFAULTS = ld.EvalSimArgs(checkpoint='-')


def _nodes(context):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    checkpoint, policy = ld.checked_checkpoint(get('checkpoint'), 'eval_sim')
    graph = ld.EvalSimArgs(
        checkpoint=checkpoint, run_dir=get('run_dir'), out=get('out'), suite=get('suite'),
        task_ids=tuple(int(t) for t in ld.comma_list(get('task_ids'))), episodes_per_task=int(get('episodes_per_task')),
        env_id=get('env_id'), splits=ld.comma_list(get('splits')), episodes=int(get('episodes')),
        first_seed=int(get('first_seed')) if get('first_seed') else None, envs_per_split=int(get('envs_per_split')),
        obs_mode='rgb' if policy.camera_names else 'state', image_size=policy.image_size)
    params_file = get('params_file') or str(ld.config_dir() / 'eval_sim.yaml')
    return node_actions(ld.eval_sim(graph), params_file)


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument('checkpoint', description='checkpoint directory to evaluate'),
        DeclareLaunchArgument('run_dir', default_value=DEFAULTS.run_dir),
        DeclareLaunchArgument('out', default_value='', description="results JSON ('': <run_dir>/results.json)"),
        DeclareLaunchArgument('suite', default_value='', description="LIBERO suite ('': a ManiSkill task)"),
        DeclareLaunchArgument('task_ids', default_value='', description='LIBERO tasks, e.g. 0,3 (default: all)'),
        DeclareLaunchArgument('episodes_per_task', default_value=str(DEFAULTS.episodes_per_task)),
        DeclareLaunchArgument('env_id', default_value=DEFAULTS.env_id),
        DeclareLaunchArgument('splits', default_value=','.join(DEFAULTS.splits),
                              description='ManiSkill: id, vision, semantic, execution (comma list)'),
        DeclareLaunchArgument('episodes', default_value=str(DEFAULTS.episodes), description='ManiSkill: per split'),
        DeclareLaunchArgument('first_seed', default_value='',
                              description="'': 10000 (ManiSkill) or initial state 0 (LIBERO)"),
        DeclareLaunchArgument('envs_per_split', default_value=str(DEFAULTS.envs_per_split)),
        DeclareLaunchArgument('params_file', default_value=''),
        localhost_discovery(),
        OpaqueFunction(function=_nodes),
    ])
