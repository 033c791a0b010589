#!/usr/bin/env bash
# Downloads the wheels bench/gpu_check.py needs on a GPU host that already has a CUDA PyTorch (and numpy,
# safetensors, pandas, pyarrow, PyYAML, ...) but no network, possibly with another Python than this one.
# The versions are the ones this project's venv resolved (run scripts/setup.sh first), so the host runs
# what the tests here ran. On the host, in a checkout of this repo:
#   python3 -m pip install --no-index --no-deps <dir>/*.whl
#   PYTHONPATH=$PWD python3 bench/gpu_check.py
# Usage: scripts/gpu_host_wheels.sh <dir> [python version of the host, default 3.12] [what: vla,mujoco,ros]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_python="${STEPNFT_VENV:-$repo/.venv}/bin/python"
dest="${1:?usage: $0 <dir> [python version] [vla,mujoco,ros]}"
pyver="${2:-3.12}"
what="${3:-vla,mujoco,ros}"
[ -x "$venv_python" ] || { echo "no venv at $venv_python: run scripts/setup.sh first" >&2; exit 2; }

# LeRobot's SmolVLA path and what it imports that a CUDA PyTorch image usually lacks (transformers and
# huggingface_hub at the versions LeRobot 0.4.4 accepts, which such images often carry newer)
vla=(lerobot transformers huggingface-hub tokenizers datasets deepdiff orderly-set diffusers draccus mergedeep
     pyserial pydantic pydantic-core typing-inspection defusedxml av num2words multiprocess dill)
mujoco=(mujoco PyOpenGL)  # the EGL check (LIBERO's renderer)
ros=(rosbags apsw ruamel.yaml lz4 backports.zstd lark-parser)  # with every ros-* wheel of the venv (ROS 2 Kilted)

pinned() {  # name==version as this venv has it
  { "$venv_python" -m pip show "$1" 2>/dev/null || true; } | awk -v n="$1" '/^Version:/ {print n "==" $2}'
}
wanted=()
[[ ",$what," == *,vla,* ]] && for p in "${vla[@]}"; do wanted+=("$(pinned "$p")"); done
[[ ",$what," == *,mujoco,* ]] && for p in "${mujoco[@]}"; do wanted+=("$(pinned "$p")"); done
if [[ ",$what," == *,ros,* ]]; then
  for p in "${ros[@]}"; do wanted+=("$(pinned "$p")"); done
  # runtime only: the rosidl generators and CMake helpers build messages, which the wheels already hold
  while read -r spec; do wanted+=("$spec"); done < <("$venv_python" -m pip list --format=freeze 2>/dev/null |
    grep -i '^ros-' | grep -viE 'ament-cmake|rosidl-generator-(c|cpp|type-description)==|rosidl-cmake|rmw-implementation-cmake|rosidl-cli')
fi
for spec in "${wanted[@]}"; do
  [ -n "$spec" ] || { echo "a package above is not installed in $venv_python" >&2; exit 2; }
done
mkdir -p "$dest"
platforms=()
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
           manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 any; do
  platforms+=(--platform "$tag")
done
"$venv_python" -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dest" "${wanted[@]}"
echo "$(ls "$dest" | wc -l) wheels in $dest ($(du -sh "$dest" | cut -f1))"
