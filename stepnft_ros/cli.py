"""`stepnft`: demos, SFT, evaluation, export, launching graphs and the operator from the command line.

    stepnft demos -n 20 -o runs/demos.npz
    stepnft sft --demos runs/demos.npz --out runs/sft
    stepnft sft --format libero-hdf5 --demos libero_spatial/*_demo.hdf5 --out runs/sft_libero
    stepnft record --out demos --config config/demo_topics.yaml
    stepnft sft --bags demos --config config/demo_topics.yaml --out runs/sft_teleop
    stepnft eval --checkpoint runs/sft --splits id,vision,semantic,execution --episodes 50 --out eval.json
    stepnft eval --checkpoint runs/vla --suite libero_spatial --tasks 0,3 --episodes-per-task 50 --out eval.json
    stepnft info runs/sft
    stepnft export-onnx --checkpoint runs/sft --out runs/sft_onnx
    stepnft train --bags runs/episodes --checkpoint runs/sft --out runs/offline
    stepnft operator --robot arm0
    stepnft launch train_sim | eval_sim | deploy_real ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from stepnft_ros.algo.labels import LABEL_SCHEMES
from stepnft_ros.algo.sft import SFTConfig
from stepnft_ros.algo.stepnft import StepNFTConfig
from stepnft_ros.episodes.demos import DemoSet
from stepnft_ros.launch_description import comma_list
from stepnft_ros.pipeline import sft_from_checkpoint, sft_from_demos
from stepnft_ros.policy import CheckpointError, PolicyConfig, load_checkpoint, save_checkpoint
from stepnft_ros.policy.checkpoint import read_header


def _load_demos(args: argparse.Namespace) -> tuple[DemoSet, dict]:
    """The demos `stepnft sft` trains on, and what to record about them in the checkpoint."""
    from stepnft_ros.episodes import demo_formats as df

    if args.bags:
        if not args.config:
            raise ValueError('--bags needs --config (the demo topics YAML, e.g. config/demo_topics.yaml)')
        topics = df.DemoTopics.load(args.config)
        demos, reports = df.read_demo_bags(args.bags, topics, on_bag=lambda r: print(
            f'{r.bag}: {r.samples} samples from {r.commands} commands'
            + (f', skipped {r.skipped}' if r.skipped else ''), file=sys.stderr))
        if args.num_demos is not None:
            demos = _first_episodes(demos, args.num_demos)
        return demos, {'demos': str(args.bags), 'format': 'rosbag', 'action_names': df.demo_action_names(topics, demos),
                       'joint_names': list(topics.joint_names), 'state_sources': list(topics.state_sources)}
    if not args.demos:
        raise ValueError('give --demos FILE(s) or --bags DIR --config YAML')
    if args.format == 'npz':
        if len(args.demos) != 1:
            raise ValueError('--format npz takes one --demos file')
        demos = DemoSet.load(args.demos[0], max_episodes=args.num_demos)
    elif args.format == 'libero-hdf5':
        demos = df.read_libero_hdf5(args.demos, df.LiberoReadConfig(
            image_size=args.image_size, max_episodes=args.num_demos,
            state=tuple(args.libero_state.split(',')) if ',' in args.libero_state else args.libero_state,
            cameras=df.LIBERO_CAMERAS if not args.no_images else {}))
    else:
        demos = df.read_maniskill_h5(args.demos, df.ManiSkillReadConfig(
            image_size=args.image_size, max_episodes=args.num_demos, success_only=args.success_only,
            cameras=() if args.no_images else None))
    return demos, {'demos': [str(d) for d in args.demos], 'format': args.format}


def _first_episodes(demos: DemoSet, n: int) -> DemoSet:
    t = int(demos.episode_lengths[:n].sum())
    return DemoSet(demos.states[:t], demos.actions[:t], demos.episode_lengths[:n],
                   images={c: f[:t] for c, f in demos.images.items()}, instructions=demos.instructions[:n])


def _sft(args: argparse.Namespace) -> int:
    demos, source = _load_demos(args)
    policy = PolicyConfig(state_dim=1, action_dim=1, horizon=args.horizon, d_model=args.d_model,
                          n_heads=args.n_heads, num_steps=args.num_steps, noise_level=args.noise_level,
                          vision_patch=args.vision_patch)
    sft = SFTConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    observation_lag=args.observation_lag, state_dropout=args.state_dropout,
                    state_dropout_dims=tuple(args.state_dropout_dims))
    language = {'auto': None, 'on': True, 'off': False}[args.language]
    start = time.perf_counter()

    def log(step: int, loss: float) -> None:
        if step % 500 == 0:
            print(f'step {step} loss {loss:.4f}', file=sys.stderr)

    if args.init:  # the architecture flags do not apply: the checkpoint has its own
        model, losses = sft_from_checkpoint(demos, args.init, sft, log=log)
        source['init'] = str(args.init)
    else:
        model, losses = sft_from_demos(demos, policy, sft, log=log, language=language)
    instructions = sorted(set(demos.instructions))
    path = save_checkpoint(args.out, model, {'stage': 'sft', **source, 'num_demos': demos.num_episodes,
                                             'instructions': instructions[:100], 'weights_version': 0})
    print(json.dumps({'checkpoint': str(path), 'final_loss': losses[-1],
                      'wall_s': round(time.perf_counter() - start, 1), 'demos': demos.num_episodes,
                      'samples': int(demos.actions.shape[0]), 'policy_config': asdict(model.config)}, indent=2))
    return 0


def _record(args: argparse.Namespace) -> int:
    from stepnft_ros.episodes.demo_formats import DemoTopics
    from stepnft_ros.nodes.demo_recorder import record

    topics = DemoTopics.load(args.config)  # a bad file stops here, before ROS starts
    return record(topics, args.out, duration_s=args.duration, instruction=args.instruction,
                  keyboard=not args.no_keyboard, ros_args=args.ros_args)


def _eval(args: argparse.Namespace) -> int:
    import torch

    from sim_bridge import evaluation

    torch.set_num_threads(max(1, args.torch_threads))  # small policies: more threads only contend
    model, meta = load_checkpoint(args.checkpoint)
    if args.suite and args.splits != 'id':
        raise ValueError('LIBERO suites are evaluated on their own initial states only (--splits id)')
    if not args.suite and args.tasks:
        raise ValueError('--tasks selects LIBERO tasks: give --suite too')
    if args.suite:
        tasks = [int(t) for t in comma_list(args.tasks)] or None
        jobs = evaluation.libero_jobs(model.config, args.suite, tasks, args.episodes_per_task,
                                      first_seed=args.first_seed if args.first_seed is not None else 0,
                                      max_episode_steps=args.max_episode_steps)
    else:
        jobs = evaluation.maniskill_jobs(
            model.config, args.env_id, list(comma_list(args.splits)), args.episodes,
            first_seed=args.first_seed if args.first_seed is not None else 10_000, control_mode=args.control_mode,
            max_episode_steps=args.max_episode_steps, render_size=args.video_size if args.video_dir else 0)
    report = evaluation.run_evaluation(jobs, model, checkpoint=str(args.checkpoint),
                                       actions_per_chunk=args.actions_per_chunk, video_dir=args.video_dir,
                                       sampler=args.mode,
                                       log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report['checkpoint_metadata'] = meta
    if args.out:
        evaluation.write_report(args.out, report)
    print(evaluation.format_table(report))
    if args.out:
        print(f'results: {args.out}')
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from stepnft_ros.offline import train_from_bags

    algo = StepNFTConfig(epochs=args.epochs, lr=args.lr, minibatch_size=args.minibatch_size,
                         microbatch_size=args.microbatch_size)
    # Under torchrun (WORLD_SIZE > 1) the ranks split each minibatch (StepNFTTrainer); rank 0 writes.
    under_torchrun = 'WORLD_SIZE' in os.environ
    if args.fsdp and not under_torchrun:
        raise SystemExit('--fsdp shards over the processes torchrun starts: '
                         'torchrun --nproc_per_node N -m stepnft_ros.cli train --fsdp ...')
    distributed = args.fsdp or int(os.environ.get('WORLD_SIZE', '1')) > 1
    device = 'cpu'
    if args.device == 'cuda':
        if not torch.cuda.is_available():
            raise SystemExit('--device cuda: no CUDA device is visible to this process')
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
        device = f'cuda:{torch.cuda.current_device()}'
    if distributed:
        dist.init_process_group('nccl' if args.device == 'cuda' else 'gloo')
    try:
        start = time.perf_counter()
        report = train_from_bags(args.bags, args.checkpoint, args.out, algo, labels=args.labels,
                                 max_version_lag=args.max_version_lag, seed=args.seed, distributed=distributed,
                                 fsdp=args.fsdp, device=device)
        report['wall_s'] = round(time.perf_counter() - start, 1)
        if not distributed or dist.get_rank() == 0:
            print(json.dumps(report, indent=2))
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def _params_file(args: argparse.Namespace) -> Path:
    from stepnft_ros import launch_description as ld

    params = Path(args.params_file) if args.params_file else ld.config_dir() / f'{args.graph}.yaml'
    if not params.is_file():
        raise FileNotFoundError(f'no parameter file {params}')
    return params


def _launch_eval_sim(args: argparse.Namespace) -> int:
    from stepnft_ros import launch_description as ld
    from stepnft_ros.launcher import launch

    checkpoint, policy = ld.checked_checkpoint(args.checkpoint, 'eval_sim')
    graph = ld.EvalSimArgs(
        checkpoint=checkpoint, run_dir=args.run_dir or 'runs/eval_sim', out=args.out or '', suite=args.suite or '',
        task_ids=tuple(int(t) for t in comma_list(args.tasks)), episodes_per_task=args.episodes_per_task,
        env_id=args.env_id, splits=comma_list(args.splits), episodes=args.episodes, first_seed=args.first_seed,
        envs_per_split=args.envs_per_split, obs_mode='rgb' if policy.camera_names else 'state',
        image_size=policy.image_size)
    code = launch(ld.eval_sim(graph), _params_file(args), Path(graph.run_dir))
    if code == 0 and Path(graph.results_path).exists():
        print(f'[launch] results: {graph.results_path}', flush=True)
    return code


def _launch_deploy_real(args: argparse.Namespace) -> int:
    from stepnft_ros import launch_description as ld
    from stepnft_ros.launcher import launch

    checkpoint, policy = ld.checked_checkpoint(args.checkpoint, 'deploy_real')
    graph = ld.DeployRealArgs(checkpoint=checkpoint, run_dir=args.run_dir or 'runs/deploy_real', robot=args.robot,
                              mode=args.mode, learn=args.learn, standin=args.standin,
                              image_size=policy.image_size if policy.camera_names else 0)
    return launch(ld.deploy_real(graph), _params_file(args), Path(graph.run_dir))


def _launch(args: argparse.Namespace) -> int:
    from stepnft_ros import launch_description as ld
    from stepnft_ros.launcher import launch, node_parameter
    from stepnft_ros.progress import Progress

    if args.graph == 'eval_sim':
        return _launch_eval_sim(args)
    if args.graph == 'deploy_real':
        return _launch_deploy_real(args)
    run_dir = args.run_dir or 'runs/train_sim'
    if args.suite:  # LIBERO: the checkpoint decides cameras and image size; no ManiSkill evaluator
        checkpoint, policy = ld.checked_checkpoint(args.checkpoint, 'train_sim on LIBERO')
        graph = ld.TrainSimArgs(run_dir=run_dir, num_envs=args.num_envs, checkpoint=checkpoint,
                                obs_mode='rgb' if policy.camera_names else 'state', evaluate=False,
                                suite=args.suite, task_ids=tuple(int(t) for t in comma_list(args.tasks)) or (0,),
                                image_size=policy.image_size if policy.camera_names else 0)
    else:
        checkpoint = args.checkpoint or str(ld.default_start(
            run_dir, _params_file(args), log=lambda msg: print(f'[launch] {msg}', file=sys.stderr, flush=True)))
        checkpoint, _ = ld.checked_checkpoint(checkpoint, 'train_sim')
        graph = ld.TrainSimArgs(run_dir=run_dir, num_envs=args.num_envs, checkpoint=checkpoint,
                                obs_mode=args.obs_mode, evaluate=not args.no_eval)
    specs, params = ld.train_sim(graph, checkpoint), _params_file(args)
    run = Path(graph.run_dir)
    # The console shows a line per update (from the learner's and evaluator's files); --verbose adds
    # every node's output, which otherwise goes to <run_dir>/logs.
    progress = Progress(run, max_updates=node_parameter(specs, params, '/learner', 'max_updates', 0),
                        out=lambda line: print(line, flush=True))
    code = launch(specs, params, run, log_dir=None if args.verbose else run / 'logs', on_tick=progress.poll)
    progress.poll()
    print(progress.summary_line(progress.summarize()), flush=True)
    plot = run / ('success.png' if graph.evaluate else 'learner/success.png')
    if plot.exists():
        print(f'[launch] success plot: {plot}', flush=True)
    return code


def _info(args: argparse.Namespace) -> int:
    from stepnft_ros.policy.backend import lerobot_policy_type

    config, meta = read_header(args.checkpoint)
    # SmolVLA: `config` is its robot-facing interface (the FlowVLA sizes in it do not apply)
    backend = lerobot_policy_type(args.checkpoint) or 'flowvla'
    print(json.dumps({'backend': backend, 'config': asdict(config), 'metadata': meta}, indent=2))
    return 0


def _demos(args: argparse.Namespace) -> int:
    from sim_bridge.maniskill_demos import main as demos_main

    return demos_main(args.rest) or 0


def _export_onnx(args: argparse.Namespace) -> int:
    from stepnft_ros.policy.onnx_backend import export_onnx, verify_export

    out = args.out or f'{args.checkpoint.rstrip("/")}_onnx'
    start = time.perf_counter()
    export_onnx(args.checkpoint, out)
    report = {'export': str(out), 'wall_s': round(time.perf_counter() - start, 1),
              **verify_export(out, args.checkpoint)}
    print(json.dumps(report, indent=2))
    return 0


def _operator(args: argparse.Namespace) -> int:
    from stepnft_ros.operator_tool import run

    return run(args.robot, args.keys, args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='stepnft', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('sft', help='behaviour-clone a flow policy from demos (.npz, LIBERO, ManiSkill, rosbags)')
    p.add_argument('--demos', nargs='+', help='demo file(s) in --format')
    p.add_argument('--format', choices=('npz', 'libero-hdf5', 'maniskill-h5'), default='npz',
                   help='npz: obs, actions, episode_lengths (+ image_<cam>, instructions); libero-hdf5: LIBERO '
                        'demo files (one per task); maniskill-h5: ManiSkill3 trajectories with their .json')
    p.add_argument('--bags', help='demo rosbags (from `stepnft record` or `ros2 bag record`): a bag or a '
                                  'directory of them, one demo each')
    p.add_argument('--config', help='demo topics YAML for --bags (see config/demo_topics.yaml)')
    p.add_argument('--image-size', type=int, default=64, help='images are resized to this (LIBERO, ManiSkill)')
    p.add_argument('--no-images', action='store_true', help='LIBERO/ManiSkill: a state-only policy')
    p.add_argument('--libero-state', default='bridge',
                   help='LIBERO state: a layout (bridge, eef) or comma-separated parts')
    p.add_argument('--success-only', action='store_true', help='ManiSkill: skip unsuccessful trajectories')
    p.add_argument('--language', choices=('auto', 'on', 'off'), default='auto',
                   help='condition on the instruction (auto: when the demos have more than one)')
    p.add_argument('--vision-patch', type=int, default=8, help='patch size of the vision encoder')
    p.add_argument('--out', required=True, help='checkpoint directory to write')
    p.add_argument('--init', help='fine-tune this checkpoint (ours or a LeRobot SmolVLA directory) instead of '
                                  'training a new FlowVLA; its architecture and normalization stay')
    p.add_argument('--num-demos', type=int, help='use only the first N demos (per file for LIBERO/ManiSkill)')
    p.add_argument('--steps', type=int, default=3000)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--horizon', type=int, default=8)
    p.add_argument('--d-model', type=int, default=64)
    p.add_argument('--n-heads', type=int, default=4)
    p.add_argument('--num-steps', type=int, default=4, help='K solver steps')
    p.add_argument('--noise-level', type=float, default=0.3, help='a, Flow-SDE noise level')
    p.add_argument('--observation-lag', type=int, default=0,
                   help='pair each action chunk with the observation N control steps before it: a policy '
                        'for a loop whose observations arrive that late (about 1 over a ROS graph)')
    p.add_argument('--state-dropout', type=float, default=0.0, metavar='P',
                   help='zero --state-dropout-dims in a share P of the training samples (e.g. the joint '
                        'velocities, so the policy reads the goal to move from standstill)')
    p.add_argument('--state-dropout-dims', type=int, nargs='+', default=[], metavar='DIM',
                   help='state dims --state-dropout zeroes (a ManiSkill state with n joints: n .. 2n-1)')
    p.add_argument('--seed', type=int, default=0)
    p.set_defaults(func=_sft)

    p = sub.add_parser('eval', help='success rates of a checkpoint (ODE sampler): a LIBERO suite, or a ManiSkill '
                                    'task in-distribution and under OOD splits')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--suite', help='LIBERO suite (libero_spatial, libero_object, libero_goal, libero_10); '
                                   'omit for ManiSkill')
    p.add_argument('--tasks', help='LIBERO task ids, e.g. 0,3 (default: every task of the suite)')
    p.add_argument('--episodes-per-task', type=int, default=50, help='LIBERO: initial states 0..N-1 of each task')
    p.add_argument('--env-id', default='PickCube-v1', help='ManiSkill task')
    p.add_argument('--splits', default='id', help='ManiSkill: comma list of id, vision, semantic, execution')
    p.add_argument('--episodes', type=int, default=50, help='ManiSkill: seeds per split')
    p.add_argument('--control-mode', default='pd_ee_delta_pose')
    p.add_argument('--first-seed', type=int, help='first seed / initial state (default: ManiSkill 10000, LIBERO 0)')
    p.add_argument('--actions-per-chunk', type=int, default=4)
    p.add_argument('--max-episode-steps', type=int, help="step cap (default: ManiSkill 100, LIBERO the suite's)")
    p.add_argument('--video-dir', help='one mp4 per episode, named task_split_seedN_outcome.mp4')
    p.add_argument('--video-size', type=int, default=128, help='ManiSkill: side of the rendered video frames')
    p.add_argument('--out', help='results JSON (written atomically)')
    p.add_argument('--mode', choices=('ode', 'sde'), default='ode', help='sampler (the protocol: ode)')
    p.add_argument('--torch-threads', type=int, default=1)
    p.set_defaults(func=_eval)

    p = sub.add_parser('train', help='one offline pi-StepNFT update from recorded episode bags')
    p.add_argument('--bags', required=True, help='episode store: one rosbag2 directory per episode')
    p.add_argument('--checkpoint', required=True, help='checkpoint to update')
    p.add_argument('--out', required=True, help='checkpoint directory to write (weights version + 1)')
    p.add_argument('--epochs', type=int, default=StepNFTConfig.epochs)
    p.add_argument('--lr', type=float, default=StepNFTConfig.lr)
    p.add_argument('--minibatch-size', type=int, default=StepNFTConfig.minibatch_size,
                   help='decisions per gradient step')
    p.add_argument('--microbatch-size', type=int, default=0,
                   help='decisions per forward/backward pass, gradients summed per step (0: whole minibatch); '
                        'bounds memory for large backbones')
    p.add_argument('--labels', choices=LABEL_SCHEMES, default='terminal_binary')
    p.add_argument('--max-version-lag', type=int, help='drop episodes more than N weights versions behind')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--fsdp', action='store_true',
                   help='under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2) '
                        'instead of a full copy per rank, for backbones that do not fit one process')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                   help='cuda: each rank on its LOCAL_RANK GPU, nccl between ranks (gloo on cpu)')
    p.set_defaults(func=_train)

    p = sub.add_parser('launch', help='start a node graph without ros2 launch (same graph as launch/*.launch.py)')
    p.add_argument('graph', choices=('train_sim', 'eval_sim', 'deploy_real'))
    p.add_argument('--run-dir', help='episodes, checkpoints, plot and logs (default: runs/<graph>)')
    p.add_argument('--num-envs', type=int, default=2, help='simulated robots (namespaces env0, env1, ...)')
    p.add_argument('--checkpoint', default='', help='start from this checkpoint (default: the embedded SFT policy, '
                                                    'built on first use)')
    p.add_argument('--obs-mode', default='state', choices=('state', 'rgb'))
    p.add_argument('--params-file', help='node parameters (default: config/<graph>.yaml)')
    p.add_argument('--no-eval', action='store_true', help='no held-out evaluation node (the learner ends the run)')
    p.add_argument('--verbose', action='store_true',
                   help='train_sim: every node\'s output on the console (default: one line per learner update '
                        'and a summary; node output in <run-dir>/logs/)')
    p.add_argument('--suite', help='a LIBERO suite instead of a ManiSkill task (train_sim: needs --checkpoint; '
                                   'obs mode and image size come from it)')
    p.add_argument('--tasks', help='LIBERO task ids, e.g. 0,3 (eval_sim default: all; train_sim: env<i> runs '
                                   'task i mod the list, default 0)')
    g = p.add_argument_group('eval_sim', 'what to evaluate (see `stepnft eval`); obs mode and image size come '
                                         'from the checkpoint')
    g.add_argument('--out', help='results JSON (default: <run-dir>/results.json)')
    g.add_argument('--episodes-per-task', type=int, default=50)
    g.add_argument('--env-id', default='PickCube-v1')
    g.add_argument('--splits', default='id', help='ManiSkill: comma list of id, vision, semantic, execution')
    g.add_argument('--episodes', type=int, default=50, help='ManiSkill: seeds per split')
    g.add_argument('--first-seed', type=int, help='default: 10000 (ManiSkill) or initial state 0 (LIBERO)')
    g.add_argument('--envs-per-split', type=int, default=1,
                   help='parallel bridges: ManiSkill, per split (sharing its seeds); LIBERO, sharing the tasks')
    g = p.add_argument_group('deploy_real', 'a real arm behind the safety layer (config/deploy_real.yaml maps it)')
    g.add_argument('--robot', default='arm', help="the arm's namespace")
    g.add_argument('--mode', default='deploy', choices=('deploy', 'train'),
                   help='deploy: ODE, nothing recorded; train: Flow-SDE, labelled episodes recorded')
    g.add_argument('--learn', action='store_true', help='also run the learner (online fine-tuning; needs --mode train)')
    g.add_argument('--standin', action='store_true', help='dry run: the ManiSkill stand-in arm plays the arm')
    p.set_defaults(func=_launch)

    p = sub.add_parser('record', help='record teleoperated demos as rosbag2 MCAP bags, one per demo')
    p.add_argument('--out', required=True, help='directory of demo bags (demo_0000, demo_0001, ...)')
    p.add_argument('--config', required=True, help='demo topics YAML (see config/demo_topics.yaml)')
    p.add_argument('--duration', type=float, help='record one demo of this many seconds, starting now, then exit')
    p.add_argument('--instruction', default='', help='task instruction stored with each bag')
    p.add_argument('--no-keyboard', action='store_true', help='ignore stdin; start/stop only by the services')
    p.add_argument('--ros-args', nargs=argparse.REMAINDER, default=[], help='passed to ROS (e.g. -r __ns:=/arm)')
    p.set_defaults(func=_record)

    p = sub.add_parser('info', help="print a checkpoint's config and metadata")
    p.add_argument('checkpoint')
    p.set_defaults(func=_info)

    p = sub.add_parser('demos', help='expert demos from the ManiSkill motion planner (see sim_bridge.maniskill_demos)')
    p.add_argument('rest', nargs=argparse.REMAINDER)
    p.set_defaults(func=_demos)

    p = sub.add_parser('export-onnx', help='export a checkpoint to ONNX (prefix + velocity graphs) and check it '
                                           'against torch')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--out', help='export directory to create (default: <checkpoint>_onnx)')
    p.set_defaults(func=_export_onnx)

    p = sub.add_parser('operator', help="start, stop and label a real arm's episodes with single keys "
                                        '(s x y n d q; talks to the episode_operator node)')
    p.add_argument('--robot', default='env0', help="the robot's namespace (one of episode_operator's robots)")
    p.add_argument('--keys', help='act on these keys, then quit (e.g. sxy); default: keys from stdin')
    p.add_argument('--timeout', type=float, default=10.0, help='seconds to wait for the operator services')
    p.set_defaults(func=_operator)
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
