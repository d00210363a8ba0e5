"""The official MSA serving workloads (shared/workloads/, from MiniMax-AI/MSA) on a GPU.

    python benchmarks/bench_workloads.py --suite decode  --out benchmarks/results/h100/workloads
    python benchmarks/bench_workloads.py --suite prefill --out benchmarks/results/h100/workloads

Decode suite (decode_suite.json, ``cases_full`` and ``cases_low_latency``): per-request
lengths regenerated with torch's CPU generator exactly as its ``seq_len_generation_rule``
says (lengths include the case's query tokens); openmsa's MSADecodeWrapper.run timed as its
``timing_protocol`` says: 120 calls captured in one CUDA graph, 5 warmup and 20 timed
replays, median per-call latency (replay time / 120) and CV; calls rotate over disjoint
physical-page slots (one plan per slot) so that the bytes touched between two uses of a
slot exceed twice the L2 (the smallest divisor of 120 that achieves it). Reported: per-case
median (us), CV and the weighted mean over ``cases_full``.

Prefill selection (prefill_benchmark_cases_v1.json, 128 cases): per-request lengths are not
published, so total_q is split evenly and every request gets max_final_kv keys (an upper
bound on the work, as the workloads README says); MSAPrefillWrapper.run timed with CUDA
events (median of 10 after 3 warmups); useful TFLOP/s from the case's useful_flops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from ..serving.decode import MSADecodeWrapper
from ..serving.prefill import MSAPrefillWrapper
from .serving import graph_time

# A copy of shared/workloads/ travels with the repository (benchmarks/workloads/), so the
# GPU machine, which sees only the checkout, has it.
WORKLOADS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "workloads")
L2_BYTES = 50 * 2**20
PAGE, D, DI, K = 128, 128, 128, 16


def decode_lengths(case: dict, base_seed: int = 1701) -> list[int]:
    """Per-request lengths of a decode-suite case (its seq_len_generation_rule)."""
    bs, nominal = case["batch_size"], case["nominal_seq_len"]
    g = torch.Generator().manual_seed(base_seed + bs * 1009 + nominal)
    assert base_seed + bs * 1009 + nominal == case.get("length_rng_seed", base_seed + bs * 1009 + nominal)
    lo = max(1, nominal // 20)
    hi = max(lo, nominal // 4)
    deltas = torch.randint(lo, hi + 1, (bs // 2,), generator=g)
    values = torch.cat([nominal - deltas, nominal + deltas])
    if bs % 2:
        values = torch.cat([values, torch.tensor([nominal])])
    values = values[torch.randperm(bs, generator=g)]
    return values.tolist()


def decode_case(case, hq, hkv, dev, gen):
    bs, nq = case["batch_size"], case["q_len_per_req"]
    lens = decode_lengths(case)
    pages = [-(-n // PAGE) for n in lens]
    # distinct bytes one call surely touches: every index key, plus at least min(pages, K)
    # distinct K/V pages a request (its queries share pages; a page holds every KV head).
    # A lower bound, so that the rotation errs towards more slots (counting each query's
    # and head's blocks apart, as this did first, under-rotated the small cases to 1 slot)
    touched = sum(lens) * DI * 2 + sum(min(p, K) for p in pages) * hkv * PAGE * D * 2 * 2
    slots = next((s for s in (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 24, 30, 40, 60, 120)
                  if s * touched > 2 * L2_BYTES), 120)
    per_slot = sum(pages)
    num_pages = slots * per_slot
    bf = dict(device=dev, dtype=torch.bfloat16)
    kc = torch.randn(num_pages, PAGE, hkv, D, generator=gen, **bf)
    vc = torch.randn(num_pages, PAGE, hkv, D, generator=gen, **bf)
    kic = torch.randn(num_pages, PAGE, DI, generator=gen, **bf)
    q = torch.randn(bs * nq, hq, D, generator=gen, **bf)
    qi = torch.randn(bs * nq, hkv, DI, generator=gen, **bf)
    cu = torch.arange(bs + 1, dtype=torch.int32, device=dev) * nq
    kv = torch.tensor(lens, dtype=torch.int32, device=dev)
    wrappers = []
    for s in range(slots):
        perm = torch.randperm(per_slot, generator=gen, device=dev) + s * per_slot
        pt = torch.zeros(bs, max(pages), dtype=torch.int32, device=dev)
        off = 0
        for b, p in enumerate(pages):
            pt[b, :p] = perm[off:off + p].to(torch.int32)
            off += p
        w = MSADecodeWrapper(hq, hkv, D, DI, block_size=PAGE, topk=K)
        w.plan(cu, kv, pt)
        wrappers.append(w)
    calls = [(lambda w=wrappers[i % slots]: w.run(q, qi, kc, vc, kic)) for i in range(120)]
    r = graph_time(None, calls=calls)
    med, cv = r["median_us"], r["cv"]
    return {"name": case["name"], "weight": case["weight"], "median_us": med, "cv": cv, "slots": slots,
            "lens_min": min(lens), "lens_max": max(lens)}


def decode_suite_main(argv=None):
    ap = argparse.ArgumentParser(prog="bench_workloads --suite decode")
    ap.add_argument("--heads", type=int, nargs=2, default=[64, 4], metavar=("HQ", "HKV"))
    ap.add_argument("--cases", default="full,low_latency")
    ap.add_argument("--out", default="benchmarks/results/local/workloads")
    args = ap.parse_args(argv)
    suite = json.load(open(os.path.join(WORKLOADS, "decode_suite.json")))
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for part in args.cases.split(","):
        for case in suite[f"cases_{part}"]:
            try:
                r = decode_case(case, *args.heads, dev, gen)
            except Exception as e:  # noqa: BLE001 - recorded in the table, the sweep goes on
                r = {"name": case["name"], "weight": case["weight"], "error": f"{type(e).__name__}: {str(e)[:100]}"}
            r["suite"] = part
            rows.append(r)
            torch.cuda.empty_cache()
            print(json.dumps(r), flush=True)
            wmean = _save_decode_suite(args, rows)  # after every case: a cut-short run keeps its rows
    print(f"weighted mean over cases_full: {wmean} us", flush=True)


def _save_decode_suite(args, rows):
    full = [r for r in rows if r["suite"] == "full" and "median_us" in r]
    wmean = (sum(r["median_us"] * r["weight"] for r in full) / sum(r["weight"] for r in full)) if full else None
    name = torch.cuda.get_device_name()
    payload = {"device": name, "torch": torch.__version__, "heads": args.heads,
               "weighted_mean_us_full": wmean, "rows": rows}
    lines = [f"Official decode suite, {name}, torch {torch.__version__}, bf16, Hq={args.heads[0]} "
             f"Hkv={args.heads[1]} D=Di={D} page=block={PAGE} K={K}; per-call median of 120 calls in one "
             f"CUDA graph (20 replays after 5), inputs rotated over page slots.", "",
             f"Weighted mean over cases_full: {wmean:.1f} us" if wmean else "", "",
             "| suite | case | weight | lengths | slots | median us | CV |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_us" in r:
            lines.append(f"| {r['suite']} | {r['name']} | {r['weight']} | {r['lens_min']}-{r['lens_max']} | "
                         f"{r['slots']} | {r['median_us']:.1f} | {r['cv']:.3f} |")
        else:
            lines.append(f"| {r['suite']} | {r['name']} | {r['weight']} | - | - | {r['error']} | - |")
    _write_results(args.out, "decode_suite", payload, lines)
    return wmean


def _write_results(out: str, stem: str, payload: dict, lines: list) -> None:
    """``out/stem.json`` (the payload) and ``out/stem.md`` (the table lines)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def prefill_selection_main(argv=None):
    ap = argparse.ArgumentParser(prog="bench_workloads --suite prefill")
    ap.add_argument("--heads", type=int, nargs=2, default=[64, 4], metavar=("HQ", "HKV"))
    ap.add_argument("--max-cases", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/local/workloads")
    args = ap.parse_args(argv)
    hq, hkv = args.heads
    sel = json.load(open(os.path.join(WORKLOADS, "prefill_benchmark_cases_v1.json")))["cases"]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for case in sel[:args.max_cases]:
        b, tq, kv_len = case["batch_size"], case["total_q"], case["max_final_kv"]
        lq = [tq // b + (1 if i < tq % b else 0) for i in range(b)]
        pages = -(-kv_len // PAGE)
        bf = dict(device=dev, dtype=torch.bfloat16)
        try:
            kc = torch.randn(b * pages, PAGE, hkv, D, generator=gen, **bf)
            vc = torch.randn(b * pages, PAGE, hkv, D, generator=gen, **bf)
            kic = torch.randn(b * pages, PAGE, DI, generator=gen, **bf)
            q = torch.randn(tq, hq, D, generator=gen, **bf)
            qi = torch.randn(tq, hkv, DI, generator=gen, **bf)
            pt = torch.randperm(b * pages, generator=gen, device=dev).view(b, pages).to(torch.int32)
            cu = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=dev)
            kv = torch.full((b,), kv_len, dtype=torch.int32, device=dev)
            w = MSAPrefillWrapper(hq, hkv, D, DI, block_size=PAGE, topk=K)
            w.plan(cu, kv, pt)
            for _ in range(3):
                w.run(q, qi, kc, vc, kic)
            torch.cuda.synchronize()
            ts = []
            for _ in range(10):
                a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                w.run(q, qi, kc, vc, kic)
                e.record()
                e.synchronize()
                ts.append(a.elapsed_time(e))
            med = statistics.median(ts)
            r = {"case_id": case["case_id"], "batch_size": b, "total_q": tq, "max_final_kv": kv_len,
                 "median_ms": med, "cv": statistics.pstdev(ts) / statistics.mean(ts),
                 "useful_tflops": case["useful_flops"] / (med * 1e-3) / 1e12,
                 "representative_weight": case.get("representative_weight", 0)}
        except Exception as e:  # noqa: BLE001 - recorded in the table, the sweep goes on
            r = {"case_id": case["case_id"], "error": f"{type(e).__name__}: {str(e)[:100]}"}
        kc = vc = kic = None
        torch.cuda.empty_cache()
        rows.append(r)
        print(json.dumps(r), flush=True)
        _save_prefill_selection(args, rows)


def _save_prefill_selection(args, rows):
    name = torch.cuda.get_device_name()
    ok = [r for r in rows if "median_ms" in r]
    rep = [r for r in ok if r["representative_weight"]]
    wmean = (sum(r["median_ms"] * r["representative_weight"] for r in rep)
             / sum(r["representative_weight"] for r in rep)) if rep else None
    payload = {"device": name, "torch": torch.__version__, "heads": args.heads,
               "note": "total_q split evenly; every request gets max_final_kv keys (upper bound)",
               "weighted_mean_ms_representative": wmean, "rows": rows}
    lines = [f"Official prefill selection, {name}, torch {torch.__version__}, bf16, Hq={args.heads[0]} "
             f"Hkv={args.heads[1]}; CUDA events, median of 10 after 3 warmups. Per-request lengths are "
             f"not published: total_q split evenly, every request at max_final_kv (an upper bound).", "",
             f"{len(ok)} of {len(rows)} cases ran; weighted mean over the representative cases: "
             + (f"{wmean:.3f} ms" if wmean else "-"), "",
             "| case | batch | total_q | max_final_kv | median ms | CV | useful TFLOP/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "median_ms" in r:
            lines.append(f"| {r['case_id']} | {r['batch_size']} | {r['total_q']} | {r['max_final_kv']} | "
                         f"{r['median_ms']:.3f} | {r['cv']:.3f} | {r['useful_tflops']:.1f} |")
        else:
            lines.append(f"| {r['case_id']} | - | - | - | {r['error']} | - | - |")
    _write_results(args.out, "prefill_selection", payload, lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench_workloads")
    ap.add_argument("--suite", choices=["decode", "prefill"], required=True)
    args, rest = ap.parse_known_args(argv)
    (decode_suite_main if args.suite == "decode" else prefill_selection_main)(rest)
