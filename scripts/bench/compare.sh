#!/usr/bin/env bash
# lisa's CPU backend against a PyTorch reference of the same toy model and step, on this
# machine, interleaved (lisa, torch, lisa, torch, ...), with the ratios and the issue's targets.
#
#   scripts/bench/compare.sh
#
# Environment:
#   LISA_BENCH_ROUNDS=2     rounds (each = one lisa bench run + one torch run)
#   LISA_BENCH_K=10         timed steps per measurement on both sides (after 3 warm-up steps)
#   LISA_BENCH_SAMPLE_REPEATS=3   timed DDIM-25 runs of 64 images on both sides
#   LISA_BENCH_THREADS=N    threads for both (default: every CPU; lisa via RAYON_NUM_THREADS)
#   LISA_BENCH_PYTHON=...   a python with torch (skips setup.sh), e.g. /work/pyref/bin/python
#   LISA_BENCH_VENV=...     where setup.sh puts its venv (default ~/.cache/lisa-bench-venv)
# Installs nothing itself: without LISA_BENCH_PYTHON and without a venv holding torch, it runs
# scripts/bench/setup.sh (PyPI's torch, which pulls several GB of CUDA libraries).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ROUNDS="${LISA_BENCH_ROUNDS:-2}"
K="${LISA_BENCH_K:-10}"
WARMUP=3 # benches/step.rs warms up min(3, steps - 1) steps
SAMPLE_REPEATS="${LISA_BENCH_SAMPLE_REPEATS:-3}"
THREADS="${LISA_BENCH_THREADS:-$(nproc)}"

if [ -n "${LISA_BENCH_PYTHON:-}" ]; then
    PY="$LISA_BENCH_PYTHON"
else
    VENV="${LISA_BENCH_VENV:-$HOME/.cache/lisa-bench-venv}"
    if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
        bash "$HERE/setup.sh"
    fi
    PY="$VENV/bin/python"
fi

echo "== machine"
MODEL="$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)"
FLAGS="$(grep -m1 '^flags' /proc/cpuinfo || true)"
has() { case " ${FLAGS#*:} " in *" $1 "*) echo yes ;; *) echo no ;; esac; }
echo "CPU: ${MODEL:-unknown} ($(nproc) CPUs available, $(lscpu | sed -n 's/^Thread(s) per core:[[:space:]]*//p') thread(s) per core)"
echo "ISA: avx2 $(has avx2), fma $(has fma), avx512f $(has avx512f), avx512_bf16 $(has avx512_bf16), amx_tile $(has amx_tile)"
echo "hypervisor: $(lscpu | sed -n 's/^Hypervisor vendor:[[:space:]]*//p' | head -1)"
echo "kernel: $(uname -sr); rustc: $(rustc --version 2>/dev/null || echo '?')"
if grep -q 'x86-v4' "$ROOT/Cargo.toml" "$ROOT/backends/cpu/Cargo.toml" 2>/dev/null; then
    echo "lisa GEMM: gemm crate with x86-v4 (AVX-512 microkernels)"
else
    echo "lisa GEMM: gemm crate without its x86-v4 feature (AVX2/FMA microkernels, even on AVX-512 CPUs)"
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "| CPU capability", torch.backends.cpu.get_cpu_capability(), "| oneDNN", torch.backends.mkldnn.is_available())'
echo "threads: $THREADS on both sides; K = $K timed steps after $WARMUP warm-up steps; $ROUNDS round(s)"

# Share of the CPUs busy during one second (other work on the machine skews both sides, torch's
# OpenMP threads far more than lisa's rayon pool: run this on a quiet machine).
busy() {
    local a b
    read -r -a a < <(grep '^cpu ' /proc/stat)
    sleep 1
    read -r -a b < <(grep '^cpu ' /proc/stat)
    local total=0 i
    for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
    local idle=$((b[4] - a[4] + b[5] - a[5]))
    echo $(((100 * (total - idle)) / (total > 0 ? total : 1)))
}
quiet_note() {
    local pct
    pct="$(busy)"
    if [ "$pct" -gt 10 ]; then
        echo "  WARNING: the CPUs were ${pct}% busy just before this run: the machine is not quiet"
    else
        echo "  (CPUs ${pct}% busy just before this run)"
    fi
}

