"""Sweep launch settings of the Triton sparse attention on a GPU (knobs: entries of openmsa.ops.utils.configs).

    python benchmarks/sweep_attention.py --contexts 32768 131072
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import openmsa  # noqa: E402
from openmsa.bench.cost_model import MSAConfig  # noqa: E402
from openmsa.bench.gpu import bench, flops, random_topk  # noqa: E402
from openmsa.bench.sweep import applied, combinations  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--knobs", default="attention_fwd.segment_tiles=1,4,16;scratch.partial_bytes=2147483648,8589934592")
    ap.add_argument("--bwd", action="store_true")
    args = ap.parse_args()
    cfg, dev = MSAConfig(), torch.device("cuda")
    for n in args.contexts:
        gen = torch.Generator(device=dev).manual_seed(n)
        q = torch.randn(n, 64, 128, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(n, 4, 128, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(n, 4, 128, device=dev, dtype=torch.bfloat16, generator=gen)
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        idx = random_topk(n, cfg, gen, dev)
        f = flops(n, cfg)
        for label, settings in combinations(args.knobs):
            if args.bwd:
                qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                do = torch.randn_like(q)

                def fn():
                    out, _ = openmsa.sparse_attention(qq, kk, vv, idx, cu, cu)
                    out.backward(do)
                useful = f["sparse_fwd"] + f["sparse_bwd"]
            else:
                def fn():
                    openmsa.sparse_attention(q, k, v, idx, cu, cu)
                useful = f["sparse_fwd"]
            with applied(settings):
                r = bench(lambda i: fn, 1, runs=10)
            print(f"{n:8d} {label:60s} {r['median_ms']:9.3f} ms {useful / r['median_ms'] / 1e9:7.1f} TFLOP/s",
                  flush=True)
    from openmsa.bench.gpu import compiled_kernel_report
    from openmsa.ops.attention import kernels as attention_kernels
    print("\n".join(compiled_kernel_report(attention_kernels)))


if __name__ == "__main__":
    main()
