"""What one layer's heads attend to (diagnostic, CPU): for query rows 1000..4000 (every 97th)
of one 4K evaluation sequence, per head, the mass of its top-5 keys and the share of that
mass on keys that repeat the query's token, whose previous token matches the query's
previous token, whose next / previous token is the query's token, and the distance of the
top key.

    python -m experiments.retrieval.analysis.head_targets RUN_DIR LAYER
"""
import sys
from pathlib import Path

import torch

from experiments.retrieval.evaluation import _msa_projections, load_run
from experiments.retrieval.model import msa_layers, set_msa_mode
from experiments.retrieval.task import eval_set
torch.set_num_threads(2)
model, tcfg, cfg = load_run(Path(sys.argv[1]), torch.device('cpu')); set_msa_mode(model, 'sparse')
li = int(sys.argv[2]); L = 4096
data = eval_set(tcfg, L, 1, 1234); tok = data['tokens'][0]
m = msa_layers(model)[li]; cap = {}
hh = m.register_forward_pre_hook(lambda mod, args: cap.__setitem__('x', args[0]))
with torch.no_grad():
    model(data['tokens'], positions=data['answer_pos'])
hh.remove()
with torch.no_grad():
    q, k, _, _ = _msa_projections(m, cap['x'][0])
g = m.num_heads // m.num_kv_heads
stats = torch.zeros(m.num_heads, 6)
rows = list(range(1000, 4000, 97))
for t in rows:
    s = torch.einsum('hd,jhd->hj', q[t].float(), k[:t+1].float().repeat_interleave(g, 1)) * m.head_dim ** -0.5
    p = s.softmax(-1)
    for h in range(m.num_heads):
        top = p[h].topk(5)
        j = top.indices
        same_tok = (tok[j] == tok[t]).float() @ top.values
        same_prev = (tok[(j - 1).clamp_min(0)] == tok[t - 1]).float() @ top.values
        next_is_cur = (tok[(j + 1).clamp_max(L-1)] == tok[t]).float() @ top.values
        prev_is_cur= (tok[(j - 1).clamp_min(0)] == tok[t]).float() @ top.values
        stats[h] += torch.tensor([top.values.sum(), same_tok, same_prev, next_is_cur, prev_is_cur, (t - j[0]).float()])
stats /= len(rows)
print("head: top5 mass, same token, prev matches prev, next-of-j is cur, prev-of-j is cur, distance of top1")
for h in range(m.num_heads): print(h, [round(x, 2) for x in stats[h].tolist()])
