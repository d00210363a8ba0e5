"""Cost of the deterministic backward (GPU): sparse attention fwd+bwd and the sparse KL
fwd+bwd with ``deterministic=False`` / ``True``, one causal sequence per context, the
default configuration (bf16, Hq=64, Hkv=4, D=Di=128, B=128, K=16).

    python benchmarks/bench_deterministic.py --contexts 32768 131072 \
        --out benchmarks/results/local/deterministic

Protocol of openmsa.bench.gpu (CUDA events after warmup, median of many runs, input sets
rotated past L2). Each mode is also run twice on one input set to record whether the
gradients are bitwise equal on a repeat. Writes OUT/deterministic.json and .md.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import openmsa  # noqa: E402
from openmsa.bench.cost_model import MSAConfig  # noqa: E402
from openmsa.bench.gpu import bench, flops, random_topk, rotation  # noqa: E402
from openmsa.bench.training import inputs  # noqa: E402


def attention_step(s, idx, cu, deterministic):
    """fwd+bwd of the sparse attention on input set s; returns (run, grads)."""
    q, k, v = (s[x].detach().requires_grad_() for x in ("q", "k", "v"))
    do = torch.randn_like(q)

    def run():
        for x in (q, k, v):
            x.grad = None
        out, _ = openmsa.sparse_attention(q, k, v, idx, cu, cu, deterministic=deterministic)
        out.backward(do)
    return run, lambda: (q.grad, k.grad, v.grad)


def kl_step(s, cu, deterministic):
    """fwd+bwd of the KL with the indexer's indices and both LSEs passed in."""
    qi, ki = s["qi"].detach().requires_grad_(), s["ki"].detach().requires_grad_()
    idx, index_lse = openmsa.indexer_topk(s["qi"], s["ki"], cu, cu)
    _, lse = openmsa.sparse_attention(s["q"], s["k"], s["v"], idx, cu, cu)

    def run():
        qi.grad = ki.grad = None
        openmsa.indexer_kl_loss(s["q"], s["k"], qi, ki, idx, cu, cu, lse=lse, index_lse=index_lse,
                                deterministic=deterministic).backward()
    return run, lambda: (qi.grad, ki.grad)


def repeat_equal(run, grads):
    """Whether two calls give bitwise-equal gradients."""
    run()
    first = [g.clone() for g in grads()]
    run()
    return all(torch.equal(a, b) for a, b in zip(first, grads()))


def run_context(n, cfg, runs, dev):
    gen = torch.Generator(device=dev).manual_seed(n)
    per_set = n * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * 2
    sets = [inputs(n, cfg, gen, dev) for _ in range(min(rotation(per_set), 4))]
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    idx = random_topk(n, cfg, gen, dev)
    f = flops(n, cfg)
    rows = []
    for op in ("sparse_attention fwd+bwd", "indexer_kl_loss fwd+bwd"):
        def step(s, det, op=op):
            return attention_step(s, idx, cu, det) if op.startswith("sparse") else kl_step(s, cu, det)
        for det in (False, True):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            res = bench(lambda i, det=det: step(sets[i % len(sets)], det)[0], len(sets), runs=runs)
            res.update(op=op, context=n, deterministic=det,
                       peak_gib=torch.cuda.max_memory_allocated(dev) / 2 ** 30,
                       bitwise_repeatable=repeat_equal(*step(sets[0], det)))
            if op.startswith("sparse"):
                res["tflops"] = (f["sparse_fwd"] + f["sparse_bwd"]) / res["median_ms"] / 1e9
            rows.append(res)
            print(f"  {op:28s} deterministic={det!s:5s} {res['median_ms']:9.3f} ms  cv {res['cv']:.3f}"
                  f"  repeatable {res['bitwise_repeatable']}", flush=True)
    return rows


def save(rows, name, cfg, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "deterministic.json"), "w") as fh:
        json.dump({"device": name, "torch": torch.__version__, "config": vars(cfg), "rows": rows}, fh,
                  indent=1)
    base = {(r["op"], r["context"]): r["median_ms"] for r in rows if not r["deterministic"]}
    lines = [f"# deterministic backward: {name}, torch {torch.__version__}", "",
             "| op | context | deterministic | median ms | vs default | bitwise repeatable | peak GiB |",
             "|---|---:|---|---:|---:|---|---:|"]
    for r in rows:
        ratio = r["median_ms"] / base[(r["op"], r["context"])]
        lines.append(f"| {r['op']} | {r['context']} | {r['deterministic']} | {r['median_ms']:.3f} | "
                     f"{ratio:.3f}x | {r['bitwise_repeatable']} | {r['peak_gib']:.1f} |")
    with open(os.path.join(out, "deterministic.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/local/deterministic")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    cfg = MSAConfig()
    name = torch.cuda.get_device_name(dev)
    print(f"{name}, torch {torch.__version__}, config {cfg}", flush=True)
    rows = []
    for n in args.contexts:
        print(f"context {n}", flush=True)
        rows += run_context(n, cfg, args.runs, dev)
        save(rows, name, cfg, args.out)
    print(f"wrote {args.out}/deterministic.json and .md")


if __name__ == "__main__":
    main()
