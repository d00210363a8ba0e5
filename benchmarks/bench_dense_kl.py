"""Dense warmup KL (docs/spec.md section 6, ``indexer_kl_loss(..., topk_indices=None)``) on a GPU:
the Triton path (the sparse KL kernels over chunks of 64 blocks, ``openmsa/ops/kl/dense.py``)
against the PyTorch reference it replaces, loss + gradients w.r.t. qi and ki, the
normalisers recomputed inside (as ``MSAttention``'s dense mode calls it).

    python benchmarks/bench_dense_kl.py --out benchmarks/results/h100/dense_kl

Protocol: CUDA events after warmup, median of the runs, input sets rotated past the L2
(``openmsa.bench.gpu``), both paths in the same process on the same card. Also checks the
Triton result against the reference (relative error norms of loss, dqi, dki). Also the
dense attention of the warmup (``sparse_attention(..., topk_indices=None)``, forward +
backward) through the kernels in chunks, against torch SDPA.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import openmsa  # noqa: E402
from openmsa.bench.gpu import bench, rotation  # noqa: E402

CONFIGS = {
    # name: Hq, Hkv, D, Di, B
    "retrieval experiment": (8, 2, 64, 64, 64),
    "MSA default": (64, 4, 128, 128, 128),
}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(name, n, args, dev):
    hq, hkv, d, di, b = CONFIGS[name]
    per_set = n * (hq * d + hkv * d + hkv * di + di) * 2
    sets = rotation(per_set)
    gen = torch.Generator(device=dev).manual_seed(n + hq)
    data = []
    for _ in range(sets):
        data.append((torch.randn(n, hq, d, device=dev, generator=gen).mul(2).bfloat16(),
                     torch.randn(n, hkv, d, device=dev, generator=gen).bfloat16(),
                     torch.randn(n, hkv, di, device=dev, generator=gen).bfloat16(),
                     torch.randn(n, 1, di, device=dev, generator=gen).bfloat16()))
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)

    def step(i, backend):
        q, k, qi, ki = data[i % sets]
        a, c = qi.detach().requires_grad_(), ki.detach().requires_grad_()

        def fn():
            loss = openmsa.indexer_kl_loss(q, k, a, c, None, cu, cu, block_size=b, backend=backend)
            loss.backward()
            return loss, a.grad, c.grad
        return fn

    row = dict(config=name, hq=hq, hkv=hkv, d=d, di=di, block_size=b, context=n, input_sets=sets)
    with_ref = n <= args.ref_max_context  # the reference takes seconds per call beyond
    if with_ref:
        got = step(0, "triton")()
        want = step(0, "reference")()
        row.update(rel_loss=rel(got[0], want[0]), rel_dqi=rel(got[1], want[1]),
                   rel_dki=rel(got[2], want[2]))
    for backend in ("triton", "reference") if with_ref else ("triton",):
        runs = args.runs if backend == "triton" else args.ref_runs
        r = bench(lambda i: step(i, backend), sets, warmup=2, runs=runs)
        row[f"{backend}_ms"], row[f"{backend}_cv"] = r["median_ms"], r["cv"]
    if with_ref:
        row["speedup"] = row["reference_ms"] / row["triton_ms"]
    print(json.dumps(row), flush=True)
    return row


def run_attention(name, n, args, dev):
    """Dense causal attention forward + backward: the sparse kernels in chunks of 64 blocks
    (``sparse_attention(..., None)``, what varlen packs use) against torch SDPA with GQA on
    the same single sequence (what equal-length batches use)."""
    hq, hkv, d, _, b = CONFIGS[name]
    sets = rotation(n * (hq + 2 * hkv) * d * 2 * 2)
    gen = torch.Generator(device=dev).manual_seed(n + 7)
    data = [tuple(torch.randn(n, h, d, device=dev, generator=gen).bfloat16() for h in (hq, hkv, hkv))
            for _ in range(sets)]
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    dout = torch.randn(n, hq, d, device=dev, generator=gen).bfloat16()

    def step(i, how):
        q, k, v = (x.detach().requires_grad_() for x in data[i % sets])

        def fn():
            if how == "triton":
                o, _ = openmsa.sparse_attention(q, k, v, None, cu, cu, block_size=b, backend="triton")
            else:
                o = torch.nn.functional.scaled_dot_product_attention(
                    *(x.transpose(0, 1)[None] for x in (q, k, v)), is_causal=True,
                    enable_gqa=True)[0].transpose(0, 1)
            o.backward(dout)
        return fn

    row = dict(config=name, op="dense attention fwd+bwd", hq=hq, hkv=hkv, d=d, block_size=b,
               context=n, input_sets=sets)
    for how in ("triton", "sdpa"):
        r = bench(lambda i: step(i, how), sets, warmup=2, runs=args.runs)
        row[f"{how}_ms"], row[f"{how}_cv"] = r["median_ms"], r["cv"]
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/local/dense_kl")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--ref-runs", type=int, default=3)
    ap.add_argument("--ref-max-context", type=int, default=16384,
                    help="time the reference (and check against it) up to this context only")
    ap.add_argument("--cases", default="retrieval experiment:4096,16384;MSA default:8192,32768")
    ap.add_argument("--attention-cases", default="retrieval experiment:16384;MSA default:32768")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for part in args.cases.split(";"):
        name, ctxs = part.split(":")
        for n in map(int, ctxs.split(",")):
            try:
                rows.append(run(name, n, args, dev))
            except torch.OutOfMemoryError as e:
                print(f"{name} {n}: out of memory ({e})", flush=True)
                rows.append(dict(config=name, context=n, error="out of memory"))
            torch.cuda.empty_cache()
    att = []
    for part in args.attention_cases.split(";") if args.attention_cases else []:
        name, ctxs = part.split(":")
        for n in map(int, ctxs.split(",")):
            att.append(run_attention(name, n, args, dev))
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, dtype="bfloat16",
                what="indexer_kl_loss(topk_indices=None): loss + backward, lse / index_lse recomputed")
    with open(os.path.join(args.out, "dense_kl.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, attention_rows=att), f, indent=1)
    lines = [f"# Dense warmup KL: Triton (chunks of 64 blocks) vs the PyTorch reference ({meta['device']})",
             "", "bf16, one sequence, loss + gradients w.r.t. qi and ki, normalisers recomputed; "
             "median of CUDA-event timings, inputs rotated past L2.", "",
             "| config (Hq/Hkv/D/Di/B) | context | Triton ms | reference ms | speedup | rel err loss / dqi / dki |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['context']} | {r['error']} | | | |")
            continue
        ref = (f"{r['reference_ms']:.1f} | {r['speedup']:.0f}x | {r['rel_loss']:.1e} / "
               f"{r['rel_dqi']:.1e} / {r['rel_dki']:.1e}") if "speedup" in r else "not run | | "
        lines.append(f"| {r['config']} ({r['hq']}/{r['hkv']}/{r['d']}/{r['di']}/{r['block_size']}) | "
                     f"{r['context']} | {r['triton_ms']:.2f} | {ref} |")
    if att:
        lines += ["", "Dense causal attention forward + backward (bf16, one sequence): the sparse "
                  "kernels in chunks of 64 blocks (the varlen path) against torch SDPA with GQA "
                  "(the equal-length path).", "",
                  "| config (Hq/Hkv/D/B) | context | Triton chunks ms | SDPA ms |", "|---|---|---|---|"]
        for r in att:
            lines.append(f"| {r['config']} ({r['hq']}/{r['hkv']}/{r['d']}/{r['block_size']}) | "
                         f"{r['context']} | {r['triton_ms']:.2f} | {r['sdpa_ms']:.2f} |")
    with open(os.path.join(args.out, "dense_kl.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
