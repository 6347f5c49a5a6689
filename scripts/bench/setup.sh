#!/usr/bin/env bash
# Creates the Python environment of the PyTorch reference benchmarks (torch_toy.py, torch_sd_step.py):
# a venv at ${LISA_BENCH_VENV:-$HOME/.cache/lisa-bench-venv} with torch from PyPI.
# Never run by the tests; compare.sh runs it only when that venv has no torch and
# LISA_BENCH_PYTHON is unset.
#
# Note: PyPI's torch wheel for Linux x86_64 depends on the CUDA libraries (nvidia-* wheels),
# several GB of download and disk, even though the benchmark only uses the CPU. Set
# LISA_BENCH_TORCH_INDEX=https://download.pytorch.org/whl/cpu to install the CPU-only wheel
# instead (much smaller; its `import torch` also leaves a smaller resident set, which matters
# for the peak-RSS comparison: say which one you used when you quote figures).
set -euo pipefail

VENV="${LISA_BENCH_VENV:-$HOME/.cache/lisa-bench-venv}"
PYTHON="${PYTHON:-python3}"
SPEC="${LISA_BENCH_TORCH_SPEC:-torch}"

echo "setup: creating $VENV with $("$PYTHON" --version 2>&1)"
if [ -z "${LISA_BENCH_TORCH_INDEX:-}" ]; then
    echo "setup: installing '$SPEC' from PyPI: this pulls the CUDA libraries too (several GB)."
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if [ -n "${LISA_BENCH_TORCH_INDEX:-}" ]; then
    "$VENV/bin/python" -m pip install "$SPEC" --index-url "$LISA_BENCH_TORCH_INDEX"
else
    "$VENV/bin/python" -m pip install "$SPEC"
fi
# LISA_BENCH_EXTRA: more packages from PyPI (compare_sd.sh asks for diffusers).
if [ -n "${LISA_BENCH_EXTRA:-}" ]; then
    # shellcheck disable=SC2086 # a word list on purpose
    "$VENV/bin/python" -m pip install ${LISA_BENCH_EXTRA}
fi
"$VENV/bin/python" -c 'import torch; print("setup: torch", torch.__version__, "CPU capability", torch.backends.cpu.get_cpu_capability())'
