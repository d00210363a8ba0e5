"""Serving benchmarks on a GPU (``openmsa bench --serving``; scripts
benchmarks/bench_decode.py and benchmarks/bench_prefill_chunk.py).

Decode: per-layer latency of openmsa's paged MSA decode (MSADecodeWrapper.run: Index
Branch + sparse attention) against dense decode over the same tokens, for batch x context x
query tokens per request. Each case fills paged K, V and index-key pools (bf16, page = block
= 128 tokens, Hq=64 Hkv=4 D=Di=128, K=16) with random values, pages shuffled; every
request holds `context` tokens and its queries are its last positions. Timing follows the
official decode protocol (shared/workloads/README.md): the call is captured in a CUDA
graph, 5 warmup and 20 timed replays, median and coefficient of variation; the caches are
far larger than the L2, so replays read them from HBM (no input rotation needed). The Index
Branch alone (``run_index``) is timed too, with its effective bandwidth (index-key bytes /
time). Dense baseline ("sdpa_folded"): torch's scaled_dot_product_attention on a contiguous
[batch, Hkv, context, D] cache (enable_gqa=True, torch's default backend), graph-captured,
with a request's n query tokens folded into the query-head dimension ([batch, n * Hq, 1, D],
as FlashInfer / FA3 pack GQA): one pass over the cache serves all n * G rows of a group, so
dense multi-token (MTP) decode reads the bytes of single-token decode. The causal offset
among the drafts is ignored, which only makes dense faster (fair to dense). For n = 1 it is
plain single-token SDPA decode. Torch's kernels do not pack a group's rows into one pass
(folded, 8 tokens took 3.2x the single-token time on the H200), so the single-token dense
time is reported too ("dense_1tok_us", with "speedup_vs_1tok"): what a packed-GQA dense
kernel reading the cache once would approach, unless compute binds first. ``--dense-masked``
also times the unfolded queries under a
bottom-right causal mask ("sdpa_unfolded_masked", the baseline of earlier results: torch
then re-reads the cache per query token, several times slower; not a fair baseline).

Chunked prefill: MSAPrefillWrapper.run (new chunk on a cached prefix, one request) against
dense SDPA over the same tokens (bottom-right causal), medians of CUDA-event timings.
"""

import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F

from ..serving.decode import MSADecodeWrapper
from ..serving.fp8 import FP8, quantize_fp8_per_token
from ..serving.prefill import MSAPrefillWrapper

HQ, HKV, D, DI, B, K = 64, 4, 128, 128, 128, 16


def graph_time(fn, warmup=5, runs=20, calls=None):
    """Median and CV of one call of ``fn`` (us), captured in a CUDA graph; with ``calls`` (a
    list of callables, e.g. rotating over input slots) the graph holds them all and the
    figure is per call (replay time / len(calls)), as the official decode protocol says."""
    calls = calls or [fn]
    for c in calls[:2]:  # compile outside the capture, on a side stream as CUDA graphs want
        c()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        calls[0]()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / len(calls))  # us
    return {"median_us": statistics.median(times), "cv": statistics.pstdev(times) / statistics.mean(times)}


def copy_bandwidth(dev):
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    r = graph_time(lambda: y.copy_(x))
    return 2 * x.numel() / (r["median_us"] * 1e-6) / 1e12  # TB/s, read + write


DENSE_BASELINE = ("sdpa_folded: torch SDPA (enable_gqa) over a contiguous [batch, Hkv, context, D] "
                  "cache, the n query tokens of a request folded into the query heads "
                  "([batch, n * Hq, 1, D]; the bytes of single-token decode; causal offset among "
                  "the drafts ignored, in dense's favour)")
DENSE_1TOK = ("dense_1tok: the same SDPA for one query token per request (the bytes bound of "
              "dense n-token decode)")
DENSE_MASKED = ("sdpa_unfolded_masked: torch SDPA over [batch, Hq, n, D] queries with a bottom-right "
                "causal mask (re-reads the cache per query token; not a fair MTP baseline)")


