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

On the CPU (default) everything is fp32 with torch.set_num_threads(--threads); run it through
bench/compare/run.sh, which clears environment variables that slow OpenBLAS and prints which BLAS
torch loaded. With --device cuda (bench/gpu/check.sh: the baseline of bench/cuda/bench_moe.cu)
the same steps run on the GPU, each call timed between two CUDA events after an L2 flush (a
256 MiB write, not timed) as the CUDA benchmarks do; the gate stays fp32 (DeepSeek scores the gate
in fp32) and the layer's weights and activations are --layer-dtype (default: bfloat16 on the GPU,
as DeepSeek's reference runs its experts; float32 on the CPU). The GPU's default gate sizes add
65536 tokens. --tiny runs small shapes only (a smoke test that works on any machine).
Prints Markdown tables; --json writes the raw numbers.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


class Timer:
    """Times one call: wall clock on the CPU; on a GPU, two CUDA events around the call after an
    untimed L2 flush (bench/cuda/bench_support.cuh times its rows the same way)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
            self.start = torch.cuda.Event(enable_timing=True)
            self.stop = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn):
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        self.flush.zero_()
        self.start.record()
        fn()
        self.stop.record()
        self.stop.synchronize()
        return self.start.elapsed_time(self.stop) * 1e-3


def time_it(fn, warmup, runs, budget_s, timer):
    """Median and best time of fn() in seconds, after `warmup` calls. Stops early once
    `budget_s` seconds have been spent timing (at least 3 runs)."""
    for _ in range(warmup):
        fn()
    times = []
    spent = 0.0
    while len(times) < runs and (len(times) < 3 or spent < budget_s):
        elapsed = timer(fn)
        times.append(elapsed)
        spent += elapsed
    return statistics.median(times), min(times), len(times)


def uniform(*shape, generator, device, scale=1.0, dtype=torch.float32):
    """Uniform in [-scale, scale), drawn on the CPU (the same numbers whatever the device)."""
    return ((torch.rand(*shape, generator=generator) * 2 - 1) * scale).to(device=device,
                                                                          dtype=dtype)


# ---------------------------------------------------------------------------------------------
# 1. The DeepSeek-V3 gate

V3_DIM, V3_EXPERTS, V3_GROUPS, V3_LIMITED, V3_TOPK, V3_SCALE = 7168, 256, 8, 4, 8, 2.5


def v3_routing(logits, bias, groups=V3_GROUPS, limited=V3_LIMITED, topk=V3_TOPK,
               route_scale=V3_SCALE):
    """DeepSeek-V3's Gate.forward after the GEMM: sigmoid, biased choice, group limit, top-k."""
    scores = logits.sigmoid()
    original_scores = scores
    scores = scores + bias
    scores = scores.view(logits.size(0), groups, -1)
    group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
    indices = group_scores.topk(limited, dim=-1)[1]
    mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, indices, False)
    scores = scores.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, topk, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * route_scale, indices


def gate_cases(tokens, generator, device):
    x = uniform(tokens, V3_DIM, generator=generator, device=device)
    weight = uniform(V3_EXPERTS, V3_DIM, generator=generator, device=device,
                     scale=V3_DIM ** -0.5)
    bias = uniform(V3_EXPERTS, generator=generator, device=device, scale=0.05)
    logits = F.linear(x, weight)

    def whole():
        return v3_routing(F.linear(x, weight), bias)

    def routing():
        return v3_routing(logits, bias)

    return whole, routing, 2.0 * tokens * V3_DIM * V3_EXPERTS


# ---------------------------------------------------------------------------------------------
# 2. Plan + dispatch + combine

def dispatch_combine_case(tokens, dim, experts, k, generator, device):
    x = torch.rand(tokens, dim, generator=generator).to(device)
    ids = torch.rand(tokens, experts, generator=generator).argsort(dim=-1)[:, :k].contiguous()
    ids = ids.to(device)
    weights = torch.rand(tokens, k, generator=generator).to(device)
    expert_in = torch.empty(tokens * k, dim, device=device)
    out = torch.empty(tokens, dim, device=device)

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
    buffer = torch.rand(tokens * k, dim, generator=generator).to(device)
    target = torch.empty_like(buffer)

    def memcpy():
        target.copy_(buffer)

    return step, moved, memcpy, 2.0 * buffer.numel() * 4


# ---------------------------------------------------------------------------------------------
# 3. The V2-Lite MoE layer, as an expert loop

L_DIM, L_INTER, L_EXPERTS, L_TOPK, L_SHARED = 2048, 1408, 64, 6, 2


def layer_case(tokens, weights, generator, device, dtype):
    gate_w, w1, w3, w2, s1, s3, s2 = weights
    x32 = uniform(tokens, L_DIM, generator=generator, device=device)
    x = x32.to(dtype)
    out = torch.empty(tokens, L_DIM, device=device, dtype=dtype)

    def step():
        scores = F.linear(x32, gate_w).softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_ids = scores.topk(L_TOPK, dim=-1)  # V2-Lite: no renormalisation
        topk_weight = topk_weight.to(dtype)
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


