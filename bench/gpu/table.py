#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""One table from bench/gpu/check.sh's outputs, with issue 5's two targets evaluated.

Reads (each optional; what is missing is said, the rest still printed):
  --steps  a file of `name<TAB>status<TAB>seconds<TAB>note` lines (check.sh's step log)
  --bench  Google Benchmark JSON of bench_cuda_mla_decode (--benchmark_out_format=json); with
           repetitions, the median aggregate of each benchmark is used
  --torch  the JSON that bench/gpu/torch_mla_decode.py --json writes

Prints Markdown: the steps, the two measured roofs, one row per decode shape (daedalus time,
GB/s, TFLOP/s, % of the measured copy bandwidth, % of the measured bf16 GEMM rate, PyTorch time,
speed-up), then the targets over the large-batch rows (batch >= 64, Tiny rows excluded):
  16 heads:  >= 70% of the measured copy bandwidth
  128 heads: >= 30% of the measured bf16 GEMM rate and >= 3x the PyTorch baseline
"""

import argparse
import json
import os
import sys

UNIT_TO_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
LARGE_BATCH = 64


def load_json(path, what, problems):
    if not path:
        return None
    if not os.path.exists(path):
        problems.append(f"{what}: {path} does not exist")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        problems.append(f"{what}: {path} could not be read ({error})")
        return None


def pick_runs(bench):
    """One entry per benchmark: the median aggregate, else the mean of its plain runs."""
    medians, plain, errors = {}, {}, {}
    for entry in bench.get("benchmarks", []):
        name = entry.get("run_name", entry.get("name", "?"))
        if entry.get("error_occurred"):
            errors[name] = entry.get("error_message", "error")
            continue
        if entry.get("run_type") == "aggregate":
            if entry.get("aggregate_name") == "median":
                medians[name] = entry
        else:
            plain.setdefault(name, []).append(entry)
    picked = dict(medians)
    for name, runs in plain.items():
        if name in picked:
            continue
        merged = dict(runs[0])
        for key, value in runs[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = sum(run.get(key, 0) for run in runs) / len(runs)
        picked[name] = merged
    return picked, errors


def time_us(entry):
    return entry["real_time"] * UNIT_TO_US.get(entry.get("time_unit", "ns"), 1e-3)


def shape_key(row):
    return (int(row["heads"]), int(row["batch"]), int(row["ctx"]), int(row["q_len"]),
            int(row["varlen"]))


def fmt(value, spec, missing="–"):
    return missing if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps")
    parser.add_argument("--bench")
    parser.add_argument("--torch")
    args = parser.parse_args()
    problems = []

    if args.steps and os.path.exists(args.steps):
        print("| step | status | seconds | note |\n|---|---|---:|---|")
        with open(args.steps, encoding="utf-8") as f:
            for line in f:
                parts = (line.rstrip("\n").split("\t") + ["", "", "", ""])[:4]
                print(f"| {parts[0]} | {parts[1]} | {parts[2]} | {parts[3]} |")
        print()

    bench = load_json(args.bench, "benchmark JSON", problems)
    torch_data = load_json(args.torch, "PyTorch JSON", problems)

    torch_rows = {}
    if torch_data:
        for row in torch_data.get("rows", []):
            if "median_us" in row:
                torch_rows[shape_key(row)] = row["median_us"]
            else:
                problems.append(f"PyTorch {shape_key(row)}: {row.get('error', 'no time')}")

    rows = []
    copy_bw = gemm_rate = None
    if bench:
        context = bench.get("context", {})
        picked, errors = pick_runs(bench)
        try:
            copy_bw = float(context["copy_bytes_per_second"])
            gemm_rate = float(context["gemm_flops_per_second"])
        except (KeyError, ValueError):
            problems.append("benchmark JSON: no measured roofs in its context")
        device = context.get("device", "?")
        print(f"Device: {device}; run {context.get('date', '?')}; "
              f"PyTorch {torch_data.get('torch', '?') if torch_data else 'not run'}\n")
        print("| roof | measured at start | benchmark row (median) |\n|---|---:|---:|")
        copy_row = next((e for n, e in picked.items() if n.startswith("BM_copy_bandwidth")),
                        None)
        gemm_row = next((e for n, e in picked.items() if n.startswith("BM_cublas_bf16_gemm")),
                        None)
        print(f"| copy bandwidth (read + write), GB/s | "
              f"{fmt(copy_bw and copy_bw * 1e-9, '.0f')} | "
              f"{fmt(copy_row and copy_row.get('bytes/s', 0) * 1e-9, '.0f')} |")
        print(f"| bf16 GEMM 8192³ (cuBLAS, fp32 accumulation), TFLOP/s | "
              f"{fmt(gemm_rate and gemm_rate * 1e-12, '.1f')} | "
              f"{fmt(gemm_row and gemm_row.get('FLOP/s', 0) * 1e-12, '.1f')} |")
        print()
        for name, message in errors.items():
            problems.append(f"benchmark {name}: {message}")
        for name, entry in picked.items():
            if "heads" not in entry:
                continue
            row = dict(name=name, tiny="Tiny" in name, heads=int(entry["heads"]),
                       batch=int(entry["batch"]), ctx=int(entry["ctx"]),
                       q_len=int(entry["q_len"]), varlen=int(entry["varlen"]),
                       us=time_us(entry), gbps=entry["bytes/s"] * 1e-9,
                       tflops=entry["FLOP/s"] * 1e-12)
            row["copy_pct"] = 100 * entry["bytes/s"] / copy_bw if copy_bw else None
            row["gemm_pct"] = 100 * entry["FLOP/s"] / gemm_rate if gemm_rate else None
            torch_us = torch_rows.get(shape_key(row))
            row["torch_us"] = torch_us
            row["speedup"] = torch_us / row["us"] if torch_us and row["us"] > 0 else None
            rows.append(row)

    rows.sort(key=lambda r: (not r["tiny"], -r["heads"], r["varlen"], r["ctx"], r["batch"],
                             r["q_len"]))
    if rows:
        print("| heads | batch | ctx | q_len | varlen | daedalus µs | GB/s | TFLOP/s | % copy BW "
              "| % bf16 GEMM | PyTorch µs | speed-up |")
        print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            ctx = f"{r['ctx']}" + (" (Tiny)" if r["tiny"] else "")
            print(f"| {r['heads']} | {r['batch']} | {ctx} | {r['q_len']} | "
                  f"{'mean' if r['varlen'] else 'fixed'} | {r['us']:.1f} | {r['gbps']:.0f} | "
                  f"{r['tflops']:.1f} | {fmt(r['copy_pct'], '.1f')} | {fmt(r['gemm_pct'], '.1f')} "
                  f"| {fmt(r['torch_us'], '.1f')} | "
                  f"{fmt(r['speedup'], '.2f') + ('x' if r['speedup'] else '')} |")
        print()
    elif bench:
        problems.append("benchmark JSON: no decode rows")

    status = evaluate_targets(rows)
    if problems:
        print("Missing or failed:")
        for problem in problems:
            print(f"- {problem}")
    return status


def evaluate_targets(rows):
    """Prints issue 5's targets over the large-batch rows; returns 0 when every one is met."""
    print(f"Targets of issue 5 over the rows with batch >= {LARGE_BATCH} (Tiny rows excluded):")
    checks = [
        ("16 heads: >= 70% of the measured copy bandwidth", 16,
         lambda r: r["copy_pct"] is not None and r["copy_pct"] >= 70.0,
         lambda r: f"{fmt(r['copy_pct'], '.1f')}%"),
        ("128 heads: >= 30% of the measured bf16 GEMM rate", 128,
         lambda r: r["gemm_pct"] is not None and r["gemm_pct"] >= 30.0,
         lambda r: f"{fmt(r['gemm_pct'], '.1f')}%"),
        ("128 heads: >= 3x the PyTorch baseline", 128,
         lambda r: r["speedup"] is not None and r["speedup"] >= 3.0,
         lambda r: fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else "")),
    ]
    all_met = True
    for title, heads, met, show in checks:
        chosen = [r for r in rows if r["heads"] == heads and not r["tiny"]
                  and r["batch"] >= LARGE_BATCH]
        if not chosen:
            print(f"- {title}: NOT EVALUATED (no rows)")
            all_met = False
            continue
        passing = [r for r in chosen if met(r)]
        verdict = "MET" if len(passing) == len(chosen) else ("PARTLY MET" if passing else
                                                               "NOT MET")
        all_met = all_met and verdict == "MET"
        values = ", ".join(
            f"{r['batch']}x{r['ctx']}{'v' if r['varlen'] else ''}/q{r['q_len']}: {show(r)}"
            for r in chosen)
        print(f"- {title}: {verdict} ({len(passing)} of {len(chosen)} rows) [{values}]")
    print()
    return 0 if all_met else 3


if __name__ == "__main__":
    sys.exit(main())
