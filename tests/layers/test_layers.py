"""MSAttention (docs/spec.md section 7): the layer in both modes, checked against an
independent plain-PyTorch GQA attention layer (SDPA, own RMSNorm, own NeoX RoPE), its
batched/packed forms, the gradient routing of the KL, collect_kl_losses, positions,
constructor validation, and a short index-only training run.

Tolerances: relative error norms <= 1e-5 in float32. The SDPA comparison reduces in a
different order than openmsa's reference (CPU flash kernel vs masked softmax); in
float32 with these tiny shapes that difference stays around 1e-7, so 1e-5 is used
there too.
"""

from __future__ import annotations

import math


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openmsa import MSAttention, collect_kl_losses
from helpers import rel

HIDDEN, HQ, HKV, D, DI = 32, 4, 2, 8, 8
G = HQ // HKV
BS = 4
TOL = 1e-5


def assert_close(a, b, tol=TOL, what=""):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = rel(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def make(mode="sparse", topk=2, qk_norm=False, rotary_dim=None, index_head_dim=DI, bias=False,
         head_dim=D, **kw):
    m = MSAttention(HIDDEN, HQ, HKV, head_dim, index_head_dim=index_head_dim, block_size=BS,
                    topk=topk, qk_norm=qk_norm, rotary_dim=rotary_dim, mode=mode, bias=bias, **kw)
    if qk_norm:  # non-trivial norm weights, so that a wrong norm is visible
        with torch.no_grad():
            for n in (m.q_norm, m.k_norm, m.qi_norm, m.ki_norm):
                n.weight.uniform_(0.5, 1.5)
    return m


INDEX_PREFIXES = ("qi_proj.", "ki_proj.", "qi_norm.", "ki_norm.")
MAIN_PREFIXES = ("q_proj.", "k_proj.", "v_proj.", "o_proj.", "q_norm.", "k_norm.")


def grads(m: nn.Module) -> dict:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in m.named_parameters()}


# --- an independent plain PyTorch layer --------------------------------------------------

