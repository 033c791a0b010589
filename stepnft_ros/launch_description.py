"""The node graphs, described once and started two ways.

`launch/train_sim.launch.py` turns these NodeSpecs into launch_ros Nodes where ROS 2 is
installed; `stepnft launch train_sim` starts the same specs as processes where only the pip
wheels are (no `ros2 launch` there). Static parameters live in config/<graph>.yaml; the specs
add only what depends on the launch arguments (namespaces, directories, seeds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = 'stepnft_ros'


@dataclass(frozen=True)
class NodeSpec:
    name: str
    executable: str
    """Console script installed under lib/stepnft_ros (what launch_ros starts)."""
    module: str
    """Python module with main() (what the pip-only launcher starts with `python -m`)."""
    namespace: str = ''
    parameters: dict[str, Any] = field(default_factory=dict)
    ends_graph: str = 'never'
    """When this node's exit stops the whole graph: 'exit' (any exit), 'failure' (non-zero exit) or 'never'."""

    def __post_init__(self) -> None:
        if self.ends_graph not in ('exit', 'failure', 'never'):
            raise ValueError(f'ends_graph must be exit, failure or never, got {self.ends_graph!r}')

    @property
    def full_name(self) -> str:
        return f'/{self.namespace}/{self.name}' if self.namespace else f'/{self.name}'


@dataclass(frozen=True)
class TrainSimArgs:
    run_dir: str = 'runs/train_sim'
    """Episodes, checkpoints, plot and logs go here."""
    num_envs: int = 2
    """Simulated robots, one namespace each (env0, env1, ...), all served by one policy server."""
    checkpoint: str = ''
    """Starting checkpoint; '' builds the embedded default SFT policy on first use (run_dir/sft)."""
    obs_mode: str = 'state'
    """Bridge observations: 'state' or 'rgb' (camera images as well; the policy must expect them)."""
    first_seed: int = 1_000_000
    """env<i> resets with seeds first_seed + i·seed_stride, first_seed + i·seed_stride + 1, ..."""
    seed_stride: int = 100_000
    evaluate: bool = True
    """Run the evaluator (held-out ODE success of new versions); the graph ends after it scores the final one."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_envs <= 64:
            raise ValueError(f'num_envs must be in [1, 64], got {self.num_envs}')


def config_dir() -> Path:
    """config/ of this package: the source tree (editable installs) or the ament share directory."""
    here = Path(__file__).resolve().parents[1] / 'config'
    if here.is_dir():
        return here
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory(PACKAGE)) / 'config'


def train_sim(args: TrainSimArgs, checkpoint: str) -> list[NodeSpec]:
    """Bridges env0..env{N-1}, one policy server serving them all, one learner, optionally the evaluator."""
    run = Path(args.run_dir).resolve()
    robots = [f'env{i}' for i in range(args.num_envs)]
    episodes = str(run / 'episodes')
    specs = [
        NodeSpec('learner', 'learner', 'stepnft_ros.nodes.learner', ends_graph='failure' if args.evaluate else 'exit',
                 parameters={'checkpoint': checkpoint, 'episode_dir': episodes, 'work_dir': str(run / 'learner')}),
        NodeSpec('policy_server', 'policy_server', 'stepnft_ros.nodes.policy_server', ends_graph='exit',
                 parameters={'checkpoint': checkpoint, 'episode_dir': episodes, 'robots': robots, 'mode': 'train'}),
    ]
    if args.evaluate:
        specs.append(NodeSpec('maniskill_evaluator', 'maniskill_evaluator', 'sim_bridge.maniskill_evaluator',
                              ends_graph='exit', parameters={'out_dir': str(run),
                                                             'learner_history': str(run / 'learner/history.json')}))
    for i, ns in enumerate(robots):
        specs.append(NodeSpec('maniskill_bridge', 'maniskill_bridge', 'sim_bridge.maniskill_node', namespace=ns,
                              parameters={'first_seed': args.first_seed + i * args.seed_stride,
                                          'publish_clock': i == 0, 'obs_mode': args.obs_mode}))
    return specs
