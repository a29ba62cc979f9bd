#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""PyTorch timings of the MoE shapes that bench/cpu/bench_moe.cpp measures.

1. gate (BM_gate<DeepSeekV3>): DeepSeek-V3's `Gate.forward` (inference/model.py) on 7168-wide
   tokens, 256 experts, sigmoid scores, selection bias, 8 groups / 4 kept by their top-2 sum,
   top-8, normalised, route scale 2.5; at 1, 64 and 4096 tokens. Timed whole (FLOPs
   2·T·7168·256) and, separately, the routing part after the GEMM (scores, groups, top-k,
   weights), which bench_moe's BM_gate_routing measures.
2. dispatch + combine (BM_plan_dispatch_combine<DeepSeekV3>/tokens:4096): 4096 tokens × 7168,
   256 experts, top-8 with distinct uniformly drawn ids and weights in (0, 1). Timed: plan
   (stable argsort of the flattened ids, bincount), dispatch (index_select into a preallocated
   [T·k, dim] buffer) and combine (scale by the weights, index_add_ back into a zeroed output).
   Bytes: dispatch reads T·dim·4 and writes T·k·dim·4; combine the reverse: 2·(k+1)·T·dim·4.
   The memcpy row copies a T·k·dim fp32 buffer, counted as read + write.
3. MoE layer (BM_moe_layer<DeepSeekV2Lite>): V2-Lite shapes (2048 → 64 experts of width 1408,
   top-6, softmax without renormalisation, 2 shared experts as one MLP of width 2816) at 1, 64,
   512 and 4096 tokens, written as the usual expert loop: gate, then for each expert with tokens,
   SwiGLU on its rows and index_add_ of weight · output, plus the shared MLP. FLOPs counted:
   2·T·dim·E (gate) + 2·T·k·3·dim·inter (routed) + 2·T·3·dim·2·inter (shared).

Everything is fp32 with torch.set_num_threads(--threads). Run it through bench/compare/run.sh,
which clears environment variables that slow OpenBLAS and prints which BLAS torch loaded.
Prints Markdown tables; --json writes the raw numbers.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


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


# ---------------------------------------------------------------------------------------------
# 1. The DeepSeek-V3 gate

V3_DIM, V3_EXPERTS, V3_GROUPS, V3_LIMITED, V3_TOPK, V3_SCALE = 7168, 256, 8, 4, 8, 2.5


def v3_routing(logits, bias):
    """DeepSeek-V3's Gate.forward after the GEMM: sigmoid, biased choice, group limit, top-k."""
    scores = logits.sigmoid()
    original_scores = scores
    scores = scores + bias
    scores = scores.view(logits.size(0), V3_GROUPS, -1)
    group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
    indices = group_scores.topk(V3_LIMITED, dim=-1)[1]
    mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, indices, False)
    scores = scores.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, V3_TOPK, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * V3_SCALE, indices


def gate_cases(tokens, generator):
    x = torch.rand(tokens, V3_DIM, generator=generator) * 2 - 1
    weight = (torch.rand(V3_EXPERTS, V3_DIM, generator=generator) * 2 - 1) / V3_DIM ** 0.5
    bias = (torch.rand(V3_EXPERTS, generator=generator) * 2 - 1) * 0.05
    logits = F.linear(x, weight)

    def whole():
        return v3_routing(F.linear(x, weight), bias)

    def routing():
        return v3_routing(logits, bias)

    return whole, routing, 2.0 * tokens * V3_DIM * V3_EXPERTS


# ---------------------------------------------------------------------------------------------
# 2. Plan + dispatch + combine

def dispatch_combine_case(tokens, dim, experts, k, generator):
    x = torch.rand(tokens, dim, generator=generator)
    ids = torch.rand(tokens, experts, generator=generator).argsort(dim=-1)[:, :k].contiguous()
    weights = torch.rand(tokens, k, generator=generator)
    expert_in = torch.empty(tokens * k, dim)
    out = torch.empty(tokens, dim)

    def step():
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)  # slots (t·k + j) grouped by expert, stable
        torch.bincount(flat, minlength=experts)   # per-expert counts (the plan's offsets)
        token_of_row = order // k
        torch.index_select(x, 0, token_of_row, out=expert_in)  # dispatch
        # (the experts would run here, on expert_in in place)
        out.zero_()                                             # combine
        out.index_add_(0, token_of_row, expert_in * weights.flatten()[order][:, None])
        return out

    moved = 2.0 * (k + 1) * tokens * dim * 4
    buffer = torch.rand(tokens * k, dim, generator=generator)
    target = torch.empty_like(buffer)

    def memcpy():
        target.copy_(buffer)

    return step, moved, memcpy, 2.0 * buffer.numel() * 4


