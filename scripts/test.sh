#!/usr/bin/env bash
# The project's test command (README): every test, the no_std proof, the examples, the docs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Everything the tests need (idempotent): a fresh machine needs only this script.
bash scripts/setup.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# wgpu runs on lavapipe (software Vulkan) where there is no GPU; cuda is compiled and its
# suite is reported as ignored without a driver (run it on a GPU machine with LISA_REQUIRE_CUDA=1,
# or its binary with -- --include-ignored).
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

echo "== unit, property and integration tests (workspace, every backend compiled in)"
cargo test --workspace --all-targets --all-features 2>&1 | tee "$log"
cargo test --workspace --doc --all-features 2>&1 | tee -a "$log"

echo "== no_std proof: lisa-core as a #![no_std] staticlib with its own panic handler"
cargo build --release --manifest-path tests/no-std-check/Cargo.toml --target-dir target/no-std

echo "== examples"
cargo run --release -q -p lisa-examples --example embed_core
# Its own workspace (candle stays out of the main one's builds), with its own target folder.
cargo run -q --manifest-path examples/embed-candle/Cargo.toml --target-dir target/embed-candle
cargo run -q --all-features -p lisa-examples --example swap_backends
# Four LISA steps of the toy through the library alone (the dev profile: a smoke run).
cargo run -q -p lisa-examples --example train_toy -- 4 target/example-train-toy

echo "== install: an installed lisa runs the demo from an empty folder (README)"
cargo install -q --locked --debug --path cli --root target/install --target-dir target
lisa_bin="$PWD/target/install/bin/lisa"
(cd "$(mktemp -d)" && "$lisa_bin" demo --max-train-steps 1 --validation-steps 1 --output-dir out >/dev/null)

echo "== docs (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features -q

# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) s += $(i-1) } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
