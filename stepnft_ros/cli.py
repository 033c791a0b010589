"""`stepnft`: expert demos, SFT and evaluation from the command line (ROS-free parts of the pipeline).

    stepnft demos -n 20 -o runs/demos.npz
    stepnft sft --demos runs/demos.npz --out runs/sft
    stepnft eval --checkpoint runs/sft --episodes 50
    stepnft info runs/sft
    stepnft train --bags runs/episodes --checkpoint runs/sft --out runs/offline
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from stepnft_ros.algo.labels import LABEL_SCHEMES
from stepnft_ros.algo.sft import SFTConfig
from stepnft_ros.algo.stepnft import StepNFTConfig
from stepnft_ros.episodes.demos import DemoSet
from stepnft_ros.pipeline import sft_from_demos
from stepnft_ros.policy import CheckpointError, FlowPolicy, PolicyConfig, load_checkpoint, save_checkpoint
from stepnft_ros.policy.checkpoint import read_header


def _sft(args: argparse.Namespace) -> int:
    demos = DemoSet.load(args.demos, max_episodes=args.num_demos)
    policy = PolicyConfig(state_dim=1, action_dim=1, horizon=args.horizon, d_model=args.d_model,
                          n_heads=args.n_heads, num_steps=args.num_steps, noise_level=args.noise_level)
    sft = SFTConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    start = time.perf_counter()
    model, losses = sft_from_demos(demos, policy, sft, log=lambda step, loss: print(
        f'step {step} loss {loss:.4f}', file=sys.stderr) if step % 500 == 0 else None)
    path = save_checkpoint(args.out, model, {'stage': 'sft', 'demos': str(args.demos),
                                             'num_demos': demos.num_episodes, 'weights_version': 0})
    print(json.dumps({'checkpoint': str(path), 'final_loss': losses[-1],
                      'wall_s': round(time.perf_counter() - start, 1), 'demos': demos.num_episodes,
                      'policy_config': asdict(model.config)}, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig
    from stepnft_ros.rollout import evaluate

    model, meta = load_checkpoint(args.checkpoint)
    env_cfg = ManiSkillEnvConfig(env_id=args.env_id, control_mode=args.control_mode,
                                 max_episode_steps=args.max_episode_steps, reconfigure_on_reset=True)
    seeds = list(range(args.first_seed, args.first_seed + args.episodes))
    with ManiSkillEnv(env_cfg) as env:
        if env.state_dim != model.config.state_dim or env.action_dim != model.config.action_dim:
            raise CheckpointError(f'{args.checkpoint}: policy expects state {model.config.state_dim} / action '
                                  f'{model.config.action_dim}, {args.env_id} gives {env.state_dim} / {env.action_dim}')
        success, episodes = evaluate(env, FlowPolicy(model, mode=args.mode), seeds, args.actions_per_chunk)
    print(json.dumps({'checkpoint': args.checkpoint, 'env_id': args.env_id, 'mode': args.mode,
                      'episodes': len(seeds), 'success_rate': success,
                      'mean_env_steps': sum(e.env_steps for e in episodes) / len(episodes),
                      'metadata': meta}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from stepnft_ros.offline import train_from_bags

    algo = StepNFTConfig(epochs=args.epochs, lr=args.lr)
    start = time.perf_counter()
    report = train_from_bags(args.bags, args.checkpoint, args.out, algo, labels=args.labels,
                             max_version_lag=args.max_version_lag, seed=args.seed)
    report['wall_s'] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))
    return 0


def _launch(args: argparse.Namespace) -> int:
    from stepnft_ros import launch_description as ld
    from stepnft_ros.launcher import launch
    from stepnft_ros.pipeline import ensure_sft_checkpoint

    graph = ld.TrainSimArgs(run_dir=args.run_dir, num_envs=args.num_envs, checkpoint=args.checkpoint,
                            obs_mode=args.obs_mode, evaluate=not args.no_eval)
    checkpoint = graph.checkpoint or str(ensure_sft_checkpoint(
        Path(graph.run_dir) / 'sft_default', log=lambda msg: print(f'[launch] {msg}', file=sys.stderr, flush=True)))
    read_header(checkpoint)  # fail here, clearly, rather than in every node
    params = Path(args.params_file) if args.params_file else ld.config_dir() / f'{args.graph}.yaml'
    if not params.is_file():
        raise FileNotFoundError(f'no parameter file {params}')
    code = launch(ld.train_sim(graph, str(Path(checkpoint).resolve())), params, Path(graph.run_dir))
    plot = Path(graph.run_dir) / ('success.png' if graph.evaluate else 'learner/success.png')
    if plot.exists():
        print(f'[launch] success plot: {plot}', flush=True)
    return code


def _info(args: argparse.Namespace) -> int:
    config, meta = read_header(args.checkpoint)
    print(json.dumps({'config': asdict(config), 'metadata': meta}, indent=2))
    return 0


def _demos(args: argparse.Namespace) -> int:
    from sim_bridge.maniskill_demos import main as demos_main

    return demos_main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='stepnft', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('sft', help='behaviour-clone a flow policy from a demo .npz')
    p.add_argument('--demos', required=True, help='.npz with obs, actions, episode_lengths')
    p.add_argument('--out', required=True, help='checkpoint directory to write')
    p.add_argument('--num-demos', type=int, help='use only the first N demos')
    p.add_argument('--steps', type=int, default=3000)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--horizon', type=int, default=8)
    p.add_argument('--d-model', type=int, default=64)
    p.add_argument('--n-heads', type=int, default=4)
    p.add_argument('--num-steps', type=int, default=4, help='K solver steps')
    p.add_argument('--noise-level', type=float, default=0.3, help='a, Flow-SDE noise level')
    p.add_argument('--seed', type=int, default=0)
    p.set_defaults(func=_sft)

    p = sub.add_parser('eval', help='success rate of a checkpoint on a ManiSkill task (ODE sampler by default)')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--env-id', default='PickCube-v1')
    p.add_argument('--control-mode', default='pd_ee_delta_pose')
    p.add_argument('--episodes', type=int, default=50)
    p.add_argument('--first-seed', type=int, default=10_000)
    p.add_argument('--actions-per-chunk', type=int, default=4)
    p.add_argument('--max-episode-steps', type=int, default=100)
    p.add_argument('--mode', choices=('ode', 'sde'), default='ode')
    p.set_defaults(func=_eval)

    p = sub.add_parser('train', help='one offline pi-StepNFT update from recorded episode bags')
    p.add_argument('--bags', required=True, help='episode store: one rosbag2 directory per episode')
    p.add_argument('--checkpoint', required=True, help='checkpoint to update')
    p.add_argument('--out', required=True, help='checkpoint directory to write (weights version + 1)')
    p.add_argument('--epochs', type=int, default=StepNFTConfig.epochs)
    p.add_argument('--lr', type=float, default=StepNFTConfig.lr)
    p.add_argument('--labels', choices=LABEL_SCHEMES, default='terminal_binary')
    p.add_argument('--max-version-lag', type=int, help='drop episodes more than N weights versions behind')
    p.add_argument('--seed', type=int, default=0)
    p.set_defaults(func=_train)

    p = sub.add_parser('launch', help='start a node graph without ros2 launch (same graph as launch/*.launch.py)')
    p.add_argument('graph', choices=('train_sim',))
    p.add_argument('--run-dir', default='runs/train_sim', help='episodes, checkpoints, plot and logs')
    p.add_argument('--num-envs', type=int, default=2, help='simulated robots (namespaces env0, env1, ...)')
    p.add_argument('--checkpoint', default='', help='start from this checkpoint (default: the embedded SFT policy, '
                                                    'built on first use)')
    p.add_argument('--obs-mode', default='state', choices=('state', 'rgb'))
    p.add_argument('--params-file', help='node parameters (default: config/<graph>.yaml)')
    p.add_argument('--no-eval', action='store_true', help='no held-out evaluation node (the learner ends the run)')
    p.set_defaults(func=_launch)

    p = sub.add_parser('info', help="print a checkpoint's config and metadata")
    p.add_argument('checkpoint')
    p.set_defaults(func=_info)

    p = sub.add_parser('demos', help='expert demos from the ManiSkill motion planner (see sim_bridge.maniskill_demos)')
    p.add_argument('rest', nargs=argparse.REMAINDER)
    p.set_defaults(func=_demos)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f'stepnft {args.command}: error: {err}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
