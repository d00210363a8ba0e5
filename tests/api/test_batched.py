"""The batched form [batch, seqlen, heads, dim] (cu_seqlens None) of the four public
functions against the packed varlen form with equal-length sequences.

Reshape conventions (openmsa/api.py docstring): total_q splits into [batch, Lq] in
place, so topk_indices [Hkv, batch, Lq, K], index_lse [Hkv, batch, Lq],
lse [batch, Lq, Hq], out [batch, Lq, Hq, D]. Queries are bottom-right aligned to the
keys (Lq <= Lk), exactly like cu_seqlens_q = arange * Lq, cu_seqlens_k = arange * Lk.

Both forms run the same float32 reference on the same numbers, so the results should
agree to rounding (relative error norm <= 1e-5; in practice they are bitwise equal).
"""

from __future__ import annotations

import pytest
import torch

import openmsa
from helpers import rel

HQ, HKV, D, DI = 4, 2, 8, 8
BS, TOPK = 4, 3
BATCH, LK = 3, 14  # 4 blocks per sequence, the last one partial
TOL = 1e-5


def assert_close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb)
    assert torch.equal(a[~fa], b[~fb])  # -inf lse of empty key sets, identically
    assert rel(a[fa], b[fb]) <= tol


def cu(batch: int, length: int) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32) * length


def pack(t: torch.Tensor) -> torch.Tensor:
    """[B, L, H, X] -> a fresh leaf [B*L, H, X] with the same values (own .grad)."""
    return t.detach().reshape(-1, *t.shape[2:]).clone().requires_grad_(t.requires_grad)


def inputs(lq: int, batch: int = BATCH, lk: int = LK, requires_grad: bool = False):
    g = dict(
        q=torch.randn(batch, lq, HQ, D), k=torch.randn(batch, lk, HKV, D),
        v=torch.randn(batch, lk, HKV, D), qi=torch.randn(batch, lq, HKV, DI),
        ki=torch.randn(batch, lk, 1, DI),
    )
    for t in g.values():
        t.requires_grad_(requires_grad)
    return g


def random_indices(lq: int, k: int = TOPK, batch: int = BATCH) -> torch.Tensor:
    """Arbitrary batched indices [Hkv, B, Lq, K]: -1, duplicates and out-of-range ids."""
    nblocks = (LK + BS - 1) // BS
    return torch.randint(-1, nblocks + 2, (HKV, batch, lq, k), dtype=torch.int32)


LQS = [LK, LK - 5, 1]  # Lq = Lk, Lq < Lk (chunked prefill), one query (decode)


