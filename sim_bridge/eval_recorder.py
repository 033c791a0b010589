"""eval_recorder: gathers the bridges' episode summaries into the evaluation report.

It subscribes to <ns>/episode_summary (std_msgs/String JSON) of every robot namespace in
`robots`, keeps one result per (task, split, seed), and once `expected_episodes` are in writes
`out` (the same JSON as `stepnft eval`, built by sim_bridge.evaluation.aggregate), prints the
table and exits, which ends the eval_sim graph. Malformed summaries are logged and dropped.
"""

from __future__ import annotations

import json
import time

from rclpy.node import Node
from std_msgs.msg import String

from sim_bridge.evaluation import EpisodeResult, aggregate, format_table, write_report
from stepnft_ros import ros_io
from stepnft_ros.nodes.common import ConfigError, Params, finish, run_node


class EvalRecorder(Node):
    def __init__(self) -> None:
        super().__init__('eval_recorder')
        p = Params(self)
        self.out = p.required('out', str)
        self.expected = p.required('expected_episodes', int)
        robots = p.get('robots', ['env0'])
        self.checkpoint = p.get('checkpoint', '')
        self.actions_per_chunk = p.get('actions_per_chunk', 4)
        if self.expected < 1:
            raise ConfigError(f"parameter 'expected_episodes' must be >= 1, got {self.expected}")
        if not robots or len(set(robots)) != len(robots):
            raise ConfigError(f"parameter 'robots' must list distinct namespaces, got {robots}")
        self.results: dict[tuple, EpisodeResult] = {}
        self.finished = False
        self.start = time.perf_counter()
        self.exit_code = 0
        for ns in robots:
            topic = f'/{ns.strip("/")}/{ros_io.EPISODE_SUMMARY}'
            self.create_subscription(String, topic, lambda msg, ns=ns: self._on_summary(ns, msg),
                                     ros_io.SUMMARY_QOS)
        self.get_logger().info(f'waiting for {self.expected} episodes from {robots}; results -> {self.out}')

    def _on_summary(self, ns: str, msg: String) -> None:
        try:
            result = EpisodeResult.from_dict(json.loads(msg.data))
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            self.get_logger().error(f'{ns}: dropped a malformed episode summary: {err}')
            return
        if result.key in self.results:
            self.get_logger().warning(f'{ns}: {result.task} [{result.split}] seed {result.seed} reported twice; '
                                      'kept the first')
            return
        self.results[result.key] = result
        self.get_logger().info(f'{len(self.results)}/{self.expected}: {result.task} [{result.split}] seed '
                               f'{result.seed} {"success" if result.success else "failure"} '
                               f'after {result.env_steps} steps')
        if len(self.results) >= self.expected and not self.finished:
            self._finish()

    def _finish(self) -> None:
        report = aggregate(list(self.results.values()), checkpoint=self.checkpoint,
                           wall_s=time.perf_counter() - self.start, actions_per_chunk=self.actions_per_chunk,
                           source='eval_sim')
        write_report(self.out, report)
        print(format_table(report), flush=True)
        self.get_logger().info(f'all {self.expected} episodes in: success {report["success_rate"]:.3f}; '
                               f'results in {self.out}')
        self.finished = True
        finish(self)


def main(args: list[str] | None = None) -> int:
    return run_node(EvalRecorder, args)


if __name__ == '__main__':
    raise SystemExit(main())
