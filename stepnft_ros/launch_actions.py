"""NodeSpecs -> launch_ros actions, shared by every launch/*.launch.py file.

Imports `launch` and `launch_ros`, so only launch files import this module (the pip-only
launcher in stepnft_ros/launcher.py starts the same specs without them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from launch.actions import EmitEvent, RegisterEventHandler, SetEnvironmentVariable
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch_ros.actions import Node

from stepnft_ros.launch_description import MAX_RESPAWNS, PACKAGE, RESPAWN_DELAY_S, NodeSpec


def node_actions(specs: Sequence[NodeSpec], params_file: str) -> list:
    """One launch_ros Node per spec (config YAML + the spec's own parameters), respawned (bounded)
    where the spec says so, and a shutdown of the whole launch when a spec whose exit ends the graph
    exits (any exit, or a failure)."""
    actions = []
    for spec in specs:
        # launch respawns after any exit; a respawnable (training) bridge exits only when it crashes.
        respawn = {'respawn': True, 'respawn_delay': RESPAWN_DELAY_S,
                   'respawn_max_retries': MAX_RESPAWNS} if spec.respawn else {}
        node = Node(package=PACKAGE, executable=spec.executable, name=spec.name, namespace=spec.namespace or None,
                    parameters=[params_file, spec.parameters], output='screen', **respawn)
        actions.append(node)
        if spec.ends_graph != 'never':
            actions.append(RegisterEventHandler(OnProcessExit(
                target_action=node, on_exit=lambda event, _ctx, s=spec: [EmitEvent(event=Shutdown(
                    reason=f'{s.full_name} exited with {event.returncode}'))]
                if s.ends_graph == 'exit' or event.returncode != 0 else [])))
    return actions


def localhost_discovery() -> SetEnvironmentVariable:
    """Discovery stays on this host unless the caller opened it up (multi-host graphs)."""
    return SetEnvironmentVariable('ROS_AUTOMATIC_DISCOVERY_RANGE',
                                  os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST'))

