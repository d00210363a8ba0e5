"""Sweep launch settings of the Triton sparse KL loss on a GPU (knobs: entries of openmsa.ops.utils.configs).

    python benchmarks/sweep_kl.py --contexts 32768 131072
    python benchmarks/sweep_kl.py --knobs "kl_teacher.tile_rows=32,64,128;kl_teacher.num_warps=4,8"

Times the loss + gradients (one fused forward pass; the backward only scales the stored
gradients) with lse and index_lse passed in, as msa_attention does. Useful FLOPs per
(query, group, selected block): the main scores 2*G*D*B, the index scores 2*Di*B and
the two gradient products 4*Di*B (full blocks; the causal tail is not discounted).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import openmsa  # noqa: E402
from openmsa.bench.cost_model import MSAConfig  # noqa: E402
from openmsa.bench.gpu import bench, compiled_kernel_report, random_topk  # noqa: E402
from openmsa.bench.sweep import applied, combinations  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--knobs", default="kl_teacher.tile_rows=32,64,128;kl_teacher.num_warps=4,8;"
                                       "kl_teacher.segment_tiles=4,16")
    ap.add_argument("--no-grad", action="store_true", help="loss only (WITH_GRAD=False)")
    args = ap.parse_args()
    cfg, dev = MSAConfig(), torch.device("cuda")
    hq, hkv, d, di, b = cfg.num_heads, cfg.num_kv_heads, 128, 128, cfg.block_size
    g = hq // hkv
    for n in args.contexts:
        gen = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn(n, hq, d, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(n, hkv, d, device=dev, dtype=torch.bfloat16, generator=gen)
        qi = torch.randn(n, hkv, di, device=dev, dtype=torch.bfloat16, generator=gen)
        ki = torch.randn(n, 1, di, device=dev, dtype=torch.bfloat16, generator=gen)
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        idx = random_topk(n, cfg, gen, dev)
        _, lse = openmsa.sparse_attention(q, k, k, idx, cu, cu)
        index_lse = torch.zeros(hkv, n, device=dev)  # values do not change the work
        entries = int((idx >= 0).sum())
        useful = entries * b * (2 * g * d + (2 if args.no_grad else 6) * di)
        for label, settings in combinations(args.knobs):
            a, c = qi.detach().requires_grad_(not args.no_grad), ki.detach().requires_grad_(not args.no_grad)

            def fn():
                loss = openmsa.indexer_kl_loss(q, k, a, c, idx, cu, cu, lse=lse, index_lse=index_lse)
                if not args.no_grad:
                    loss.backward()
            try:
                with applied(settings):
                    r = bench(lambda i: fn, 1, runs=10)
            except Exception as exc:  # e.g. out of shared memory for a knob combination
                print(f"{n:8d} {label:60s} failed: {type(exc).__name__}: {exc}"[:200], flush=True)
                continue
            print(f"{n:8d} {label:60s} {r['median_ms']:9.3f} ms {useful / r['median_ms'] / 1e9:7.1f} TFLOP/s",
                  flush=True)
    from openmsa.ops.kl import kernels as kl_kernels
    print("\n".join(compiled_kernel_report(kl_kernels)))


if __name__ == "__main__":
    main()
