"""Decode latency per layer: openmsa's paged MSA decode against dense decode over the same
cache, on a GPU.

    python benchmarks/bench_decode.py --out benchmarks/results/h100/decode

Each case (batch, context, query tokens per request) fills paged K, V and index-key pools
(bf16, page = block = 128 tokens, Hq=64 Hkv=4 D=Di=128, K=16) with random values; every
request holds `context` tokens and its queries are its last positions. Timing follows the
official decode protocol (shared/workloads/README.md): the call is captured in a CUDA graph,
5 warmup and 20 timed replays, median and coefficient of variation. The caches are far
larger than the L2, so the replays read them from HBM (no input rotation is needed).

Baseline: dense decode over the same tokens with torch's scaled_dot_product_attention on a
contiguous [batch, Hkv, context, D] cache (enable_gqa=True, torch's default backend choice;
bottom-right causal mask when there are several query tokens), also graph-captured.

openmsa is timed whole (`run`: Index Branch + sparse attention) and its Index Branch alone
(`run_index`), whose effective bandwidth (index-key bytes / time) is reported against the
device copy bandwidth.
"""

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from openmsa.serving.decode import MSADecodeWrapper  # noqa: E402

HQ, HKV, D, DI, B, K = 64, 4, 128, 128, 128, 16


def graph_time(fn, warmup=5, runs=20):
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
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
        times.append(a.elapsed_time(b) * 1000.0)  # us
    return {"median_us": statistics.median(times), "cv": statistics.pstdev(times) / statistics.mean(times)}


def copy_bandwidth(dev):
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    r = graph_time(lambda: y.copy_(x))
    return 2 * x.numel() / (r["median_us"] * 1e-6) / 1e12  # TB/s, read + write


def case(batch, ctx, nq, dev, gen):
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
    w.plan(cu_q, kv_lens, page_table)
    res = {"batch": batch, "context": ctx, "q_per_request": nq,
           "index_splits": w._plan["idx_splits"], "attention_splits": w._plan["attn_splits"]}
    res["openmsa_us"] = graph_time(lambda: w.run(q, qi, k_cache, v_cache, ki_cache))
    res["openmsa_topk_us"] = graph_time(lambda: w.run_index(qi, ki_cache))
    res["index_key_bytes"] = batch * ctx * DI * 2
    del k_cache, v_cache, ki_cache
    # dense baseline on a contiguous cache of the same size
    kd = torch.randn(batch, HKV, ctx, D, device=dev, dtype=torch.bfloat16, generator=gen)
    vd = torch.randn(batch, HKV, ctx, D, device=dev, dtype=torch.bfloat16, generator=gen)
    qd = q.view(batch, nq, HQ, D).transpose(1, 2)
    mask = None
    if nq > 1:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(nq, ctx)
    res["dense_us"] = graph_time(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True))
    res["speedup"] = res["dense_us"]["median_us"] / res["openmsa_us"]["median_us"]
    del kd, vd
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    ap.add_argument("--q", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=8 << 20, help="skip batch x context above this")
    ap.add_argument("--out", default="benchmarks/results/local/decode")
    args = ap.parse_args()
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
                try:
                    r = case(batch, ctx, nq, dev, gen)
                except torch.OutOfMemoryError as e:
                    print(f"  batch {batch} ctx {ctx} q {nq}: out of memory ({str(e)[:80]})", flush=True)
                    torch.cuda.empty_cache()
                    continue
                r["topk_TBps"] = r["index_key_bytes"] / (r["openmsa_topk_us"]["median_us"] * 1e-6) / 1e12
                rows.append(r)
                print(f"  q {nq:2d} ctx {ctx:8d} batch {batch:3d}: openmsa {r['openmsa_us']['median_us']:9.1f} us "
                      f"(topk {r['openmsa_topk_us']['median_us']:8.1f} us, {r['topk_TBps']:.2f} TB/s)  "
                      f"dense {r['dense_us']['median_us']:9.1f} us  speedup {r['speedup']:5.2f}x  "
                      f"splits {r['index_splits']}/{r['attention_splits']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "copy_TBps": bw, "rows": rows}, f, indent=1)
    lines = [f"Device: {name}, torch {torch.__version__}, bf16, Hq={HQ} Hkv={HKV} D=Di={D} B={B} K={K}; "
             f"CUDA-graph replays, median of 20 (us); copy bandwidth {bw:.2f} TB/s.", "",
             "| q/request | context | batch | openmsa decode | of which Index Branch | index-key TB/s | dense SDPA | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['q_per_request']} | {r['context'] // 1024}K | {r['batch']} | "
                     f"{r['openmsa_us']['median_us']:.1f} | {r['openmsa_topk_us']['median_us']:.1f} | "
                     f"{r['topk_TBps']:.2f} | {r['dense_us']['median_us']:.1f} | {r['speedup']:.2f}x |")
    with open(os.path.join(args.out, "decode.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
