#!/usr/bin/env python3
"""Per-op time shares of a lisa CPU run from `perf script` output (standard library only).

    perf record -e cpu-clock -F 499 --call-graph dwarf,32768 -o perf.data -- <bench>
    perf script -i perf.data -F tid,period,ip,sym | python3 profile_report.py

Prints two tables:
- kernels: the share of all samples (every thread) spent inside each lisa-cpu kernel function
  (`lisa_cpu::<module>::<function>`, its closures included, wherever rayon ran them), counted
  once per sample even when the function appears several times on the stack;
- self time by kind of work: where the CPU actually was (GEMM microkernels, im2col/col2im,
  element-wise, normalisation, reductions, layout copies, memcpy/memset, allocator, thread
  pool waiting, the trainer's own code, other).
"""

from __future__ import annotations

import re
import sys
from collections import Counter

# Self-time kinds, first match wins.
KINDS = [
    ("GEMM (gemm crate microkernels and packing)", r"\bgemm(_common|_f32|_f64)?::|nano_gemm|\bgemm\b"),
    ("im2col / col2im", r"lisa_cpu::conv::(im2col|col2im)"),
    ("convolution, other", r"lisa_cpu::conv::"),
    ("normalisation (group / layer norm)", r"lisa_cpu::norm::"),
    ("element-wise (incl. fused)", r"lisa_cpu::(elementwise|fused)::"),
    ("reductions and sums", r"lisa_cpu::(reduce|sums)::"),
    ("layout (permute, narrow, concat, pad)", r"lisa_cpu::layout::"),
    ("lisa-cpu, other", r"lisa_cpu::"),
    ("memcpy / memset", r"mem(cpy|move|set)|__memcpy|__memset|__memmove"),
    ("allocator (malloc, free)", r"malloc|\bfree\b|_int_free|cfree|realloc|calloc"),
    ("kernel: page faults, mapping fresh memory", r"page_fault|clear_page|handle_mm_fault|do_anonymous|_raw_spin|"
     r"__list_del|rmqueue|get_page_from_freelist|alloc_pages|folio|mmap|munmap|brk|lru|zap_|free_pages|tlb"),
    ("thread pool (rayon, waiting, spinning)", r"rayon|crossbeam|futex|sched_yield|std::thread|pthread|__GI___clone"),
    ("trainer (tape, optimizer, data)", r"lisa_trainer::|lisa_core::"),
]
KIND_RES = [(name, re.compile(pat)) for name, pat in KINDS]
KERNEL = re.compile(r"lisa_cpu::(\w+)::(\w+)")
HEADER = re.compile(r"^\s*(\d+)\s+(\d+)\s*$")


# Frames of the standard library (inlined intrinsics, iterators, pointer writes) stand for the
# caller that inlined them: the self time goes to the first frame outside them.
STD_FRAME = re.compile(r"^<?(core|alloc|std)::|^<(core|alloc|std)::|^<\[|^<&")


def kind_of(frames):
    for sym in frames:
        if STD_FRAME.search(sym):
            continue
        for name, rx in KIND_RES:
            if rx.search(sym):
                return name
        return "other"
    return "other"


def main():
    samples = 0
    weight_total = 0
    self_kinds = Counter()
    inclusive = Counter()
    self_syms = Counter()
    frames = []
    weight = 0

    def flush():
        nonlocal samples, weight_total
        if not frames:
            return
        samples += 1
        weight_total += weight
        self_kinds[kind_of(frames)] += weight
        self_syms[frames[0]] += weight
        keys = set()
        for sym in frames:
            m = KERNEL.search(sym)
            if m:
                keys.add(f"{m.group(1)}::{m.group(2)}")
        for k in keys:
            inclusive[k] += weight

    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            flush()
            frames = []
            continue
        m = HEADER.match(line)
        if m and not line.startswith("\t") and not frames:
            weight = int(m.group(2)) or 1
            continue
        if line.startswith("\t") or line.startswith(" "):
            parts = line.strip().split(None, 1)
            sym = parts[1] if len(parts) > 1 else parts[0]
            sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
            frames.append(sym)
    flush()
    if not weight_total:
        sys.exit("profile_report: no samples in the input (was perf record run with --call-graph?)")

    print(f"{samples} samples\n")
    print("| lisa-cpu kernel (inclusive, all threads) | share |")
    print("|---|---|")
    for k, w in inclusive.most_common():
        if 100 * w / weight_total >= 0.5:
            print(f"| {k} | {100 * w / weight_total:.1f} % |")
    print("\n| self time by kind | share |")
    print("|---|---|")
    for k, w in self_kinds.most_common():
        print(f"| {k} | {100 * w / weight_total:.1f} % |")
    print("\n| hottest functions (self) | share |")
    print("|---|---|")
    for k, w in self_syms.most_common(15):
        short = k if len(k) <= 110 else k[:107] + "..."
        print(f"| `{short}` | {100 * w / weight_total:.1f} % |")


if __name__ == "__main__":
    main()
