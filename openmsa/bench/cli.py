"""``openmsa bench``: the project's main job.

Prints the cost model of docs/spec.md section 9 for contexts 8K..1M. On a GPU it then runs
the kernel benchmark (openmsa/bench/training.py: indexer, sparse attention fwd and
fwd+bwd, KL, against cuDNN SDPA and FlexAttention; extra arguments such as
``--contexts 8192 32768 --pack`` pass through). On a CPU it times the PyTorch
reference at a small size against torch's dense causal SDPA; ``--json`` writes the
figures to a file. ``openmsa bench --serving`` (GPU only) runs the serving benchmarks
instead (openmsa/bench/serving.py: paged decode and chunked prefill against dense SDPA),
written to benchmarks/results/local/{decode,prefill_chunk}/ unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

from .cost_model import MSAConfig, config_dict, cost_table, flops_per_token, selected_tokens
from .timing import time_fn

CONTEXTS = [8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576]


def _fmt_ctx(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K"


def print_cost_table(cfg: MSAConfig, out=None) -> list[dict]:
    out = out or sys.stdout
    rows = cost_table(CONTEXTS, cfg)
    print(f"Cost model (docs/spec.md section 9), {config_dict(cfg)}", file=out)
    print("| context | dense TFLOP | MSA TFLOP (index + main) | dense / MSA |", file=out)
    print("|---|---|---|---|", file=out)
    for r in rows:
        print(f"| {_fmt_ctx(r['context'])} | {r['dense_tflop_seq']:.1f} | {r['msa_tflop_seq']:.2f} "
              f"| {r['ratio']:.1f}x |", file=out)
    return rows


def _inputs(n: int, cfg: MSAConfig, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = rnd(n, cfg.num_heads, cfg.head_dim)
    k = rnd(n, cfg.num_kv_heads, cfg.head_dim)
    v = rnd(n, cfg.num_kv_heads, cfg.head_dim)
    qi = rnd(n, cfg.num_kv_heads, cfg.index_head_dim)
    ki = rnd(n, 1, cfg.index_head_dim)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    return q, k, v, qi, ki, cu


def time_ops(n: int, cfg: MSAConfig, device, dtype, backend: str, runs: int) -> list[dict]:
    import openmsa
    import torch.nn.functional as F

    q, k, v, qi, ki, cu = _inputs(n, cfg, device, dtype)
    kw = dict(block_size=cfg.block_size, backend=backend)
    idx, ilse = openmsa.indexer_topk(qi, ki, cu, cu, topk=cfg.topk, **kw)
    out, lse = openmsa.sparse_attention(q, k, v, idx, cu, cu, **kw)
    f = flops_per_token(n, cfg)
    # Useful FLOPs of the whole sequence: exact (query, key) pair counts.
    main_flops = 4 * cfg.num_heads * cfg.head_dim * selected_tokens(n, cfg.block_size, cfg.topk)
    index_flops = f["index"] * n
    dense_flops = 2 * cfg.num_heads * cfg.head_dim * n * (n + 1)

    qg = q.detach().requires_grad_()
    kg, vg = k.detach().requires_grad_(), v.detach().requires_grad_()
    grad = torch.randn_like(out)

    def fwd_bwd():
        o, _ = openmsa.sparse_attention(qg, kg, vg, idx, cu, cu, **kw)
        o.backward(grad)

    qd = q.transpose(0, 1)[None]
    rep = cfg.num_heads // cfg.num_kv_heads
    kd = k.transpose(0, 1)[None].repeat_interleave(rep, 1)
    vd = v.transpose(0, 1)[None].repeat_interleave(rep, 1)

    cases = [
        ("indexer_topk", lambda: openmsa.indexer_topk(qi, ki, cu, cu, topk=cfg.topk, **kw), index_flops),
        ("sparse_attention fwd", lambda: openmsa.sparse_attention(q, k, v, idx, cu, cu, **kw), main_flops),
        ("sparse_attention fwd+bwd", fwd_bwd, 3.5 * main_flops),
        ("indexer_kl_loss", lambda: openmsa.indexer_kl_loss(q, k, qi, ki, idx, cu, cu, lse=lse,
                                                            index_lse=ilse, **kw), None),
        ("dense SDPA causal fwd", lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True),
         dense_flops),
    ]
    results = []
    for name, fn, flops in cases:
        t = time_fn(fn, warmup=1 if device.type == "cpu" else 5, runs=runs, device=device)
        t.update(op=name, context=n, backend=backend if "SDPA" not in name else "torch",
                 tflops=(flops / (t["median_ms"] * 1e-3) / 1e12) if flops else None)
        results.append(t)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="openmsa", description="openmsa tools")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="cost model and timings of the MSA ops")
    b.add_argument("--seqlen", type=int, default=None,
                   help="tokens of the timed sequence (default 1024 on CPU, 8192 on GPU)")
    b.add_argument("--heads", type=int, default=None, help="Hq (default 64 on GPU, 16 on CPU)")
    b.add_argument("--kv-heads", type=int, default=None, help="Hkv (default 4 on GPU, 1 on CPU)")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    b.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    b.add_argument("--runs", type=int, default=None)
    b.add_argument("--json", default=None, help="write the results to this file")
    b.add_argument("--serving", action="store_true",
                   help="serving benchmarks (paged decode, chunked prefill); needs a GPU")
    args, rest = parser.parse_known_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.serving:
        if device.type != "cuda":
            parser.error("--serving needs a CUDA device (the serving kernels are timed in CUDA graphs)")
        from .serving import decode_main, prefill_main
        out = "benchmarks/results/local"
        if "--out" in rest:
            i = rest.index("--out")
            out = rest[i + 1]
            rest = rest[:i] + rest[i + 2:]
        decode_main(rest + ["--out", os.path.join(out, "decode")])
        prefill_main(["--out", os.path.join(out, "prefill_chunk")])
        return 0
    if device.type == "cuda" and args.backend != "reference":
        # On a GPU the main job is the kernel benchmark against cuDNN SDPA and FlexAttention.
        from .training import main as gpu_main
        print_cost_table(MSAConfig())
        gpu_args = list(rest)
        if args.json:
            gpu_args += ["--out", os.path.dirname(os.path.abspath(args.json))]
        elif "--out" not in gpu_args:
            gpu_args += ["--out", "benchmarks/results/local"]
        gpu_main(gpu_args)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    cpu = device.type == "cpu"
    print(f"openmsa bench on {platform.node()} ({torch.cuda.get_device_name(device) if not cpu else platform.processor() or 'CPU'}), "
          f"torch {torch.__version__}")
    rows = print_cost_table(MSAConfig())
    n = args.seqlen or (1024 if cpu else 8192)
    cfg = MSAConfig(num_heads=args.heads or (16 if cpu else 64),
                    num_kv_heads=args.kv_heads or (1 if cpu else 4))
    dtype = torch.float32 if cpu else torch.bfloat16
    runs = args.runs or (3 if cpu else 20)
    print(f"\nTimings: one sequence of {n} tokens, {config_dict(cfg)}, {dtype}, {device}, "
          f"backend={args.backend}, median of {runs} runs")
    results = time_ops(n, cfg, device, dtype, args.backend, runs)
    print("| op | backend | median ms | CV | useful TFLOP/s |")
    print("|---|---|---|---|---|")
    for r in results:
        tf = f"{r['tflops']:.3f}" if r["tflops"] is not None else "-"
        print(f"| {r['op']} | {r['backend']} | {r['median_ms']:.2f} | {r['cv']:.2f} | {tf} |")
    if cpu:
        print("\n(The reference backend is exact PyTorch code for testing, not a fast path; the "
              "GPU benchmark needs a CUDA device.)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "torch": torch.__version__, "cost_model": rows,
                       "config": config_dict(cfg), "seqlen": n, "timings": results}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
