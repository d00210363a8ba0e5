"""Sparse attention at the retrieval experiment's shapes (Hq 8, Hkv 2, D 64, B 64, K 8) with
every visible block selected (L <= K * B) must equal dense causal attention, forward and
backward. Prints relative errors against a float32 PyTorch dense reference.

    python benchmarks/check_small_heads.py            # GPU (Triton compiled)
    TRITON_INTERPRET=1 python benchmarks/check_small_heads.py --device cpu --dtype float32
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import openmsa  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lens", default="256,512,192,320")
    ap.add_argument("--shapes", default="8,2,64,64,8", help="Hq,Hkv,D,B,K")
    args = ap.parse_args()
    hq, hkv, d, bs, topk = map(int, args.shapes.split(","))
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    lens = [int(x) for x in args.lens.split(",")]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    n = sum(lens)
    q = torch.randn(n, hq, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(n, hkv, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(n, hkv, d, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn(n, hq, d, device=dev, dtype=dt)
    # every visible block of each row: local block first-class, earlier blocks, -1 padding
    idx = torch.full((hkv, n, topk), -1, dtype=torch.int32, device=dev)
    for s, L in enumerate(lens):
        for t in range(L):
            blocks = list(range(t // bs + 1))[-topk:]
            idx[:, cu[s] + t, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    out, _ = openmsa.sparse_attention(q, k, v, idx, cu, cu, block_size=bs)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), do)
    # float32 dense reference per sequence
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    outs = []
    for s, L in enumerate(lens):
        a, b = int(cu[s]), int(cu[s + 1])
        o = F.scaled_dot_product_attention(qf[a:b].transpose(0, 1)[None], kf[a:b].transpose(0, 1)[None],
                                           vf[a:b].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    ref = torch.cat(outs)
    rq, rk, rv = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    print(f"{args.device} {args.dtype} shapes Hq {hq} Hkv {hkv} D {d} B {bs} K {topk} lens {lens}")
    print(f"  out rel {rel(out, ref):.2e}  dq {rel(gq, rq):.2e}  dk {rel(gk, rk):.2e}  dv {rel(gv, rv):.2e}")


if __name__ == "__main__":
    main()
