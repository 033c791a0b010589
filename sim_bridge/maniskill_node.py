"""maniskill_bridge: one ManiSkill3 environment presented as a robot on the standard topics.

The robot-facing behaviour is SimBridge's (sim_bridge/bridge_node.py); this node only reads
the ManiSkill parameters: env_id, control_mode, obs_mode, max_episode_steps, image_size,
reconfigure_on_reset, split (evaluation split, sim_bridge/maniskill_ood.py). Seeds count up
from first_seed (default 1000000: demos use seeds from 0).
"""

from __future__ import annotations

from sim_bridge.bridge_node import BridgeTask, SimBridge
from sim_bridge.maniskill_env import ManiSkillEnv, ManiSkillEnvConfig
from stepnft_ros.nodes.common import Params, run_node


class ManiSkillBridge(SimBridge):
    default_first_seed = 1_000_000

    def __init__(self) -> None:
        super().__init__('maniskill_bridge')

    def read_tasks(self, p: Params) -> list[BridgeTask]:
        self.env_cfg = cfg = ManiSkillEnvConfig(
            env_id=p.get('env_id', 'PickCube-v1'), control_mode=p.get('control_mode', 'pd_ee_delta_pose'),
            obs_mode=p.get('obs_mode', 'state'), max_episode_steps=p.get('max_episode_steps', 100),
            image_size=p.get('image_size', 64), reconfigure_on_reset=p.get('reconfigure_on_reset', True),
            split=p.get('split', 'id'))
        self.split = cfg.split
        return [BridgeTask(label=cfg.env_id, suite=cfg.env_id, instruction=cfg.instruction,
                           make_env=lambda: ManiSkillEnv(cfg))]

    def describe(self) -> str:
        return f'{self.env_cfg.env_id} ({self.env_cfg.obs_mode}, {self.env_cfg.control_mode})'


def main(args: list[str] | None = None) -> int:
    return run_node(ManiSkillBridge, args)


if __name__ == '__main__':
    raise SystemExit(main())
