"""Kernel-level time breakdown of one MSADecodeWrapper.run (torch.profiler, CUPTI kernel
durations: launch gaps excluded), for the decode cases that matter most at batch 1.

    python benchmarks/profile_decode.py --cases 1:1048576:1:none 1:1048576:1:index
      (batch:context:queries per request:fp8 mode, as openmsa/bench/serving.py's case())
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from openmsa.bench import serving  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["1:1048576:1:none", "1:1048576:1:index"])
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    for spec in args.cases:
        batch, ctx, nq, fp8 = spec.split(":")
        calls = []
        serving.case(int(batch), int(ctx), int(nq), dev, gen, dense=False, fp8=fp8, capture=calls)
        fn = calls[0]
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                fn()
            torch.cuda.synchronize()
        per = collections.defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per[ev.name] += ev.device_time / args.iters
        total = sum(per.values())
        print(f"batch {batch} context {ctx} q {nq} fp8 {fp8}: kernels {total:.1f} us per run")
        for name, t in sorted(per.items(), key=lambda kv: -kv[1]):
            print(f"  {t:8.1f} us  {name[:90]}")
        calls.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
