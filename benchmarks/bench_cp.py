"""Context-parallel MSA on N GPUs of one host (openmsa.distributed.msa_attention_cp, NCCL):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 8 benchmarks/bench_cp.py \\
        --contexts 131072 262144 524288 1048576 --out benchmarks/results/h200/cp

(NVLink multicast / NVLS stays off: the lent machines do not support it.) Per context, one
causal sequence of that many tokens spread over the ranks in the zigzag layout, bf16,
Hq=64 Hkv=4 D=Di=128 B=128 K=16. It times one layer's training step on every rank:
the all-gather of K, V and ki, the indexer, sparse attention forward + backward and the
KL forward + backward, with the reduce-scatter of the key gradients (CUDA events, median of
--runs after warmup; the slowest rank is the step), and each rank's peak memory. Before
that, an exactness check at a small size (a varlen pack, --check-tokens in all): every rank
compares its shard of out, topk_indices and every gradient, and the KL parts' sum, with a
single-GPU run on the same global inputs (index inputs dyadic: exact index dots, so the
selections must be equal). With one rank (``--nproc-per-node 1``) each context also times the
single-GPU op (``openmsa.msa_attention``) on the same tokens: the CP path's own cost on one
GPU. Writes OUT/bench_cp.json and OUT/bench_cp.md.

``python benchmarks/bench_cp.py --model`` (no GPU) prints the communication-volume model of
benchmarks/NOTES.md instead. ``torchrun --nproc-per-node 2 benchmarks/bench_cp.py --device cpu
--contexts 512 --check-tokens 512`` is a smoke run of the whole script on CPUs (gloo, the
reference backend).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

HQ, HKV, D, DI, B, K = 64, 4, 128, 128, 128, 16


def dyadic(shape, gen, device):
    return (torch.randint(-8, 9, shape, generator=gen, device=device).float() / 4).to(torch.bfloat16)


def inputs(n_tokens, gen, device, index_dyadic=False):
    def rnd(*s):
        return torch.randn(*s, generator=gen, device=device, dtype=torch.bfloat16)
    x = dict(q=rnd(n_tokens, HQ, D), k=rnd(n_tokens, HKV, D), v=rnd(n_tokens, HKV, D),
             dout=rnd(n_tokens, HQ, D))
    if index_dyadic:
        x.update(qi=dyadic((n_tokens, HKV, DI), gen, device), ki=dyadic((n_tokens, 1, DI), gen, device))
    else:
        x.update(qi=rnd(n_tokens, HKV, DI), ki=rnd(n_tokens, 1, DI))
    return x


def step(x, cu, group):
    """One layer's CP training step on this rank's shard x; returns the grads."""
    from openmsa.distributed import msa_attention_cp

    t = {n: x[n].detach().requires_grad_() for n in ("q", "k", "v", "qi", "ki")}
    out, kl, idx = msa_attention_cp(t["q"], t["k"], t["v"], t["qi"], t["ki"], cu, group=group,
                                    block_size=B, topk=K)
    ((out.float() * x["dout"].float()).sum() + kl).backward()
    return out, kl, idx, t


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def exactness(check_tokens, rank, world, device, group):
    """Max over ranks of the relative errors against the single-GPU run."""
    import openmsa
    from openmsa.distributed import shard

    # a varlen pack: a long, a very short (empty chunks) and two uneven sequences
    lens = [check_tokens // 2, 7, check_tokens // 8, check_tokens - check_tokens // 2 - 7 - check_tokens // 8]
    lens = [n for n in lens if n > 0]
    gen = torch.Generator(device=device).manual_seed(0)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    x = inputs(sum(lens), gen, device, index_dyadic=True)
    t = {n: x[n].detach().requires_grad_() for n in ("q", "k", "v", "qi", "ki")}
    out, kl, idx = openmsa.msa_attention(t["q"], t["k"], t["v"], t["qi"], t["ki"], cu, cu,
                                         block_size=B, topk=K)
    ((out.float() * x["dout"].float()).sum() + kl).backward()
    mine = {n: shard(v, cu, world, rank) for n, v in x.items()}
    out_r, kl_r, idx_r, t_r = step(mine, cu, group)
    kl_sum = kl_r.detach().clone()
    dist.all_reduce(kl_sum, group=group)
    errs = {"out": rel(out_r, shard(out, cu, world, rank)), "kl": rel(kl_sum, kl),
            "topk_indices_mismatch": (idx_r != shard(idx.transpose(0, 1), cu, world, rank)
                                      .transpose(0, 1)).float().mean().item()}
    for n in ("q", "k", "v", "qi", "ki"):
        errs["d" + n] = rel(t_r[n].grad, shard(t[n].grad, cu, world, rank))
    vals = torch.tensor(list(errs.values()), dtype=torch.float64, device=device)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(errs, vals.tolist())), lens


def single_step(x, cu):
    """The same training step through the single-GPU op (openmsa.msa_attention)."""
    import openmsa

    t = {n: x[n].detach().requires_grad_() for n in ("q", "k", "v", "qi", "ki")}
    out, kl, _ = openmsa.msa_attention(t["q"], t["k"], t["v"], t["qi"], t["ki"], cu, cu,
                                       block_size=B, topk=K)
    ((out.float() * x["dout"].float()).sum() + kl).backward()


def median_ms(fn, device, group, warmup, runs):
    """Median of ``runs`` calls after ``warmup`` (CUDA events on GPUs), the ranks in step."""
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + runs):
        dist.barrier(group=group)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return sorted(times)[len(times) // 2]


def time_context(n, rank, world, device, group, warmup, runs):
    """The CP step at one context; with one rank also the single-GPU op on the same tokens
    (what the CP path costs over the op it distributes: the plan, the fragment form, the
    collectives on one rank)."""
    from openmsa.distributed import cp_plan

    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    plan = cp_plan(cu, world, rank)
    gen = torch.Generator(device=device).manual_seed(rank)
    x = inputs(plan.local_total, gen, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    med = torch.tensor([median_ms(lambda: step(x, cu, group), device, group, warmup, runs)],
                       dtype=torch.float64, device=device)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0],
                        dtype=torch.float64, device=device)
    meds = [torch.zeros_like(med) for _ in range(world)]
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(meds, med, group=group)
    dist.all_gather(peaks, peak, group=group)
    row = {"context": n, "world_size": world, "local_tokens": plan.local_total,
           "step_ms": max(m.item() for m in meds), "step_ms_per_rank": [m.item() for m in meds],
           "peak_gib_per_rank": [p.item() for p in peaks]}
    if world == 1:  # the shard is the whole sequence, in its own order
        row["single_gpu_op_ms"] = median_ms(lambda: single_step(x, cu), device, group, warmup, runs)
    return row


# ------------------------------------------------------------------ communication model
NVLINK_BPS = 450e9  # per direction, per GPU
IB_BPS = 50e9  # one 400 Gb/s NIC per GPU, for the model's multi-node column
T32K_MS, T128K_MS = 47.7, 195.0  # measured single-H200 step (indexer + attn fwd+bwd + KL fwd+bwd)


def kv_bytes(total):
    """Bytes all-gathered per layer (bf16 k, v and ki); the backward reduce-scatters their
    gradients in float32, twice as many."""
    return 2 * total * HKV * D * 2 + total * DI * 2


def single_gpu_ms(total):
    """a x + b x^2 (x = total / 32K) through the two measured points: the per-token work of
    the Main Branch and the KL is constant (K x B keys), the indexer's grows with the context."""
    b = (T128K_MS - 4 * T32K_MS) / 12
    a = T32K_MS - b
    x = total / 32768
    return a * x + b * x * x


