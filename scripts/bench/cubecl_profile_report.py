#!/usr/bin/env python3
"""Per-kernel GPU time from a cubecl profiling log.

Run any lisa program on a cubecl backend with cubecl's profiler on, for example

    CUBECL_DEBUG_LOG=/tmp/cubecl.log CUBECL_DEBUG_OPTION=profile \\
        LISA_BENCH_BACKEND=cuda LISA_BENCH_ARMS=baseline cargo bench -p lisa-trainer --features cuda --bench step

then `cubecl_profile_report.py /tmp/cubecl.log` sums the logged `| <duration> | <kernel>` lines
per kernel name and prints the kernels by total time: count, total, mean, share. cubecl times each
kernel on its own while profiling, so the durations are the kernels' own; the wall-clock time of
the profiled run is not meaningful.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+?)\s*$")


def parse(lines):
    totals, counts = defaultdict(float), defaultdict(int)
    for line in lines:
        m = LINE.match(line.strip())
        if not m:
            continue
        name = m.group(3)
        totals[name] += float(m.group(1)) * UNITS[m.group(2)]
        counts[name] += 1
    return totals, counts


def short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", help="the file named by CUBECL_DEBUG_LOG")
    ap.add_argument("--top", type=int, default=30, help="kernels to list (default 30)")
    ap.add_argument("--width", type=int, default=90, help="kernel name width (default 90)")
    args = ap.parse_args()
    with open(args.log, encoding="utf-8", errors="replace") as f:
        totals, counts = parse(f)
    if not totals:
        sys.exit(f"{args.log}: no profiled kernel lines (was CUBECL_DEBUG_OPTION=profile set?)")
    all_s = sum(totals.values())
    print(f"{sum(counts.values())} kernel launches, {len(totals)} kernels, {all_s * 1e3:.1f} ms of kernel time")
    print(f"| {'kernel':<{args.width}} | launches | total ms | mean µs | share |")
    print(f"|{'-' * (args.width + 2)}|---|---|---|---|")
    for name in sorted(totals, key=totals.get, reverse=True)[: args.top]:
        t, n = totals[name], counts[name]
        print(f"| {short(name, args.width):<{args.width}} | {n} | {t * 1e3:.2f} | {t / n * 1e6:.1f} | {t / all_s:.1%} |")


if __name__ == "__main__":
    main()
