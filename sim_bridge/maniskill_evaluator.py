"""maniskill_evaluator: scores each new weights version with the ODE sampler on held-out seeds.

A validation loop for training in simulation: it follows /policy_weights (latched), runs the
deterministic ODE policy of every `every_n_versions`-th version on the same held-out reset
seeds in its own ManiSkill environment, and publishes /evaluation/success_rate
(std_msgs/Float32) and /evaluation/result (std_msgs/String JSON). It keeps
<out_dir>/eval_history.json and redraws <out_dir>/success.png with the learner's training
success (read from `learner_history`) beside it, and TensorBoard scalars eval/* under
<out_dir>/evaluator/tensorboard. After the version marked final by the
learner it exits, which ends the train_sim graph.
The latched topic keeps only the newest version, so an evaluator that starts after the learner's
first updates (simulator start-up is slow) scores the due versions it missed from the learner's
checkpoints first, version 0 being `checkpoint` (the starting weights): the run's start is always
scored when that parameter is given.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rclpy.node import Node
from std_msgs.msg import Float32, String

from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig
from stepnft_ros import ros_io
from stepnft_ros.atomic import atomic_write_text
from stepnft_ros.learner import plot_history, version_dir
from stepnft_ros.monitoring import EVENTS_DIR, ScalarLog
from stepnft_ros.nodes.common import ConfigError, Params, finish, run_node
from stepnft_ros.policy import CheckpointError, FlowPolicy, load_checkpoint
from stepnft_ros.progress import rate_interval
from stepnft_ros.rollout import evaluate


class ManiSkillEvaluator(Node):
    def __init__(self) -> None:
        super().__init__('maniskill_evaluator')
        p = Params(self)
        self.out_dir = Path(p.required('out_dir', str))
        self.learner_history = p.get('learner_history', '')
        self.initial_checkpoint = p.get('checkpoint', '')
        first_seed, episodes = p.get('first_eval_seed', 10_000), p.get('eval_episodes', 48)
        self.seeds = list(range(first_seed, first_seed + episodes))
        self.every = p.get('every_n_versions', 1)
        self.actions_per_chunk = p.get('actions_per_chunk', 4)
        torch.set_num_threads(max(1, p.get('torch_threads', 1)))
        try:
            env_cfg = ManiSkillEnvConfig(env_id=p.get('env_id', 'PickCube-v1'),
                                         control_mode=p.get('control_mode', 'pd_ee_delta_pose'),
                                         max_episode_steps=p.get('max_episode_steps', 100),
                                         reconfigure_on_reset=True)  # bit-exact seeds: comparable scores
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if episodes < 1 or self.every < 1:
            raise ConfigError(f'eval_episodes and every_n_versions must be >= 1, got {episodes}, {self.every}')
        self.env = ManiSkillEnv(env_cfg)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        history_path = self.out_dir / 'eval_history.json'
        self.history = json.loads(history_path.read_text()) if history_path.exists() else []
        self.done_versions = {h['weights_version'] for h in self.history}
        self.scalars = ScalarLog(self.out_dir / 'evaluator' / EVENTS_DIR) if p.get('tensorboard', True) else None
        self.rate_pub = self.create_publisher(Float32, ros_io.EVALUATION_SUCCESS_RATE, ros_io.RELIABLE_QOS)
        self.result_pub = self.create_publisher(String, ros_io.EVALUATION_RESULT, ros_io.RELIABLE_QOS)
        self.create_subscription(String, ros_io.POLICY_WEIGHTS, self._on_weights, ros_io.LATCHED_QOS)
        self.exit_code = 0
        self.get_logger().info(f'evaluating every {self.every} version(s) on {episodes} held-out seeds '
                               f'from {first_seed} (ODE sampler)')

    def _on_weights(self, msg: String) -> None:
        try:
            announced = ros_io.WeightsAnnouncement.from_msg(msg)
        except ValueError as err:
            self.get_logger().error(str(err))
            return
        for missed in self._missed(announced):
            self._evaluate(missed)
        due = announced.version % self.every == 0 or announced.final
        if due and announced.version not in self.done_versions:
            self._evaluate(announced)
        if announced.final:
            self.get_logger().info(f'final version {announced.version} evaluated; plot at '
                                   f'{self.out_dir / "success.png"}')
            finish(self)

    def _missed(self, announced: ros_io.WeightsAnnouncement) -> list[ros_io.WeightsAnnouncement]:
        """Due versions before `announced` that were never scored and whose weights are on disk."""
        missed = []
        for version in range(0, announced.version, self.every):
            if version in self.done_versions or (version == 0 and not self.initial_checkpoint):
                continue
            path = (Path(self.initial_checkpoint) if version == 0
                    else version_dir(Path(announced.checkpoint).parent, version))
            if path.exists():
                missed.append(ros_io.WeightsAnnouncement(version=version, checkpoint=str(path)))
        return missed

    def _evaluate(self, announced: ros_io.WeightsAnnouncement) -> None:
        try:
            model, _ = load_checkpoint(announced.checkpoint)
        except CheckpointError as err:
            self.get_logger().error(f'cannot evaluate version {announced.version}: {err}')
            return
        start = time.perf_counter()
        success, episodes = evaluate(self.env, FlowPolicy(model, mode='ode'), self.seeds, self.actions_per_chunk)
        record = {'weights_version': announced.version, 'eval_success': success, 'episodes': len(episodes),
                  'mean_env_steps': sum(e.env_steps for e in episodes) / len(episodes),
                  'eval_s': round(time.perf_counter() - start, 1)}
        # Per seed (in self.seeds order): two versions compare seed by seed, not only rate against rate.
        outcomes = [bool(e.success) for e in episodes]
        self.history.append({**record, 'first_seed': self.seeds[0], 'outcomes': outcomes})
        self.done_versions.add(announced.version)
        atomic_write_text(self.out_dir / 'eval_history.json', json.dumps(self.history, indent=1) + '\n')
        if self.scalars is not None:
            low, high = rate_interval(record['eval_success'], record['episodes'])
            self.scalars.write('eval', {**record, 'success_low95': low, 'success_high95': high}, announced.version)
        self.rate_pub.publish(Float32(data=float(success)))
        self.result_pub.publish(String(data=json.dumps(record)))
        train = []
        if self.learner_history and Path(self.learner_history).exists():
            train = json.loads(Path(self.learner_history).read_text())
        plot_history(train, self.out_dir / 'success.png', eval_history=self.history)
        self.get_logger().info(f'version {announced.version}: ODE success {success:.3f} on {len(episodes)} '
                               f'held-out seeds ({record["eval_s"]:.0f} s)')

    def close(self) -> None:
        self.env.close()
        if self.scalars is not None:
            self.scalars.close()


def main(args: list[str] | None = None) -> int:
    return run_node(ManiSkillEvaluator, args)


if __name__ == '__main__':
    raise SystemExit(main())