def rope_ref(x: torch.Tensor, pos: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """NeoX half-split RoPE on the first rotary_dim channels; x [B, L, H, X], pos [B, L].
    Angles in float32, as openmsa documents for its RoPE."""
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32) * 2.0 / rotary_dim)
    ang = pos.to(torch.float32)[..., None] * inv_freq  # [B, L, half]
    cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def rms_ref(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_layer(m: MSAttention, x: torch.Tensor, pos: torch.Tensor | None = None,
                    eps: float = 1e-6):
    """Dense causal GQA attention layer + dense KL (docs/spec.md section 6 warmup) from m's
    weights. x [B, L, hidden]. Returns (out [B, L, hidden], kl scalar)."""
    b, n, _ = x.shape
    d, di = m.head_dim, m.index_head_dim
    if pos is None:
        pos = torch.arange(n).expand(b, n)

    def lin(proj, inp):
        return F.linear(inp, proj.weight, proj.bias)

    q = lin(m.q_proj, x).view(b, n, HQ, d)
    k = lin(m.k_proj, x).view(b, n, HKV, d)
    v = lin(m.v_proj, x).view(b, n, HKV, d)
    qi = lin(m.qi_proj, x.detach()).view(b, n, HKV, di)
    ki = lin(m.ki_proj, x.detach()).view(b, n, 1, di)
    if isinstance(m.q_norm, nn.RMSNorm):
        q, k = rms_ref(q, m.q_norm.weight, eps), rms_ref(k, m.k_norm.weight, eps)
        qi, ki = rms_ref(qi, m.qi_norm.weight, eps), rms_ref(ki, m.ki_norm.weight, eps)
    r, theta = m.rotary_dim, m.rope_theta
    q, k, qi, ki = (rope_ref(t, pos, r, theta) for t in (q, k, qi, ki))

    qh = q.transpose(1, 2)  # [B, Hq, L, D]
    kh = k.repeat_interleave(G, dim=2).transpose(1, 2)  # head h uses KV head h // G
    vh = v.repeat_interleave(G, dim=2).transpose(1, 2)
    o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    out = lin(m.o_proj, o.transpose(1, 2).reshape(b, n, HQ * d))

    causal = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        s = (qh @ kh.transpose(-1, -2)) * d ** -0.5
        p = torch.softmax(s.masked_fill(~causal, -math.inf), dim=-1)
        teacher = p.view(b, HKV, G, n, n).mean(2)  # [B, Hkv, L, L]
    z = (qi.transpose(1, 2) @ ki[:, :, 0].transpose(1, 2)[:, None]) * di ** -0.5  # [B, Hkv, L, L]
    log_s = torch.log_softmax(z.masked_fill(~causal, -math.inf), dim=-1).masked_fill(~causal, 0.0)
    log_t = torch.log(torch.where(teacher > 0, teacher, torch.ones_like(teacher)))
    kl = (teacher * (log_t - log_s)).sum() / (HKV * b * n)
    return out, kl


def test_reference_layer_sanity():
    """The reference's KL is >= 0 and its attention is causal (a change to the last token
    leaves every earlier output unchanged)."""
    m = make(mode="dense")
    x = torch.randn(2, 9, HIDDEN)
    out, kl = reference_layer(m, x)
    assert kl.item() > 0
    x2 = x.clone()
    x2[:, -1] += 1.0
    out2, _ = reference_layer(m, x2)
    assert torch.equal(out[:, :-1], out2[:, :-1]) or rel(out2[:, :-1], out[:, :-1]) < 1e-7


# --- the tests ---------------------------------------------------------------------------

CONFIGS = [
    dict(),
    dict(qk_norm=True),
    dict(rotary_dim=4),  # partial RoPE
    dict(rotary_dim=0),  # no RoPE
    dict(qk_norm=True, rotary_dim=6, bias=True),
    dict(index_head_dim=16),  # default rotary_dim = min(D, Di) = 8: partial on qi, ki
    dict(head_dim=16, index_head_dim=8, rotary_dim=4),
]


def _cfg_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items()) or "default"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_dense_mode_equals_plain_gqa_attention(cfg):
    m = make(mode="dense", **cfg)
    x = torch.randn(2, 11, HIDDEN)
    w = torch.randn(2, 11, HIDDEN)

    out = m(x)
    kl = m.kl_loss
    ((out * w).sum() + kl).backward()
    g_mod = grads(m)
    m.zero_grad(set_to_none=True)

    out_r, kl_r = reference_layer(m, x)
    ((out_r * w).sum() + kl_r).backward()
    g_ref = grads(m)

    assert_close(out, out_r, what="out")
    assert_close(kl, kl_r, what="kl")
    for n in g_ref:
        assert g_ref[n] is not None and g_mod[n] is not None, n
        assert_close(g_mod[n], g_ref[n], what=f"grad {n}")


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("cfg", [dict(), dict(qk_norm=True), dict(rotary_dim=4),
                                 dict(rotary_dim=0)], ids=_cfg_id)
def test_batched_equals_packed(mode, cfg):
    m = make(mode=mode, **cfg)
    b, n = 2, 13
    x = torch.randn(b, n, HIDDEN, requires_grad=True)
    w = torch.randn(b, n, HIDDEN)

    out_b = m(x)
    assert out_b.shape == x.shape
    kl_b = m.kl_loss
    ((out_b * w).sum() + kl_b).backward()
    g_b, dx_b = grads(m), x.grad.clone()
    m.zero_grad(set_to_none=True)

    xp = x.detach().reshape(b * n, HIDDEN).clone().requires_grad_()
    cu = torch.arange(b + 1, dtype=torch.int32) * n
    out_p = m(xp, cu)
    assert out_p.shape == xp.shape
    kl_p = m.kl_loss
    ((out_p * w.reshape(b * n, HIDDEN)).sum() + kl_p).backward()

    assert_close(out_p, out_b.reshape(b * n, HIDDEN), what="out")
    assert_close(kl_p, kl_b, what="kl")
    assert_close(xp.grad, dx_b.reshape(b * n, HIDDEN), what="dx")
    for name, p in m.named_parameters():
        assert_close(p.grad, g_b[name], what=f"grad {name}")


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_packed_varlen_equals_separate_sequences(mode):
    """Unequal lengths packed with cu_seqlens == each sequence run alone; the KL is the
    token-weighted mean of the per-sequence KLs (it is normalised by Hkv * total_q)."""
    m = make(mode=mode, qk_norm=True, rotary_dim=4)
    lens = [5, 13, 8]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    x = torch.randn(sum(lens), HIDDEN)
    out = m(x, cu)
    kl = m.kl_loss
    kl_sum = 0.0
    for i, L in enumerate(lens):
        xs = x[cu[i]:cu[i + 1]]
        out_s = m(xs[None])[0]
        assert_close(out[cu[i]:cu[i + 1]], out_s, what=f"seq {i}")
        kl_sum = kl_sum + m.kl_loss * L
    assert_close(kl, kl_sum / sum(lens), what="kl")


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_packed_dense_reference_varlen(mode):
    """Packed unequal lengths against the independent layer run per sequence."""
    m = make(mode=mode, topk=64, qk_norm=True)  # sparse with every block == dense
    lens = [3, 10]
    x = torch.randn(sum(lens), HIDDEN)
    cu = torch.tensor([0, 3, 13], dtype=torch.int32)
    out = m(x, cu)
    for i in range(2):
        out_r, _ = reference_layer(m, x[None, cu[i]:cu[i + 1]])
        assert_close(out[cu[i]:cu[i + 1]], out_r[0], what=f"seq {i}")


