"""The Index Branch on one GPU, 16-bit against FP8 ranking (``index_dtype``):

    python benchmarks/bench_indexer.py --contexts 32768 131072 1048576 --out DIR

One causal sequence per context, bf16 inputs, Hkv=4 Di=128 B=128 K=16. Per context:

- the time of ``openmsa.indexer_topk`` (the whole op: Top-k and index_lse) with bf16 and
  with FP8 ranking (CUDA events, median after warmup; useful FLOPs = 2 Hkv Di per visible
  (query, key) pair, docs/spec.md section 9, the same count for both);
- the FP8 selection's quality on these random inputs, on ``--quality-rows`` query rows
  spread over the sequence (rows with more than K visible blocks): ``agreement``, the
  share of the bf16 selection's ranked blocks that the FP8 selection also holds, and
  ``index_mass_recall``, the softmax mass of the bf16 index scores over the FP8-selected
  tokens divided by that over the bf16-selected ones (1 = as good a selection for the
  index distribution the KL trains). Random main-branch q, k say nothing about the index,
  so attention-mass recall is measured on trained models instead
  (experiments/retrieval/analysis/fp8_index.py).

``--sweep N ...`` also times the launch settings of ``configs.Indexer`` listed in SWEEP at
those contexts (twice, interleaved, up to 128K). Writes DIR/bench_indexer.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import openmsa  # noqa: E402
from openmsa.bench.gpu import bench  # noqa: E402
from openmsa.ops.utils.configs import override  # noqa: E402

HKV, DI, B, K = 4, 128, 128, 16
FP8 = torch.float8_e4m3fn
# (label, index_dtype, fields of configs.Indexer): the launch settings --sweep compares
SWEEP = [
    ("bf16 default", None, {}),
    ("bf16 one program per SM", None, {"two_program_tiles": {}}),
    ("fp8 default", FP8, {}),
    ("fp8 no register cap", FP8, {"fp8_maxnreg": 0}),
    ("fp8 64 rows, 4 warps", FP8, {"fp8_tiles": {DI: (64, 4, 3)}}),
]


def useful_flops(n: int) -> int:
    return 2 * HKV * DI * n * (n + 1) // 2


def quality(qi, ki, idx16, idx8, rows: int, gen) -> dict:
    """agreement and index_mass_recall (module docstring) on ``rows`` sampled query rows."""
    n = qi.shape[0]
    lo = K * B
    t = torch.randint(lo, n, (rows,), generator=gen, device=qi.device).sort().values
    agree, recall = [], []
    for chunk in t.split(64):
        z = torch.einsum("rhd,jd->hrj", qi[chunk].float(), ki[:, 0].float()) * DI ** -0.5
        vis = torch.arange(n, device=qi.device)[None, :] <= chunk[:, None]
        p = torch.softmax(z.masked_fill(~vis, float("-inf")), -1)  # [Hkv, R, n]
        nb = -(-n // B)
        mass = torch.nn.functional.pad(p, (0, nb * B - n)).view(HKV, len(chunk), nb, B).sum(-1)

        def held(idx):
            sel = idx[:, chunk].long()
            m = torch.zeros(HKV, len(chunk), nb + 1, dtype=torch.bool, device=qi.device)
            m.scatter_(-1, torch.where(sel >= 0, sel, nb), True)
            return m[..., :nb]
        s16, s8 = held(idx16), held(idx8)
        local = torch.zeros_like(s16)
        local.scatter_(-1, (chunk // B).expand(HKV, -1)[..., None], True)
        ranked16 = s16 & ~local
        agree.append(((ranked16 & s8).sum(-1).float() / ranked16.sum(-1).clamp_min(1)).flatten())
        recall.append(((mass * s8).sum(-1) / (mass * s16).sum(-1)).flatten())
    agree, recall = torch.cat(agree), torch.cat(recall)
    return {"agreement": agree.mean().item(), "agreement_min": agree.min().item(),
            "index_mass_recall": recall.mean().item(), "index_mass_recall_min": recall.min().item(),
            "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072, 1048576])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--quality-rows", type=int, default=512)
    ap.add_argument("--sweep", type=int, nargs="*", default=[],
                    help="contexts at which to time every launch setting of SWEEP")
    ap.add_argument("--out", default="benchmarks/results/local/indexer")
    args = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"{name}, torch {torch.__version__}", flush=True)
    rows = []
    for n in args.contexts:
        gen = torch.Generator(device=dev).manual_seed(n)
        qi = torch.randn(n, HKV, DI, generator=gen, device=dev).bfloat16()
        ki = torch.randn(n, 1, DI, generator=gen, device=dev).bfloat16()
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        runs = args.runs if n <= 131072 else max(3, args.runs // 2)
        row = {"context": n}
        sel = {}
        for label, dt in (("bf16", None), ("fp8", FP8)):
            res = bench(lambda i: lambda: openmsa.indexer_topk(qi, ki, cu, cu, block_size=B, topk=K,
                                                               index_dtype=dt), 1, runs=runs)
            res["tflops"] = useful_flops(n) / res["median_ms"] / 1e9
            row[label] = res
            sel[label] = openmsa.indexer_topk(qi, ki, cu, cu, block_size=B, topk=K, index_dtype=dt)[0]
            print(f"  {n:>8} {label}: {res['median_ms']:9.3f} ms  {res['tflops']:6.1f} TFLOP/s", flush=True)
        row["fp8_speedup"] = row["bf16"]["median_ms"] / row["fp8"]["median_ms"]
        row["quality"] = quality(qi, ki, sel["bf16"], sel["fp8"], args.quality_rows,
                                 torch.Generator(device=dev).manual_seed(1))
        print(f"  {n:>8} fp8 speedup {row['fp8_speedup']:.2f}x, quality {row['quality']}", flush=True)
        if n in args.sweep:
            row["sweep"] = []
            for rep in range(2 if n <= 131072 else 1):  # twice, interleaved, where it is cheap
                for label, dt, fields in SWEEP:
                    try:
                        with override("indexer", **fields):
                            res = bench(lambda i: lambda: openmsa.indexer_topk(
                                qi, ki, cu, cu, block_size=B, topk=K, index_dtype=dt), 1, runs=runs)
                        row["sweep"].append({"setting": label, "rep": rep, **res})
                        print(f"  {n:>8} {label:40s} {res['median_ms']:9.3f} ms", flush=True)
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                        row["sweep"].append({"setting": label, "rep": rep,
                                             "error": f"{type(exc).__name__}: {exc}"[:300]})
                        print(f"  {n:>8} {label:40s} failed {type(exc).__name__}", flush=True)
        rows.append(row)
        del qi, ki, sel
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_indexer.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "config": dict(hkv=HKV, di=DI, block=B, topk=K),
                   "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench_indexer.md"), "w") as f:
        f.write(f"# Index Branch, bf16 against FP8 ranking ({name})\n\n"
                f"One causal sequence, bf16 inputs, Hkv={HKV} Di={DI} B={B} K={K}; `openmsa.indexer_topk` "
                "(Top-k + index_lse), median of CUDA-event timings; quality on random inputs "
                f"({args.quality_rows} rows).\n\n"
                "| context | bf16 (ms) | TFLOP/s | FP8 (ms) | TFLOP/s | speedup | agreement | "
                "index-mass recall (mean / min) |\n|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            qv = r["quality"]
            f.write(f"| {r['context'] // 1024}K | {r['bf16']['median_ms']:.2f} | {r['bf16']['tflops']:.0f} | "
                    f"{r['fp8']['median_ms']:.2f} | {r['fp8']['tflops']:.0f} | {r['fp8_speedup']:.2f}x | "
                    f"{qv['agreement']:.3f} | {qv['index_mass_recall']:.4f} / {qv['index_mass_recall_min']:.4f} |\n")
    print(f"wrote {args.out}/bench_indexer.json and .md")


if __name__ == "__main__":
    main()
