"""Turn benchmarks/results/<gpu>/bench_training.json into the summary table
(markdown, with prefill and training-step totals and speedups) and a PNG plot of
speedup vs context.

    python benchmarks/summarize.py benchmarks/results/h100
"""

import json
import os
import sys


def ctx_label(n):
    if isinstance(n, str):
        return n
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K"


def main(folder):
    data = json.load(open(os.path.join(folder, "bench_training.json")))
    by = {}
    for r in data["rows"]:
        if "error" not in r:
            by.setdefault(r["context"], {})[r["op"]] = r
    lines = [f"Device: {data['device']}, torch {data['torch']}, bf16, one causal sequence, "
             f"Hq=64 Hkv=4 D=Di=128 B=128 K=16. Medians of CUDA-event timings (ms); "
             f"TFLOP/s count useful (visible, selected) work only.", "",
             "| context | indexer | sparse fwd | prefill (idx + fwd) | dense cuDNN fwd | prefill speedup "
             "| prefill speedup, FP8 ranking | FlexAttn fwd | sparse fwd+bwd | KL fwd+bwd | train step "
             "| dense fwd+bwd | train speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    plot = {"ctx": [], "prefill": [], "prefill_fp8": [], "train": []}
    for ctx, ops in by.items():
        def ms(op):
            r = ops.get(op)
            return r["median_ms"] if r else None

        def tf(op):
            r = ops.get(op)
            return f" ({r['tflops']:.0f} TF/s)" if r and r.get("tflops") else ""

        idx, fwd = ms("openmsa indexer_topk"), ms("openmsa sparse_attention fwd")
        dense = ms("dense SDPA cuDNN fwd") or ms("dense SDPA fwd (per request, causal_lower_right)")
        fb, kl = ms("openmsa sparse_attention fwd+bwd"), ms("openmsa indexer_kl_loss fwd+bwd")
        dfb, flex = ms("dense SDPA cuDNN fwd+bwd"), ms("FlexAttention fwd (same budget)")
        prefill = idx + fwd if idx and fwd else None
        idx8 = ms("openmsa indexer_topk (FP8 ranking)")
        ps8 = dense / (idx8 + fwd) if dense and idx8 and fwd else None
        train = idx + fb + (kl or 0) if idx and fb else None

        def f(x, extra=""):
            return f"{x:.1f}{extra}" if x is not None else "-"
        ps = dense / prefill if dense and prefill else None
        ts = dfb / train if dfb and train else None
        lines.append(
            f"| {ctx_label(ctx)} | {f(idx, tf('openmsa indexer_topk'))} | {f(fwd, tf('openmsa sparse_attention fwd'))} "
            f"| {f(prefill)} | {f(dense)} | {f(ps, 'x')} | {f(ps8, 'x')} | {f(flex, tf('FlexAttention fwd (same budget)'))} "
            f"| {f(fb, tf('openmsa sparse_attention fwd+bwd'))} | {f(kl)} | {f(train)}{'' if kl else ' (no KL)' if train else ''} "
            f"| {f(dfb)} | {f(ts, 'x')} |")
        if isinstance(ctx, int):
            plot["ctx"].append(ctx)
            plot["prefill"].append(ps)
            plot["prefill_fp8"].append(ps8)
            plot["train"].append(ts)
    table = "\n".join(lines) + "\n"
    open(os.path.join(folder, "summary.md"), "w").write(table)
    print(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = plot["ctx"]
    for key, label in (("prefill", "prefill (indexer + sparse fwd) vs dense cuDNN fwd"),
                       ("prefill_fp8", "prefill with FP8 ranking"),
                       ("train", "train step vs dense cuDNN fwd+bwd")):
        pts = [(x, y) for x, y in zip(xs, plot[key]) if y]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [ctx_label(x) for x in xs])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("context (tokens, one sequence)")
    ax.set_ylabel("speedup over dense (x)")
    ax.set_title(f"openmsa on {data['device']} (bf16)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "speedup.png"), dpi=120)
    print("wrote", os.path.join(folder, "speedup.png"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/h100")