@pytest.mark.parametrize("topk", [4, 5, 64])  # 13 tokens / block 4 = 4 blocks
@pytest.mark.parametrize("cfg", [dict(), dict(qk_norm=True, rotary_dim=4)], ids=_cfg_id)
def test_sparse_with_all_blocks_equals_dense(topk, cfg):
    m = make(mode="sparse", topk=topk, **cfg)
    x = torch.randn(3, 13, HIDDEN)
    w = torch.randn(3, 13, HIDDEN)
    res = {}
    for mode in ("sparse", "dense"):
        m.mode = mode
        m.zero_grad(set_to_none=True)
        out = m(x)
        ((out * w).sum() + m.kl_loss).backward()
        res[mode] = (out.detach(), m.kl_loss.detach(), grads(m))
    assert_close(res["sparse"][0], res["dense"][0], what="out")
    assert_close(res["sparse"][1], res["dense"][1], what="kl")
    for n, g in res["dense"][2].items():
        assert_close(res["sparse"][2][n], g, what=f"grad {n}")


def test_sparse_with_few_blocks_differs_from_dense():
    """Sanity check that the comparison above is not vacuous: with topk = 1 (local block
    only) and 4 blocks, sparse and dense outputs differ clearly."""
    m = make(mode="sparse", topk=1)
    x = torch.randn(2, 16, HIDDEN)
    sparse = m(x).detach()
    m.mode = "dense"
    dense = m(x).detach()
    assert torch.equal(sparse[:, :BS], dense[:, :BS]) or rel(sparse[:, :BS], dense[:, :BS]) < TOL
    assert rel(sparse, dense) > 1e-2


def test_fp8_index_dtype_reaches_the_index_branch(monkeypatch):
    """MSAttention(index_dtype=float8_e4m3fn) ranks with FP8 (the indexer gets the dtype)
    and keeps the other ops as they are; a dtype it cannot rank with is refused."""
    import openmsa.api as api
    seen = []
    real = api.indexer_topk

    def spy(*args, **kwargs):
        seen.append(kwargs.get("index_dtype"))
        return real(*args, **kwargs)
    monkeypatch.setattr(api, "indexer_topk", spy)
    x = torch.randn(2, 16, HIDDEN)
    m = make(mode="sparse", topk=2)
    plain = m(x)
    m.index_dtype = torch.float8_e4m3fn
    fp8 = m(x)
    assert seen == [None, torch.float8_e4m3fn]
    assert plain.shape == fp8.shape and bool(torch.isfinite(fp8).all())
    with pytest.raises(ValueError, match="index_dtype"):
        MSAttention(HIDDEN, 4, 2, index_head_dim=16, block_size=BS, index_dtype=torch.bfloat16)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_index_parameters(mode):
    m = make(mode=mode, qk_norm=True, bias=True)
    names = {id(p): n for n, p in m.named_parameters()}
    idx = {names[id(p)] for p in m.index_parameters()}
    assert idx == {n for n in names.values() if n.startswith(INDEX_PREFIXES)}
    assert len(idx) == 6  # qi/ki proj weight + bias, qi/ki norm weights


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_kl_gradient_reaches_only_the_index_branch(mode):
    m = make(mode=mode, qk_norm=True, bias=True)
    x = torch.randn(2, 12, HIDDEN, requires_grad=True)
    m(x)
    m.kl_loss.backward()
    for n, p in m.named_parameters():
        if n.startswith(INDEX_PREFIXES):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None or not p.grad.any(), n
    assert x.grad is None  # stop-gradient on the layer input (sg(x))


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_output_gradient_does_not_reach_the_index_branch(mode):
    m = make(mode=mode, qk_norm=True, bias=True)
    x = torch.randn(2, 12, HIDDEN, requires_grad=True)
    out = m(x)
    (out * torch.randn_like(out)).sum().backward()
    for n, p in m.named_parameters():
        if n.startswith(INDEX_PREFIXES):
            assert p.grad is None or not p.grad.any(), n
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_kl_does_not_reach_upstream_layers():
    """In a model, the KL must not train what produces the layer input either."""
    emb = nn.Linear(HIDDEN, HIDDEN)
    m = make(mode="sparse")
    m(emb(torch.randn(2, 12, HIDDEN)))
    m.kl_loss.backward()
    assert emb.weight.grad is None


class TwoLayerModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([make(mode="sparse"), make(mode="dense", qk_norm=True)])
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.block = nn.Sequential(nn.Identity(), make(mode="sparse", topk=1, rotary_dim=0))

    def forward(self, x):
        x = x + self.layers[0](x)
        x = self.mid(x)
        x = x + self.layers[1](x)
        return self.block(x)


def test_collect_kl_losses():
    model = TwoLayerModel()
    with pytest.raises(RuntimeError, match="no(ne of the 3)? MSA layers? .*computed a KL loss.*forward"):
        collect_kl_losses(model)  # no forward yet
    with pytest.raises(ValueError, match="no MSA layers"):
        collect_kl_losses(nn.Linear(2, 2))  # no MSAttention at all
    with pytest.raises(TypeError, match="model"):
        collect_kl_losses([make()])
    model(torch.randn(2, 10, HIDDEN))
    mods = [m for m in model.modules() if isinstance(m, MSAttention)]
    assert len(mods) == 3
    total = collect_kl_losses(model)
    expected = sum(m.kl_loss for m in mods)
    assert total.dim() == 0
    assert torch.allclose(total, expected, rtol=1e-6, atol=0)
    assert all(m.kl_loss.item() > 0 for m in mods)
    total.backward()
    for m in mods:
        for p in m.index_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
        assert m.q_proj.weight.grad is None
    assert model.mid.weight.grad is None


def test_collect_kl_losses_single_layer_and_latest_forward():
    m = make()
    m(torch.randn(1, 8, HIDDEN))
    first = m.kl_loss.detach().clone()
    m(torch.randn(1, 8, HIDDEN))
    total = collect_kl_losses(m)  # the module itself counts, and only its last forward
    assert torch.equal(total, m.kl_loss)
    assert not torch.equal(total.detach(), first)
    assert torch.equal(collect_kl_losses(m), total)  # collecting leaves the losses in place


def test_collect_kl_losses_skips_layers_without_a_loss():
    """A layer that holds no KL (no forward yet) contributes nothing; one layer suffices."""
    model = TwoLayerModel()
    first = model.layers[0]
    first(torch.randn(1, 8, HIDDEN))
    assert model.layers[1].kl_loss is None
    total = collect_kl_losses(model)
    assert total.dtype == torch.float32 and torch.equal(total, first.kl_loss)
    (0.1 * total).backward()
    assert first.qi_proj.weight.grad is not None


