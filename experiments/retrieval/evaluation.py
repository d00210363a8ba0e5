"""Evaluate trained runs: answer accuracy vs context length, and for MSA runs the
indexer's recall of the Main Branch's true top blocks.

    python -m experiments.retrieval.evaluation --runs out/retrieval/dense out/retrieval/msa_native \
        --contexts 4096 8192 16384

Writes ``eval.json`` into every run directory.

Accuracy: exact match of the answer token (argmax over the whole vocabulary) at every
query of a fixed evaluation set per context (same sequences for every variant), also
split by the depth of the queried pair in the haystack (4 bins), which shows *why* the
sliding window fails: it answers only the pairs that sit in its last window.

Recall (MSA runs, on --recall-seqs sequences per context, plain PyTorch): for every MSA
layer, KV group g and query position t with more than K visible blocks (below that the
selection is everything visible), let

    a_g(t, c) = sum over visible keys j in block c of (1/G) sum_{h in g} softmax_h(t, j)

be the true attention mass of block c: the group-mean softmax of the Main Branch (the
layer's own q, k) over *all* visible keys, i.e. what dense attention would do. With S
the blocks the Index Branch selects (local block included) and S* the K blocks of
largest a_g(t, .):

    block recall = |S ∩ S*| / K         attention-mass recall = a_g(t, S) / a_g(t, S*)

(S* is unconstrained, so it need not contain the local block MSA always keeps; both are
<= 1.) Reported per layer as means over (t, g), over all qualifying positions and over
the answer positions alone, with the absolute masses a_g(t, S) and a_g(t, S*), and the
hit rate: how often S holds the block of the queried pair's value token at an answer
position (what retrieval needs), per (group, answer) ("pair_hit") and per answer in at
least one group ("pair_hit_any_group": one group retrieving is enough).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import openmsa
from openmsa.layers.rope import apply_rope, rope_cos_sin

from experiments.retrieval.model import Decoder, ModelConfig, msa_layers, set_msa_mode
from experiments.retrieval.task import IGNORE, TaskConfig, eval_set, split_batches

DEPTH_BINS = 4


@torch.no_grad()
def evaluate_answers(model, data: dict, batch: int, device) -> dict:
    """Accuracy and CE at the answer positions of ``data`` (a make_batch dict)."""
    correct, losses = [], []
    for b in split_batches(data, batch, device):
        logits = model(b["tokens"], positions=b["answer_pos"]).float()
        target = b["labels"].gather(1, b["answer_pos"])
        losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        correct.append((logits.argmax(-1) == target).cpu())
    correct = torch.cat(correct)  # [N, Q] bool
    loss = torch.stack(losses).sum().item() / correct.numel()
    return dict(acc=correct.float().mean().item(), loss=loss, correct=correct)


def filler_ce(logits, lm_labels):
    """(mean CE, #correct, #targets) of logits [B, L, V] at the filler targets ``lm_labels``
    [B, L] (-100 elsewhere): the chain filler's next-token loss (train.py) and metric."""
    logits, target = logits.flatten(0, 1), lm_labels.flatten()
    valid = target != IGNORE
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE)
    return loss, ((logits.argmax(-1) == target) & valid).sum(), valid.sum()


@torch.no_grad()
def evaluate_filler(model, data: dict, batch: int, device) -> dict:
    """Next-token accuracy and CE of a "chain" haystack's filler transitions (``lm_labels``).

    The chain's ceiling: a chain step is predictable once the current token has occurred
    earlier in the context; a jump (probability 1 - chain_prob) is not."""
    correct = count = 0
    loss = 0.0
    for b in split_batches(data, batch, device):
        ce, ok, n = filler_ce(model(b["tokens"]), b["lm_labels"])
        loss += ce.item() * n.item()
        correct += ok.item()
        count += n.item()
    return dict(acc=correct / max(1, count), loss=loss / max(1, count), targets=count)


def answer_accuracy(model, data: dict, batch: int, device) -> tuple[float, float]:
    r = evaluate_answers(model, data, batch, device)
    return r["acc"], r["loss"]


def accuracy_by_depth(correct: torch.Tensor, pair_pos: torch.Tensor, length: int) -> list:
    """Accuracy per depth bin of the queried pair (bin 0 = start of the haystack)."""
    bins = (pair_pos.float() / length * DEPTH_BINS).long().clamp(max=DEPTH_BINS - 1)
    out = []
    for i in range(DEPTH_BINS):
        m = bins == i
        out.append(correct[m].float().mean().item() if m.any() else None)
    return out


