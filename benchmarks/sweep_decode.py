"""Knob sweep of the paged decode at one case (default: 1M tokens, batch 1, 1 query token):
index-scan pages per step and pipeline stages (configs.DecodeIndex), index
and attention split counts, for bf16 and FP8 index keys. CUDA-graph medians (us), as
openmsa/bench/serving.py times them; no dense baseline.

    python benchmarks/sweep_decode.py --batch 1 --context 1048576
"""
import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from openmsa.bench import serving  # noqa: E402
from openmsa.ops.utils.configs import override  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1 << 20)
    ap.add_argument("--q", type=int, default=1)
    ap.add_argument("--fp8", nargs="+", default=["none", "index"])
    ap.add_argument("--pages", nargs="+", default=["2", "4"])
    ap.add_argument("--stages", nargs="+", default=["2", "3", "4"])
    ap.add_argument("--warps", nargs="+", default=["4"])
    ap.add_argument("--index-splits", type=int, nargs="+", default=[0])
    ap.add_argument("--attention-splits", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    for fp8, pages, stages, warps, isp, asp in itertools.product(
            args.fp8, args.pages, args.stages, args.warps, args.index_splits, args.attention_splits):
        try:
            with override("decode_index", pages=int(pages), num_warps=int(warps),
                          num_stages=int(stages)):
                r = serving.case(args.batch, args.context, args.q, dev, gen, index_splits=isp or None,
                                 dense=False, fp8=fp8, attention_splits=asp or None)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for a knob setting
            print(f"fp8 {fp8:5s} pages {pages} stages {stages} warps {warps} splits {isp}/{asp}: "
                  f"{type(e).__name__} {str(e)[:80]}")
            continue
        tb = r["index_key_bytes"] / (r["openmsa_topk_us"]["median_us"] * 1e-6) / 1e12
        print(f"fp8 {fp8:5s} pages {pages} stages {stages} warps {warps} "
              f"splits {r['index_splits']:4d}/{r['attention_splits']:2d}: "
              f"decode {r['openmsa_us']['median_us']:7.1f} us  index {r['openmsa_topk_us']['median_us']:7.1f} us "
              f"({tb:.2f} TB/s)", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