def test_collect_kl_losses_is_one_function_for_every_msa_layer():
    """openmsa.collect_kl_losses finds every module marked as an MSA layer (the
    IndexBranchMixin that MSAttention and the transformers integration's module share),
    and the layers package does not import the integrations."""
    import subprocess
    import sys

    import openmsa
    from openmsa.layers.msa_attention import IndexBranchMixin

    assert openmsa.collect_kl_losses is collect_kl_losses
    assert isinstance(make(), IndexBranchMixin)

    class OtherMSA(IndexBranchMixin, nn.Module):  # e.g. another integration's module
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(2.0))

        def forward(self):
            self.kl_loss = self.w * 3.0

    model = nn.Sequential(OtherMSA(), make())
    with pytest.raises(RuntimeError):
        collect_kl_losses(model)
    model[0]()
    assert collect_kl_losses(model).item() == 6.0
    model[1](torch.randn(1, 8, HIDDEN))
    assert torch.allclose(collect_kl_losses(model), 6.0 + model[1].kl_loss)
    code = ("import sys, openmsa, openmsa.layers; "
            "assert not any(m.startswith('openmsa.integrations') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('openmsa'))")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- positions -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_positions_default_is_local_positions(mode):
    m = make(mode=mode, rotary_dim=4)
    b, n = 2, 10
    x = torch.randn(b, n, HIDDEN)
    out = m(x)
    kl = m.kl_loss
    pos2d = torch.arange(n).expand(b, n)
    for pos in (pos2d, pos2d.reshape(-1), pos2d.to(torch.int32)):
        assert torch.equal(m(x, positions=pos), out)
        assert torch.equal(m.kl_loss, kl)
    # packed: positions restart at 0 in every sequence
    lens = [4, 9]
    xp = torch.randn(sum(lens), HIDDEN)
    cu = torch.tensor([0, 4, 13], dtype=torch.int32)
    out_p = m(xp, cu)
    local = torch.cat([torch.arange(L) for L in lens])
    assert torch.equal(m(xp, cu, positions=local), out_p)


@pytest.mark.parametrize("rotary_dim", [None, 4])
def test_positions_argument_matches_reference(rotary_dim):
    """Arbitrary (e.g. prefix-offset) positions go into RoPE of q, k, qi and ki."""
    m = make(mode="dense", rotary_dim=rotary_dim, qk_norm=True)
    b, n = 2, 9
    x = torch.randn(b, n, HIDDEN)
    pos = torch.stack([torch.arange(n) + 5, torch.randperm(40)[:n].sort().values])
    out = m(x, positions=pos)
    kl = m.kl_loss
    out_r, kl_r = reference_layer(m, x, pos)
    assert_close(out, out_r, what="out")
    assert_close(kl, kl_r, what="kl")
    assert rel(out, m(x)) > 1e-4  # positions actually changed something
    # packed form with the same positions
    out_p = m(x.reshape(b * n, HIDDEN), torch.tensor([0, n, 2 * n], dtype=torch.int32),
              positions=pos.reshape(-1))
    assert_close(out_p, out.reshape(b * n, HIDDEN), what="packed")


def test_rotary_dim_zero_ignores_positions():
    m = make(mode="sparse", rotary_dim=0)
    x = torch.randn(1, 9, HIDDEN)
    assert torch.equal(m(x), m(x, positions=torch.arange(9) * 7 + 3))


@pytest.mark.parametrize("bad,exc", [("float", TypeError), ("bool", TypeError),
                                     ("complex", TypeError), ("numel", ValueError),
                                     ("rank", ValueError), ("device", ValueError)])
def test_bad_positions(bad, exc):
    m = make()
    x = torch.randn(2, 6, HIDDEN)
    pos = {"float": torch.arange(12, dtype=torch.float32),
           "bool": torch.ones(12, dtype=torch.bool),
           "complex": torch.zeros(12, dtype=torch.complex64),
           "numel": torch.arange(11),
           "rank": torch.arange(12).view(2, 2, 3),
           "device": torch.arange(12, device="meta")}[bad]
    with pytest.raises(exc, match="positions") as info:
        m(x, positions=pos)
    if exc is TypeError:
        assert "integer" in str(info.value) and str(pos.dtype) in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_positions_dtypes(dtype):
    m = make(rotary_dim=4)
    x = torch.randn(1, 7, HIDDEN)
    assert torch.equal(m(x, positions=torch.arange(7, dtype=dtype) + 2),
                       m(x, positions=torch.arange(7) + 2))


