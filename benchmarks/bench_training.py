"""H100 benchmark of the MSA training ops (issue 3), one causal sequence per context.

    python benchmarks/bench_training.py --contexts 8192 32768 131072 --out DIR

Times, in one process on one card: openmsa's Triton ops (sparse attention forward,
and the indexer when it is registered), FlexAttention with MSA's block budget, and
dense causal SDPA (cuDNN). Writes DIR/bench_training.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import openmsa  # noqa: E402
from openmsa._backend import TRITON_OPS  # noqa: E402
from openmsa.bench.cost_model import MSAConfig  # noqa: E402
from openmsa.bench.gpu import bench, flex_block_mask, flops, random_topk, rotation  # noqa: E402


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
    sets = [inputs(n, cfg, gen, dev) for _ in range(min(rotation(per_set), 4))]
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    idx = random_topk(n, cfg, gen, dev)
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
    if "indexer_topk" in TRITON_OPS:
        record("openmsa indexer_topk", safe_bench(lambda i: lambda: openmsa.indexer_topk(
            sets[i % len(sets)]["qi"], sets[i % len(sets)]["ki"], cu, cu), len(sets), runs=runs), f["index"])
    record("openmsa sparse_attention fwd", safe_bench(lambda i: lambda: openmsa.sparse_attention(
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
    record("openmsa sparse_attention fwd+bwd", safe_bench(sparse_fb, len(sets), runs=runs),
           f["sparse_fwd"] + f["sparse_bwd"])

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
        record("dense SDPA cuDNN fwd", safe_bench(dense_fn, min(len(sets), 2),
                                             runs=runs if n <= 32768 else 3), f["dense_fwd"])

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
        record("dense SDPA cuDNN fwd+bwd", safe_bench(dense_fb, 1, runs=runs if n <= 32768 else 3),
               f["dense_fwd"] + f["dense_bwd"])
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--max-flex", type=int, default=131072)
    ap.add_argument("--max-dense", type=int, default=131072)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = MSAConfig()
    name = torch.cuda.get_device_name(dev)
    print(f"{name}, torch {torch.__version__}, config {cfg}", flush=True)
    rows = []
    for n in args.contexts:
        print(f"context {n}", flush=True)
        rows += run_context(n, cfg, args, dev)
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_training.json"), "w") as fh:
        json.dump({"device": name, "torch": torch.__version__, "config": cfg.__dict__, "rows": rows}, fh, indent=2)
    with open(os.path.join(args.out, "bench_training.md"), "w") as fh:
        fh.write(f"Device: {name}; bf16; {cfg}\n\n| context | op | median ms | CV | useful TFLOP/s |\n|---|---|---|---|---|\n")
        for r in rows:
            if "error" in r:
                fh.write(f"| {r['context']} | {r['op']} | failed: {r['error'][:80]} | | |\n")
                continue
            tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
            fh.write(f"| {r['context']} | {r['op']} | {r['median_ms']:.3f} | {r['cv']:.3f} | {tf} |\n")


if __name__ == "__main__":
    main()
