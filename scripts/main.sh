#!/usr/bin/env bash
# Installs everything (scripts/setup.sh, idempotent) and runs the main job: the PickCube
# learning benchmark (expert demos -> few-shot SFT -> pi-StepNFT online, with both ablations).
# Extra arguments go to bench/learning_pickcube.py, e.g. --rl-minutes 5 --variants stepnft.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"
exec "${STEPNFT_VENV:-$repo/.venv}/bin/python" bench/learning_pickcube.py "$@"
