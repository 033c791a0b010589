#!/usr/bin/env bash
# Installs everything (scripts/setup.sh, idempotent) and runs the whole test suite.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
# Tests talk over loopback only, and ROS logs stay out of $HOME.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_LOG_DIR="${ROS_LOG_DIR:-$repo/runs/ros_log}"
# The tests' models are tiny: one intra-op thread each; OpenMP threads spinning against the node
# processes of the ROS tests cost far more than they gain (on a busy 2-core machine, 50x).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${STEPNFT_VENV:-$repo/.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
