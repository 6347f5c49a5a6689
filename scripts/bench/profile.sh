#!/usr/bin/env bash
# Where a toy training step spends its time on the CPU backend: perf samples of one arm of the
# step benchmark (trainer/benches/step.rs), summarised per lisa-cpu kernel and per kind of work.
#
#   scripts/bench/profile.sh            # the LISA step (default arm: lisa)
#   scripts/bench/profile.sh baseline   # any arm of LISA_BENCH_ARMS: baseline, lisa, pretrain, sample, ...
#
# Needs `perf` (linux-perf) and permission to profile one's own processes
# (kernel.perf_event_paranoid <= 2). LISA_BENCH_STEPS (default 8) steps, warm-up included.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ARM="${1:-lisa}"
command -v perf >/dev/null || { echo "profile.sh: perf not found (apt-get install linux-perf)" >&2; exit 1; }

OUT="$(mktemp -d "${TMPDIR:-/tmp}/lisa-profile.XXXXXX")"
(cd "$ROOT" && cargo bench -p lisa-trainer --bench step --no-run --message-format=json) >"$OUT/build.json" \
    2>"$OUT/build.log" || { tail -30 "$OUT/build.log"; exit 1; }
BIN="$(python3 -c '
import json, sys
exe = ""
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and (m.get("target") or {}).get("name") == "step" and m.get("executable"):
        exe = m["executable"]
print(exe)' "$OUT/build.json")"
[ -x "$BIN" ] || { echo "profile.sh: no step bench executable (see $OUT/build.log)" >&2; exit 1; }

echo "CPU: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(nproc) CPUs;" \
    "avx512f $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no); arm $ARM"
(cd "$ROOT" && LISA_BENCH_ARMS="$ARM" LISA_BENCH_STEPS="${LISA_BENCH_STEPS:-8}" \
    perf record -q -e cpu-clock -F 499 --call-graph dwarf,32768 -o "$OUT/perf.data" -- "$BIN" --bench) \
    | grep -E '^\| [A-Za-z]' | grep -v '^| arm' || true
perf script -i "$OUT/perf.data" -F tid,period,ip,sym 2>/dev/null | python3 "$HERE/profile_report.py"
rm -rf "$OUT"
