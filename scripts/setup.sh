#!/usr/bin/env bash
# Installs what the build and tests need on a fresh machine. Idempotent.
set -euo pipefail

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: '$1' not found: $2" >&2; exit 1; }; }
need cargo "install the Rust toolchain (rustup) first"
cargo fmt --version >/dev/null 2>&1 || { echo "setup: rustfmt missing (rustup component add rustfmt)" >&2; exit 1; }
cargo clippy --version >/dev/null 2>&1 || { echo "setup: clippy missing (rustup component add clippy)" >&2; exit 1; }
echo "setup: $(cargo --version), toolchain ready"

# Python's safetensors (+ numpy) for the test that reads our checkpoints the way PyTorch users do.
if ! python3 -c "import safetensors.numpy" >/dev/null 2>&1; then
  python3 -m pip install --quiet safetensors numpy
fi
echo "setup: python safetensors $(python3 -c 'import safetensors; print(safetensors.__version__)')"

# Software Vulkan (lavapipe) so the wgpu backend's tests run on machines without a GPU.
if [ ! -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] && ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
  else
    echo "setup: no apt-get; install Mesa's lavapipe (mesa-vulkan-drivers) and the Vulkan loader yourself" >&2
  fi
fi
ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 && echo "setup: lavapipe (software Vulkan) installed" \
  || echo "setup: lavapipe not installed; wgpu tests will skip (and fail under CI=true)" >&2
