#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""PyTorch timings of the MLA decode shapes that bench/cpu/bench_mla.cpp measures.

The absorbed decode core (DeepSeek-V3: 128 heads, 512-wide latent + 64-wide shared rotary key,
one query token per sequence), written the way a PyTorch implementation writes it:

    scores = q_lat · cᵀ + q_pe · k_peᵀ        [batch, heads, ctx]
    p      = softmax(scores · scale) in fp32
    o_lat  = p · c                            [batch, heads, 512]

FLOPs per step: batch · heads · ctx · 2 · (576 + 512), the same count bench_mla uses, so the
GFLOP/s columns compare directly with its FLOP/s counters. For bf16 the cache and queries are
stored in bf16, the products run in bf16 (accumulating in fp32 inside the BLAS), and the
softmax runs in fp32 with p rounded back to bf16 for the value product, as FlashMLA does.

Optionally the naive decode (decompress every cached latent through wkv_b, then ordinary MHA),
at 4K context, batch 1, fp32: the reference point for why decode absorbs.

Run it through bench/compare/run.sh, which clears environment variables that slow OpenBLAS and
prints which BLAS torch loaded. Prints a Markdown table; --json writes the raw numbers.
"""

import argparse
import json
import statistics
import time

import torch

HEADS = 128
KV_LORA_RANK = 512
ROPE = 64
NOPE = 128
V_HEAD_DIM = 128
# softmax_scale<DeepSeekV3>(): 192^-0.5 · mscale², mscale = 0.1 · ln(40) + 1 (YaRN).
SCALE = 0.135234


def time_it(fn, warmup, runs, budget_s):
    """Median and best wall time of fn() in seconds, after `warmup` calls. Stops early once
    `budget_s` seconds have been spent timing (at least 3 runs)."""
    for _ in range(warmup):
        fn()
    times = []
    spent = 0.0
    while len(times) < runs and (len(times) < 3 or spent < budget_s):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    return statistics.median(times), min(times), len(times)


def absorbed_case(dtype, batch, ctx, generator):
    """Tensors and a step function for the absorbed decode core."""
    c = torch.randn(batch, ctx, KV_LORA_RANK, generator=generator).to(dtype)
    k_pe = torch.randn(batch, ctx, ROPE, generator=generator).to(dtype)
    q_lat = torch.randn(batch, HEADS, KV_LORA_RANK, generator=generator).to(dtype)
    q_pe = torch.randn(batch, HEADS, ROPE, generator=generator).to(dtype)
    c_t = c.transpose(1, 2)
    k_pe_t = k_pe.transpose(1, 2)

    def step():
        scores = torch.bmm(q_lat, c_t)
        scores += torch.bmm(q_pe, k_pe_t)
        p = torch.softmax(scores.float() * SCALE, dim=-1).to(dtype)
        return torch.bmm(p, c)

    flops = batch * HEADS * ctx * 2 * (KV_LORA_RANK + ROPE + KV_LORA_RANK)
    return step, flops


def naive_case(ctx, generator):
    """Naive decode, batch 1, fp32: up-project every latent, then MHA with d_qk 192, d_v 128."""
    c = torch.randn(ctx, KV_LORA_RANK, generator=generator)
    k_pe = torch.randn(ctx, ROPE, generator=generator)
    wkv_b = torch.randn(HEADS * (NOPE + V_HEAD_DIM), KV_LORA_RANK, generator=generator) * 0.04
    q = torch.randn(HEADS, NOPE + ROPE, generator=generator)

    def step():
        kv = (c @ wkv_b.t()).view(ctx, HEADS, NOPE + V_HEAD_DIM)
        k_nope, v = kv[..., :NOPE], kv[..., NOPE:]
        scores = torch.einsum("hd,thd->ht", q[:, :NOPE], k_nope)
        scores += q[:, NOPE:] @ k_pe.t()
        p = torch.softmax(scores * SCALE, dim=-1)
        return torch.einsum("ht,thd->hd", p, v)

    flops = ctx * 2 * HEADS * (NOPE + V_HEAD_DIM) * KV_LORA_RANK + ctx * 2 * HEADS * (
        NOPE + ROPE + V_HEAD_DIM)
    return step, flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--ctx", default="1024,4096,16384")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds of timed runs per shape before stopping early")
    parser.add_argument("--naive-ctx", type=int, default=4096,
                        help="context of the naive decode reference; 0 skips it")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    generator = torch.Generator().manual_seed(0)
    rows = []

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"best and median of up to {args.runs} runs after {args.warmup} warm-up runs\n")
    print("| case | dtype | batch | ctx | best ms | median ms | GFLOP/s (best) | GFLOP/s (median) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")

    def report(case, dtype_name, batch, ctx, fn, flops, runs):
        median, best, n = time_it(fn, args.warmup, runs, args.budget)
        row = dict(case=case, dtype=dtype_name, batch=batch, ctx=ctx, best_ms=best * 1e3,
                   median_ms=median * 1e3, gflops_best=flops / best / 1e9,
                   gflops_median=flops / median / 1e9, runs=n)
        rows.append(row)
        print(f"| {case} | {dtype_name} | {batch} | {ctx} | {row['best_ms']:.2f} | "
              f"{row['median_ms']:.2f} | {row['gflops_best']:.1f} | {row['gflops_median']:.1f} |",
              flush=True)

    for dtype_name in args.dtypes.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            for ctx in (int(c) for c in args.ctx.split(",")):
                step, flops = absorbed_case(dtypes[dtype_name], batch, ctx, generator)
                report("absorbed", dtype_name, batch, ctx, step, flops, args.runs)
                del step

    if args.naive_ctx > 0:
        step, flops = naive_case(args.naive_ctx, generator)
        report("naive", "fp32", 1, args.naive_ctx, step, flops, max(3, args.runs // 5))

    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), rows=rows),
                      out, indent=1)


if __name__ == "__main__":
    main()
