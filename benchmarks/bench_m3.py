"""transformers' MiniMax-M3 sparse layers on openmsa against transformers' own path, on a GPU.

A reduced-depth M3 text model at the real attention shapes (hidden 6144, Hq 64, Hkv 4,
D 128, 4 index heads of Di 128, block 128, K 16, 1 local block; ``--layers`` sparse
layers, default 2, a small dense MLP, vocab 32768, random bf16 weights) is timed

- prefill (one sequence, ``--prefill`` lengths, default 8K, 32K and 128K; a fresh
  ``DynamicCache(config=...)`` per call, logits of the last token only), and
- decode (one new token on a cache of ``--decode`` tokens, default 128K; the cache is
  filled once by the openmsa prefill, which writes the same k, v and index keys as
  transformers would; each timed step is cropped back, so every step sees the same length),

with ``enable_msa_kernels`` (openmsa's Triton kernels) and with transformers' own sparse
layers (``--hf-attn``: "sdpa", the default, or "eager"): its indexer materialises
[B, H_idx, Sq, Sk] float32 scores and its attention a [B, Hq, Sq, Sk] mask, so it is
expected to run out of memory at long prefill; an out-of-memory error is caught and
reported. Both paths use the same modules and weights (the openmsa layers take over the
original submodules), switched per run. Times: CUDA events, median of ``--runs`` after
``--warmup`` calls; peak memory: ``torch.cuda.max_memory_allocated`` during the timed
calls, next to the model's own weights.

    python benchmarks/bench_m3.py --out benchmarks/results/h200/m3

Writes ``m3.json`` and ``m3.md`` to ``--out``. ``--tiny`` runs the same on tiny shapes in
float32 on the CPU when there is no GPU (a smoke test of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from openmsa.bench.timing import time_fn  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = dict(vocab_size=32768, hidden_size=6144, num_attention_heads=64, num_key_value_heads=4,
              head_dim=128, index_n_heads=4, index_head_dim=128, index_block_size=128,
              index_topk_blocks=16, index_local_blocks=1, dense_intermediate_size=4096)
TINY = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            index_n_heads=2, index_head_dim=16, index_block_size=16, index_topk_blocks=3,
            index_local_blocks=1, dense_intermediate_size=64)


def build_model(layers: int, hf_attn: str, tiny: bool):
    from transformers import MiniMaxM3VLForCausalLM, MiniMaxM3VLTextConfig
    cfg = MiniMaxM3VLTextConfig(
        num_hidden_layers=layers, layer_types=["minimax_m3_sparse"] * layers,
        mlp_layer_types=["dense"] * layers, max_position_embeddings=1 << 20,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **(TINY if tiny else SHAPES))
    cfg._attn_implementation = hf_attn
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if tiny else torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = MiniMaxM3VLForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    return model


class Paths:
    """The same model with its sparse layers as transformers' or as openmsa's modules."""

    def __init__(self, model):
        from openmsa.integrations.transformers import enable_msa_kernels
        self.model = model
        self.decoder = model.model.layers
        self.hf = [layer.self_attn for layer in self.decoder]
        enable_msa_kernels(model, compute_kl=False)
        self.openmsa = [layer.self_attn for layer in self.decoder]

    def use(self, name: str):
        for layer, attn in zip(self.decoder, getattr(self, name)):
            layer.self_attn = attn


def measure(fn, warmup: int, runs: int) -> dict:
    """Timing and peak memory of fn(), or {"error": "OOM"}."""
    cuda = DEVICE == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    try:
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time_fn(fn, warmup=0, runs=runs, device=DEVICE)
        if cuda:
            t["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return t
    except torch.OutOfMemoryError as exc:
        return {"error": "OOM", "detail": str(exc).splitlines()[0][:200]}
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def profile_step(fn, name: str) -> dict:
    """torch.profiler over 5 calls of fn: the top kernels by device time (printed) and the
    device-busy time per call against the wall time per call."""
    import time
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 5 * 1e3
    attr = "self_device_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    busy = sum(getattr(e, attr) for e in events if DEVICE != "cuda" or e.device_type.name == "CUDA")
    print(f"--- {name}: one step, wall {wall:.2f} ms, device busy {busy / 5e3:.2f} ms")
    print(prof.key_averages().table(sort_by=attr, row_limit=15))
    return {"wall_ms": wall, "device_busy_ms": busy / 5e3}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prefill", default="8192,32768,131072")
    ap.add_argument("--check", type=int, default=4096,
                    help="tokens of the agreement check of the two paths' logits (0: none)")
    ap.add_argument("--decode", default="131072")
    ap.add_argument("--hf-attn", default="sdpa", choices=("sdpa", "eager"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny float32 shapes (a smoke test)")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's top kernels of one decode step of each path "
                         "and the step's GPU-busy share")
    args = ap.parse_args()
    if DEVICE != "cuda" and not args.tiny:
        ap.error("needs a CUDA GPU (or --tiny for a smoke test on the CPU)")
    from transformers import DynamicCache

    model = build_model(args.layers, args.hf_attn, args.tiny)
    paths = Paths(model)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    results = []
    agreement = None
    if args.check:  # the two paths' logits on one prompt: relative error norm
        ids = torch.randint(0, model.config.vocab_size, (1, args.check), device=DEVICE, generator=gen)
        logits = {}
        for name in ("openmsa", "hf"):
            paths.use(name)
            with torch.no_grad():
                logits[name] = model(ids, use_cache=False).logits.float()
        agreement = ((logits["openmsa"] - logits["hf"]).norm() / logits["hf"].norm()).item()
        del logits
        print("logits agreement (relative error norm):", agreement, flush=True)

    def prefill(ids):
        with torch.no_grad():
            model(ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)

    for n in [int(x) for x in args.prefill.split(",") if x]:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=DEVICE, generator=gen)
        for name in ("openmsa", "hf"):
            paths.use(name)
            r = measure(lambda: prefill(ids), args.warmup, args.runs)
            results.append(dict(phase="prefill", tokens=n, path=name, **r))
            print(results[-1], flush=True)

    for n in [int(x) for x in args.decode.split(",") if x]:
        ids = torch.randint(0, model.config.vocab_size, (1, n + 1), device=DEVICE, generator=gen)
        cache = DynamicCache(config=model.config)
        paths.use("openmsa")
        try:
            with torch.no_grad():
                model(ids[:, :n], cache=cache, use_cache=True, logits_to_keep=1)
        except torch.OutOfMemoryError:
            results.append(dict(phase="decode", tokens=n, path="openmsa", error="OOM filling the cache"))
            continue

        def step():
            with torch.no_grad():
                model(ids[:, n:], cache=cache, use_cache=True)
            cache.crop(-1)

        for name in ("openmsa", "hf"):
            paths.use(name)
            r = measure(step, args.warmup + 3, args.runs * 4)
            if args.profile:
                r["profile"] = profile_step(step, name)
            results.append(dict(phase="decode", tokens=n, path=name, **r))
            print({k: v for k, v in results[-1].items() if k != "profile"}, flush=True)
        cache = None  # frees the filled cache before the next context
    paths.use("openmsa")

    meta = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__,
                transformers=__import__("transformers").__version__, layers=args.layers,
                hf_attn=args.hf_attn, weights_gib=weights_gib, check_tokens=args.check,
                logits_rel_error=agreement,
                shapes=("tiny, float32" if args.tiny else
                        "hidden 6144, Hq 64, Hkv 4, D 128, index 4 x 128, block 128, K 16, local 1, "
                        "dense MLP 4096, vocab 32768, bf16"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "m3.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    lines = [f"# MiniMax-M3 sparse layers: openmsa vs transformers ({args.hf_attn})", "",
             f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}; "
             f"{args.layers} sparse layers ({meta['shapes']}); weights {weights_gib:.1f} GiB. "
             f"Median of {args.runs} (decode: {args.runs * 4}) timings after warmup (CUDA events; on a CPU wall clock); "
             f"peak = max allocated during the timed calls. Logits of the two paths on "
             f"{args.check} tokens: relative error norm {agreement if agreement is None else f'{agreement:.2e}'}.", "",
             "| phase | tokens | openmsa (ms) | openmsa peak (GiB) | transformers (ms) | "
             "transformers peak (GiB) | speedup |", "|---|---|---|---|---|---|---|"]
    keyed = {(r["phase"], r["tokens"], r["path"]): r for r in results}
    for phase, n in dict.fromkeys((r["phase"], r["tokens"]) for r in results):
        o, h = keyed.get((phase, n, "openmsa"), {}), keyed.get((phase, n, "hf"), {})

        def cell(r, key, fmt):
            return r.get("error", "-") if key not in r else format(r[key], fmt)
        speed = (f"{h['median_ms'] / o['median_ms']:.1f}x"
                 if "median_ms" in o and "median_ms" in h else "-")
        size = f"{n // 1024}K" if n % 1024 == 0 else str(n)
        lines.append(f"| {phase} | {size} | {cell(o, 'median_ms', '.2f')} | {cell(o, 'peak_gib', '.1f')} "
                     f"| {cell(h, 'median_ms', '.2f')} | {cell(h, 'peak_gib', '.1f')} | {speed} |")
    with open(os.path.join(args.out, "m3.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
