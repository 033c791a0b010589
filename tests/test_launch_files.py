"""The ros2 launch files, run against a recording stand-in of the `launch` / `launch_ros` API.

Neither package installs from PyPI, so these tests cannot prove launch_ros accepts the actions;
they do run every line of our launch files: argument defaults, the checkpoint check, the graph
built from launch_description, and that each node names an installed console script.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
from ros_harness import REPO, tiny_checkpoint

from stepnft_ros.launch_description import MAX_RESPAWNS, RESPAWN_DELAY_S


class _Recorded:
    """Any launch action: keeps its arguments for the test to inspect."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration:
    def __init__(self, name: str) -> None:
        self.name = name

    def perform(self, context) -> str:
        return context.launch_configurations[self.name]


def _stub_launch_api(monkeypatch) -> None:
    names = {
        'launch': ['LaunchDescription'],
        'launch.actions': ['DeclareLaunchArgument', 'OpaqueFunction', 'EmitEvent', 'RegisterEventHandler',
                           'SetEnvironmentVariable'],
        'launch.event_handlers': ['OnProcessExit'],
        'launch.events': ['Shutdown'],
        'launch.substitutions': [],
        'launch_ros': [],
        'launch_ros.actions': ['Node'],
    }
    for module_name, classes in names.items():
        module = types.ModuleType(module_name)
        for cls in classes:
            setattr(module, cls, type(cls, (_Recorded,), {}))
        monkeypatch.setitem(sys.modules, module_name, module)
    sys.modules['launch.substitutions'].LaunchConfiguration = _LaunchConfiguration
    monkeypatch.delitem(sys.modules, 'stepnft_ros.launch_actions', raising=False)


