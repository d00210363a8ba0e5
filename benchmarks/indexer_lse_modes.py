"""Indexer time with the two selected-LSE modes (configs.Indexer.lse_mode), random and
correlated queries, on a GPU.  python benchmarks/indexer_lse_modes.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import openmsa  # noqa: E402
from openmsa.bench.gpu import bench  # noqa: E402
from openmsa.ops.utils.configs import override  # noqa: E402

for n in (8192, 32768, 131072, 524288, 1048576):
    gen = torch.Generator(device="cuda").manual_seed(n)
    ki = torch.randn(n, 1, 128, device="cuda", generator=gen).bfloat16()
    qr = torch.randn(n, 4, 128, device="cuda", generator=gen)
    base = torch.randn(n // 64 + 1, 4, 128, device="cuda", generator=gen).repeat_interleave(64, 0)[:n]
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    flops = 2 * 4 * 128 * n * (n + 1) // 2
    for corr, qi in (("random", qr.bfloat16()), ("correlated", (base + 0.25 * qr).bfloat16())):
        for mode in ("kv_outer", "union"):
            with override("indexer", lse_mode=mode):
                r = bench(lambda i: lambda: openmsa.indexer_topk(qi, ki, cu, cu), 1,
                          runs=10 if n <= 131072 else 3)
            print(f"{n:8d} {corr:10s} {mode:8s} {r['median_ms']:10.3f} ms {flops / r['median_ms'] / 1e9:7.1f} TFLOP/s",
                  flush=True)
