"""FP8 ranking of a trained model's Index Branch (``index_dtype=torch.float8_e4m3fn``)
against its ranking in the precision of its own qi, ki, side by side (diagnostic; CPU or
GPU).

Per context and MSA layer, on ``--seqs`` evaluation sequences: the attention-mass recall
of each selection (``evaluation.block_recall_stats``: the selected blocks' share of the
true group-mean attention mass of the K heaviest blocks; the same teacher for both), and
``agreement``: the share of the unquantized selection's ranked (non-local) blocks that the
FP8 selection also holds, over rows with more than K visible blocks. The qi, ki are the
layer's own (projections, norms, RoPE), in the model's precision (float32).

    python -m experiments.retrieval.analysis.fp8_index RUN_DIR [--contexts 512 1024 2048]
        [--seqs 2] [--out DIR]

Writes DIR/fp8_index.json and .md when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import openmsa

from experiments.retrieval.evaluation import _mean, _msa_projections, block_recall_stats, load_run
from experiments.retrieval.model import msa_layers, set_msa_mode
from experiments.retrieval.task import eval_set, split_batches

FP8 = torch.float8_e4m3fn


def agreement(idx16: torch.Tensor, idx8: torch.Tensor, block_size: int, topk: int) -> float:
    """Mean share of idx16's (the unquantized selection's) ranked blocks that idx8 holds
    (rows with > topk visible blocks)."""
    hkv, n, _ = idx16.shape
    local = torch.arange(n, device=idx16.device) // block_size
    ranked = (idx16 >= 0) & (idx16 != local[None, :, None])
    held = (idx16[..., :, None] == idx8[..., None, :]).any(-1) & ranked
    share = held.sum(-1).float() / ranked.sum(-1).clamp_min(1).float()
    rows = (local + 1 > topk)[None].expand(hkv, -1)
    return share[rows].mean().item() if rows.any() else float("nan")


@torch.no_grad()
def compare(run_dir: Path, contexts, seqs: int, seed: int, device) -> dict:
    model, tcfg, cfg = load_run(run_dir, device)
    set_msa_mode(model, "sparse")
    layers = msa_layers(model)
    out = {"run": str(run_dir), "variant": cfg["variant"], "model": cfg["model"], "contexts": {}}
    for length in contexts:
        data = eval_set(tcfg, length, seqs, seed)
        per = [{"input": [], "fp8": [], "agreement": []} for _ in layers]
        inputs = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
                 for i, m in enumerate(layers)]
        try:
            for b in split_batches(data, 1, device):
                model(b["tokens"], positions=b["answer_pos"])
                for i, m in enumerate(layers):
                    q, k, qi, ki = _msa_projections(m, inputs[i][0])
                    sel = {name: openmsa.indexer_topk(qi[None], ki[None], block_size=m.block_size, topk=m.topk,
                                                      index_dtype=dt)[0][:, 0]
                           for name, dt in (("input", None), ("fp8", FP8))}
                    for name in ("input", "fp8"):
                        per[i][name].append(block_recall_stats(q, k, sel[name], m.block_size))
                    per[i]["agreement"].append(agreement(sel["input"], sel["fp8"], m.block_size, m.topk))
        finally:
            for h in hooks:
                h.remove()
        rows = []
        for i, p in enumerate(per):
            row = {"layer": i, "agreement": _mean(p["agreement"])}
            for name in ("input", "fp8"):
                for key in ("mass_recall", "block_recall"):
                    row[f"{name}_{key}"] = _mean([s[key] for s in p[name]])
            rows.append(row)
            print(f"{cfg['variant']} ctx {length} layer {i}: mass recall {row['input_mass_recall']:.4f} "
                  f"fp8 {row['fp8_mass_recall']:.4f}, agreement {row['agreement']:.3f}", flush=True)
        out["contexts"][str(length)] = rows
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--seqs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    res = compare(args.run_dir, args.contexts, args.seqs, args.seed, torch.device(args.device))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fp8_index.json").write_text(json.dumps(res, indent=1))
        lines = [f"# FP8 against unquantized ranking: {res['variant']}", "",
                 "| context | layer | mass recall, unquantized | mass recall, FP8 | block recall, unquantized | "
                 "block recall, FP8 | agreement |", "|---|---|---|---|---|---|---|"]
        for length, rows in res["contexts"].items():
            for r in rows:
                lines.append(f"| {length} | {r['layer']} | {r['input_mass_recall']:.4f} | {r['fp8_mass_recall']:.4f} "
                             f"| {r['input_block_recall']:.4f} | {r['fp8_block_recall']:.4f} | {r['agreement']:.3f} |")
        (args.out / "fp8_index.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
