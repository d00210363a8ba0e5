"""Where the indexer's recall is lost (diagnostic, CPU), on the chain filler: per MSA layer,
the attention-mass recall of the layer's own selection and the local-block ceiling, bucketed
by what the query row is (a filler token by how often it has occurred before, a pair's key or
value, a query) and by where it sits in the sequence (quarters). One evaluation sequence.

    python -m experiments.retrieval.analysis.recall_by_position RUN_DIR [LENGTH] [EDGES]

EDGES: comma-separated bounds of the "seen" buckets (default 1,8,32: new, 1-7x, 8-31x, 32x+).
Columns: mass recall / local-block ceiling / perfect-index ceiling / top-K mass.
"""
import sys
from pathlib import Path

import torch

import openmsa

from experiments.retrieval.evaluation import _msa_projections, block_recall_stats, load_run
from experiments.retrieval.model import msa_layers, set_msa_mode
from experiments.retrieval.task import eval_set

torch.set_num_threads(2)
run = sys.argv[1]
L = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
edges = [int(e) for e in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1, 8, 32]
model, tcfg, cfg = load_run(Path(run), torch.device("cpu"))
set_msa_mode(model, "sparse")
data = eval_set(tcfg, L, 1, 1234)
layers = msa_layers(model)
inputs = {}
hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
         for i, m in enumerate(layers)]
with torch.no_grad():
    model(data["tokens"], positions=data["answer_pos"])
for h in hooks:
    h.remove()
tok = data["tokens"][0]
# earlier occurrences of each row's token (the chain lookup's candidates)
seen = torch.zeros(L, dtype=torch.long)
count = {}
for t, x in enumerate(tok.tolist()):
    seen[t] = count.get(x, 0)
    count[x] = seen[t].item() + 1
sep = 1 + tcfg.haystack_len(L)
is_noise = tok >= tcfg.noise_start
kind = {"filler, token new": is_noise & (seen == 0)}
for lo, hi in zip(edges, edges[1:] + [None]):
    name = f"filler, seen {lo}x+" if hi is None else (
        f"filler, seen {lo}x" if hi == lo + 1 else f"filler, seen {lo}-{hi - 1}x")
    kind[name] = is_noise & (seen >= lo) & ((seen < hi) if hi is not None else True)
kind["pair key / value"] = ~is_noise & (torch.arange(L) < sep) & (torch.arange(L) > 0)
kind["query section"] = torch.arange(L) > sep
quarter = {f"position q{i + 1}": (torch.arange(L) * 4 // L) == i for i in range(4)}
print(f"{run} at {L}: mass recall / local-block ceiling / perfect-index ceiling / top-K mass, "
      "per bucket (rows)")
for li, m in enumerate(layers):
    with torch.no_grad():
        q, k, qi, ki = _msa_projections(m, inputs[li][0])
        idx = openmsa.indexer_topk(qi[None], ki[None], block_size=m.block_size, topk=m.topk)[0][:, 0]
        st = block_recall_stats(q, k, idx, m.block_size, per_row=True)
    rows = st["rows"]
    parts = []
    for name, mask in {**kind, **quarter}.items():
        sel = rows["mass_recall"][:, mask]
        ok = ~torch.isnan(sel)
        if ok.sum() == 0:
            continue
        mean = lambda key: rows[key][:, mask][ok].mean().item()  # noqa: E731
        parts.append(f"  {name:20s} {mean('mass_recall'):.3f} / {mean('local_oracle_recall'):.3f} / "
                     f"{mean('perfect_student_recall'):.3f} / {mean('topk_mass'):.3f}  ({ok.sum().item()})")
    print(f"layer {li}: mean {st['mass_recall']:.3f}, ceilings {st['local_oracle_recall']:.3f} "
          f"(local block) {st['perfect_student_recall']:.3f} (perfect index)")
    print("\n".join(parts))
