"""libero_bridge: LIBERO tasks presented as a robot on the standard topics (SimBridge).

Parameters: suite (libero_spatial, libero_object, libero_goal, libero_10) and task_id, or
task_ids (a list of ids of `suite`, or "suite/id" strings) with episodes_per_task for an
evaluation sweep (the tasks run one after another; the node exits when all are done);
first_seed (first benchmark init state, per task), obs_mode (rgb: agentview and wrist
cameras; state), image_size, max_episode_steps (0: the suite's usual cap), settle_steps,
hard_reset (false: ~4x faster resets, trajectories no longer bit-exact per seed); and
SimBridge's actions_per_chunk, request_timeout_s, max_episodes, publish_clock.
"""

from __future__ import annotations

from array import array

from sim_bridge.bridge_node import BridgeTask, SimBridge
from sim_bridge.libero_env import LiberoEnv, LiberoEnvConfig, suite_tasks
from stepnft_ros.nodes.common import Params, run_node


def parse_task_ids(entries, suite: str) -> list[tuple[str, int]]:
    """[3, 4] or ['3', 'libero_goal/4'] -> [(suite, 3), ('libero_goal', 4)] (ranges checked later)."""
    out = []
    for entry in entries:
        if isinstance(entry, str):
            task_suite, _, ident = entry.rpartition('/')
            if not ident.strip().isdigit():
                raise ValueError(f"task_ids entry {entry!r} is neither a task id nor 'suite/id'")
            out.append((task_suite or suite, int(ident)))
        elif isinstance(entry, int) and not isinstance(entry, bool):
            out.append((suite, entry))
        else:
            raise ValueError(f'task_ids entry {entry!r} is neither a task id nor a "suite/id" string')
    return out


class LiberoBridge(SimBridge):
    default_first_seed = 0

    def __init__(self) -> None:
        super().__init__('libero_bridge')

    def read_tasks(self, p: Params) -> list[BridgeTask]:
        suite = p.get('suite', 'libero_spatial')
        task_id = p.get('task_id', 0)
        # Either integers or strings: declared with dynamic typing so both forms load.
        listed = p.untyped('task_ids')
        episodes_per_task = p.get('episodes_per_task', 0)
        common = dict(obs_mode=p.get('obs_mode', 'rgb'), image_size=p.get('image_size', 128),
                      max_episode_steps=p.get('max_episode_steps', 0) or None,
                      settle_steps=p.get('settle_steps', 10), hard_reset=p.get('hard_reset', True))
        entries = [] if listed is None else list(listed) if isinstance(listed, (list, tuple, array)) else [listed]
        pairs = parse_task_ids(entries, suite) if entries else [(suite, task_id)]
        if episodes_per_task < 0 or (len(pairs) > 1 and episodes_per_task == 0):
            raise ValueError(f"parameter 'episodes_per_task' must be >= 1 when task_ids lists several tasks, "
                             f'got {episodes_per_task}')
        configs = [LiberoEnvConfig(suite=s, task_id=t, **common) for s, t in pairs]  # ValueError -> exit 2
        instructions = {s: {i: language for i, _, language in suite_tasks(s)} for s in {c.suite for c in configs}}
        return [BridgeTask(label=c.label, suite=c.suite, instruction=instructions[c.suite][c.task_id],
                           make_env=lambda c=c: LiberoEnv(c), episodes=episodes_per_task) for c in configs]

    def describe(self) -> str:
        cfg = self.env.cfg
        return (f'{cfg.label} ({cfg.obs_mode}, {cfg.max_episode_steps} steps, init states from '
                f'{self.first_seed} of {self.env.num_init_states})')


def main(args: list[str] | None = None) -> int:
    return run_node(LiberoBridge, args)


if __name__ == '__main__':
    raise SystemExit(main())