def model_rows(contexts=(131072, 524288, 1048576), worlds=(8, 16, 32, 64)):
    rows = []
    for n in contexts:
        for w in worlds:
            compute = single_gpu_ms(n) / w
            moved = 3 * kv_bytes(n) * (w - 1) / w  # all-gather (fwd) + float32 reduce-scatter (bwd)
            nv, ib = moved / NVLINK_BPS * 1e3, moved / IB_BPS * 1e3
            rows.append(dict(context=n, world_size=w, compute_ms=compute, comm_gb=moved / 1e9,
                             nvlink_ms=nv, ib_ms=ib, nvlink_ratio=nv / compute, ib_ratio=ib / compute))
    return rows


def print_model():
    print("| context | ranks | compute / rank (ms) | moved / rank (GB) | NVLink (ms) | "
          "comm / compute, NVLink | IB 50 GB/s (ms) | comm / compute, IB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in model_rows():
        print(f"| {r['context'] // 1024}K | {r['world_size']} | {r['compute_ms']:.1f} | "
              f"{r['comm_gb']:.2f} | {r['nvlink_ms']:.2f} | {r['nvlink_ratio']:.2f} | "
              f"{r['ib_ms']:.1f} | {r['ib_ratio']:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    p.add_argument("--check-tokens", type=int, default=16384)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/local/cp")
    p.add_argument("--model", action="store_true", help="print the communication model and exit")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a smoke run over gloo on the reference backend")
    args = p.parse_args()
    if args.model:
        print_model()
        return
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    errs, lens = exactness(args.check_tokens, rank, world, device, group)
    if rank == 0:
        print(f"exactness vs one GPU ({lens} tokens, {world} ranks): "
              + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
    rows = []
    for n in args.contexts:
        try:
            row = time_context(n, rank, world, device, group, args.warmup, args.runs)
        except torch.cuda.OutOfMemoryError as exc:
            row = {"context": n, "world_size": world, "error": f"OutOfMemoryError: {str(exc)[:200]}"}
            torch.cuda.empty_cache()
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        meta = {"gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "world_size": world, "dtype": "bfloat16",
                "config": dict(hq=HQ, hkv=HKV, d=D, di=DI, block_size=B, topk=K),
                "exactness": {"lens": lens, "max_over_ranks": errs}}
        with open(os.path.join(args.out, "bench_cp.json"), "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "bench_cp.md"), "w") as f:
            f.write(f"# Context-parallel MSA step, {world} x {meta['gpu']}, bf16\n\n"
                    f"Exactness vs one GPU ({sum(lens)} tokens, pack {lens}), max over ranks: "
                    + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + "\n\n"
                    "| context | tokens / rank | step (ms, slowest rank) | peak memory / rank (GiB, max) "
                    "| single-GPU op, one rank (ms) |\n"
                    "|---|---|---|---|---|\n")
            for r in rows:
                if "error" in r:
                    f.write(f"| {r['context'] // 1024}K | - | {r['error'][:60]} | - | - |\n")
                else:
                    single = f"{r['single_gpu_op_ms']:.1f}" if "single_gpu_op_ms" in r else "-"
                    f.write(f"| {r['context'] // 1024}K | {r['local_tokens']} | {r['step_ms']:.1f} | "
                            f"{max(r['peak_gib_per_rank']):.1f} | {single} |\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