def fold_queries(q, batch, nq, hq=HQ, hkv=HKV):
    """[batch * nq, Hq, D] query tokens -> [batch, nq * Hq, 1, D] for SDPA with enable_gqa:
    the rows of KV group g (its G heads x the nq tokens) are the query heads
    g * nq * G .. (g + 1) * nq * G - 1, which enable_gqa maps to KV head g."""
    g, d = hq // hkv, q.shape[-1]
    return q.view(batch, nq, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(batch, hkv * nq * g, 1, d)


def unfold_output(o, batch, nq, hq=HQ, hkv=HKV):
    """The inverse of fold_queries on SDPA's output: [batch * nq, Hq, D]."""
    g, d = hq // hkv, o.shape[-1]
    return o.view(batch, hkv, nq, g, d).permute(0, 2, 1, 3, 4).reshape(batch * nq, hq, d)


def dense_decode(q, kd, vd, batch, nq, masked=False):
    """The dense decode baseline as timed: ``q [batch * nq, Hq, D]`` against the contiguous
    cache ``kd, vd [batch, Hkv, context, D]``; folded (the default) or, with ``masked``,
    unfolded under a bottom-right causal mask. Returns SDPA's output (its own layout)."""
    hq, hkv = q.shape[1], kd.shape[1]
    if not masked:
        return F.scaled_dot_product_attention(fold_queries(q, batch, nq, hq, hkv), kd, vd, enable_gqa=True)
    qd = q.view(batch, nq, hq, q.shape[-1]).transpose(1, 2)
    mask = None
    if nq > 1:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(nq, kd.shape[2])
    return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)


def case(batch, ctx, nq, dev, gen, index_splits=None, dense=True, fp8="none", capture=None,
         attention_splits=None, dense_masked=False):
    """One decode case; ``fp8``: "none" (bf16 pools), "index" (FP8 index keys with per-token
    scales and FP8 index queries) or "index_kv" (also FP8 K/V pages, per-layer scales).
    ``capture``: a list that receives the run() closure instead of timing it (profiling).
    ``dense_masked``: also time the unfolded, causally masked dense variant."""
    pages = ctx // B
    num_pages = batch * pages
    k_cache = torch.randn(num_pages, B, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v_cache = torch.randn(num_pages, B, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen)
    ki_cache = torch.randn(num_pages, B, DI, device=dev, dtype=torch.bfloat16, generator=gen)
    page_table = torch.randperm(num_pages, device=dev, generator=gen).view(batch, pages).to(torch.int32)
    q = torch.randn(batch * nq, HQ, D, device=dev, dtype=torch.bfloat16, generator=gen)
    qi = torch.randn(batch * nq, HKV, DI, device=dev, dtype=torch.bfloat16, generator=gen)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev) * nq
    kv_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    w = MSADecodeWrapper(HQ, HKV, D, DI, block_size=B, topk=K)
    w.plan(cu_q, kv_lens, page_table, index_splits=index_splits, attention_splits=attention_splits)
    res = {"batch": batch, "context": ctx, "q_per_request": nq, "fp8": fp8,
           "index_splits": w._plan["idx_splits"], "attention_splits": w._plan["attn_splits"]}
    extra, ki_scale = {}, None
    if fp8 in ("index", "index_kv"):
        ki_cache, ki_scale = quantize_fp8_per_token(ki_cache)
        qi = quantize_fp8_per_token(qi)[0]
        extra["ki_scale"] = ki_scale
    if fp8 == "index_kv":
        k_cache, v_cache = k_cache.to(FP8), v_cache.to(FP8)
        extra.update(k_scale=1.0, v_scale=1.0)
    if capture is not None:
        capture.append(lambda: w.run(q, qi, k_cache, v_cache, ki_cache, **extra))
        return res
    res["openmsa_us"] = graph_time(lambda: w.run(q, qi, k_cache, v_cache, ki_cache, **extra))
    res["openmsa_topk_us"] = graph_time(lambda: w.run_index(qi, ki_cache, ki_scale=ki_scale))
    # bytes the Index Branch must stream: the keys, plus the per-token scales in FP8
    res["index_key_bytes"] = batch * ctx * (DI * ki_cache.element_size() + (4 if ki_scale is not None else 0))
    k_cache = v_cache = ki_cache = w = None  # free the pools before the dense cache
    res["dense_baseline"] = "sdpa_folded"
    if not dense:
        res["dense_us"] = res["dense_1tok_us"] = {"median_us": float("nan"), "cv": 0.0}
        res["speedup"] = res["speedup_vs_1tok"] = float("nan")
        return res
    # dense baseline on a contiguous cache of the same size
    kd = torch.randn(batch, HKV, ctx, D, device=dev, dtype=torch.bfloat16, generator=gen)
    vd = torch.randn(batch, HKV, ctx, D, device=dev, dtype=torch.bfloat16, generator=gen)
    res["dense_us"] = graph_time(lambda: dense_decode(q, kd, vd, batch, nq))
    res["speedup"] = res["dense_us"]["median_us"] / res["openmsa_us"]["median_us"]
    if nq > 1:
        q1 = q.view(batch, nq, HQ, D)[:, -1].contiguous()
        res["dense_1tok_us"] = graph_time(lambda: dense_decode(q1, kd, vd, batch, 1))
    else:
        res["dense_1tok_us"] = res["dense_us"]
    res["speedup_vs_1tok"] = res["dense_1tok_us"]["median_us"] / res["openmsa_us"]["median_us"]
    if dense_masked:
        res["dense_masked_us"] = graph_time(lambda: dense_decode(q, kd, vd, batch, nq, masked=True))
    kd = vd = None
    torch.cuda.empty_cache()
    return res


