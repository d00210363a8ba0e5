"""Chunked prefill per layer on a GPU: openmsa's paged prefill (MSAPrefillWrapper.run:
Index Branch + sparse attention over the cached prefix and the chunk) against dense
attention over the same tokens (torch SDPA, bottom-right causal, contiguous cache).

    python benchmarks/bench_prefill_chunk.py --out benchmarks/results/h100/prefill_chunk

bf16, Hq=64 Hkv=4 D=Di=128 B=128 K=16, one request; random values, shuffled pages. Times
are medians of CUDA-event timings after warmup (the caches are far larger than L2).
"""

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from openmsa.serving.prefill import MSAPrefillWrapper  # noqa: E402

HQ, HKV, D, DI, B, K = 64, 4, 128, 128, 128, 16


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="8192:122880,4096:28672,16384:245760",
                    help="new:prefix pairs (tokens)")
    ap.add_argument("--out", default="benchmarks/results/local/prefill_chunk")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
