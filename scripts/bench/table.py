#!/usr/bin/env python3
"""Reads the outputs of lisa's Rust step benchmark (`cargo bench -p lisa-trainer --bench step`)
and of torch_toy.py (--json), one pair per round, and prints the comparison table with the
issue's targets. Standard library only; compare.sh calls it.

    python table.py --lisa r1.txt r2.txt --torch r1.json r2.json

Lines read from lisa's output (trainer/benches/step.rs's format; compare.sh runs one arm per
process and concatenates their outputs into one file per round):
    | baseline | 0.123 s | 100 MiB | 120 MiB |
    | LISA | 0.150 s | ... |
    | LISA, sub-batch 16 | 0.140 s | ... |
    | pretraining step | 0.123 s | ... |
    prior pass (main up path, no grad): 12.3 ms
    LISA decoder (forward + backward): 4.5 ms
    DDIM-25 sampling of 64 images: 4.56 s
    peak RSS of arm baseline: 123 MiB           (one per process when it ran one arm)
    peak RSS of the process: 123 MiB            (older outputs: every arm in one process)
"""

from __future__ import annotations

import argparse
import json
import re

NOT_MEASURED = "not measured by lisa's bench yet"
TRAINING_ARMS = ("baseline", "lisa", "lisa_sub16", "prior_pass", "decoder")
LISA_TRAINING_ARMS = ("baseline", "lisa", "lisa_sub16", "parts")


def seconds(value, unit):
    return float(value) * (1e-3 if unit == "ms" else 1.0)


def parse_lisa(text):
    out = {}
    rows = {
        "baseline": r"^\|\s*baseline\s*\|\s*([0-9.]+)\s*(s|ms)\s*\|\s*(\d+) MiB\s*\|\s*(\d+) MiB",
        "lisa": r"^\|\s*LISA\s*\|\s*([0-9.]+)\s*(s|ms)\s*\|\s*(\d+) MiB\s*\|\s*(\d+) MiB",
        "lisa_sub16": r"^\|\s*LISA, sub-batch 16\s*\|\s*([0-9.]+)\s*(s|ms)\s*\|\s*(\d+) MiB\s*\|\s*(\d+) MiB",
        "pretrain": r"^\|\s*pretrain[^|]*\|\s*([0-9.]+)\s*(s|ms)\s*\|",
    }
    lines = {
        "prior_pass": r"^prior pass[^:]*:\s*([0-9.]+)\s*(ms|s)\b",
        "decoder": r"^LISA decoder[^:]*:\s*([0-9.]+)\s*(ms|s)\b",
        "pretrain": r"^pretrain[^:|]*:\s*([0-9.]+)\s*(ms|s)\b",
        "sample": r"^DDIM-25 sampling[^:]*:\s*([0-9.]+)\s*(ms|s)\b",
    }
    for line in text.splitlines():
        line = line.strip()
        for key, pat in rows.items():
            m = re.match(pat, line)
            if m:
                out[key] = seconds(m.group(1), m.group(2))
                if m.lastindex and m.lastindex >= 4:
                    out[f"{key}_rss_after_warmup_mib"] = int(m.group(3))
                    out[f"{key}_rss_end_mib"] = int(m.group(4))
        for key, pat in lines.items():
            m = re.match(pat, line)
            if m and key not in out:
                out[key] = seconds(m.group(1), m.group(2))
        m = re.match(r"^LISA / baseline, paired steps:\s*([0-9.]+)", line)
        if m:
            out["pair"] = float(m.group(1))
        m = re.match(r"^peak RSS of arm (\w+):\s*(\d+) MiB", line)
        if m:
            out[f"{m.group(1)}_peak_rss_mib"] = int(m.group(2))
        m = re.match(r"^peak RSS of the process:\s*(\d+) MiB", line)
        if m:
            out["process_peak_rss_mib"] = max(out.get("process_peak_rss_mib", 0), int(m.group(1)))
        m = re.match(r"^reference toy configuration, (.*)$", line)
        if m:
            out.setdefault("header", m.group(1))
    # The training arms' peak: the largest per-arm peak ("parts" = prior pass + decoder), or, for
    # an output of every arm in one process, that process's peak.
    peaks = [out[f"{k}_peak_rss_mib"] for k in LISA_TRAINING_ARMS if f"{k}_peak_rss_mib" in out]
    if peaks:
        out["peak_rss_mib"] = max(peaks)
    elif "process_peak_rss_mib" in out:
        out["peak_rss_mib"] = out["process_peak_rss_mib"]
    return out