@pytest.mark.parametrize("lq", LQS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_indexer_topk_batched_equals_packed(lq, deterministic):
    g = inputs(lq)
    idx_b, lse_b = openmsa.indexer_topk(g["qi"], g["ki"], block_size=BS, topk=TOPK,
                                        deterministic=deterministic)
    idx_p, lse_p = openmsa.indexer_topk(pack(g["qi"]), pack(g["ki"]), cu(BATCH, lq), cu(BATCH, LK),
                                        block_size=BS, topk=TOPK, deterministic=deterministic)
    assert idx_b.shape == (HKV, BATCH, lq, TOPK) and idx_b.dtype == torch.int32
    assert lse_b.shape == (HKV, BATCH, lq) and lse_b.dtype == torch.float32
    if deterministic:
        assert torch.equal(idx_b, idx_p.view(HKV, BATCH, lq, TOPK))
    else:  # the non-local entries are a set: compare sorted rows
        assert torch.equal(idx_b.sort(-1).values, idx_p.view(HKV, BATCH, lq, TOPK).sort(-1).values)
    assert_close(lse_b, lse_p.view(HKV, BATCH, lq))


@pytest.mark.parametrize("lq", LQS)
@pytest.mark.parametrize("which", ["indexer", "random", "dense"])
def test_sparse_attention_batched_equals_packed(lq, which):
    g = inputs(lq, requires_grad=True)
    if which == "indexer":
        idx_b, _ = openmsa.indexer_topk(g["qi"], g["ki"], block_size=BS, topk=TOPK)
    elif which == "random":
        idx_b = random_indices(lq)
    else:
        idx_b = None
    q_p, k_p, v_p = pack(g["q"]), pack(g["k"]), pack(g["v"])
    idx_p = None if idx_b is None else idx_b.reshape(HKV, BATCH * lq, TOPK)

    out_b, lse_b = openmsa.sparse_attention(g["q"], g["k"], g["v"], idx_b, block_size=BS)
    out_p, lse_p = openmsa.sparse_attention(q_p, k_p, v_p, idx_p, cu(BATCH, lq), cu(BATCH, LK),
                                            block_size=BS)
    assert out_b.shape == (BATCH, lq, HQ, D) and lse_b.shape == (BATCH, lq, HQ)
    assert_close(out_b, out_p.view(BATCH, lq, HQ, D))
    assert_close(lse_b, lse_p.view(BATCH, lq, HQ))

    do = torch.randn(BATCH, lq, HQ, D)
    out_b.backward(do)
    out_p.backward(do.reshape(BATCH * lq, HQ, D))
    for n, leaf in (("q", q_p), ("k", k_p), ("v", v_p)):
        assert g[n].grad is not None and g[n].grad.shape == g[n].shape
        assert_close(g[n].grad.reshape(leaf.shape), leaf.grad)


@pytest.mark.parametrize("lq", LQS)
@pytest.mark.parametrize("which", ["indexer", "random", "dense"])
@pytest.mark.parametrize("pass_lse", [False, True])
def test_indexer_kl_loss_batched_equals_packed(lq, which, pass_lse):
    g = inputs(lq, requires_grad=True)
    index_lse_b = None
    if which == "indexer":
        idx_b, index_lse_b = openmsa.indexer_topk(g["qi"].detach(), g["ki"].detach(),
                                                  block_size=BS, topk=TOPK)
    elif which == "random":
        idx_b = random_indices(lq)
    else:
        idx_b = None
    _, lse_b = openmsa.sparse_attention(g["q"], g["k"], g["v"], idx_b, block_size=BS)
    idx_p = None if idx_b is None else idx_b.reshape(HKV, BATCH * lq, TOPK)
    kw_b = dict(block_size=BS, coeff=0.7)
    kw_p = dict(kw_b)
    if pass_lse:
        kw_b.update(lse=lse_b, index_lse=index_lse_b)
        kw_p.update(lse=lse_b.reshape(BATCH * lq, HQ),
                    index_lse=None if index_lse_b is None else index_lse_b.reshape(HKV, BATCH * lq))
    qi_p, ki_p = pack(g["qi"]), pack(g["ki"])

    kl_b = openmsa.indexer_kl_loss(g["q"], g["k"], g["qi"], g["ki"], idx_b, **kw_b)
    kl_p = openmsa.indexer_kl_loss(pack(g["q"]), pack(g["k"]), qi_p, ki_p, idx_p,
                                   cu(BATCH, lq), cu(BATCH, LK), **kw_p)
    assert kl_b.dim() == 0 and kl_b.dtype == torch.float32
    assert torch.isfinite(kl_b) and kl_b.item() > 0
    assert_close(kl_b, kl_p)

    kl_b.backward()
    kl_p.backward()
    for n, leaf in (("qi", qi_p), ("ki", ki_p)):
        assert_close(g[n].grad.reshape(leaf.shape), leaf.grad)
    # The KL trains only the index branch.
    assert g["q"].grad is None and g["k"].grad is None


@pytest.mark.parametrize("lq", LQS)
def test_msa_attention_batched_equals_packed(lq):
    g = inputs(lq, requires_grad=True)
    p = {n: pack(t) for n, t in g.items()}
    out_b, kl_b, idx_b = openmsa.msa_attention(g["q"], g["k"], g["v"], g["qi"], g["ki"],
                                               block_size=BS, topk=TOPK, deterministic=True)
    out_p, kl_p, idx_p = openmsa.msa_attention(p["q"], p["k"], p["v"], p["qi"], p["ki"],
                                               cu(BATCH, lq), cu(BATCH, LK), block_size=BS,
                                               topk=TOPK, deterministic=True)
    assert out_b.shape == (BATCH, lq, HQ, D) and idx_b.shape == (HKV, BATCH, lq, TOPK)
    assert kl_b.dim() == 0
    assert torch.equal(idx_b, idx_p.view(HKV, BATCH, lq, TOPK))
    assert_close(out_b, out_p.view(BATCH, lq, HQ, D))
    assert_close(kl_b, kl_p)

    do = torch.randn(BATCH, lq, HQ, D)
    (out_b * do).sum().backward()
    (out_p * do.reshape(out_p.shape)).sum().backward()
    for n in ("q", "k", "v"):
        assert_close(g[n].grad.reshape(p[n].shape), p[n].grad)
    assert g["qi"].grad is None and g["ki"].grad is None  # out does not reach the index branch

    for t in list(g.values()) + list(p.values()):
        t.grad = None
    kl_b.backward()
    kl_p.backward()
    for n in ("qi", "ki"):
        assert_close(g[n].grad.reshape(p[n].shape), p[n].grad)
    for n in ("q", "k", "v"):
        assert g[n].grad is None  # the KL does not reach the main branch


def test_batched_single_sequence_equals_per_sequence_calls():
    """Each batch row is an independent sequence: batch = concatenation of batch-1 calls."""
    lq = LK - 3
    g = inputs(lq)
    out, kl, idx = openmsa.msa_attention(g["q"], g["k"], g["v"], g["qi"], g["ki"], block_size=BS,
                                         topk=TOPK, deterministic=True)
    for b in range(BATCH):
        one = {n: t[b:b + 1] for n, t in g.items()}
        out1, _, idx1 = openmsa.msa_attention(one["q"], one["k"], one["v"], one["qi"], one["ki"],
                                              block_size=BS, topk=TOPK, deterministic=True)
        assert torch.equal(idx[:, b:b + 1], idx1)
        assert_close(out[b:b + 1], out1)


def test_batched_non_contiguous_inputs():
    """Batched tensors coming from a [batch, heads, seqlen, dim] layout (non-contiguous
    views) give the same results as contiguous copies."""
    lq = LK - 2
    g = inputs(lq)
    nc = {n: t.transpose(1, 2).contiguous().transpose(1, 2) for n, t in g.items()}
    assert not nc["q"].is_contiguous()
    out_c, kl_c, idx_c = openmsa.msa_attention(g["q"], g["k"], g["v"], g["qi"], g["ki"],
                                               block_size=BS, topk=TOPK, deterministic=True)
    out_n, kl_n, idx_n = openmsa.msa_attention(nc["q"], nc["k"], nc["v"], nc["qi"], nc["ki"],
                                               block_size=BS, topk=TOPK, deterministic=True)
    assert torch.equal(idx_c, idx_n)
    assert_close(out_n, out_c)
    assert_close(kl_n, kl_c)


# --- batched validation ------------------------------------------------------------------

def _named(name: str) -> str:
    return rf"(?<!\w){name}(?!\w)"


def _bad(fn, args, exc, name):
    snap = {n: t.clone() for n, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(exc, match=_named(name)):
        fn(**args)
    for n, t in snap.items():
        assert torch.equal(args[n], t)


def _base(fn_name, lq=LK - 2):
    g = inputs(lq)
    if fn_name == "indexer_topk":
        return openmsa.indexer_topk, dict(qi=g["qi"], ki=g["ki"], block_size=BS, topk=TOPK)
    if fn_name == "sparse_attention":
        return openmsa.sparse_attention, dict(q=g["q"], k=g["k"], v=g["v"],
                                              topk_indices=random_indices(lq), block_size=BS)
    if fn_name == "indexer_kl_loss":
        return openmsa.indexer_kl_loss, dict(q=g["q"], k=g["k"], qi=g["qi"], ki=g["ki"],
                                             topk_indices=random_indices(lq), block_size=BS)
    return openmsa.msa_attention, dict(q=g["q"], k=g["k"], v=g["v"], qi=g["qi"], ki=g["ki"],
                                       block_size=BS, topk=TOPK)


FN_NAMES = ["indexer_topk", "sparse_attention", "indexer_kl_loss", "msa_attention"]


@pytest.mark.parametrize("fn_name", FN_NAMES)
def test_batched_base_inputs_are_valid(fn_name):
    fn, args = _base(fn_name)
    fn(**args)


@pytest.mark.parametrize("fn_name", FN_NAMES)
@pytest.mark.parametrize("name", ["q", "k", "v", "qi", "ki"])
def test_batched_mismatched_batch_size(fn_name, name):
    """One tensor with a smaller batch: the message names it (for the first query tensor,
    the reference of the batch size, it says "... like <name>")."""
    fn, args = _base(fn_name)
    if name not in args:
        pytest.skip("argument not taken")
    args[name] = args[name][:-1]
    _bad(fn, args, ValueError, name)


@pytest.mark.parametrize("fn_name", ["sparse_attention", "msa_attention"])
def test_batched_k_v_seqlen_mismatch(fn_name):
    fn, args = _base(fn_name)
    args["v"] = args["v"][:, :-1]
    _bad(fn, args, ValueError, "v")


@pytest.mark.parametrize("fn_name", ["indexer_kl_loss", "msa_attention"])
def test_batched_k_ki_seqlen_mismatch(fn_name):
    fn, args = _base(fn_name)
    args["ki"] = args["ki"][:, :-1]
    _bad(fn, args, ValueError, "ki")


@pytest.mark.parametrize("fn_name", ["indexer_kl_loss", "msa_attention"])
def test_batched_q_qi_seqlen_mismatch(fn_name):
    fn, args = _base(fn_name)
    args["qi"] = args["qi"][:, :-1]
    _bad(fn, args, ValueError, "qi")


@pytest.mark.parametrize("fn_name", FN_NAMES)
def test_batched_lq_greater_than_lk(fn_name):
    fn, args = _base(fn_name, lq=LK)
    kname = "ki" if fn_name == "indexer_topk" else "k"
    for n in ("k", "v", "ki"):
        if n in args:
            args[n] = args[n][:, :-1]  # Lk = LK - 1 < Lq = LK
    if "topk_indices" in args:
        args["topk_indices"] = random_indices(LK)
    qname = "qi" if fn_name == "indexer_topk" else "q"
    _bad(fn, args, ValueError, qname)
    _bad(fn, args, ValueError, kname)


@pytest.mark.parametrize("fn_name", FN_NAMES)
def test_batched_wrong_rank(fn_name):
    """cu_seqlens None means the batched 4-D form: 3-D inputs are an error naming them."""
    fn, args = _base(fn_name)
    name = "qi" if fn_name == "indexer_topk" else "q"
    args[name] = args[name][0]
    _bad(fn, args, ValueError, name)


@pytest.mark.parametrize("fn_name", ["sparse_attention", "indexer_kl_loss"])
@pytest.mark.parametrize("bad", ["packed_shape", "batch", "seqlen", "rank"])
def test_batched_topk_indices_shape(fn_name, bad):
    lq = LK - 2
    fn, args = _base(fn_name, lq)
    idx = args["topk_indices"]
    args["topk_indices"] = {
        "packed_shape": idx.reshape(HKV, BATCH * lq, TOPK),
        "batch": idx[:, :-1],
        "seqlen": idx[:, :, :-1],
        "rank": idx[0],
    }[bad]
    _bad(fn, args, ValueError, "topk_indices")


def test_batched_topk_indices_dtype():
    fn, args = _base("sparse_attention")
    args["topk_indices"] = args["topk_indices"].long()
    _bad(fn, args, TypeError, "topk_indices")


@pytest.mark.parametrize("bad", ["packed_shape", "batch", "heads", "dtype"])
def test_batched_lse_shape(bad):
    lq = LK - 2
    fn, args = _base("indexer_kl_loss", lq)
    lse = torch.zeros(BATCH, lq, HQ)
    args["lse"] = {
        "packed_shape": lse.reshape(BATCH * lq, HQ),
        "batch": lse[:-1],
        "heads": lse[..., :-1],
        "dtype": lse.double(),
    }[bad]
    _bad(fn, args, TypeError if bad == "dtype" else ValueError, "lse")


@pytest.mark.parametrize("bad", ["packed_shape", "batch", "seqlen", "dtype"])
def test_batched_index_lse_shape(bad):
    lq = LK - 2
    fn, args = _base("indexer_kl_loss", lq)
    ilse = torch.zeros(HKV, BATCH, lq)
    args["index_lse"] = {
        "packed_shape": ilse.reshape(HKV, BATCH * lq),
        "batch": ilse[:, :-1],
        "seqlen": ilse[:, :, :-1],
        "dtype": ilse.half(),
    }[bad]
    _bad(fn, args, TypeError if bad == "dtype" else ValueError, "index_lse")