def layer_weights(generator, device, dtype):
    """The gate's weight in fp32, the experts' and the shared MLP's in `dtype`."""
    def linear(*shape, fan_in, kind=dtype):
        return uniform(*shape, generator=generator, device=device, scale=fan_in ** -0.5,
                       dtype=kind)

    shared = L_SHARED * L_INTER
    return (linear(L_EXPERTS, L_DIM, fan_in=L_DIM, kind=torch.float32),
            linear(L_EXPERTS, L_INTER, L_DIM, fan_in=L_DIM),
            linear(L_EXPERTS, L_INTER, L_DIM, fan_in=L_DIM),
            linear(L_EXPERTS, L_DIM, L_INTER, fan_in=L_INTER),
            linear(shared, L_DIM, fan_in=L_DIM), linear(shared, L_DIM, fan_in=L_DIM),
            linear(L_DIM, shared, fan_in=shared))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gate-tokens",
                        help="token counts of the gate (default 1,64,4096; on a GPU also 65536)")
    parser.add_argument("--dispatch-tokens", type=int, default=4096,
                        help="tokens of the dispatch + combine case; 0 skips it")
    parser.add_argument("--layer-tokens", default="1,64,512,4096",
                        help="token counts of the V2-Lite layer; empty skips it")
    parser.add_argument("--layer-dtype", choices=["float32", "bfloat16"],
                        help="the layer's weights and activations (default: bfloat16 on a GPU, "
                             "float32 on the CPU)")
    parser.add_argument("--tiny", action="store_true",
                        help="small token counts only (a smoke test): gate 1,16, dispatch 64, "
                             "layer 8")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds of timed runs per case before stopping early")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("torch_moe.py: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 77
    torch.set_num_threads(args.threads)
    if args.gate_tokens is None:
        args.gate_tokens = "1,64,4096" + (",65536" if device.type == "cuda" else "")
    if args.tiny:
        args.gate_tokens, args.dispatch_tokens, args.layer_tokens = "1,16", 64, "8"
    dtype = getattr(torch, args.layer_dtype or
                    ("bfloat16" if device.type == "cuda" else "float32"))
    timer = Timer(device)
    generator = torch.Generator().manual_seed(0)
    rows = []
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}; "
          f"best and median of up to {args.runs} runs after {args.warmup} warm-up runs\n")
    print("| case | tokens | best ms | median ms | rate (best) | rate (median) |")
    print("|---|---:|---:|---:|---:|---:|")

    def report(case, tokens, fn, amount, unit, runs=None, scale=1e9):
        median, best, n = time_it(fn, args.warmup, runs or args.runs, args.budget, timer)
        row = dict(case=case, tokens=tokens, best_ms=best * 1e3, median_ms=median * 1e3,
                   unit=unit, rate_best=amount / best / scale, rate_median=amount / median / scale,
                   runs=n)
        rows.append(row)
        print(f"| {case} | {tokens} | {row['best_ms']:.3f} | {row['median_ms']:.3f} | "
              f"{row['rate_best']:.3g} {unit} | {row['rate_median']:.3g} {unit} |", flush=True)
        # Rewritten after every row: a run stopped by a time limit keeps what it measured.
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(dict(torch=torch.__version__, device=where, rows=rows), out, indent=1)

    # The layer first: it is the row a GPU run's time limit must not cut (the V2-Lite layer target).
    layer_tokens = [int(t) for t in args.layer_tokens.split(",") if t]
    if layer_tokens:
        weights = layer_weights(generator, device, dtype)
        for tokens in layer_tokens:
            step, flops = layer_case(tokens, weights, generator, device, dtype)
            report(f"MoE layer V2-Lite (expert loop, {args.layer_dtype or dtype})".replace(
                "torch.", ""), tokens, step, flops, "GFLOP/s",
                   runs=max(3, args.runs // 4) if tokens >= 512 else None)
        del weights

    for tokens in (int(t) for t in args.gate_tokens.split(",") if t):
        whole, routing, flops = gate_cases(tokens, generator, device)
        report("gate V3 (GEMM + routing)", tokens, whole, flops, "GFLOP/s")
        report("gate V3 routing only", tokens, routing, tokens, "Mtokens/s", scale=1e6)

    if args.dispatch_tokens > 0:
        step, moved, memcpy, copied = dispatch_combine_case(args.dispatch_tokens, V3_DIM,
                                                            V3_EXPERTS, V3_TOPK, generator,
                                                            device)
        report("plan + dispatch + combine V3", args.dispatch_tokens, step, moved, "GB/s")
        report("memcpy of T·k·dim fp32", args.dispatch_tokens, memcpy, copied, "GB/s")
        del step, memcpy
    return 0


if __name__ == "__main__":
    sys.exit(main())
