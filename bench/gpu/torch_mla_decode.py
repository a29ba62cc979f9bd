#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""PyTorch baseline of the absorbed MLA decode that bench/cuda/bench_mla_decode.cu times.

What a user would write instead of a fused kernel, in bf16 with plain torch ops, on the same
shapes (batch, context, heads, q_len, varlen lengths) as the CUDA benchmark:

    kv     = pool[block_table]                 gather the latent rows   [batch, L, 576]
    scores = q · kvᵀ                           over the 576-wide latent [batch, q_len·heads, L]
    mask   : key t of entry b is seen by query i when t <= seqlen_b - q_len + i (bottom-right
             causal, as daedalus's absorbed_attention) and t < seqlen_b
    p      = softmax(scores · scale) in fp32, rounded to bf16
    out    = p · kv[..., :512]                 the first 512 columns    [batch, q_len, heads, 512]

Each call is timed between two CUDA events after an L2 flush (a 256 MiB write, not timed), after
`--warmup` untimed calls; the median of `--runs` calls is reported. Prints one line per shape,
`torch_mla_decode config=... heads=... batch=... ctx=... q_len=... varlen=... median_us=...
min_us=... runs=...`, and --json writes the same rows for bench/gpu/table.py.

--check compares the step with an fp64 reference on small shapes (runs on the CPU too).
"""

import argparse
import json
import math
import statistics
import sys

import torch

BLOCK = 64
LATENT = 576
RANK = 512
# softmax_scale<C>() of include/daedalus/mla/rope.hpp: (128 + 64)^-0.5 · (0.1·mscale·ln 40 + 1)²
CONFIGS = {
    "DeepSeekV3": dict(heads=128, mscale=1.0),
    "DeepSeekV2Lite": dict(heads=16, mscale=0.707),
}
MASK64 = (1 << 64) - 1


def softmax_scale(config):
    m = 0.1 * CONFIGS[config]["mscale"] * math.log(40.0) + 1.0
    return (128 + 64) ** -0.5 * m * m


def splitmix64(x):
    """SplitMix64, as bench/cuda/bench_mla_decode.cu's splitmix64 (the varlen lengths)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def sequence_lengths(batch, ctx, q_len, varlen):
    """The cached tokens of each entry: ctx, or for varlen ctx//2 + splitmix64(b) mod (ctx+1)."""
    if not varlen:
        return [ctx] * batch
    return [max(ctx // 2 + splitmix64(b) % (ctx + 1), q_len) for b in range(batch)]


def shapes(grid):
    """(config, batch, ctx, q_len, varlen) in the CUDA benchmark's order."""
    out = [("DeepSeekV2Lite", 3, 300, 1, False), ("DeepSeekV2Lite", 3, 300, 2, True),
           ("DeepSeekV3", 2, 130, 2, False)]
    if grid == "tiny":
        return out
    for ctx in (4096, 16384):
        for batch in (1, 16, 64, 128):
            for q_len in (1, 2):
                out.append(("DeepSeekV3", batch, ctx, q_len, False))
                out.append(("DeepSeekV2Lite", batch, ctx, q_len, False))
        for batch in (64, 128):
            out.append(("DeepSeekV3", batch, ctx, 1, True))
            out.append(("DeepSeekV2Lite", batch, ctx, 1, True))
    return out


def make_case(config, batch, ctx, q_len, varlen, device, generator):
    """A shuffled paged pool of random bf16 rows, its block table, lengths and queries."""
    heads = CONFIGS[config]["heads"]
    lengths = sequence_lengths(batch, ctx, q_len, varlen)
    used = [(n + BLOCK - 1) // BLOCK for n in lengths]
    max_blocks = max(used)
    num_blocks = sum(used)
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    table = torch.zeros(batch, max_blocks, dtype=torch.int64)
    start = 0
    for b, n in enumerate(used):
        table[b, :n] = torch.tensor(perm[start:start + n], dtype=torch.int64)
        start += n
    pool = torch.empty(num_blocks, BLOCK, LATENT, dtype=torch.bfloat16, device=device)
    pool.uniform_(-1.0, 1.0)
    q = torch.empty(batch, q_len, heads, LATENT, dtype=torch.bfloat16, device=device)
    q.uniform_(-1.0, 1.0)
    return dict(pool=pool, table=table.to(device), lengths=lengths,
                seqlens=torch.tensor(lengths, dtype=torch.int64, device=device), q=q,
                heads=heads, q_len=q_len, scale=softmax_scale(config))


def decode_step(case):
    """The absorbed decode in plain torch ops (the module docstring's five lines)."""
    pool, table, seqlens, q = case["pool"], case["table"], case["seqlens"], case["q"]
    heads, q_len, scale = case["heads"], case["q_len"], case["scale"]
    batch, max_blocks = table.shape
    keys = max_blocks * BLOCK
    kv = pool[table].view(batch, keys, LATENT)
    scores = torch.matmul(q.view(batch, q_len * heads, LATENT), kv.transpose(1, 2))
    scores = scores.float().view(batch, q_len, heads, keys) * scale
    last = seqlens.view(batch, 1) - q_len + torch.arange(q_len, device=q.device).view(1, q_len)
    hidden = torch.arange(keys, device=q.device).view(1, 1, keys) > last.view(batch, q_len, 1)
    scores.masked_fill_(hidden.view(batch, q_len, 1, keys), float("-inf"))
    p = torch.softmax(scores, dim=-1).to(torch.bfloat16)
    out = torch.matmul(p.view(batch, q_len * heads, keys), kv[..., :RANK])
    return out.view(batch, q_len, heads, RANK)


def reference(case):
    """fp64 absorbed attention, one entry and query at a time, rows read through the table."""
    pool, table, q = case["pool"].double().cpu(), case["table"].cpu(), case["q"].double().cpu()
    batch, q_len, heads = q.shape[0], case["q_len"], case["heads"]
    out = torch.zeros(batch, q_len, heads, RANK, dtype=torch.float64)
    for b, n in enumerate(case["lengths"]):
        rows = torch.stack([pool[table[b, t // BLOCK], t % BLOCK] for t in range(n)])
        for i in range(q_len):
            seen = rows[: n - q_len + i + 1]
            p = torch.softmax(q[b, i] @ seen.T * case["scale"], dim=-1)
            out[b, i] = p @ seen[:, :RANK]
    return out


def self_check(device):
    """The step against the fp64 reference: bf16 scores, p and output give ~1e-2 relative."""
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for config, batch, ctx, q_len, varlen in [("DeepSeekV2Lite", 3, 150, 2, True),
                                              ("DeepSeekV3", 2, 70, 1, False)]:
        case = make_case(config, batch, ctx, q_len, varlen, device, generator)
        got = decode_step(case).double().cpu()
        want = reference(case)
        error = ((got - want).norm() / want.norm()).item()
        worst = max(worst, error)
        print(f"check {config} batch={batch} ctx={ctx} q_len={q_len} varlen={int(varlen)}: "
              f"relative error {error:.2e}")
    # bf16 keeps 8 significant bits (2^-9 relative per rounding); the scores, p and the output
    # are each rounded once, so a few parts in 1e3 is expected and 2e-2 flags a wrong formula.
    if not worst < 2e-2:
        print("check FAILED: the torch step does not compute the absorbed decode", file=sys.stderr)
        return 1
    return 0


def time_case(case, warmup, runs, flush):
    """Median and minimum seconds of one decode step, CUDA events, L2 flushed before each."""
    for _ in range(warmup):
        decode_step(case)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(runs):
        flush.zero_()
        start.record()
        decode_step(case)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3)
    return statistics.median(times), min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=("full", "tiny"), default="full")
    parser.add_argument("--filter", default="", help="only configs whose name contains this")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--check", action="store_true",
                        help="compare with an fp64 reference on small shapes, then exit")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    if args.check:
        return self_check(args.device)
    if not torch.cuda.is_available():
        print("torch_mla_decode: no CUDA device answered; nothing was measured")
        return 0

    device = "cuda"
    generator = torch.Generator().manual_seed(0)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    print(f"torch_mla_decode: torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"median of {args.runs} calls after {args.warmup} warm-up calls", flush=True)
    rows = []
    for config, batch, ctx, q_len, varlen in shapes(args.grid):
        if args.filter not in config:
            continue
        row = dict(config=config, heads=CONFIGS[config]["heads"], batch=batch, ctx=ctx,
                   q_len=q_len, varlen=int(varlen))
        try:
            case = make_case(config, batch, ctx, q_len, varlen, device, generator)
            median, best = time_case(case, args.warmup, args.runs, flush)
            row.update(median_us=median * 1e6, min_us=best * 1e6, runs=args.runs)
            del case
        except torch.cuda.OutOfMemoryError as error:  # report the shape, keep going
            row.update(error=str(error).splitlines()[0])
            torch.cuda.empty_cache()
        rows.append(row)
        fields = " ".join(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"
                          for key, value in row.items())
        print(f"torch_mla_decode {fields}", flush=True)
        # Rewritten after every row: a run stopped by a time limit keeps what it measured.
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(dict(torch=torch.__version__, device=torch.cuda.get_device_name(),
                               rows=rows), out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