@torch.no_grad()
def attention_ablation(model: Decoder, data: dict, batch: int, device, autocast) -> list:
    """Which layers' attention the task uses: per layer, the answer accuracy when that
    layer's attention output is replaced by its mean over the sequence's positions (mean
    ablation: keeps the average contribution, removes everything position-specific)."""
    accs = []
    for blk in model.blocks:
        h = blk.attn.register_forward_hook(
            lambda mod, args, out: out.mean(dim=1, keepdim=True).expand_as(out))
        try:
            with autocast():
                accs.append(evaluate_answers(model, data, batch, device)["acc"])
        finally:
            h.remove()
    return accs


# --- recall of the indexer ----------------------------------------------------------------

def _msa_projections(m: openmsa.MSAttention, x: torch.Tensor):
    """q [L, Hq, D], k [L, Hkv, D], qi [L, Hkv, Di], ki [L, 1, Di] of one sequence x [L, hidden],
    computed exactly as MSAttention.forward does (projections, norms, RoPE)."""
    n = x.shape[0]
    q = m.q_norm(m.q_proj(x).view(n, m.num_heads, m.head_dim))
    k = m.k_norm(m.k_proj(x).view(n, m.num_kv_heads, m.head_dim))
    qi = m.qi_norm(m.qi_proj(x).view(n, m.num_kv_heads, m.index_head_dim))
    ki = m.ki_norm(m.ki_proj(x).view(n, 1, m.index_head_dim))
    if m.rotary_dim:
        cos, sin = rope_cos_sin(torch.arange(n, device=x.device), m.rotary_dim, m.rope_theta)
        q, k, qi, ki = (apply_rope(y, cos, sin) for y in (q, k, qi, ki))
    return q, k, qi, ki


