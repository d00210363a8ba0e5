"""Inputs and runs shared by the context-parallel tests (test_cp.py) and their rank
processes (cp_worker.py): the same seed gives the same global inputs in every process, so
each rank takes its shard and the test compares with the single-process run."""

import torch
from torch import nn

import openmsa
from helpers import fp8_lossless
from openmsa.distributed import shard

# name -> case. Packs of short and uneven sequences: a sequence shorter than 2W (empty
# chunks), an empty one, lengths not divisible by 2W.
CASES = {
    "ref": dict(lens=[70, 5, 0, 131, 33], hq=4, hkv=2, d=16, di=16, block=16, topk=3,
                backend="reference"),
    "triton": dict(lens=[150, 3, 90], hq=4, hkv=2, d=32, di=64, block=64, topk=2,
                   backend="triton"),
    "gpu": dict(lens=[3000, 7, 700, 4200], hq=8, hkv=2, d=128, di=128, block=128, topk=16,
                backend="triton"),
    # FP8 ranking (index inputs exact in E4M3, helpers.fp8_lossless)
    "fp8": dict(lens=[70, 5, 131], hq=4, hkv=2, d=16, di=16, block=16, topk=3, backend="reference",
                index_dtype=torch.float8_e4m3fn),
}
# the layer test: K = every block, so the selection cannot depend on rounding
LAYER = dict(lens=[40, 3, 57], hidden=32, heads=4, kv_heads=2, head_dim=8, index_head_dim=8,
             block=16, topk=4, backend="reference")


def dyadic(shape, gen):
    return torch.randint(-8, 9, shape, generator=gen).float() / 4


def cu_of(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def global_inputs(case, device):
    """q, k, v random; qi, ki dyadic (every index dot exact in float32, so the selections of
    any two correct runs are equal); the output gradient dout; cu_seqlens."""
    c = CASES[case]
    gen = torch.Generator().manual_seed(1234)
    t = sum(c["lens"])
    index = fp8_lossless if "index_dtype" in c else dyadic
    x = dict(q=torch.randn(t, c["hq"], c["d"], generator=gen),
             k=torch.randn(t, c["hkv"], c["d"], generator=gen),
             v=torch.randn(t, c["hkv"], c["d"], generator=gen),
             qi=index((t, c["hkv"], c["di"]), gen), ki=index((t, 1, c["di"]), gen),
             dout=torch.randn(t, c["hq"], c["d"], generator=gen))
    return {n: v.to(device) for n, v in x.items()}, cu_of(c["lens"], device)


KL_WEIGHT = 3.0


def run_single(case, device):
    """The single-process run: out, kl, idx and the gradients of out . dout + 3 kl."""
    c = CASES[case]
    x, cu = global_inputs(case, device)
    t = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v", "qi", "ki")}
    out, kl, idx = openmsa.msa_attention(t["q"], t["k"], t["v"], t["qi"], t["ki"], cu, cu,
                                         block_size=c["block"], topk=c["topk"], backend=c["backend"],
                                         index_dtype=c.get("index_dtype"))
    ((out * x["dout"]).sum() + KL_WEIGHT * kl).backward()
    return dict(out=out.detach(), kl=kl.detach(), idx=idx,
                **{"d" + n: t[n].grad for n in ("q", "k", "v", "qi", "ki")})


def run_rank(case, device, world_size, rank, group=None):
    """This rank's msa_attention_cp run on its shards, with the same loss."""
    c = CASES[case]
    x, cu = global_inputs(case, device)
    s = {n: shard(v, cu, world_size, rank) for n, v in x.items()}
    t = {n: s[n].clone().requires_grad_() for n in ("q", "k", "v", "qi", "ki")}
    out, kl, idx = openmsa.distributed.msa_attention_cp(
        t["q"], t["k"], t["v"], t["qi"], t["ki"], cu, group=group, block_size=c["block"],
        topk=c["topk"], backend=c["backend"], index_dtype=c.get("index_dtype"))
    ((out * s["dout"]).sum() + KL_WEIGHT * kl).backward()
    return dict(out=out.detach(), kl=kl.detach(), idx=idx,
                **{"d" + n: t[n].grad for n in ("q", "k", "v", "qi", "ki")})


class TinyModel(nn.Module):
    """Two MSA layers with a residual stream: the parameters before the second layer get
    gradients through the first layer's gathered keys."""

    def __init__(self, process_group=None):
        super().__init__()
        c = LAYER
        kw = dict(index_head_dim=c["index_head_dim"], block_size=c["block"], topk=c["topk"],
                  qk_norm=True, rotary_dim=4, backend=c["backend"], process_group=process_group)
        self.inp = nn.Linear(c["hidden"], c["hidden"])
        self.layers = nn.ModuleList(
            [openmsa.MSAttention(c["hidden"], c["heads"], c["kv_heads"], c["head_dim"], **kw)
             for _ in range(2)])

    def forward(self, x, cu_seqlens):
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(h, cu_seqlens)
        return h


def layer_inputs():
    gen = torch.Generator().manual_seed(99)
    t = sum(LAYER["lens"])
    return (torch.randn(t, LAYER["hidden"], generator=gen),
            torch.randn(t, LAYER["hidden"], generator=gen), cu_of(LAYER["lens"], "cpu"))


def run_layer(mode, world_size=1, rank=0, group=None):
    """Loss = y . w + 0.5 * KL of the tiny model on this rank's tokens (all tokens when
    group is None); returns y and the parameter gradients (partial sums under CP)."""
    torch.manual_seed(7)
    model = TinyModel(process_group=group)
    for layer in model.layers:
        layer.mode = mode
    x, w, cu = layer_inputs()
    if group is not None:
        x, w = shard(x, cu, world_size, rank), shard(w, cu, world_size, rank)
    y = model(x, cu)
    loss = (y * w).sum() + 0.5 * openmsa.collect_kl_losses(model)
    loss.backward()
    return dict(y=y.detach(), kl=openmsa.collect_kl_losses(model).detach(),
                **{"grad." + n: p.grad for n, p in model.named_parameters()})