def parse_torch(path):
    with open(path) as f:
        data = json.load(f)
    out = {"_env": data.get("environment", {}), "_params": data.get("params", {})}
    res = data["results"]
    for k, r in res.items():
        out[k] = r.get("paired_ratio", r["median_s"])
        out[f"{k}_peak_rss_mib"] = r["peak_rss_kib"] / 1024
        out[f"{k}_rss_after_import_mib"] = r["rss_after_import_kib"] / 1024
        out[f"{k}_rss_end_mib"] = r["rss_end_kib"] / 1024
    peaks = [res[k]["peak_rss_kib"] / 1024 for k in TRAINING_ARMS if k in res]
    if peaks:
        out["peak_rss_mib"] = max(peaks)
    imports = [r["rss_after_import_kib"] / 1024 for r in res.values()]
    if imports:
        out["rss_after_import_mib"] = min(imports)
    return out


def agg(rounds, key):
    """The best (smallest) of the per-round medians: interference from other work on the
    machine only ever slows a round down, so the fastest round is the least disturbed one."""
    vals = [r[key] for r in rounds if key in r]
    return (min(vals), vals) if vals else (None, [])


def median_of(rounds, key):
    """The median over rounds (for ratios measured within one process: no side is favoured
    by the least disturbed round, so the rounds' middle value is reported)."""
    vals = sorted(r[key] for r in rounds if key in r)
    if not vals:
        return None, []
    mid = len(vals) // 2
    return (vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2), vals


SPREAD_WARN = 0.10


