#!/usr/bin/env bash
# Installs everything (scripts/setup.sh, idempotent) and runs the main job: the train_sim node
# graph (ManiSkill PushCube bridges, policy server, learner, evaluator) on the embedded default
# starting policy, built on first use. Extra arguments go to `stepnft launch train_sim`,
# e.g. --num-envs 4 --run-dir runs/big.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
exec "${STEPNFT_VENV:-$repo/.venv}/bin/stepnft" launch train_sim "$@"