# --- input dtypes --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64,
                                   torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_wrong_input_dtype_raises_type_error(dtype, packed):
    m = make()  # float32 parameters
    x = torch.ones(2, 6, HIDDEN).to(dtype)
    cu = None
    if packed:
        x, cu = x.reshape(12, HIDDEN), torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"^x must .*torch\.float32.*" + str(dtype).replace(".", r"\.")):
        m(x, cu)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_input_of_the_parameter_dtype_runs(dtype):
    """float64 input is fine for a float64 layer (and so on): only a mismatch is refused."""
    m = make(qk_norm=True).to(dtype)
    out = m(torch.randn(2, 9, HIDDEN, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    kl_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert m.kl_loss.dtype == kl_dtype and torch.isfinite(m.kl_loss)
    m(torch.randn(0, 9, HIDDEN, dtype=dtype))  # empty input: the same dtypes
    assert m.kl_loss.dtype == kl_dtype and m.kl_loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_autocast_accepts_floating_inputs(dtype):
    """Under torch.autocast the projections cast a float32/16-bit input themselves."""
    m = make(qk_norm=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 9, HIDDEN, dtype=dtype))
        with pytest.raises(TypeError, match="x must"):  # autocast leaves float64 alone
            m(torch.randn(2, 9, HIDDEN, dtype=torch.float64))
        with pytest.raises(TypeError, match="x must"):
            m(torch.ones(2, 9, HIDDEN, dtype=torch.int64))
    assert out.dtype == torch.bfloat16 and torch.isfinite(m.kl_loss)


# --- empty inputs -----------------------------------------------------------------------------

EMPTY_CASES = {
    "batch0": ((0, 7, HIDDEN), None),
    "seqlen0": ((3, 0, HIDDEN), None),
    "batch0-seqlen0": ((0, 0, HIDDEN), None),
    "packed-no-seqs": ((0, HIDDEN), [0]),
    "packed-empty-seqs": ((0, HIDDEN), [0, 0, 0]),
}


@pytest.mark.parametrize("case", list(EMPTY_CASES))
@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_input(case, mode, backend):
    """No tokens: an empty output of x's shape and kl_loss = 0 (float32 scalar), both of
    which backward goes through (zero gradients, to the same parameters as usual)."""
    shape, cu = EMPTY_CASES[case]
    m = make(mode=mode, qk_norm=True, bias=True, rotary_dim=4, backend=backend)
    x = torch.randn(shape, requires_grad=True)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    out = m(x, cu)
    assert out.shape == x.shape and out.dtype == x.dtype
    kl = m.kl_loss
    assert kl.shape == () and kl.dtype == torch.float32 and kl.item() == 0.0
    assert torch.equal(collect_kl_losses(m), kl)
    (out.sum() + 0.1 * collect_kl_losses(m)).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for n, p in m.named_parameters():
        if isinstance(getattr(m, n.split(".")[0]), nn.Linear):
            assert p.grad is not None and not p.grad.any(), n
    m.zero_grad(set_to_none=True)
    m(x, cu)
    m.kl_loss.backward()  # the KL alone, too
    assert all(p.grad is not None for p in m.index_parameters() if p.dim() == 2)
    # with positions (empty) too
    pos = torch.zeros(shape[:-1], dtype=torch.int64)
    assert m(x, cu, positions=pos).shape == x.shape


def test_empty_sequences_inside_a_pack():
    """Empty sequences between non-empty ones change nothing."""
    m = make(mode="sparse", rotary_dim=4)
    x = torch.randn(9, HIDDEN)
    ref = m(x, torch.tensor([0, 4, 9], dtype=torch.int32))
    kl = m.kl_loss
    out = m(x, torch.tensor([0, 0, 4, 4, 9, 9], dtype=torch.int32))
    assert torch.equal(out, ref) and torch.equal(m.kl_loss, kl)


@pytest.mark.parametrize("arg", ["x", "positions"])
def test_forward_non_tensor_raises_type_error(arg):
    m = make()
    x = torch.randn(2, 6, HIDDEN)
    with pytest.raises(TypeError, match=arg):
        if arg == "x":
            m(x.tolist())
        else:
            m(x, positions=list(range(12)))


def test_bad_forward_layout():
    m = make()
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 6, HIDDEN + 1))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(12, HIDDEN))  # packed without cu_seqlens
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(2, 6, HIDDEN), torch.tensor([0, 6, 12], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must be int32, got torch.int64"):
        m(torch.randn(12, HIDDEN), torch.tensor([0, 6, 12]))  # int64
    with pytest.raises(TypeError, match="cu_seqlens must be int32, got torch.float32"):
        m(torch.randn(12, HIDDEN), torch.tensor([0.0, 6.0, 12.0]))
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        m(torch.randn(12, HIDDEN), [0, 6, 12])
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        m(torch.randn(12, HIDDEN), torch.tensor([[0, 6, 12]], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must have at least one entry"):
        m(torch.randn(0, HIDDEN), torch.tensor([], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal x.shape\[0\] = 12, got 11"):
        m(torch.randn(12, HIDDEN), torch.tensor([0, 6, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        m(torch.randn(12, HIDDEN), torch.tensor([0, 7, 6, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        m(torch.randn(12, HIDDEN), torch.tensor([1, 6, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must be on cpu"):
        m(torch.randn(12, HIDDEN), torch.tensor([0, 6, 12], dtype=torch.int32, device="meta"))


# --- constructor validation -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads"),
    (dict(num_heads=4, num_kv_heads=3), "num_heads"),
    (dict(num_heads=0), "num_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(rotary_dim=3), "rotary_dim"),
    (dict(rotary_dim=7), "rotary_dim"),
    (dict(rotary_dim=10), "rotary_dim"),  # > head_dim = index_head_dim = 8
    (dict(head_dim=16, index_head_dim=8, rotary_dim=12), "rotary_dim"),  # > index_head_dim
    (dict(head_dim=8, index_head_dim=16, rotary_dim=12), "rotary_dim"),  # > head_dim
    (dict(rotary_dim=-2), "rotary_dim"),
    (dict(rotary_dim=4.0), "rotary_dim"),
    (dict(mode="full"), "mode"),
    (dict(mode="Sparse"), "mode"),
    (dict(mode=None), "mode"),
    (dict(block_size=0), "block_size"),
    (dict(topk=-1), "topk"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_constructor_args(kwargs, name):
    args = dict(hidden_size=HIDDEN, num_heads=HQ, num_kv_heads=HKV, head_dim=D, index_head_dim=DI)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=rf"(?<!\w){name}(?!\w)") as info:
        MSAttention(**args)
    if name in ("num_heads", "rotary_dim", "mode"):  # the brief's cases: ValueError
        assert info.type is ValueError


def test_bad_mode_assignment():
    m = make()
    with pytest.raises(ValueError, match="mode"):
        m.mode = "warmup"
    assert m.mode == "sparse"


# --- training -----------------------------------------------------------------------------------

def test_training_index_params_reduces_kl():
    """Dense (warmup) mode, lm loss + KL, only the index parameters optimised: the KL on a
    fixed batch drops clearly while the backbone stays untouched."""
    m = make(mode="dense", qk_norm=True, rotary_dim=4)
    x = torch.randn(2, 16, HIDDEN)
    target = torch.randn(2, 16, HIDDEN)
    backbone = {n: p.detach().clone() for n, p in m.named_parameters()
                if not n.startswith(INDEX_PREFIXES)}
    opt = torch.optim.Adam(m.index_parameters(), lr=3e-2)
    kls = []
    for _ in range(40):
        m.zero_grad(set_to_none=True)
        out = m(x)
        kl = collect_kl_losses(m)
        loss = F.mse_loss(out, target) + 1.0 * kl
        loss.backward()
        opt.step()
        kls.append(kl.item())
    m(x)
    kls.append(m.kl_loss.item())
    assert all(math.isfinite(v) for v in kls)
    assert kls[-1] < 0.25 * kls[0], kls  # typically ~20x lower after 40 steps
    for n, p in m.named_parameters():
        if n in backbone:
            assert torch.equal(p.detach(), backbone[n]), n


class _Float32Norm(nn.Module):
    """Stands for nn.RMSNorm under CUDA autocast, which computes and returns float32."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.float())


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_float32_norm_outputs_are_cast_to_the_projection_dtype(mode):
    """A norm that returns float32 next to 16-bit projections (RMSNorm under autocast) must
    not reach the ops as mixed dtypes: the layer runs in the projections' dtype and gives
    the same result as with norms that keep the dtype."""
    torch.manual_seed(3)
    m = make(mode=mode, qk_norm=True).to(torch.float16)
    x = torch.randn(2, 40, HIDDEN, dtype=torch.float16)
    ref = m(x)
    for name in ("q_norm", "k_norm", "qi_norm", "ki_norm"):
        setattr(m, name, _Float32Norm(getattr(m, name)))
    out = m(x)
    assert out.dtype == torch.float16
    assert_close(out.float(), ref.float(), tol=1e-2, what="float32-norm layer")


def test_dense_mode_sdpa_path_equals_the_reference_path():
    """Dense mode on a batch of equal-length sequences runs the Main Branch through torch's
    SDPA; it must equal the reference path (backend="reference"): output, KL and every
    gradient."""
    import copy
    torch.manual_seed(5)
    m = make(mode="dense", rotary_dim=8)
    ref = copy.deepcopy(m)
    ref.backend = "reference"
    x = torch.randn(2, 50, HIDDEN)
    assert_same_layer_results(m, ref, x, torch.ones_like(x))


def assert_same_layer_results(m, ref, x, w):
    """Run both layers on x (loss = sum(out * w) + KL) and compare output, KL and every
    gradient; returns the reference output."""
    outs = []
    for layer in (m, ref):
        out = layer(x)
        ((out * w).sum() + layer.kl_loss).backward()
        outs.append((out, layer.kl_loss, grads(layer)))
    (o1, kl1, g1), (o2, kl2, g2) = outs
    assert_close(o1, o2, what="out")
    assert_close(kl1, kl2, what="kl")
    for name, g in g2.items():
        assert g is not None and g1[name] is not None, name
        assert_close(g1[name], g, what=f"grad {name}")
    return o2


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="Triton's interpreter on CPU tensors; on a CUDA host Triton runs "
                           "compiled (the gpu tests cover the kernels there)")
@pytest.mark.parametrize("seqlen", [64, 150])  # one block exactly; 3 blocks, the last partial
def test_dense_mode_through_the_kernels_equals_the_reference_path(seqlen, monkeypatch):
    """Dense mode on equal-length batches with at most 64 blocks runs as sparse mode with
    K = every block, through the Triton kernels (here under the interpreter): output, KL
    and every gradient must equal the reference path's dense attention and dense KL. The
    kernel path must really be taken (spied), and a K one short of every block must not
    equal dense (so that the comparison can fail)."""
    import copy

    import openmsa.layers.msa_attention as layer_mod
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(6)
    m = MSAttention(64, 4, 2, 32, index_head_dim=64, block_size=64, topk=2, qk_norm=True,
                    rotary_dim=16, mode="dense", backend="triton")
    ref = copy.deepcopy(m)
    ref.backend = "reference"
    calls = []
    real = layer_mod.msa_attention
    monkeypatch.setattr(layer_mod, "msa_attention",
                        lambda *a, **kw: calls.append(kw["topk"]) or real(*a, **kw))
    x = torch.randn(2, seqlen, 64)
    o2 = assert_same_layer_results(m, ref, x, torch.randn(2, seqlen, 64))
    assert calls == [-(-seqlen // 64)]
    if seqlen > 64:  # one block fewer: not dense any more
        m.mode, m.topk = "sparse", -(-seqlen // 64) - 1
        assert rel(m(x), o2) > 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen,block", [(4096, 64), (8192, 128), (1000, 64), (16384, 64), (9000, 128)])
def test_gpu_dense_mode_through_the_kernels(seqlen, block):
    """On the GPU, in bf16: dense mode through the kernels against the reference path (float32
    layer on the same inputs). Up to 64 blocks (the most the kernels' K takes) all three
    stages run as sparse mode with K = every block; beyond (16384 / 64: 256 blocks; 9000 /
    128: 71, a partial last chunk), torch SDPA and the dense KL kernels 64 blocks at a time."""
    import copy
    torch.manual_seed(7)
    m = MSAttention(256, 8, 2, 64, index_head_dim=64, block_size=block, topk=8, qk_norm=True,
                    rotary_dim=32, mode="dense").cuda()
    ref = copy.deepcopy(m)
    ref.backend = "reference"
    x = torch.randn(2, seqlen, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x)
    kl = m.kl_loss
    (out.float().square().mean() + kl).backward()
    out_r = ref(x)
    (out_r.square().mean() + ref.kl_loss).backward()
    assert rel(out.float(), out_r) <= 1e-2
    assert abs(kl.item() - ref.kl_loss.item()) <= 1e-2 * abs(ref.kl_loss.item())
    for (n, p), p_r in zip(m.named_parameters(), ref.parameters()):
        assert rel(p.grad, p_r.grad) <= 3e-2, n
