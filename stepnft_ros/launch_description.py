"""The node graphs, described once and started two ways.

`launch/<graph>.launch.py` (train_sim, eval_sim) turns these NodeSpecs into launch_ros Nodes
where ROS 2 is installed; `stepnft launch <graph>` starts the same specs as processes where only
the pip wheels are (no `ros2 launch` there). Static parameters live in config/<graph>.yaml; the specs
add only what depends on the launch arguments (namespaces, directories, seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = 'stepnft_ros'
RESPAWN_DELAY_S = 3.0
"""Wait before restarting a node that died (a crashed simulator), so a crash loop does not spin."""
MAX_RESPAWNS = 5
"""Restarts per node and launch; a node that keeps dying is left dead, and the graph runs on without it."""


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
    stops_first: bool = False
    """The pip-only launcher stops it, and waits for it, before the other nodes (lifecycle_manager: it
    deactivates the managed nodes while they still run)."""
    respawn: bool = False
    """Restart it when it dies (non-zero exit), after RESPAWN_DELAY_S, at most MAX_RESPAWNS times. Only
    for nodes whose restart loses nothing but their running episode: training sim bridges (the policy
    server drops the episode they leave unfinished), not a real arm's nodes or an evaluation's bridges
    (a restart would repeat their seeds)."""

    def __post_init__(self) -> None:
        if self.ends_graph not in ('exit', 'failure', 'never'):
            raise ValueError(f'ends_graph must be exit, failure or never, got {self.ends_graph!r}')
        if self.respawn and self.ends_graph != 'never':
            raise ValueError(f'{self.full_name}: a node whose exit ends the graph cannot be respawned')

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
    suite: str = ''
    """A LIBERO suite: the robots are LIBERO bridges on `task_ids` instead of ManiSkill bridges."""
    task_ids: tuple[int, ...] = (0,)
    """LIBERO: env<i> runs task task_ids[i % len(task_ids)], from the benchmark's initial states."""
    image_size: int = 0
    """Camera size of the bridges (0: the bridge's default); must match the policy's."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_envs <= 64:
            raise ValueError(f'num_envs must be in [1, 64], got {self.num_envs}')
        if self.suite:
            from sim_bridge.libero_env import SUITES  # the adapter module; LIBERO itself loads lazily

            if self.suite not in SUITES:
                raise ValueError(f'suite must be one of {SUITES}, got {self.suite!r}')
            if self.evaluate:
                raise ValueError('the held-out evaluator runs ManiSkill tasks: train on LIBERO without it and '
                                 'score the learner\'s checkpoints with `stepnft eval --suite` or eval_sim')
            if not self.checkpoint:
                raise ValueError('LIBERO training needs a checkpoint: the embedded defaults are ManiSkill policies')
            if not self.task_ids:
                raise ValueError('task_ids must name at least one LIBERO task')


def config_dir() -> Path:
    """config/ of this package: the source tree (editable installs) or the ament share directory."""
    here = Path(__file__).resolve().parents[1] / 'config'
    if here.is_dir():
        return here
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory(PACKAGE)) / 'config'


def default_start(run_dir: str | Path, params_file: str | Path, log: Callable[[str], None]) -> Path:
    """The embedded default SFT policy of the task the params file configures, built on first use
    (pipeline.EMBEDDED_STARTS; run_dir/sft_default)."""
    from sim_bridge.maniskill_env import ManiSkillEnvConfig
    from stepnft_ros.launcher import node_parameter
    from stepnft_ros.pipeline import embedded_start, ensure_sft_checkpoint

    robot = '/env0/maniskill_bridge'  # what the bridges read: their section, else /**, else the env's defaults
    spec = embedded_start(node_parameter([], params_file, robot, 'env_id', ManiSkillEnvConfig.env_id),
                          node_parameter([], params_file, robot, 'control_mode', ManiSkillEnvConfig.control_mode))
    return ensure_sft_checkpoint(Path(run_dir) / 'sft_default', spec, log=log)


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
                              ends_graph='exit', parameters={'out_dir': str(run), 'checkpoint': checkpoint,
                                                             'learner_history': str(run / 'learner/history.json')}))
    for i, ns in enumerate(robots):
        bridge = {'first_seed': args.first_seed + i * args.seed_stride, 'publish_clock': i == 0,
                  'obs_mode': args.obs_mode, **({'image_size': args.image_size} if args.image_size else {})}
        if args.suite:  # LIBERO seeds pick the benchmark's initial states (seed % 50)
            specs.append(NodeSpec('libero_bridge', 'libero_bridge', 'sim_bridge.libero_node', namespace=ns,
                                  respawn=True, parameters={**bridge, 'suite': args.suite,
                                                            'task_id': args.task_ids[i % len(args.task_ids)]}))
        else:
            specs.append(NodeSpec('maniskill_bridge', 'maniskill_bridge', 'sim_bridge.maniskill_node', namespace=ns,
                                  respawn=True, parameters=bridge))
    return specs


def comma_list(text: str | None) -> tuple[str, ...]:
    """'0, 3,' -> ('0', '3'): how launch arguments and CLI flags spell lists (tasks, splits)."""
    return tuple(t.strip() for t in (text or '').split(',') if t.strip())


def checked_checkpoint(path: str, graph: str):
    """The checkpoint argument resolved and its header read once, so a bad path fails the launch
    with one clear error rather than in every node: (absolute path, PolicyConfig)."""
    from stepnft_ros.policy.checkpoint import read_header

    if not path:
        raise ValueError(f'{graph} needs a checkpoint')
    resolved = str(Path(path).resolve())
    policy, _ = read_header(resolved)
    return resolved, policy


@dataclass(frozen=True)
class EvalSimArgs:
    """The eval_sim graph: bridges running fixed seeds / initial states, an ODE policy server, a recorder."""

    checkpoint: str
    run_dir: str = 'runs/eval_sim'
    """Logs and, unless `out` is set, results.json go here."""
    out: str = ''
    """Results JSON ('' = <run_dir>/results.json)."""
    suite: str = ''
    """A LIBERO suite (libero_spatial, ...): evaluate it instead of a ManiSkill task."""
    task_ids: tuple[int, ...] = ()
    """LIBERO tasks (empty: every task of the suite)."""
    episodes_per_task: int = 50
    """LIBERO: initial states first_seed .. first_seed + n - 1 of each task."""
    env_id: str = 'PickCube-v1'
    splits: tuple[str, ...] = ('id',)
    """ManiSkill: one group of bridges per split (sim_bridge/maniskill_ood.py)."""
    episodes: int = 50
    """ManiSkill: seeds per split."""
    first_seed: int | None = None
    """None: 10000 (ManiSkill, held out from training seeds) or 0 (LIBERO's first initial state)."""
    envs_per_split: int = 1
    """Parallel bridges: ManiSkill, per split, sharing its seeds; LIBERO, sharing the task list
    (each bridge holds one env of 2–3 GB at a time)."""
    obs_mode: str = 'state'
    image_size: int = 64

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError('eval_sim needs a checkpoint')
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f'splits must be distinct and not empty, got {self.splits}')
        for name in ('episodes_per_task', 'episodes', 'envs_per_split'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.suite and self.splits != ('id',):
            raise ValueError(f'LIBERO suites have the id split only, got {self.splits}')
        if not self.suite:
            from sim_bridge.maniskill_ood import check_split

            for split in self.splits:
                check_split(split, self.env_id)  # here, not as a bridge failing at start-up

    @property
    def results_path(self) -> str:
        return str(Path(self.out).resolve() if self.out else Path(self.run_dir).resolve() / 'results.json')


def eval_sim(args: EvalSimArgs) -> list[NodeSpec]:
    """Bridges (LIBERO bridges sharing the task list, or `envs_per_split` ManiSkill bridges per split),
    a policy server in eval mode (ODE sampler, nothing recorded) and the eval_recorder, which ends the graph."""
    bridges: list[NodeSpec] = []
    if args.suite:
        from sim_bridge.libero_env import suite_tasks

        task_ids = list(args.task_ids) or [t[0] for t in suite_tasks(args.suite)]
        for j in range(min(args.envs_per_split, len(task_ids))):
            share = task_ids[j::args.envs_per_split]  # round robin: every bridge gets whole tasks
            bridges.append(NodeSpec('libero_bridge', 'libero_bridge', 'sim_bridge.libero_node',
                                    namespace=f'libero{j}', ends_graph='failure', parameters={
                                        'suite': args.suite, 'task_ids': share,
                                        'episodes_per_task': args.episodes_per_task,
                                        'max_episodes': len(share) * args.episodes_per_task,
                                        'first_seed': 0 if args.first_seed is None else args.first_seed,
                                        'obs_mode': args.obs_mode, 'image_size': args.image_size,
                                        'publish_clock': j == 0}))
        expected = len(task_ids) * args.episodes_per_task
    else:
        first = 10_000 if args.first_seed is None else args.first_seed
        for split in args.splits:
            # Contiguous seed ranges, one per bridge: every split runs the same seeds.
            per, extra = divmod(args.episodes, args.envs_per_split)
            offset = 0
            for j in range(args.envs_per_split):
                count = per + (j < extra)
                if count:
                    bridges.append(NodeSpec('maniskill_bridge', 'maniskill_bridge', 'sim_bridge.maniskill_node',
                                            namespace=f'{split}{j}', ends_graph='failure', parameters={
                                                'env_id': args.env_id, 'split': split, 'first_seed': first + offset,
                                                'max_episodes': count, 'obs_mode': args.obs_mode,
                                                'image_size': args.image_size, 'publish_clock': not bridges}))
                offset += count
        expected = len(args.splits) * args.episodes
    robots = [b.namespace for b in bridges]
    return [
        NodeSpec('eval_recorder', 'eval_recorder', 'sim_bridge.eval_recorder', ends_graph='exit',
                 parameters={'out': args.results_path, 'expected_episodes': expected, 'robots': list(robots),
                             'checkpoint': args.checkpoint}),  # own list: the launcher's YAML allows no aliases
        NodeSpec('policy_server', 'policy_server', 'stepnft_ros.nodes.policy_server', ends_graph='failure',
                 parameters={'checkpoint': args.checkpoint, 'robots': robots, 'mode': 'eval'}),
        *bridges,
    ]


DEPLOY_MODES = ('deploy', 'train')


@dataclass(frozen=True)
class DeployRealArgs:
    """The deploy_real graph: one real arm (or the stand-in) behind a safety layer, served by a policy server."""

    checkpoint: str
    run_dir: str = 'runs/deploy_real'
    """Episodes (train mode), learner checkpoints and logs go here."""
    robot: str = 'arm'
    """The arm's namespace: policy topics, the operator's services and safety/* inputs live under it."""
    mode: str = 'deploy'
    """'deploy': ODE sampler, nothing recorded; 'train': Flow-SDE and every operator-labelled episode recorded."""
    learn: bool = False
    """Also run the learner: online π-StepNFT from the operator's labels (needs mode 'train')."""
    standin: bool = False
    """Dry run: the ManiSkill stand-in arm (sim_bridge/standin_arm.py) plays the arm's drivers."""
    image_size: int = 0
    """The policy's image size (from its checkpoint): the bridge resizes camera frames to it (0: params file)."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError('deploy_real needs a checkpoint')
        if self.mode not in DEPLOY_MODES:
            raise ValueError(f'mode must be one of {DEPLOY_MODES}, got {self.mode!r}')
        if self.learn and self.mode != 'train':
            raise ValueError("the learner needs recorded episodes: use mode 'train' with learn")
        if not self.robot or not self.robot.replace('_', '').isalnum():
            raise ValueError(f'robot must be a plain namespace name (letters, digits, _), got {self.robot!r}')


def deploy_real(args: DeployRealArgs) -> list[NodeSpec]:
    """safety_layer + arm_bridge (namespace `robot`), policy_server, episode_operator, lifecycle_manager,
    optionally learner and stand-in.

    The safety layer's exit ends the graph: the arm must never be commanded without it. The three
    nodes on the command path are managed (lifecycle) nodes: lifecycle_manager activates the
    safety layer first, then the policy server, then the arm bridge, so nothing can command the
    arm before the safety layer filters; its failure to bring them up ends the graph."""
    run = Path(args.run_dir).resolve()
    episodes = str(run / 'episodes')
    server = {'checkpoint': args.checkpoint, 'robots': [args.robot], 'mode': args.mode, 'managed': True}
    if args.mode == 'train':
        server['episode_dir'] = episodes
    specs = [
        NodeSpec('safety_layer', 'safety_layer', 'stepnft_ros.nodes.safety_layer', namespace=args.robot,
                 ends_graph='exit', parameters={'managed': True}),
        NodeSpec('policy_server', 'policy_server', 'stepnft_ros.nodes.policy_server', ends_graph='failure',
                 parameters=server),
        NodeSpec('arm_bridge', 'arm_bridge', 'stepnft_ros.nodes.arm_bridge', namespace=args.robot,
                 ends_graph='failure',
                 parameters={'managed': True, **({'image_size': args.image_size} if args.image_size else {})}),
        NodeSpec('episode_operator', 'episode_operator', 'stepnft_ros.nodes.episode_operator', ends_graph='failure',
                 parameters={'robots': [args.robot]}),
        NodeSpec('lifecycle_manager', 'lifecycle_manager', 'stepnft_ros.nodes.lifecycle_manager', ends_graph='failure',
                 stops_first=True, parameters={'node_names': [f'/{args.robot}/safety_layer', '/policy_server',
                                            f'/{args.robot}/arm_bridge']}),
    ]
    if args.learn:
        # seeded_resets: a real arm's episodes have no reset seed, so group_mean labels cannot work here.
        specs.append(NodeSpec('learner', 'learner', 'stepnft_ros.nodes.learner', ends_graph='failure',
                              parameters={'checkpoint': args.checkpoint, 'episode_dir': episodes,
                                          'work_dir': str(run / 'learner'), 'seeded_resets': False}))
    if args.standin:
        specs.append(NodeSpec('standin_arm', 'standin_arm', 'sim_bridge.standin_arm', ends_graph='failure'))
    return specs
