#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""One table from bench/gpu/check.sh's outputs, with the MLA decode and MoE targets evaluated.

Reads (each optional; what is missing is said, the rest still printed):
  --steps  a file of `name<TAB>status<TAB>seconds<TAB>note` lines (check.sh's step log)
  --bench  Google Benchmark JSON of bench_cuda_mla_decode (--benchmark_out_format=json); with
           repetitions, the median aggregate of each benchmark is used
  --torch  the JSON that bench/gpu/torch_mla_decode.py --json writes
  --moe-bench  Google Benchmark JSON of bench_cuda_moe
  --moe-torch  the JSON that bench/compare/torch_moe.py --device cuda --json writes

Prints Markdown: the steps, the two measured roofs, one row per decode shape (daedalus time,
GB/s, TFLOP/s, % of the measured copy bandwidth, % of the measured bf16 GEMM rate, PyTorch time,
speed-up), then the targets over the large-batch rows (batch >= 64, Tiny rows excluded):
  16 heads:  >= 70% of the measured copy bandwidth
  128 heads: >= 30% of the measured bf16 GEMM rate and >= 3x the PyTorch baseline
then the MoE rows (gate, plan, dispatch + combine, the routed experts on the mma kernel and on
cuBLAS's grouped GEMM, V2-Lite layer, each against PyTorch where it has a baseline) and
the MoE targets:
  dispatch + combine at 4096 tokens x 7168: >= 60% of the measured copy bandwidth
  gate at 4096 tokens: the fused routing under 10% of the logits GEMM's time
  V2-Lite MoE layer at 4096 tokens: >= 3x the PyTorch expert loop
Exit status 3 when a target is missed or could not be evaluated.
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
    parser.add_argument("--moe-bench")
    parser.add_argument("--moe-torch")
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
    if args.moe_bench or args.moe_torch:
        moe_status = moe_section(load_json(args.moe_bench, "MoE benchmark JSON", problems),
                                 load_json(args.moe_torch, "MoE PyTorch JSON", problems),
                                 problems)
        status = status or moe_status
    if problems:
        print("Missing or failed:")
        for problem in problems:
            print(f"- {problem}")
    return status


def evaluate_targets(rows):
    """Prints the MLA decode targets over the large-batch rows; returns 0 when every one is met."""
    print(f"MLA decode targets over the rows with batch >= {LARGE_BATCH} (Tiny rows excluded):")
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


# bench_cuda_moe's layer rows by the DeviceExpertPath they run.
LAYER_PATHS = {
    "BM_moe_layer": "grouped_mma",
    "BM_moe_layer_permuted_read": "grouped_mma_permuted_read",
    "BM_moe_layer_cublas": "cublas_grouped",
}


def moe_rows(bench, problems):
    """{(kind, config, tokens): entry} of bench_cuda_moe's rows; kind is the name before '<'."""
    picked, errors = pick_runs(bench)
    for name, message in errors.items():
        problems.append(f"MoE benchmark {name}: {message}")
    rows = {}
    for name, entry in picked.items():
        if "<" not in name or "tokens" not in entry:
            continue
        kind, rest = name.split("<", 1)
        config = rest.split(">", 1)[0]
        rows[(kind, config, int(entry["tokens"]))] = entry
    return rows


def torch_moe_rows(torch_data):
    """{(case, tokens): median µs} of torch_moe.py's rows."""
    if not torch_data:
        return {}
    return {(row["case"], int(row["tokens"])): row["median_ms"] * 1e3
            for row in torch_data.get("rows", [])}


def torch_case(rows, prefix, tokens):
    return next((us for (case, t), us in rows.items() if case.startswith(prefix) and t == tokens),
                None)


def moe_section(bench, torch_data, problems):
    """Prints the MoE table and the MoE targets; returns 0 when every target is met, else 3."""
    print("MoE (bench_cuda_moe; PyTorch: bench/compare/torch_moe.py --device cuda)\n")
    rows = moe_rows(bench, problems) if bench else {}
    torch_rows = torch_moe_rows(torch_data)
    copy_bw = None
    if bench:
        try:
            copy_bw = float(bench.get("context", {})["copy_bytes_per_second"])
        except (KeyError, ValueError):
            problems.append("MoE benchmark JSON: no measured copy bandwidth in its context")

    def us(kind, config, tokens):
        entry = rows.get((kind, config, tokens))
        return time_us(entry) if entry else None

    def speedup(ours, theirs):
        return theirs / ours if ours and theirs else None

    print("| row | tokens | daedalus µs | rate | % copy BW | PyTorch µs | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    gate_tokens = sorted({t for (kind, config, t) in rows if kind == "BM_gate"
                          and config == "DeepSeekV3"})
    for tokens in gate_tokens:
        logits, routing, whole = (us(kind, "DeepSeekV3", tokens)
                                  for kind in ("BM_gate_logits", "BM_gate_routing", "BM_gate"))
        entry = rows[("BM_gate", "DeepSeekV3", tokens)]
        theirs = torch_case(torch_rows, "gate V3 (GEMM", tokens)
        print(f"| gate V3 (fp32 GEMM + routing) | {tokens} | {fmt(whole, '.1f')} | "
              f"{entry.get('FLOP/s', 0) * 1e-12:.1f} TFLOP/s | – | {fmt(theirs, '.1f')} | "
              f"{fmt(speedup(whole, theirs), '.2f')} |")
        share = 100 * routing / logits if routing and logits else None
        theirs = torch_case(torch_rows, "gate V3 routing", tokens)
        print(f"| gate V3 routing only ({fmt(share, '.1f')}% of the logits GEMM's "
              f"{fmt(logits, '.1f')} µs) | {tokens} | {fmt(routing, '.1f')} | – | – | "
              f"{fmt(theirs, '.1f')} | {fmt(speedup(routing, theirs), '.2f')} |")
    for (kind, config, tokens), entry in sorted(rows.items()):
        if kind == "BM_dispatch_combine" and config == "DeepSeekV3":
            ours = time_us(entry)
            plan = us("BM_plan", config, tokens)
            pct = 100 * entry["bytes/s"] / copy_bw if copy_bw else None
            theirs = torch_case(torch_rows, "plan + dispatch + combine", tokens)
            print(f"| dispatch + combine V3 | {tokens} | {ours:.1f} | "
                  f"{entry['bytes/s'] * 1e-9:.0f} GB/s | {fmt(pct, '.1f')} | – | – |")
            both = ours + plan if plan else None
            print(f"| plan + dispatch + combine V3 | {tokens} | {fmt(both, '.1f')} | – | – | "
                  f"{fmt(theirs, '.1f')} | {fmt(speedup(both, theirs), '.2f')} |")
    for (kind, config, tokens), entry in sorted(rows.items()):
        if kind == "BM_routed_experts_mma" and config in ("DeepSeekV2Lite", "DeepSeekV3"):
            short = "V2-Lite" if config == "DeepSeekV2Lite" else "V3"
            for path, name in (("mma", "BM_routed_experts_mma"),
                               ("cuBLAS grouped", "BM_routed_experts_cublas")):
                row = rows.get((name, config, tokens))
                if not row:
                    continue
                print(f"| routed experts {short} ({path}) | {tokens} | {time_us(row):.1f} | "
                      f"{row.get('FLOP/s', 0) * 1e-12:.1f} TFLOP/s | – | – | – |")
    for (kind, config, tokens), entry in sorted(rows.items()):
        if kind in LAYER_PATHS and config == "DeepSeekV2Lite":
            ours = time_us(entry)
            theirs = torch_case(torch_rows, "MoE layer V2-Lite", tokens)
            print(f"| MoE layer V2-Lite, {LAYER_PATHS[kind]} | {tokens} | {ours:.1f} | "
                  f"{entry.get('FLOP/s', 0) * 1e-12:.1f} TFLOP/s | – | {fmt(theirs, '.1f')} | "
                  f"{fmt(speedup(ours, theirs), '.2f')} |")
    print()

    print("MoE targets:")
    all_met = True

    def verdict(title, value, met, shown):
        nonlocal all_met
        if value is None:
            print(f"- {title}: NOT EVALUATED (missing rows)")
            all_met = False
            return
        all_met = all_met and met
        print(f"- {title}: {'MET' if met else 'NOT MET'} ({shown})")

    entry = rows.get(("BM_dispatch_combine", "DeepSeekV3", 4096))
    pct = 100 * entry["bytes/s"] / copy_bw if entry and copy_bw else None
    verdict("dispatch + combine, 4096 tokens x 7168: >= 60% of the copy bandwidth", pct,
            pct is not None and pct >= 60.0, f"{fmt(pct, '.1f')}%")
    logits, routing = us("BM_gate_logits", "DeepSeekV3", 4096), us("BM_gate_routing",
                                                                     "DeepSeekV3", 4096)
    share = 100 * routing / logits if routing and logits else None
    verdict("gate, 4096 tokens: routing < 10% of the logits GEMM", share,
            share is not None and share < 10.0, f"{fmt(share, '.1f')}%")
    # The layer with its fastest routed-experts path (DeviceExpertPath), named in the verdict.
    timed = [(us(kind, "DeepSeekV2Lite", 4096), path) for kind, path in LAYER_PATHS.items()]
    timed = [(t, path) for t, path in timed if t]
    ours, best_path = min(timed) if timed else (None, None)
    theirs = torch_case(torch_rows, "MoE layer V2-Lite", 4096)
    gain = speedup(ours, theirs)
    verdict("V2-Lite MoE layer, 4096 tokens: >= 3x the PyTorch expert loop", gain,
            gain is not None and gain >= 3.0, f"{fmt(gain, '.2f')}x, {best_path}")
    print()
    return 0 if all_met else 3


if __name__ == "__main__":
    sys.exit(main())
