"""Kernel-level time breakdown of openmsa's Triton ops on a GPU (torch.profiler),
plus the compiled kernels' register/spill counts.

    python benchmarks/profile_ops.py --context 131072 --ops fwd,bwd,indexer,kl
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import openmsa  # noqa: E402
from openmsa.bench.cost_model import MSAConfig  # noqa: E402
from openmsa.bench.gpu import random_topk  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--ops", default="fwd,bwd,indexer,kl")
    args = ap.parse_args()
    cfg = MSAConfig()
    n, dev = args.context, torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(n, 64, 128, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
    k = torch.randn(n, 4, 128, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
    v = torch.randn(n, 4, 128, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
    qi = torch.randn(n, 4, 128, device=dev, dtype=torch.bfloat16, generator=gen)
    ki = torch.randn(n, 1, 128, device=dev, dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    idx = random_topk(n, cfg, gen, dev)
    do = torch.randn_like(q)
    ops = args.ops.split(",")
    if "kl" in ops:  # the KL reads the LSEs of the two branches, as msa_attention passes them
        _, lse = openmsa.sparse_attention(q.detach(), k.detach(), v.detach(), idx, cu, cu)
        index_lse = torch.zeros(4, n, device=dev)

    def step():
        if "indexer" in ops:
            openmsa.indexer_topk(qi, ki, cu, cu)
        if "fwd" in ops or "bwd" in ops:
            out, _ = openmsa.sparse_attention(q, k, v, idx, cu, cu)
            if "bwd" in ops:
                out.backward(do)
        if "kl" in ops:
            a = qi.detach().requires_grad_()
            b = ki.detach().requires_grad_()
            loss = openmsa.indexer_kl_loss(q.detach(), k.detach(), a, b, idx, cu, cu,
                                           lse=lse, index_lse=index_lse)
            loss.backward()

    step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    from openmsa.bench.gpu import compiled_kernel_report
    from openmsa.ops.attention import kernels as attention_kernels
    from openmsa.ops.kl import kernels as kl_kernels
    print("\n".join(compiled_kernel_report(attention_kernels) + compiled_kernel_report(kl_kernels)))


if __name__ == "__main__":
    main()