def _run_launch_file(monkeypatch, name: str, overrides: dict[str, str]) -> list:
    _stub_launch_api(monkeypatch)
    spec = importlib.util.spec_from_file_location(f'launch_{name}', REPO / 'launch' / f'{name}.launch.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    actions = description.args[0]
    declared = {a.args[0]: a.kwargs.get('default_value')
                for a in actions if type(a).__name__ == 'DeclareLaunchArgument'}
    unknown = set(overrides) - set(declared)
    assert not unknown, f'{name}: no launch arguments {unknown}'
    context = types.SimpleNamespace(launch_configurations={**declared, **overrides})
    missing = [k for k, v in context.launch_configurations.items() if v is None]
    assert not missing, f'{name}: arguments without a default must be given: {missing}'
    opaque = [a for a in actions if type(a).__name__ == 'OpaqueFunction']
    assert len(opaque) == 1
    return opaque[0].kwargs['function'](context)


def _console_scripts() -> set[str]:
    text = (REPO / 'setup.py').read_text()
    return set(re.findall(r"'([a-z_]+) = [a-z_.]+:main'", text))


@pytest.mark.parametrize('name, overrides, expected_nodes', [
    ('train_sim', {'num_envs': '3'}, {'learner', 'policy_server', 'maniskill_evaluator', 'maniskill_bridge'}),
    ('train_sim', {'suite': 'libero_goal', 'task_ids': '0,1', 'num_envs': '3'},
     {'learner', 'policy_server', 'libero_bridge'}),
    ('eval_sim', {'splits': 'id,execution', 'episodes': '4', 'envs_per_split': '2'},
     {'eval_recorder', 'policy_server', 'maniskill_bridge'}),
    ('eval_sim', {'suite': 'libero_goal', 'task_ids': '0,1,2', 'episodes_per_task': '3', 'envs_per_split': '2'},
     {'eval_recorder', 'policy_server', 'libero_bridge'}),
    ('deploy_real', {'mode': 'train', 'learn': 'true', 'standin': 'true'},
     {'safety_layer', 'policy_server', 'arm_bridge', 'episode_operator', 'learner', 'standin_arm',
      'lifecycle_manager'}),
])
def test_launch_file_builds_its_graph(monkeypatch, tmp_path, name, overrides, expected_nodes):
    checkpoint = tiny_checkpoint(tmp_path / 'ckpt')
    overrides = {'checkpoint': str(checkpoint), 'run_dir': str(tmp_path / 'run'), **overrides}
    actions = _run_launch_file(monkeypatch, name, overrides)
    nodes = [a for a in actions if type(a).__name__ == 'Node']
    assert {n.kwargs['executable'] for n in nodes} == expected_nodes
    assert {n.kwargs['executable'] for n in nodes} <= _console_scripts()
    for node in nodes:
        params_file, instance = node.kwargs['parameters']
        assert Path(params_file) == REPO / 'config' / f'{name}.yaml'
        assert isinstance(instance, dict)
        if 'checkpoint' in instance:
            assert instance['checkpoint'] == str(checkpoint.resolve())
    if name == 'train_sim' and 'suite' in overrides:
        tasks = {n.kwargs['namespace']: n.kwargs['parameters'][1]['task_id'] for n in nodes
                 if n.kwargs['executable'] == 'libero_bridge'}
        assert tasks == {'env0': 0, 'env1': 1, 'env2': 0}
    elif name == 'train_sim':
        assert sorted(n.kwargs['namespace'] for n in nodes if n.kwargs['executable'] == 'maniskill_bridge') \
            == ['env0', 'env1', 'env2']
    if name == 'eval_sim' and 'suite' in overrides:
        bridges = {n.kwargs['namespace']: n.kwargs['parameters'][1] for n in nodes
                   if n.kwargs['executable'] == 'libero_bridge'}
        assert {ns: p['task_ids'] for ns, p in bridges.items()} == {'libero0': [0, 2], 'libero1': [1]}
        assert [p['max_episodes'] for p in bridges.values()] == [6, 3]
        recorder = next(n for n in nodes if n.kwargs['executable'] == 'eval_recorder').kwargs['parameters'][1]
        assert recorder['expected_episodes'] == 9 and sorted(recorder['robots']) == ['libero0', 'libero1']
    elif name == 'eval_sim':
        bridges = [n for n in nodes if n.kwargs['executable'] == 'maniskill_bridge']
        assert len(bridges) == 4  # 2 splits x 2 bridges, each with its half of the 4 seeds
        assert sum(b.kwargs['parameters'][1]['max_episodes'] for b in bridges) == 8
    if name == 'deploy_real':  # a real arm's episodes have no reset seed: the learner refuses group_mean
        learner = next(n for n in nodes if n.kwargs['executable'] == 'learner')
        assert learner.kwargs['parameters'][1]['seeded_resets'] is False
    # Training sim bridges are respawned (bounded); nothing else is: an evaluation's bridges would
    # repeat their seeds, and a real arm's nodes must not come back on their own.
    respawned = {n.kwargs['executable'] for n in nodes if n.kwargs.get('respawn')}
    assert respawned == ({'maniskill_bridge', 'libero_bridge'} & expected_nodes if name == 'train_sim' else set())
    for node in nodes:
        if node.kwargs.get('respawn'):
            assert (node.kwargs['respawn_delay'], node.kwargs['respawn_max_retries']) == (RESPAWN_DELAY_S, MAX_RESPAWNS)
    # Every node whose exit ends the graph gets an exit handler.
    handlers = [a for a in actions if type(a).__name__ == 'RegisterEventHandler']
    assert handlers, 'no node ends the graph'


def test_launch_file_refuses_a_missing_checkpoint(monkeypatch, tmp_path):
    with pytest.raises(Exception, match='checkpoint'):
        _run_launch_file(monkeypatch, 'deploy_real', {'checkpoint': str(tmp_path / 'nope')})


def test_the_foxglove_layout_shows_topics_the_train_sim_graph_publishes():
    import json

    from stepnft_ros import ros_io
    layout = json.loads((REPO / 'config/foxglove_train_sim.json').read_text())

    def leaves(node):
        return [node] if isinstance(node, str) else leaves(node['first']) + leaves(node['second'])
    panels = layout['configById']
    assert sorted(leaves(layout['layout'])) == sorted(panels), 'every panel placed once, none missing'
    topics = set()
    for config in panels.values():
        topics.update(path['value'].split('.', 1)[0] for path in config.get('paths', []))
        topics.update(config[key] for key in ('topicPath', 'topicToRender') if key in config)
        topics.update(filter(None, [config.get('imageMode', {}).get('imageTopic')]))
    published = {ros_io.LEARNER_SUCCESS_RATE, ros_io.EVALUATION_SUCCESS_RATE, ros_io.LEARNER_METRICS,
                 ros_io.POLICY_WEIGHTS, ros_io.DIAGNOSTICS, f'/env0/{ros_io.JOINT_STATES}',
                 f'/env0/{ros_io.camera_topic("base_camera")}'}
    assert topics == published


def test_the_embedded_default_start_follows_the_configured_task(monkeypatch, tmp_path):
    """No checkpoint: train_sim builds the embedded start of the task its params file names, and refuses a task
    or control mode it has none for, naming what to pass instead."""
    import yaml

    from stepnft_ros import launch_description as ld
    from stepnft_ros import pipeline

    built = []
    monkeypatch.setattr(pipeline, 'ensure_sft_checkpoint', lambda out, spec, log: built.append((out, spec)) or out)
    params = yaml.safe_load((REPO / 'config/train_sim.yaml').read_text())
    params_file = tmp_path / 'params.yaml'
    for env_id, control_mode, wanted in (('PushCube-v1', 'pd_ee_delta_pose', 10), ('PickCube-v1', 'pd_ee_delta_pose',
                                                                                     300)):
        params['/**']['ros__parameters'].update(env_id=env_id, control_mode=control_mode)
        params_file.write_text(yaml.safe_dump(params))
        assert ld.default_start(tmp_path / 'run', params_file, log=print) == tmp_path / 'run' / 'sft_default'
        assert (built[-1][1].env_id, built[-1][1].num_demos) == (env_id, wanted)
    assert ld.default_start(tmp_path, REPO / 'config/train_sim.yaml', log=print) and built[-1][1].env_id == \
        'PushCube-v1', 'the shipped configuration trains PushCube'
    for env_id, control_mode, error in (('StackCube-v1', 'pd_ee_delta_pose', 'no embedded default policy for env_id'),
                                        ('PushCube-v1', 'pd_joint_pos', "acts in control_mode 'pd_ee_delta_pose'")):
        params['/**']['ros__parameters'].update(env_id=env_id, control_mode=control_mode)
        params_file.write_text(yaml.safe_dump(params))
        with pytest.raises(ValueError, match=error):
            ld.default_start(tmp_path / 'run', params_file, log=print)
