"""The reference backend on one 32K-token sequence with the default configuration
(Hq=64, Hkv=4, D=Di=128, B=128, K=16) on a CPU: msa_attention forward and the
backward of out and KL. Checks that memory stays bounded (peak RSS) and records time.

    python benchmarks/cpu_reference_32k.py [--seqlen 32768] [--json out.json]
"""

import argparse
import json
import resource
import time

import torch

import openmsa
from openmsa.bench.cli import _inputs
from openmsa.bench.cost_model import MSAConfig


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = MSAConfig()
    dtype = getattr(torch, args.dtype)
    q, k, v, qi, ki, cu = _inputs(args.seqlen, cfg, torch.device("cpu"), dtype)
    for t in (q, k, v, qi, ki):
        t.requires_grad_()
    res = {"seqlen": args.seqlen, "dtype": args.dtype, "config": cfg.__dict__,
           "threads": torch.get_num_threads(), "rss_inputs_gib": peak_rss_gib()}
    t0 = time.perf_counter()
    out, kl, idx = openmsa.msa_attention(q, k, v, qi, ki, cu, cu, backend="reference")
    res["forward_s"] = time.perf_counter() - t0
    res["rss_after_forward_gib"] = peak_rss_gib()
    t0 = time.perf_counter()
    (out.float().square().mean() + kl).backward()
    res["backward_s"] = time.perf_counter() - t0
    res["peak_rss_gib"] = peak_rss_gib()
    res["kl"] = kl.item()
    res["finite"] = bool(torch.isfinite(out).all() and torch.isfinite(q.grad).all()
                         and torch.isfinite(qi.grad).all() and torch.isfinite(ki.grad).all())
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
