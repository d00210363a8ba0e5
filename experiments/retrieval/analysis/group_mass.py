"""Where each MSA layer's dense attention goes, and how well one index query per group can
follow it (diagnostic, CPU), on one evaluation sequence, every 7th query row past K blocks:
mass recall of the layer's selection by block max (what MSA does) and by the index
distribution's block sum, the index KL, the teacher's mass by token type (special, key, value,
noise) and on the local block, the group mean's top-K block mass, and each head's own top-K
block mass (heads of a group that attend to different keys make the group mean harder to
follow than any one head).

    python -m experiments.retrieval.analysis.group_mass RUN_DIR [LENGTH]
"""
import sys
from pathlib import Path

import torch

from experiments.retrieval.evaluation import _msa_projections, load_run
from experiments.retrieval.model import msa_layers, set_msa_mode
from experiments.retrieval.task import eval_set

torch.set_num_threads(2)
run = sys.argv[1]; L = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
model, tcfg, cfg = load_run(Path(run), torch.device('cpu'))
set_msa_mode(model, 'sparse')
data = eval_set(tcfg, L, 1, 1234)
layers = msa_layers(model)
inputs = {}
hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0])) for i, m in enumerate(layers)]
with torch.no_grad():
    model(data['tokens'], positions=data['answer_pos'])
tok = data['tokens'][0]
ks, vs, ns = tcfg.key_start, tcfg.value_start, tcfg.noise_start
ttype = torch.full_like(tok, 4)  # 0 special 1 key 2 value 3 noise
ttype[tok < ks] = 0; ttype[(tok >= ks) & (tok < vs)] = 1; ttype[(tok >= vs) & (tok < ns)] = 2; ttype[tok >= ns] = 3
B, K = layers[0].block_size, (int(sys.argv[3]) if len(sys.argv) > 3 else layers[0].topk)
pos = torch.arange(L)
rows = torch.arange(K * B, L, 7)  # qualifying rows sample
for li, m in enumerate(layers):
    with torch.no_grad():
        q, k, qi, ki = _msa_projections(m, inputs[li][0])
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]; g = hq // hkv
        s = torch.einsum('rhd,jhd->hrj', q[rows].float(), k.float().repeat_interleave(g, 1)) * d ** -0.5
        vis = pos[None, :] <= rows[:, None]
        p = torch.softmax(s.masked_fill(~vis, -1e30), -1).view(hkv, g, len(rows), L)
        pt = p.mean(1)  # [hkv, R, L]
        z = torch.einsum('rgd,jd->grj', qi[rows].float(), ki[:, 0].float()) * qi.shape[-1] ** -0.5
        z = z.masked_fill(~vis, float('-inf'))
        ps = torch.softmax(z, -1)
        nb = L // B
        mass = pt.view(hkv, len(rows), nb, B).sum(-1)
        smax = z.view(hkv, len(rows), nb, B).amax(-1)
        ssum = ps.view(hkv, len(rows), nb, B).sum(-1)
        local = rows // B
        bvis = torch.arange(nb)[None] <= local[:, None]
        top = mass.masked_fill(~bvis, -1).topk(K, -1).indices
        topm = mass.gather(-1, top).sum(-1)
        def sel_of(score):
            sc = score.masked_fill(~bvis, float('-inf')).clone()
            sc.scatter_(-1, local[None, :, None].expand(hkv, -1, 1), float('inf'))
            return sc.topk(K, -1).indices
        res = {}
        # 'teacher_max': block max of the teacher's own log-probabilities, i.e. what block-max
        # selection gives with a student that matches the teacher exactly (KL 0)
        tmax = pt.clamp_min(1e-30).log().masked_fill(~vis, float('-inf')).view(hkv, len(rows), nb, B).amax(-1)
        for name, sc in (('max', smax), ('sum', ssum), ('teacher_max', tmax), ('teacher_with_local', mass)):
            sel = sel_of(sc)
            res[name] = (mass.gather(-1, sel).sum(-1) / topm).mean().item()
        # mass by token type
        tm = {n: pt[..., ttype == t].sum(-1).mean().item() for t, n in enumerate(['special', 'key', 'value', 'noise'])}
        lm = sum(pt[h][torch.arange(len(rows)), :].mul((pos[None] // B == local[:, None]).float()).sum(-1).mean().item() for h in range(hkv)) / hkv
        kl = (pt * (pt.clamp_min(1e-30).log() - ps.clamp_min(1e-30).log())).sum(-1).mean().item()
        # per-head entropy / top-1 block mass
        hm = p.view(hkv, g, len(rows), nb, B).sum(-1)
        print(f"L{li}: recall max {res['max']:.3f} sum {res['sum']:.3f} perfect-student-max {res['teacher_max']:.3f} teacher-with-local {res['teacher_with_local']:.3f} | KL {kl:.2f} | mass by type " +
              " ".join(f"{n} {v:.2f}" for n, v in tm.items()) + f" local-block {lm:.2f} | top8 {topm.mean():.2f}")
        # per head: mass on the top-8 blocks of that head alone
        ht = hm.topk(K, -1).values.sum(-1).mean(-1)
        print("    per-head top-8 block mass:", [[round(x, 2) for x in r] for r in ht.tolist()])