def fmt_time(s):
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1.0 else f"{s:.3f} s"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lisa", nargs="+", required=True)
    ap.add_argument("--torch", nargs="+", required=True)
    args = ap.parse_args()
    lisa = [parse_lisa(open(p).read()) for p in args.lisa]
    torch = [parse_torch(p) for p in args.torch]
    n = len(lisa)

    print(f"\nbest of {n} round(s) of each side's median step (rounds interleaved: lisa, torch, ...)")
    if lisa and "header" in lisa[0]:
        print(f"lisa bench: {lisa[0]['header']}")
    env = torch[0]["_env"] if torch else {}
    print(f"torch: {env.get('torch')}, CPU capability {env.get('torch_cpu_capability')}, "
          f"{env.get('threads_used', env.get('threads'))} threads")
    print()
    print("| measurement | lisa | torch | ratio lisa/torch | target | met |")
    print("|---|---|---|---|---|---|")

    def row(label, key, target=None, limit=None):
        lv, _ = agg(lisa, key)
        tv, _ = agg(torch, key)
        ratio = lv / tv if (lv is not None and tv) else None
        met = "-"
        if limit is not None and ratio is not None:
            met = "yes" if ratio <= limit else "NO"
        lcell = fmt_time(lv) if lv is not None else NOT_MEASURED
        rcell = f"{ratio:.2f}×" if ratio is not None else "-"
        print(f"| {label} | {lcell} | {fmt_time(tv)} | {rcell} | {target or ''} | {met} |")
        return lv, tv

    lb, tb = row("baseline step (batch 32)", "baseline", "≤ 1.0× torch", 1.0)
    ll, tl = row("LISA step (batch 32, λ 0.2)", "lisa")
    if lb and ll:
        own = ll / lb
        tl_own = (tl / tb) if (tl and tb) else None
        tcell = f"{tl_own:.3f}" if tl_own is not None else "-"
        print(f"| LISA step / own baseline, best of separate runs | {own:.3f} | {tcell} | - | | |")
    lp, lps = median_of(lisa, "pair")
    tp, tps = median_of(torch, "pair")
    if lp is not None:
        tcell = f"{tp:.3f}" if tp is not None else "-"
        print(f"| LISA step / own baseline, paired steps | {lp:.3f} | {tcell} | - | lisa ≤ 1.25 | "
              f"{'yes' if lp <= 1.25 else 'NO'} |")
    elif lb and ll:
        print(f"| LISA step / own baseline (no paired run: separate runs) | {ll / lb:.3f} | - | - | "
              f"lisa ≤ 1.25 | {'yes' if ll / lb <= 1.25 else 'NO'} |")
    row("LISA step, sub-batch 16", "lisa_sub16")
    row("prior pass (main up path, no grad)", "prior_pass")
    row("LISA decoder forward + backward", "decoder")
    row("prior pretraining step (batch 32)", "pretrain", "≤ 1.0× torch", 1.0)
    row("DDIM-25 sampling, 64 images", "sample", "≤ 1.0× torch", 1.0)

    def rss_row(label, lisa_key, torch_key):
        lp, _ = agg(lisa, lisa_key)
        tp, _ = agg(torch, torch_key)
        if lp is not None and tp:
            r = lp / tp
            print(f"| peak RSS, {label} | {lp:.0f} MiB | {tp:.0f} MiB | {r:.2f}× | ≤ 1/3 of torch | "
                  f"{'yes' if r <= 1 / 3 else 'NO'} |")
        else:
            print(f"| peak RSS, {label} | {NOT_MEASURED if lp is None else f'{lp:.0f} MiB'} | "
                  f"{'-' if tp is None else f'{tp:.0f} MiB'} | - | ≤ 1/3 of torch | - |")

    rss_row("training arms", "peak_rss_mib", "peak_rss_mib")
    rss_row("pretraining", "pretrain_peak_rss_mib", "pretrain_peak_rss_mib")
    rss_row("sampling", "sample_peak_rss_mib", "sample_peak_rss_mib")

    print("\nNotes:")
    print("- Peak RSS: each measurement runs in its own process on both sides (lisa: VmHWM, torch:")
    print("  ru_maxrss); 'training arms' is the largest over baseline, LISA, sub-batch 16, prior pass and")
    print("  decoder. torch's figures include the resident set of `import torch`: each arm ran in")
    ti, _ = agg(torch, "rss_after_import_mib")
    if ti is not None:
        print(f"  its own subprocess; {ti:.0f} MiB of it is `import torch` alone (RSS before any model).")
    else:
        print("  its own subprocess.")
    print("- 'LISA step / own baseline' in the torch column is torch's own LISA/baseline ratio. 'paired")
    print("  steps': both trainers in one process, baseline and LISA steps alternated, the median over")
    print("  pairs of their ratio, then the median over rounds; this is the figure held to the target,")
    print("  as it is free of the drift between separate runs ('best of separate runs' is kept beside it).")

    noisy = []
    for side, rounds in (("lisa", lisa), ("torch", torch)):
        for k in ("baseline", "lisa", "lisa_sub16", "prior_pass", "decoder", "pretrain", "sample"):
            _, vals = agg(rounds, k)
            if len(vals) > 1 and max(vals) > (1 + SPREAD_WARN) * min(vals):
                noisy.append(f"{side} {k} ({', '.join(fmt_time(v) for v in vals)})")
    if noisy:
        print(f"- WARNING: rounds disagree by more than {SPREAD_WARN:.0%} (the machine was not quiet?): "
              + "; ".join(noisy))

    print("\nPer round (lisa | torch):")
    keys = ["baseline", "lisa", "lisa_sub16", "prior_pass", "decoder", "pretrain", "sample"]
    for i in range(max(len(lisa), len(torch))):
        parts = []
        for k in keys:
            lv = lisa[i].get(k) if i < len(lisa) else None
            tv = torch[i].get(k) if i < len(torch) else None
            parts.append(f"{k} {fmt_time(lv)} | {fmt_time(tv)}")
        lr = lisa[i].get("pair") if i < len(lisa) else None
        tr = torch[i].get("pair") if i < len(torch) else None
        if lr is not None or tr is not None:
            parts.append(f"LISA/baseline paired {'-' if lr is None else f'{lr:.3f}'} | "
                         f"{'-' if tr is None else f'{tr:.3f}'}")
        lp = lisa[i].get("peak_rss_mib") if i < len(lisa) else None
        tp = torch[i].get("peak_rss_mib") if i < len(torch) else None
        parts.append(f"peak RSS {lp if lp is not None else '-'} | {f'{tp:.0f}' if tp else '-'} MiB")
        print(f"  round {i + 1}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