def block_recall_stats(q, k, idx, block_size: int, answer_rows=None, value_pos=None,
                       max_bytes: int = 1 << 30, per_row: bool = False) -> dict:
    """Recall of the selected blocks ``idx`` [Hkv, L, K] (-1 padded) against the top-K
    blocks by the true group-mean attention mass of q [L, Hq, D], k [L, Hkv, D] (one
    causal sequence). Chunked over query rows; plain float32 torch.

    MSA always keeps the query's local block (docs/spec.md section 4), so the indexer chooses only
    K - 1 blocks; when the local block is not among the K heaviest, no selection reaches
    mass recall 1. ``local_oracle_recall`` is that ceiling: the mass of the best selection
    that holds the local block (the local block + the K - 1 heaviest others) over the top-K
    mass; ``mass_recall_vs_local_oracle`` = selected mass / that best selection's mass.
    ``perfect_student_recall``: the recall of the spec's block-max selection applied to the
    teacher distribution itself (the local block + the K - 1 blocks with the largest single
    token probability), i.e. what an index that matches the teacher exactly would reach.
    ``per_row=True`` adds the per-(group, row) values under "rows"."""
    n, hq, d = q.shape
    hkv, _, topk = idx.shape
    g = hq // hkv
    scale = d ** -0.5
    qf, kf = q.float(), k.float().permute(1, 0, 2)  # kf [Hkv, L, D]
    rows_per = max(1, max_bytes // (4 * hq * n * 3))
    pos = torch.arange(n, device=q.device)
    # per (g, t): block recall, mass recall, selected mass, top-K mass; NaN where t has <= K blocks
    out = {key: torch.full((hkv, n), float("nan"), device=q.device)
           for key in ("block_recall", "mass_recall", "selected_mass", "topk_mass",
                       "local_oracle_recall", "mass_recall_vs_local_oracle",
                       "perfect_student_recall")}
    for r0 in range(0, n, rows_per):
        r1 = min(n, r0 + rows_per)
        keys = r1  # rows < r1 see keys < r1 only
        nbk = -(-keys // block_size)
        qg = qf[r0:r1].view(r1 - r0, hkv, g, d).permute(1, 2, 0, 3)      # [Hkv, G, R, D]
        s = torch.matmul(qg, kf[:, None, :keys].transpose(-1, -2)) * scale  # [Hkv, G, R, keys]
        visible = pos[None, :keys] <= pos[r0:r1, None]                       # [R, keys]
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1).mean(1)  # [Hkv, R, keys]
        p = F.pad(p, (0, nbk * block_size - keys))
        mass = p.view(hkv, r1 - r0, nbk, block_size).sum(-1)                 # [Hkv, R, nbk]
        local = pos[r0:r1] // block_size
        blocks_visible = torch.arange(nbk, device=q.device)[None, :] <= local[:, None]  # [R, nbk]
        top = mass.masked_fill(~blocks_visible, -1.0).topk(min(topk, nbk), dim=-1).indices
        top_mask = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, True)
        sel = idx[:, r0:r1].long()
        sel_mask = torch.zeros(hkv, r1 - r0, nbk + 1, dtype=torch.bool, device=q.device)
        sel_mask.scatter_(-1, torch.where(sel >= 0, sel, nbk), True)
        sel_mask = sel_mask[..., :nbk]
        top_mass = (mass * top_mask).sum(-1)
        sel_mass = (mass * sel_mask).sum(-1)
        is_local = torch.arange(nbk, device=q.device)[None, :] == local[:, None]     # [R, nbk]

        def kept_mass(score):  # mass of the local block + the K - 1 others ranked first by score
            ranked = score.masked_fill(~blocks_visible | is_local, float("-inf"))
            best = ranked.topk(min(topk - 1, nbk), dim=-1)
            return (mass * is_local).sum(-1) + (mass.gather(-1, best.indices)
                                                * best.values.isfinite()).sum(-1)

        oracle_mass = kept_mass(mass)
        # ranked by the teacher's own block max: what the spec's block-max selection reaches
        # with an index whose distribution equals the teacher's (KL 0)
        student_mass = kept_mass(p.view(hkv, r1 - r0, nbk, block_size).amax(-1))
        qualify = (local + 1 > topk)[None].expand(hkv, -1)
        vals = dict(block_recall=(sel_mask & top_mask).sum(-1).float() / topk,
                    mass_recall=sel_mass / top_mass.clamp_min(1e-30),
                    selected_mass=sel_mass, topk_mass=top_mass,
                    local_oracle_recall=oracle_mass / top_mass.clamp_min(1e-30),
                    mass_recall_vs_local_oracle=sel_mass / oracle_mass.clamp_min(1e-30),
                    perfect_student_recall=student_mass / top_mass.clamp_min(1e-30))
        for key, v in vals.items():
            out[key][:, r0:r1] = torch.where(qualify, v, torch.full_like(v, float("nan")))
    stats = {key: _nanmean(v) for key, v in out.items()}
    if per_row:  # the [Hkv, L] values themselves (NaN where a row does not qualify)
        stats["rows"] = out
    if answer_rows is not None:
        for key, v in out.items():
            stats["answer_" + key] = _nanmean(v[:, answer_rows])
        vb = (value_pos // block_size).long()                                 # [Q]
        hit = (idx[:, answer_rows].long() == vb[None, :, None]).any(-1)       # [Hkv, Q]
        stats["pair_hit"] = hit.float().mean().item()
        # per answer, in at least one group: a layer where one group retrieves and the
        # other does something else has pair_hit ~0.5 but pair_hit_any_group ~1
        stats["pair_hit_any_group"] = hit.any(0).float().mean().item()
    return stats


def _nanmean(v: torch.Tensor):
    m = ~torch.isnan(v)
    return v[m].mean().item() if m.any() else None


@torch.no_grad()
def indexer_recall(model: Decoder, data: dict, device, autocast) -> list:
    """Per MSA layer: the mean of block_recall_stats over the sequences of ``data``."""
    layers = msa_layers(model)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
             for i, m in enumerate(layers)]
    per_layer = [[] for _ in layers]
    try:
        for b in split_batches(data, 1, device):
            with autocast():  # the precision of the forward, so that idx is what it selects
                model(b["tokens"], positions=b["answer_pos"])
                proj = [_msa_projections(m, inputs[i][0]) for i, m in enumerate(layers)]
                sel = [openmsa.indexer_topk(qi[None], ki[None], block_size=m.block_size,
                                            topk=m.topk)[0][:, 0]
                       for m, (_, _, qi, ki) in zip(layers, proj)]
            for i, (m, (q, k, _, _)) in enumerate(zip(layers, proj)):  # teacher in float32
                per_layer[i].append(block_recall_stats(
                    q, k, sel[i], m.block_size, answer_rows=b["answer_pos"][0],
                    value_pos=b["pair_pos"][0] + 1))
    finally:
        for h in hooks:
            h.remove()
    layer_ids = [i for i, blk in enumerate(model.blocks) if isinstance(blk.attn, openmsa.MSAttention)]
    result = []
    for li, stats in zip(layer_ids, per_layer):
        keys = stats[0].keys()
        mean = {key: _mean([s[key] for s in stats]) for key in keys}
        result.append(dict(layer=li, **mean))
    return result


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# --- driver ---------------------------------------------------------------------------

