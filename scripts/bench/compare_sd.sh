#!/usr/bin/env bash
# lisa's CPU backend against PyTorch + diffusers at the real SD 1.5 size: the ControlNet training
# step of trainer/benches/sd_step.rs and the same step in scripts/bench/torch_sd_step.py, on this
# machine, interleaved (lisa, torch, lisa, torch, ...), one arm per process so that each arm's
# peak resident memory is its own. Random weights, f32, batch 1, 64x64 latents, 77 tokens.
#
#   scripts/bench/compare_sd.sh
#
# Environment:
#   LISA_BENCH_ROUNDS=1     rounds (each = every arm on lisa, then on torch)
#   LISA_BENCH_STEPS=2      timed steps per arm on both sides (the median is reported)
#   LISA_BENCH_ARMS=baseline,lisa
#   LISA_BENCH_THREADS=N    threads for both (default: every CPU)
#   LISA_BENCH_PYTHON=...   a python with torch and diffusers (skips setup.sh)
#   LISA_BENCH_VENV=...     where setup.sh puts its venv (default ~/.cache/lisa-bench-venv)
# Needs about 10 GiB of memory per side (one side runs at a time) and a few minutes per arm
# on two cores. Installs nothing itself except through scripts/bench/setup.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ROUNDS="${LISA_BENCH_ROUNDS:-1}"
STEPS="${LISA_BENCH_STEPS:-2}"
ARMS="${LISA_BENCH_ARMS:-baseline,lisa}"
THREADS="${LISA_BENCH_THREADS:-$(nproc)}"

if [ -n "${LISA_BENCH_PYTHON:-}" ]; then
    PY="$LISA_BENCH_PYTHON"
else
    VENV="${LISA_BENCH_VENV:-$HOME/.cache/lisa-bench-venv}"
    if ! "$VENV/bin/python" -c 'import torch, diffusers' >/dev/null 2>&1; then
        LISA_BENCH_EXTRA="diffusers safetensors" bash "$HERE/setup.sh"
    fi
    PY="$VENV/bin/python"
fi

echo "== machine"
MODEL="$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)"
FLAGS="$(grep -m1 '^flags' /proc/cpuinfo || true)"
has() { case " ${FLAGS#*:} " in *" $1 "*) echo yes ;; *) echo no ;; esac; }
echo "CPU: ${MODEL:-unknown} ($(nproc) CPUs available); avx2 $(has avx2), avx512f $(has avx512f)"
"$PY" -c 'import torch, diffusers; print("torch", torch.__version__, "| diffusers", diffusers.__version__, "| CPU capability", torch.backends.cpu.get_cpu_capability())'
echo "threads: $THREADS on both sides; $STEPS timed step(s) per arm; $ROUNDS round(s); arms $ARMS"

OUT="$(mktemp -d "${TMPDIR:-/tmp}/lisa-sd-bench.XXXXXX")"
echo "raw outputs: $OUT"
echo "== building lisa's sd_step bench (bench profile = release + debug info)"
(cd "$ROOT" && cargo bench -p lisa-trainer --bench sd_step --no-run --message-format=json-render-diagnostics) \
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
    if m.get("reason") == "compiler-artifact" and t.get("name") == "sd_step" and m.get("executable"):
        exe = m["executable"]
print(exe or "")
' "$OUT/build.json")"
[ -x "$BENCH_BIN" ] || { echo "could not find the sd_step bench executable (see $OUT/build.log)"; exit 1; }

for r in $(seq 1 "$ROUNDS"); do
    for arm in ${ARMS//,/ }; do
        echo "== round $r/$ROUNDS, $arm: lisa"
        (cd "$ROOT" && RAYON_NUM_THREADS="$THREADS" LISA_BENCH_STEPS="$STEPS" LISA_BENCH_ARMS="$arm" \
            "$BENCH_BIN" --bench) | tee "$OUT/lisa.$r.$arm.txt" | grep -E 'step|parameters'
        echo "== round $r/$ROUNDS, $arm: torch + diffusers"
        "$PY" "$HERE/torch_sd_step.py" --steps "$STEPS" --arms "$arm" --threads "$THREADS" \
            --json "$OUT/torch.$r.$arm.json" | tee "$OUT/torch.$r.$arm.txt" | grep -E 'step|torch_sd_step'
    done
done

echo "== lisa / torch on: ${MODEL:-unknown}, $THREADS threads (medians; peak resident memory of each process)"
"$PY" - "$OUT" "$ROUNDS" "$ARMS" <<'PY'
import json, re, sys
out, rounds, arms = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
pat = re.compile(r"step\s+([0-9.]+) s .*peak RSS ([0-9.]+) GiB")
print(f"| arm | round | lisa step (s) | torch step (s) | ratio | lisa peak (GiB) | torch peak (GiB) | ratio |")
print("|---|---|---|---|---|---|---|---|")
for r in range(1, rounds + 1):
    for arm in arms:
        m = [pat.search(l) for l in open(f"{out}/lisa.{r}.{arm}.txt")]
        m = [x for x in m if x][-1]
        ls, lp = float(m.group(1)), float(m.group(2))
        t = json.load(open(f"{out}/torch.{r}.{arm}.json"))["arms"][arm]
        ts, tp = t["median_s"], t["peak_gib"]
        print(f"| {arm} | {r} | {ls:.2f} | {ts:.2f} | {ls / ts:.2f} | {lp:.2f} | {tp:.2f} | {lp / tp:.2f} |")
PY