OUT="$(mktemp -d "${TMPDIR:-/tmp}/lisa-bench.XXXXXX")"
echo "raw outputs: $OUT"

echo "== building lisa's step bench (bench profile = release + debug info)"
# Built once with cargo, then run directly (as `cargo bench` runs it, with --bench): cargo is not
# held during the rounds, so its build-directory lock does not block another cargo meanwhile.
(cd "$ROOT" && cargo bench -p lisa-trainer --bench step --no-run --message-format=json-render-diagnostics) \
    >"$OUT/build.json" 2>"$OUT/build.log" || {
    tail -30 "$OUT/build.log"
    exit 1
}
BENCH_BIN="$("$PY" -c '
import json, sys
exe = None
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target") or {}
    if m.get("reason") == "compiler-artifact" and t.get("name") == "step" and "bench" in t.get("kind", []) and m.get("executable"):
        exe = m["executable"]
print(exe or "")
' "$OUT/build.json")"
[ -x "$BENCH_BIN" ] || { echo "could not find the step bench executable (see $OUT/build.log)"; exit 1; }
echo "lisa bench: $BENCH_BIN"

echo "== parameter counts"
"$PY" "$HERE/torch_toy.py" --check-prior "$ROOT/assets/prior.safetensors" | tail -1
"$PY" -B -c "import sys; sys.path.insert(0, '$HERE'); import torch_toy; torch_toy.param_report()"

LISA_FILES=()
TORCH_FILES=()
for r in $(seq 1 "$ROUNDS"); do
    echo "== round $r/$ROUNDS: lisa"
    quiet_note
    # One process per arm, so that each arm's peak RSS is its own (as torch_toy.py does).
    : >"$OUT/lisa.$r.txt"
    for arm in baseline lisa lisa_sub16 pair parts pretrain sample; do
        (cd "$ROOT" && RAYON_NUM_THREADS="$THREADS" LISA_BENCH_STEPS=$((K + WARMUP)) LISA_BENCH_ARMS=$arm \
            LISA_BENCH_SAMPLE_REPEATS="$SAMPLE_REPEATS" "$BENCH_BIN" --bench) >"$OUT/lisa.$r.$arm.txt" \
            2>"$OUT/lisa.$r.$arm.err" || {
            cat "$OUT/lisa.$r.$arm.txt"
            tail -30 "$OUT/lisa.$r.$arm.err"
            exit 1
        }
        cat "$OUT/lisa.$r.$arm.txt" >>"$OUT/lisa.$r.txt"
        grep -E '^\| [A-Za-z]|peak RSS of arm' "$OUT/lisa.$r.$arm.txt" | grep -v '^| arm' | sed 's/^/  /'
    done
    echo "== round $r/$ROUNDS: torch"
    quiet_note
    "$PY" "$HERE/torch_toy.py" --steps "$K" --warmup "$WARMUP" --sample-repeats "$SAMPLE_REPEATS" \
        --threads "$THREADS" --only baseline,lisa,lisa_sub16,pair,prior_pass,decoder,pretrain,sample \
        --json "$OUT/torch.$r.json" | grep -E '^  ' || true
    [ -s "$OUT/torch.$r.json" ] || { echo "torch run $r failed"; exit 1; }
    LISA_FILES+=("$OUT/lisa.$r.txt")
    TORCH_FILES+=("$OUT/torch.$r.json")
done

echo "== comparison on: ${MODEL:-unknown}, avx2 $(has avx2), avx512f $(has avx512f), $THREADS threads"
"$PY" "$HERE/table.py" --lisa "${LISA_FILES[@]}" --torch "${TORCH_FILES[@]}"
