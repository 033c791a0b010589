"""learner: π-StepNFT updates from the episodes the policy server writes, new weights back to it.

in   /episode_written (std_msgs/String: an episode id; a periodic scan of the store catches any
     notification missed while the learner was down or busy)
out  /policy_weights (std_msgs/String JSON {version, checkpoint}, latched),
     /learner/metrics (std_msgs/String JSON per update), /learner/success_rate (std_msgs/Float32)
files  <work_dir>/checkpoints/vNNNNNN, history.json, success.png, tensorboard/ (train/* scalars per update)

`labels: group_mean` compares episodes that started from the same reset seed. Real arms have no
seeds, so the deploy_real graph sets `seeded_resets: false` and the learner refuses group_mean
there at start-up (exit 2) rather than failing at its first update.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rclpy.node import Node
from std_msgs.msg import Float32, String

from stepnft_ros import ros_io
from stepnft_ros.algo.stepnft import StepNFTConfig
from stepnft_ros.episodes.store import EpisodeStore
from stepnft_ros.learner import Learner, LearnerConfig, plot_history
from stepnft_ros.nodes.common import ConfigError, Params, finish, run_node
from stepnft_ros.policy import CheckpointError


class LearnerNode(Node):
    def __init__(self) -> None:
        super().__init__('learner')
        p = Params(self)
        checkpoint = p.required('checkpoint', str)
        episode_dir = p.required('episode_dir', str)
        self.work_dir = Path(p.required('work_dir', str))
        scan_period_s = p.get('scan_period_s', 2.0)
        device = p.get('device', 'cpu')
        torch.set_num_threads(max(1, p.get('torch_threads', 1)))
        labels = p.get('labels', 'terminal_binary')
        if labels == 'group_mean' and not p.get('seeded_resets', True):
            raise ConfigError("labels 'group_mean' groups episodes by their reset seed, and this graph's robots "
                              "(real arms) have none: use 'terminal_binary' or 'batch_mean'")
        try:
            cfg = LearnerConfig(episodes_per_update=p.get('episodes_per_update', 16),
                                labels=labels,
                                max_version_lag=p.get('max_version_lag', 1), off_policy=p.get('off_policy', 'drop'),
                                stale_weight=p.get('stale_weight', 0.5), max_updates=p.get('max_updates', 0),
                                replay_updates=p.get('replay_updates', 1),
                                seed=p.get('seed', 0), tensorboard=p.get('tensorboard', True),
                                intervention_negatives=p.get('intervention_negatives', True),
                                # > 0: also clone what people did during takeovers (the interventions preset: 1.0)
                                intervention_bc_weight=p.get('intervention_bc_weight', 0.0),
                                # > 1: this node and ranks − 1 worker processes share each update
                                ranks=p.get('ranks', 1))
            algo = StepNFTConfig(lr=p.get('lr', 1e-4), epochs=p.get('epochs', 2),
                                 minibatch_size=p.get('minibatch_size', 4096),
                                 # > 0 for large backbones: forward/backward in micro-batches of this many decisions
                                 microbatch_size=p.get('microbatch_size', 0), beta=p.get('beta', 1.0),
                                 delta_max=p.get('delta_max', 0.5), loss_form=p.get('loss_form', 'ranking'),
                                 target=p.get('target', 'next_step'), lambda_kl=p.get('lambda_kl', 1e-4),
                                 executed_only=p.get('executed_only', True), adam_beta1=p.get('adam_beta1', 0.9),
                                 adam_beta2=p.get('adam_beta2', 0.95), algo=p.get('algo', 'stepnft'),
                                 clip_ratio=p.get('clip_ratio', 0.2), target_kl=p.get('target_kl', 0.0),
                                 holdout_fraction=p.get('holdout_fraction', 0.0))
            self.learner = Learner(self.work_dir, checkpoint, EpisodeStore(episode_dir), cfg, algo, device=device,
                                   log=self.get_logger().info)
        except (ValueError, CheckpointError) as err:
            raise ConfigError(str(err)) from None
        self.weights_pub = self.create_publisher(String, ros_io.POLICY_WEIGHTS, ros_io.LATCHED_QOS)
        self.metrics_pub = self.create_publisher(String, ros_io.LEARNER_METRICS, ros_io.RELIABLE_QOS)
        self.success_pub = self.create_publisher(Float32, ros_io.LEARNER_SUCCESS_RATE, ros_io.RELIABLE_QOS)
        self.create_subscription(String, ros_io.EPISODE_WRITTEN, lambda _: self._poll(), ros_io.EVENTS_QOS)
        self.create_timer(scan_period_s, self._poll)
        self.exit_code = 0
        self._announce()
        self.get_logger().info(f'learning from {episode_dir}: {cfg.episodes_per_update} episodes per update, '
                               f'{algo.epochs} epochs, lr {algo.lr:g}; checkpoints in {self.learner.checkpoints}')
        self._poll()

    def _announce(self) -> None:
        path = self.learner.checkpoint_path().resolve()
        self.weights_pub.publish(ros_io.WeightsAnnouncement(self.learner.version, str(path), final=self.learner.done,
                                                            env_steps=self.learner.env_steps).to_msg())

    def _poll(self) -> None:
        while records := self.learner.poll(max_updates=1):  # announce each version as soon as it exists
            record = records[0]
            self._announce()
            self.metrics_pub.publish(String(data=json.dumps(record)))
            self.success_pub.publish(Float32(data=float(record['train_success'])))
            plot_history(self.learner.history, self.work_dir / 'success.png')
            self.get_logger().info(
                f"update {record['weights_version']}: success {record['train_success']:.2f} over "
                f"{record['episodes']} episodes, loss {record['loss']:.4f}, pref. acc. "
                f"{record.get('preference_accuracy', float('nan')):.2f}, clip {record.get('clip_fraction', 0.0):.2f}, "
                f"{record['episodes_consumed']} episodes consumed, {record['dropped_off_policy']} dropped"
                + (f", BC loss {record['bc_loss']:.4f} on {record['bc_chunks']} human chunks"
                   if 'bc_loss' in record else ''))
        if self.learner.done:
            self.get_logger().info(f'reached max_updates={self.learner.cfg.max_updates}; plot at '
                                   f'{self.work_dir / "success.png"}')
            finish(self)


    def close(self) -> None:
        self.learner.close()


def main(args: list[str] | None = None) -> int:
    return run_node(LearnerNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
