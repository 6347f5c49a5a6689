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
