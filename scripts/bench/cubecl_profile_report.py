#!/usr/bin/env python3
"""Per-kernel GPU time from a cubecl profiling log.

Run any lisa program on a cubecl backend with cubecl's profiler on, for example

    CUBECL_DEBUG_LOG=/tmp/cubecl.log CUBECL_DEBUG_OPTION=profile \\
        LISA_BENCH_BACKEND=cuda LISA_BENCH_ARMS=baseline cargo bench -p lisa-trainer --features cuda --bench step

then `cubecl_profile_report.py /tmp/cubecl.log` collects the logged `| <duration> | <kernel>`
lines per kernel name and prints the kernels by total time: launches, total, mean, median,
share. cubecl times each kernel on its own while profiling, so the durations are the kernels'
own; the wall-clock time of the profiled run is not meaningful.

A kernel's first launch also includes its compilation (NVRTC: tens of milliseconds), which
swamps the total of a kernel launched only a few dozen times. `--robust` ranks by
launches × median instead, which leaves such outliers out; use it to find where a step's time
goes.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+?)\s*$")


def parse(lines) -> dict[str, list[float]]:
    """Seconds of every launch, per kernel name."""
    durations: dict[str, list[float]] = defaultdict(list)
    for line in lines:
        m = LINE.match(line.strip())
        if m:
            durations[m.group(3)].append(float(m.group(1)) * UNITS[m.group(2)])
    return durations


def median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", help="the file named by CUBECL_DEBUG_LOG")
    ap.add_argument("--top", type=int, default=30, help="kernels to list (default 30)")
    ap.add_argument("--width", type=int, default=90, help="kernel name width (default 90)")
    ap.add_argument("--robust", action="store_true", help="rank by launches × median, not the sum")
    args = ap.parse_args()
    with open(args.log, encoding="utf-8", errors="replace") as f:
        durations = parse(f)
    if not durations:
        sys.exit(f"{args.log}: no profiled kernel lines (was CUBECL_DEBUG_OPTION=profile set?)")
    totals = {k: len(d) * median(d) if args.robust else sum(d) for k, d in durations.items()}
    all_s = sum(totals.values())
    launches = sum(len(d) for d in durations.values())
    what = "launches × median" if args.robust else "kernel time"
    print(f"{launches} kernel launches, {len(totals)} kernels, {all_s * 1e3:.1f} ms of {what}")
    print(f"| {'kernel':<{args.width}} | launches | total ms | mean µs | median µs | share |")
    print(f"|{'-' * (args.width + 2)}|---|---|---|---|---|")
    for name in sorted(totals, key=totals.get, reverse=True)[: args.top]:
        d, t = durations[name], totals[name]
        print(
            f"| {short(name, args.width):<{args.width}} | {len(d)} | {t * 1e3:.2f} | "
            f"{sum(d) / len(d) * 1e6:.1f} | {median(d) * 1e6:.1f} | {t / all_s:.1%} |"
        )


if __name__ == "__main__":
    main()