# ---------------------------------------------------------------------------------------------
# 3. The V2-Lite MoE layer, as an expert loop

L_DIM, L_INTER, L_EXPERTS, L_TOPK, L_SHARED = 2048, 1408, 64, 6, 2


def layer_case(tokens, weights, generator):
    gate_w, w1, w3, w2, s1, s3, s2 = weights
    x = torch.rand(tokens, L_DIM, generator=generator) * 2 - 1
    out = torch.empty(tokens, L_DIM)

    def step():
        scores = F.linear(x, gate_w).softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_ids = scores.topk(L_TOPK, dim=-1)  # V2-Lite: no renormalisation
        out.copy_(F.linear(F.silu(F.linear(x, s1)) * F.linear(x, s3), s2))  # shared MLP
        counts = torch.bincount(topk_ids.flatten(), minlength=L_EXPERTS).tolist()
        for e in range(L_EXPERTS):
            if counts[e] == 0:
                continue
            idx, slot = torch.where(topk_ids == e)
            rows = x[idx]
            y = F.linear(F.silu(F.linear(rows, w1[e])) * F.linear(rows, w3[e]), w2[e])
            out.index_add_(0, idx, y * topk_weight[idx, slot, None])
        return out

    flops = (2.0 * tokens * L_DIM * L_EXPERTS + 2.0 * tokens * L_TOPK * 3 * L_DIM * L_INTER +
             2.0 * tokens * 3 * L_DIM * L_SHARED * L_INTER)
    return step, flops


def layer_weights(generator):
    def uniform(*shape, fan_in):
        return (torch.rand(*shape, generator=generator) * 2 - 1) / fan_in ** 0.5

    shared = L_SHARED * L_INTER
    return (uniform(L_EXPERTS, L_DIM, fan_in=L_DIM),
            uniform(L_EXPERTS, L_INTER, L_DIM, fan_in=L_DIM),
            uniform(L_EXPERTS, L_INTER, L_DIM, fan_in=L_DIM),
            uniform(L_EXPERTS, L_DIM, L_INTER, fan_in=L_INTER),
            uniform(shared, L_DIM, fan_in=L_DIM), uniform(shared, L_DIM, fan_in=L_DIM),
            uniform(L_DIM, shared, fan_in=shared))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gate-tokens", default="1,64,4096")
    parser.add_argument("--dispatch-tokens", type=int, default=4096,
                        help="tokens of the dispatch + combine case; 0 skips it")
    parser.add_argument("--layer-tokens", default="1,64,512,4096",
                        help="token counts of the V2-Lite layer; empty skips it")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds of timed runs per case before stopping early")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"best and median of up to {args.runs} runs after {args.warmup} warm-up runs\n")
    print("| case | tokens | best ms | median ms | rate (best) | rate (median) |")
    print("|---|---:|---:|---:|---:|---:|")

    def report(case, tokens, fn, amount, unit, runs=None, scale=1e9):
        median, best, n = time_it(fn, args.warmup, runs or args.runs, args.budget)
        row = dict(case=case, tokens=tokens, best_ms=best * 1e3, median_ms=median * 1e3,
                   unit=unit, rate_best=amount / best / scale, rate_median=amount / median / scale,
                   runs=n)
        rows.append(row)
        print(f"| {case} | {tokens} | {row['best_ms']:.3f} | {row['median_ms']:.3f} | "
              f"{row['rate_best']:.3g} {unit} | {row['rate_median']:.3g} {unit} |", flush=True)

    for tokens in (int(t) for t in args.gate_tokens.split(",") if t):
        whole, routing, flops = gate_cases(tokens, generator)
        report("gate V3 (GEMM + routing)", tokens, whole, flops, "GFLOP/s")
        report("gate V3 routing only", tokens, routing, tokens, "Mtokens/s", scale=1e6)

    if args.dispatch_tokens > 0:
        step, moved, memcpy, copied = dispatch_combine_case(args.dispatch_tokens, V3_DIM,
                                                            V3_EXPERTS, V3_TOPK, generator)
        report("plan + dispatch + combine V3", args.dispatch_tokens, step, moved, "GB/s")
        report("memcpy of T·k·dim fp32", args.dispatch_tokens, memcpy, copied, "GB/s")
        del step, memcpy

    layer_tokens = [int(t) for t in args.layer_tokens.split(",") if t]
    if layer_tokens:
        weights = layer_weights(generator)
        for tokens in layer_tokens:
            step, flops = layer_case(tokens, weights, generator)
            report("MoE layer V2-Lite (expert loop)", tokens, step, flops, "GFLOP/s",
                   runs=max(3, args.runs // 4) if tokens >= 512 else None)

    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), rows=rows),
                      out, indent=1)


if __name__ == "__main__":
    main()
