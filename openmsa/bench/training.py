"""GPU benchmark of the MSA ops, one causal sequence per context (`openmsa bench` on a
GPU, and benchmarks/bench_training.py).

    openmsa bench --contexts 8192 32768 131072 --out DIR

Times, in one process on one card: openmsa's Triton ops (sparse attention forward,
and the indexer with 16-bit and with FP8 ranking when it is registered), FlexAttention with MSA's block budget, and
dense causal SDPA (cuDNN). Writes DIR/bench_training.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

import openmsa
from openmsa.library import TRITON_KERNELS
from openmsa.bench.cost_model import MSAConfig
from openmsa.bench.gpu import SELECTIONS, bench, flex_block_mask, flops, random_topk, rotation


def safe_bench(*args, **kwargs):
    """bench(), or the exception it raised (recorded, so one failing op does not stop the run)."""
    try:
        return bench(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the results
        return exc


def inputs(n, cfg, gen, dev):
    def rnd(*s):
        return torch.randn(*s, generator=gen, device=dev, dtype=torch.bfloat16)
    return {"q": rnd(n, cfg.num_heads, cfg.head_dim), "k": rnd(n, cfg.num_kv_heads, cfg.head_dim),
            "v": rnd(n, cfg.num_kv_heads, cfg.head_dim), "qi": rnd(n, cfg.num_kv_heads, cfg.index_head_dim),
            "ki": rnd(n, 1, cfg.index_head_dim)}


def run_context(n, cfg, args, dev):
    gen = torch.Generator(device=dev).manual_seed(n)
    f = flops(n, cfg)
    per_set = n * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * 2
    # Rotate input sets past L2 where they are small; one set (already >> L2) at long context.
    sets = [inputs(n, cfg, gen, dev) for _ in range(min(rotation(per_set), 4 if n <= 131072 else 1))]
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    idx = random_topk(n, cfg, gen, dev, args.selection)
    tag = "" if args.selection == "uniform" else f" ({args.selection} selection)"
    rows = []

    def record(name, res, useful):
        if isinstance(res, Exception):
            print(f"  {name:32s} FAILED: {type(res).__name__}: {str(res)[:300]}", flush=True)
            rows.append({"op": name, "context": n, "error": f"{type(res).__name__}: {res}"[:1000]})
            torch.cuda.empty_cache()
            return
        res.update(op=name, context=n, tflops=useful / res["median_ms"] / 1e9 if useful else None)
        rows.append(res)
        print(f"  {name:32s} {res['median_ms']:10.3f} ms  cv {res['cv']:.3f}"
              + (f"  {res['tflops']:7.1f} TFLOP/s" if useful else ""), flush=True)

    runs = args.runs if n <= 131072 else max(3, args.runs // 4)
    if "indexer_topk" in TRITON_KERNELS:
        record("openmsa indexer_topk", safe_bench(lambda i: lambda: openmsa.indexer_topk(
            sets[i % len(sets)]["qi"], sets[i % len(sets)]["ki"], cu, cu), len(sets), runs=runs), f["index"])
        record("openmsa indexer_topk (FP8 ranking)", safe_bench(lambda i: lambda: openmsa.indexer_topk(
            sets[i % len(sets)]["qi"], sets[i % len(sets)]["ki"], cu, cu, index_dtype=torch.float8_e4m3fn),
            len(sets), runs=runs), f["index"])
    record("openmsa sparse_attention fwd" + tag, safe_bench(lambda i: lambda: openmsa.sparse_attention(
        sets[i % len(sets)]["q"], sets[i % len(sets)]["k"], sets[i % len(sets)]["v"], idx, cu, cu),
        len(sets), runs=runs), f["sparse_fwd"])

    def sparse_fb(i):
        s = sets[i % len(sets)]
        q, k, v = (s[x].detach().requires_grad_() for x in ("q", "k", "v"))
        do = torch.randn_like(q)

        def run():
            out, _ = openmsa.sparse_attention(q, k, v, idx, cu, cu)
            out.backward(do)
        return run
    if n <= args.max_train:
        record("openmsa sparse_attention fwd+bwd" + tag, safe_bench(sparse_fb, len(sets), runs=runs),
               f["sparse_fwd"] + f["sparse_bwd"])

    if n <= args.max_train:
        def kl_fb(i):
            s = sets[i % len(sets)]
            qi, ki = s["qi"].detach().requires_grad_(), s["ki"].detach().requires_grad_()
            if args.selection == "uniform":  # the indexer's own selection
                idx_i, index_lse = openmsa.indexer_topk(s["qi"], s["ki"], cu, cu)
            else:  # the synthetic selection; the KL recomputes the index LSE on it
                idx_i, index_lse = idx, None
            _, lse = openmsa.sparse_attention(s["q"], s["k"], s["v"], idx_i, cu, cu)

            def run():
                openmsa.indexer_kl_loss(s["q"], s["k"], qi, ki, idx_i, cu, cu, lse=lse,
                                        index_lse=index_lse).backward()
            return run
        # Useful KL work: main scores (2 GEMM-FLOPs per pair and head) + index scores and
        # the two index-gradient products (3 x 2 x Di per pair and group).
        pairs = f["sparse_fwd"] // (4 * cfg.num_heads * cfg.head_dim)
        kl_flops = pairs * (2 * cfg.num_heads * cfg.head_dim + 6 * cfg.num_kv_heads * cfg.index_head_dim)
        record("openmsa indexer_kl_loss fwd+bwd" + tag, safe_bench(kl_fb, len(sets), runs=runs), kl_flops)

    if n <= args.max_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention)
        bm = flex_block_mask(n, cfg, gen, dev)

        def flex_fn(i):
            s = sets[i % len(sets)]
            q4, k4, v4 = (s[x].transpose(0, 1)[None] for x in ("q", "k", "v"))
            return lambda: flex(q4, k4, v4, block_mask=bm, enable_gqa=True)
        record("FlexAttention fwd (same budget)", safe_bench(flex_fn, len(sets), runs=runs), f["sparse_fwd"])

        def flex_fb(i):
            s = sets[i % len(sets)]
            q4, k4, v4 = (s[x].transpose(0, 1)[None].detach().requires_grad_() for x in ("q", "k", "v"))
            do = torch.randn_like(q4)

            def run():
                flex(q4, k4, v4, block_mask=bm, enable_gqa=True).backward(do)
            return run
        if n <= args.max_flex_train:
            record("FlexAttention fwd+bwd (same budget)", safe_bench(flex_fb, len(sets), runs=runs),
                   f["sparse_fwd"] + f["sparse_bwd"])

    if n <= args.max_dense:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        rep = cfg.num_heads // cfg.num_kv_heads

        def dense_fn(i):
            s = sets[i % len(sets)]
            q4 = s["q"].transpose(0, 1)[None]
            k4 = s["k"].transpose(0, 1)[None].repeat_interleave(rep, 1)
            v4 = s["v"].transpose(0, 1)[None].repeat_interleave(rep, 1)

            def run():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)
            return run
        long = n > 131072  # seconds per call: one warmup, one timed run
        record("dense SDPA cuDNN fwd", safe_bench(dense_fn, 1, warmup=1 if long else 3,
                                                  runs=1 if long else (runs if n <= 32768 else 3)),
               f["dense_fwd"])

        def dense_fb(i):
            s = sets[i % len(sets)]
            q4 = s["q"].transpose(0, 1)[None].detach().requires_grad_()
            k4 = s["k"].transpose(0, 1)[None].repeat_interleave(rep, 1).detach().requires_grad_()
            v4 = s["v"].transpose(0, 1)[None].repeat_interleave(rep, 1).detach().requires_grad_()
            do = torch.randn_like(q4)

            def run():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    F.scaled_dot_product_attention(q4, k4, v4, is_causal=True).backward(do)
            return run
        if n <= args.max_dense_train:
            record("dense SDPA cuDNN fwd+bwd", safe_bench(dense_fb, 1, runs=runs if n <= 32768 else 3),
                   f["dense_fwd"] + f["dense_bwd"])
    return rows


# A representative varlen prefill pack of the official selection (shared/workloads/
# prefill_benchmark_cases_v1.json, case prefill_6dfbe1ea63d464d4d3b0: 6 requests, 13,088 new
# tokens, longest final KV 135,155). Per-request lengths are not published: total_q is split
# evenly and every request gets the longest KV length (an upper bound on the work).
PACK = {"case_id": "prefill_6dfbe1ea63d464d4d3b0", "batch_size": 6, "total_q": 13088,
        "max_final_kv": 135155}


def run_pack(cfg, args, dev):
    from torch.nn.attention.bias import causal_lower_right

    b, lk = PACK["batch_size"], PACK["max_final_kv"]
    lq = [PACK["total_q"] // b + (1 if i < PACK["total_q"] % b else 0) for i in range(b)]
    gen = torch.Generator(device=dev).manual_seed(1)
    tq, tk = sum(lq), b * lk

    def rnd(*sh):
        return torch.randn(*sh, generator=gen, device=dev, dtype=torch.bfloat16)
    q, k, v = rnd(tq, cfg.num_heads, cfg.head_dim), rnd(tk, cfg.num_kv_heads, cfg.head_dim), rnd(tk, cfg.num_kv_heads, cfg.head_dim)
    qi, ki = rnd(tq, cfg.num_kv_heads, cfg.index_head_dim), rnd(tk, 1, cfg.index_head_dim)
    cu_q = torch.tensor([0] + [sum(lq[:i + 1]) for i in range(b)], dtype=torch.int32, device=dev)
    cu_k = torch.arange(b + 1, dtype=torch.int32, device=dev) * lk
    rows, name = [], f"pack {PACK['case_id']} ({b} x {lq[0]} new tokens on {lk} keys)"
    print(name, flush=True)
    # Useful work: every query sees min(p + 1, K*B-ish) keys; count exactly per query.
    from openmsa.bench.cost_model import selected_tokens
    pairs = sum(selected_tokens(lk, cfg.block_size, cfg.topk) - selected_tokens(lk - n, cfg.block_size, cfg.topk)
                for n in lq)
    dense_pairs = sum(n * lk - n * (n - 1) // 2 for n in lq)
    index_flops = 2 * cfg.num_kv_heads * cfg.index_head_dim * dense_pairs
    sparse_flops = 4 * cfg.num_heads * cfg.head_dim * pairs
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k)

    def rec(op, res, useful):
        if isinstance(res, Exception):
            rows.append({"op": op, "context": name, "error": str(res)[:500]})
            print(f"  {op:32s} FAILED {res}", flush=True)
            return
        res.update(op=op, context=name, tflops=useful / res["median_ms"] / 1e9)
        rows.append(res)
        print(f"  {op:32s} {res['median_ms']:10.3f} ms  {res['tflops']:7.1f} TFLOP/s", flush=True)
    rec("openmsa indexer_topk", safe_bench(lambda i: lambda: openmsa.indexer_topk(qi, ki, cu_q, cu_k), 1,
                                           runs=args.runs), index_flops)
    rec("openmsa sparse_attention fwd", safe_bench(lambda i: lambda: openmsa.sparse_attention(
        q, k, v, idx, cu_q, cu_k), 1, runs=args.runs), sparse_flops)
    rep = cfg.num_heads // cfg.num_kv_heads

    def dense(i):
        qs = [q[cu_q[j]:cu_q[j + 1]].transpose(0, 1)[None] for j in range(b)]
        ks = [k[j * lk:(j + 1) * lk].transpose(0, 1)[None].repeat_interleave(rep, 1) for j in range(b)]
        vs = [v[j * lk:(j + 1) * lk].transpose(0, 1)[None].repeat_interleave(rep, 1) for j in range(b)]
        masks = [causal_lower_right(lq[j], lk) for j in range(b)]
        return lambda: [F.scaled_dot_product_attention(qs[j], ks[j], vs[j], attn_mask=masks[j]) for j in range(b)]
    rec("dense SDPA fwd (per request, causal_lower_right)", safe_bench(dense, 1, runs=args.runs),
        4 * cfg.num_heads * cfg.head_dim * dense_pairs)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="openmsa bench")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--max-flex", type=int, default=131072)
    ap.add_argument("--max-dense", type=int, default=131072)
    ap.add_argument("--max-train", type=int, default=524288, help="largest context timed fwd+bwd")
    ap.add_argument("--max-dense-train", type=int, default=131072)
    # FlexAttention's backward hit an illegal memory access at 512K in one of two runs
    # (torch 2.11, H100): keep it to 128K by default.
    ap.add_argument("--max-flex-train", type=int, default=131072)
    ap.add_argument("--pack", action="store_true", help="also time the workload varlen pack")
    ap.add_argument("--selection", choices=SELECTIONS, default="uniform",
                    help="the blocks the sparse attention and KL attend to: random ('uniform') or "
                         "the synthetic of trained models' selections ('skewed': sink, nearest "
                         "blocks, content blocks shared by neighbouring queries)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    cfg = MSAConfig()
    name = torch.cuda.get_device_name(dev)
    print(f"{name}, torch {torch.__version__}, config {cfg}", flush=True)
    rows = []
    for n in args.contexts:
        print(f"context {n}", flush=True)
        rows += run_context(n, cfg, args, dev)
        torch.cuda.empty_cache()
        save(rows, name, cfg, args.out)
    if args.pack:
        rows += run_pack(cfg, args, dev)
    save(rows, name, cfg, args.out)
    print(f"wrote {args.out}/bench_training.json and .md")


def save(rows, name, cfg, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_training.json"), "w") as fh:
        json.dump({"device": name, "torch": torch.__version__, "config": cfg.__dict__, "rows": rows}, fh, indent=2)
    with open(os.path.join(out, "bench_training.md"), "w") as fh:
        fh.write(f"Device: {name}; bf16; {cfg}\n\n| context | op | median ms | CV | useful TFLOP/s |\n|---|---|---|---|---|\n")
        for r in rows:
            if "error" in r:
                fh.write(f"| {r['context']} | {r['op']} | failed: {r['error'][:80]} | | |\n")
                continue
            tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
            fh.write(f"| {r['context']} | {r['op']} | {r['median_ms']:.3f} | {r['cv']:.3f} | {tf} |\n")


if __name__ == "__main__":
    main()