def load_run(run_dir: Path, device) -> tuple[Decoder, TaskConfig, dict]:
    cfg = json.loads((run_dir / "config.json").read_text())
    model = Decoder(ModelConfig(**cfg["model"]))
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu"))
    return model.to(device).eval(), TaskConfig(**cfg["task"]), cfg


def evaluate_run(run_dir: Path, contexts, eval_seqs: int, tokens_per_batch: int, recall_seqs: int,
                 seed: int, device, amp, ablate_seqs: int = 0, filler_seqs: int = 32) -> dict:
    model, tcfg, cfg = load_run(run_dir, device)
    is_msa = bool(msa_layers(model))
    if is_msa:
        set_msa_mode(model, "sparse")

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    res = dict(variant=cfg["variant"], contexts={}, eval_seqs=eval_seqs, seed=seed)
    for length in contexts:
        t0 = time.time()
        data = eval_set(tcfg, length, eval_seqs, seed)
        with autocast():
            r = evaluate_answers(model, data, max(1, tokens_per_batch // length), device)
        entry = dict(acc=r["acc"], loss=r["loss"], answers=r["correct"].numel(),
                     acc_by_depth=accuracy_by_depth(r["correct"], data["pair_pos"], length))
        if "lm_labels" in data:  # a "chain" haystack: how well the filler is predicted
            sub = {k: v[:filler_seqs] for k, v in data.items()}
            with autocast():
                entry["filler"] = evaluate_filler(model, sub, max(1, tokens_per_batch // length), device)
        if is_msa and recall_seqs > 0:
            sub = {k: v[:recall_seqs] for k, v in data.items()}
            entry["recall"] = indexer_recall(model, sub, device, autocast)
            entry["recall_mean"] = {key: _mean([lay[key] for lay in entry["recall"]])
                                    for key in entry["recall"][0] if key != "layer"}
        if ablate_seqs > 0:
            sub = {k: v[:ablate_seqs] for k, v in data.items()}
            entry["ablation_acc"] = attention_ablation(model, sub, max(1, tokens_per_batch // length),
                                                       device, autocast)
        entry["seconds"] = time.time() - t0
        res["contexts"][str(length)] = entry
        msg = f"{cfg['variant']:14s} ctx {length:6d}: acc {entry['acc']:.4f} loss {entry['loss']:.4f}"
        if "filler" in entry:
            msg += f" | filler next-token acc {entry['filler']['acc']:.4f}"
        if "recall_mean" in entry:
            rm = entry["recall_mean"]
            msg += (f" | block recall {rm['block_recall']:.3f} mass recall {rm['mass_recall']:.3f}"
                    f" (answers: {rm['answer_mass_recall']:.3f}, pair hit {rm['pair_hit']:.3f})")
        if "ablation_acc" in entry:
            msg += " | acc with one layer's attention mean-ablated: " + " ".join(
                f"L{i} {x:.3f}" for i, x in enumerate(entry["ablation_acc"]))
        print(msg + f" [{entry['seconds']:.0f}s]", flush=True)
    (run_dir / "eval.json").write_text(json.dumps(res, indent=1))
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run directories (from train.py)")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--eval-seqs", type=int, default=128, help="sequences per context")
    p.add_argument("--tokens-per-batch", type=int, default=65536)
    p.add_argument("--recall-seqs", type=int, default=2, help="sequences per context for recall")
    p.add_argument("--ablate-seqs", type=int, default=0,
                   help="sequences per context for the per-layer attention ablation (0: none)")
    p.add_argument("--seed", type=int, default=1234, help="evaluation set seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)  # (TF32 stays off: the recall's float32 teacher is exact)
    amp = torch.bfloat16 if a.amp == "bf16" or (a.amp == "auto" and device.type == "cuda") else None
    for run in a.runs:
        evaluate_run(Path(run), a.contexts, a.eval_seqs, a.tokens_per_batch, a.recall_seqs, a.seed,
                     device, amp, a.ablate_seqs)


if __name__ == "__main__":
    main()