def decode_main(argv=None):
    ap = argparse.ArgumentParser(prog="openmsa bench --serving (decode)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    ap.add_argument("--q", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=8 << 20, help="skip batch x context above this")
    ap.add_argument("--index-splits", type=int, nargs="+", default=[0],
                    help="programs per request scanning its index keys (0: the plan's default)")
    ap.add_argument("--attention-splits", type=int, default=0,
                    help="programs per (query, group) sharing its K blocks (0: the plan's default)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    ap.add_argument("--dense-masked", action="store_true",
                    help="also time the unfolded, causally masked SDPA (earlier results' baseline)")
    ap.add_argument("--fp8", nargs="+", default=["none"], choices=["none", "index", "index_kv"],
                    help="pool precisions: none (bf16), index (FP8 index keys/queries), "
                         "index_kv (also FP8 K/V pages)")
    ap.add_argument("--out", default="benchmarks/results/local/decode")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    bw = copy_bandwidth(dev)
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}; copy bandwidth {bw:.2f} TB/s", flush=True)
    rows = []
    for nq in args.q:
        for ctx in args.contexts:
            for batch in args.batches:
                if batch * ctx > args.max_tokens:
                    continue
                for isp, fp8 in [(i, f) for f in args.fp8 for i in args.index_splits]:
                    try:
                        r = case(batch, ctx, nq, dev, gen, index_splits=isp or None,
                                 dense=not args.no_dense, fp8=fp8,
                                 attention_splits=args.attention_splits or None,
                                 dense_masked=args.dense_masked)
                    except torch.OutOfMemoryError as e:
                        print(f"  batch {batch} ctx {ctx} q {nq}: out of memory ({str(e)[:80]})", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    r["topk_TBps"] = r["index_key_bytes"] / (r["openmsa_topk_us"]["median_us"] * 1e-6) / 1e12
                    rows.append(r)
                    print(f"  q {nq:2d} ctx {ctx:8d} batch {batch:3d} fp8 {fp8:8s}: openmsa {r['openmsa_us']['median_us']:9.1f} us "
                          f"(topk {r['openmsa_topk_us']['median_us']:8.1f} us, {r['topk_TBps']:.2f} TB/s)  "
                          f"dense (folded) {r['dense_us']['median_us']:9.1f} us  speedup {r['speedup']:5.2f}x  "
                          f"(dense 1-token {r['dense_1tok_us']['median_us']:9.1f} us: {r['speedup_vs_1tok']:5.2f}x)  "
                          + (f"dense (masked) {r['dense_masked_us']['median_us']:9.1f} us  "
                             if "dense_masked_us" in r else "")
                          + f"splits {r['index_splits']}/{r['attention_splits']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    baselines = {"dense_us": DENSE_BASELINE, "dense_1tok_us": DENSE_1TOK}
    if args.dense_masked:
        baselines["dense_masked_us"] = DENSE_MASKED
    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "copy_TBps": bw, "dense_baseline": baselines,
                   "rows": rows}, f, indent=1)
    masked_col = " dense SDPA unfolded + causal mask |" if args.dense_masked else ""
    lines = [f"Device: {name}, torch {torch.__version__}, bf16, Hq={HQ} Hkv={HKV} D=Di={D} B={B} K={K}; "
             f"CUDA-graph replays, median of 20 (us); copy bandwidth {bw:.2f} TB/s.",
             f"Dense baseline: {DENSE_BASELINE}; speedup = dense / openmsa. Also: {DENSE_1TOK}."
             + (f" And: {DENSE_MASKED}." if args.dense_masked else ""), "",
             "| q/request | context | batch | FP8 | openmsa decode | of which Index Branch | index-key TB/s "
             "| dense SDPA, queries folded into heads | speedup | dense, 1 token/request (bytes bound) "
             f"| speedup vs it |{masked_col}",
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.dense_masked else "")]
    for r in rows:
        masked = (f" {r['dense_masked_us']['median_us']:.1f} |" if "dense_masked_us" in r
                  else " n/a |" if args.dense_masked else "")
        lines.append(f"| {r['q_per_request']} | {r['context'] // 1024}K | {r['batch']} | {r.get('fp8', 'none')} | "
                     f"{r['openmsa_us']['median_us']:.1f} | {r['openmsa_topk_us']['median_us']:.1f} | "
                     f"{r['topk_TBps']:.2f} | {r['dense_us']['median_us']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['dense_1tok_us']['median_us']:.1f} | {r['speedup_vs_1tok']:.2f}x |{masked}")
    with open(os.path.join(args.out, "decode.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))



def timed(fn, warmup=3, runs=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return {"median_ms": statistics.median(ts), "cv": statistics.pstdev(ts) / statistics.mean(ts)}


def prefill_main(argv=None):
    ap = argparse.ArgumentParser(prog="openmsa bench --serving (chunked prefill)")
    ap.add_argument("--cases", default="8192:122880,4096:28672,16384:245760",
                    help="new:prefix pairs (tokens)")
    ap.add_argument("--out", default="benchmarks/results/local/prefill_chunk")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for item in args.cases.split(","):
        new, prefix = map(int, item.split(":"))
        total = new + prefix
        pages = -(-total // B)
        bf = dict(device=dev, dtype=torch.bfloat16)
        kc = torch.randn(pages, B, HKV, D, generator=gen, **bf)
        vc = torch.randn(pages, B, HKV, D, generator=gen, **bf)
        kic = torch.randn(pages, B, DI, generator=gen, **bf)
        pt = torch.randperm(pages, generator=gen, device=dev).view(1, pages).to(torch.int32)
        q = torch.randn(new, HQ, D, generator=gen, **bf)
        qi = torch.randn(new, HKV, DI, generator=gen, **bf)
        cu_q = torch.tensor([0, new], dtype=torch.int32, device=dev)
        kv = torch.tensor([total], dtype=torch.int32, device=dev)
        w = MSAPrefillWrapper(HQ, HKV, D, DI, block_size=B, topk=K)
        w.plan(cu_q, kv, pt)
        r = {"new_tokens": new, "prefix_tokens": prefix,
             "openmsa": timed(lambda: w.run(q, qi, kc, vc, kic))}
        # dense: the same tokens as a contiguous [1, Hkv, total, D] cache
        from torch.nn.attention.bias import causal_lower_right
        kd = kc[pt[0].long()].flatten(0, 1)[:total].permute(1, 0, 2)[None].contiguous()
        vd = vc[pt[0].long()].flatten(0, 1)[:total].permute(1, 0, 2)[None].contiguous()
        kc = vc = kic = None
        qd = q.transpose(0, 1)[None]
        mask = causal_lower_right(new, total)
        r["dense_sdpa"] = timed(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask,
                                                                        enable_gqa=True))
        r["speedup"] = r["dense_sdpa"]["median_ms"] / r["openmsa"]["median_ms"]
        rows.append(r)
        print(f"new {new:6d} on prefix {prefix:7d}: openmsa {r['openmsa']['median_ms']:8.3f} ms  "
              f"dense {r['dense_sdpa']['median_ms']:8.3f} ms  speedup {r['speedup']:.2f}x", flush=True)
        kd = vd = None
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefill_chunk.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)

