"""Capacity probe of the index branch (diagnostic, CPU): with the backbone frozen, fit a fresh
index branch (qi, ki linear maps, partial RoPE or none) of width Di to one layer's dense
group-mean attention by the dense KL on 24 sequences of 1K tokens, then report the attention-
mass recall of its block-max selection on two 4K evaluation sequences. If a wider index does
not recall more, the index width is not what limits the recall.

    python -m experiments.retrieval.analysis.fit_index RUN_DIR LAYER 64r,128r,64n [STEPS]

(``64r``: Di 64 with RoPE on the layer's rotary channels; ``64n``: without RoPE.)
"""
import sys
import time
from pathlib import Path

import torch

import openmsa
from openmsa.layers.rope import apply_rope, rope_cos_sin

from experiments.retrieval.evaluation import _msa_projections, block_recall_stats, load_run
from experiments.retrieval.model import msa_layers, set_msa_mode
from experiments.retrieval.task import eval_set, make_batch

torch.set_num_threads(2); torch.manual_seed(0)
run, li = sys.argv[1], int(sys.argv[2])
variants = sys.argv[3].split(',')  # e.g. 64r,128r,64n
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 300
model, tcfg, cfg = load_run(Path(run), torch.device('cpu')); set_msa_mode(model, 'sparse')
m = msa_layers(model)[li]
cap = {}
h = m.register_forward_pre_hook(lambda mod, args: cap.__setitem__('x', args[0]))
def layer_inputs(data):
    xs = []
    for i in range(data['tokens'].shape[0]):
        with torch.no_grad():
            model(data['tokens'][i:i+1], positions=data['answer_pos'][i:i+1]); xs.append(cap['x'][0])
    return xs
LT, NT = 1024, 24
train = layer_inputs(make_batch(tcfg, NT, LT, torch.Generator().manual_seed(5)))
evald = eval_set(tcfg, 4096, 2, 1234); evx = layer_inputs(evald)
h.remove()
hq, hkv, d, B, K, rd = m.num_heads, m.num_kv_heads, m.head_dim, m.block_size, m.topk, m.rotary_dim
g = hq // hkv
def teacher(x):
    with torch.no_grad():
        q, k, _, _ = _msa_projections(m, x)
        n = x.shape[0]
        s = torch.einsum('thd,jhd->htj', q.float(), k.float().repeat_interleave(g, 1)) * d ** -0.5
        vis = torch.ones(n, n, dtype=torch.bool).tril()
        return torch.softmax(s.masked_fill(~vis, float('-inf')), -1).view(hkv, g, n, n).mean(1), q, k
TT = [teacher(x)[0] for x in train]
for var in variants:
    di, rope = int(var[:-1]), var[-1] == 'r'
    qi_p = torch.nn.Linear(m.hidden_size, hkv * di, bias=False); ki_p = torch.nn.Linear(m.hidden_size, di, bias=False)
    if di == m.index_head_dim:
        qi_p.weight.data.copy_(m.qi_proj.weight.data); ki_p.weight.data.copy_(m.ki_proj.weight.data)
    opt = torch.optim.Adam(list(qi_p.parameters()) + list(ki_p.parameters()), lr=3e-3)
    def student(x):
        n = x.shape[0]
        qi = qi_p(x).view(n, hkv, di); ki = ki_p(x).view(n, 1, di)
        if rope and rd:
            cos, sin = rope_cos_sin(torch.arange(n), rd, m.rope_theta); qi, ki = apply_rope(qi, cos, sin), apply_rope(ki, cos, sin)
        return qi, ki
    t0 = time.time()
    def kl_of(x, pt):
        qi, ki = student(x); n = x.shape[0]
        z = torch.einsum('tgd,jd->gtj', qi, ki[:, 0]) * di ** -0.5
        vis = torch.ones(n, n, dtype=torch.bool).tril()
        lps = torch.log_softmax(z.masked_fill(~vis, float('-inf')), -1)
        return (pt * (pt.clamp_min(1e-30).log() - lps.masked_fill(~vis, 0))).sum(-1).mean()
    for step in range(steps):
        idx = torch.randint(0, NT, (4,))
        loss = sum(kl_of(train[i], TT[i]) for i in idx) / 4
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  L{li} Di {di} rope {rope} step {step} KL {loss.item():.3f} ({time.time()-t0:.0f}s)", flush=True)
    with torch.no_grad():
        rec = []
        for x in evx:
            q, k = _msa_projections(m, x)[:2]
            qi, ki = student(x)
            idx, _ = openmsa.indexer_topk(qi[None].float(), ki[None].float(), block_size=B, topk=K, backend='reference')
            rec.append(block_recall_stats(q, k, idx[:, 0], B))
        print(f"L{li} Di {di} rope {rope}: 4K mass recall {sum(r['mass_recall'] for r in rec)/2:.3f} block {sum(r['block_recall'] for r in rec)/2:.3f}", flush=True)
