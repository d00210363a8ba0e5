"""Forced blocks of the Index Branch (docs/spec.md section 4): ``init_blocks`` I and
``local_blocks`` L.

The PyTorch reference against the brute force (tests/brute_force.py), and the Triton
indexer (interpreter on a CPU, float32), the paged decode and the paged prefill against
the reference. Index inputs are dyadic (multiples of 1/4), so every dot product is exact
in float32 and the selections must be equal, ties included. Packs mix sequences shorter
than a block, exact block multiples, Lq < Lk, Lq = 0 and K larger than the number of
blocks.
"""


import pytest
import torch

import openmsa
from brute_force import bf_indexer_topk
from helpers import gen_for, make_cu, make_paged, rel
from openmsa.serving import MSADecodeWrapper, MSAPrefillWrapper, paged_indexer_topk_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5

PACK_SMALL = [(5, 5), (0, 7), (13, 13), (3, 20), (16, 16), (1, 1), (0, 0), (9, 33), (30, 70)]
PACK_64 = [(70, 200), (64, 64), (30, 30), (0, 50), (1, 129), (40, 256), (3, 3)]
# (topk, init_blocks, local_blocks)
FORCED = [(4, 1, 1), (4, 0, 2), (5, 2, 2), (3, 0, 3), (3, 2, 1), (16, 1, 3)]




def dyadic(shape, gen):
    return torch.randint(-8, 9, tuple(shape), generator=gen).float() / 4


def index_inputs(pack, hkv, di, gen, device=DEV):
    cu_q, cu_k = make_cu(pack, device)
    qi = dyadic((int(cu_q[-1]), hkv, di), gen).to(device)
    ki = dyadic((int(cu_k[-1]), 1, di), gen).to(device)
    return qi, ki, cu_q, cu_k


def forced_of(loc: int, init_blocks: int, local_blocks: int):
    return sorted({c for c in range(init_blocks) if c <= loc}
                  | {c for c in range(loc - local_blocks + 1, loc + 1) if c >= 0})


@pytest.mark.parametrize("topk,init_blocks,local_blocks", FORCED + [(2, 0, 1), (1, 0, 1)])
@pytest.mark.parametrize("bs", [4, 16])
def test_reference_matches_bruteforce(topk, init_blocks, local_blocks, bs):
    qi, ki, cu_q, cu_k = index_inputs(PACK_SMALL, 2, 32, gen_for("bf", topk, init_blocks, bs), "cpu")
    kw = dict(block_size=bs, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", deterministic=True, **kw)
    bidx, blse = bf_indexer_topk(qi, ki, cu_q, cu_k, bs, topk, 32 ** -0.5, init_blocks, local_blocks)
    assert torch.equal(idx, bidx)
    assert rel(lse, blse.float()) <= TOL


def test_rows_hold_the_forced_blocks_then_minus_one():
    """The row layout of the spec: ranked blocks, forced blocks ascending (the local block
    last), -1; min(K, l + 1) valid entries; no duplicates."""
    bs, topk, init_blocks, local_blocks = 8, 5, 2, 2
    qi, ki, cu_q, cu_k = index_inputs([(60, 60), (7, 90)], 1, 16, gen_for("layout"), "cpu")
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=topk, init_blocks=init_blocks,
                                  local_blocks=local_blocks, backend="reference")
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(2):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        for i in range(lq):
            loc = (lk - lq + i) // bs
            row = idx[0, cq[b] + i].tolist()
            valid = [c for c in row if c >= 0]
            assert row == valid + [-1] * (topk - len(valid))
            assert len(valid) == min(topk, loc + 1) == len(set(valid))
            forced = forced_of(loc, init_blocks, local_blocks)
            assert valid[len(valid) - len(forced):] == forced
            assert all(init_blocks <= c <= loc - local_blocks for c in valid[:len(valid) - len(forced)])


def test_defaults_are_the_local_block_alone():
    qi, ki, cu_q, cu_k = index_inputs(PACK_SMALL, 2, 32, gen_for("defaults"), "cpu")
    kw = dict(block_size=4, topk=4, backend="reference")
    a = openmsa.indexer_topk(qi, ki, cu_q, cu_k, **kw)
    b = openmsa.indexer_topk(qi, ki, cu_q, cu_k, init_blocks=0, local_blocks=1, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("topk,init_blocks,local_blocks,lse_mode",
                         [f + (("union", "kv_outer")[i % 2],) for i, f in enumerate(FORCED)])
def test_triton_indexer_matches_reference(topk, init_blocks, local_blocks, lse_mode, launch):
    launch("indexer", lse_mode=lse_mode)
    qi, ki, cu_q, cu_k = index_inputs(PACK_64, 2, 64, gen_for("triton", topk, init_blocks, local_blocks))
    kw = dict(block_size=64, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    ref_idx, ref_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", **kw)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton", deterministic=True, **kw)
    assert torch.equal(idx, ref_idx)
    assert rel(lse, ref_lse) <= TOL
    # without deterministic the ranked entries are a set in any order
    idx_nd, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton", **kw)
    assert torch.equal(idx_nd.sort(-1).values, ref_idx.sort(-1).values)


def test_triton_indexer_small_tiles_and_batched(launch):
    """Query tiles smaller than a block (several tiles per block) and the batched form
    with Lq < Lk."""
    launch("indexer", float32_tile=(16, 4, 1))
    gen = gen_for("batched")
    qi = dyadic((2, 70, 2, 64), gen).to(DEV)
    ki = dyadic((2, 300, 1, 64), gen).to(DEV)
    kw = dict(block_size=64, topk=4, init_blocks=1, local_blocks=2)
    ref = openmsa.indexer_topk(qi, ki, backend="reference", **kw)
    out = openmsa.indexer_topk(qi, ki, backend="triton", deterministic=True, **kw)
    assert torch.equal(out[0], ref[0]) and rel(out[1], ref[1]) <= TOL


def test_msa_attention_passes_the_forced_blocks():
    gen = gen_for("msa")
    cu_q, cu_k = make_cu(PACK_SMALL, "cpu")
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = torch.randn(tq, 4, 16, generator=gen), torch.randn(tk, 2, 16, generator=gen), \
        torch.randn(tk, 2, 16, generator=gen)
    qi, ki = dyadic((tq, 2, 16), gen), dyadic((tk, 1, 16), gen)
    kw = dict(block_size=4, topk=4, init_blocks=1, local_blocks=2)
    out, kl, idx = openmsa.msa_attention(q, k, v, qi, ki, cu_q, cu_k, **kw)
    want_idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, **kw)
    want, _ = openmsa.sparse_attention(q, k, v, want_idx, cu_q, cu_k, block_size=4)
    assert torch.equal(idx, want_idx) and torch.equal(out, want)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(init_blocks=-1), ValueError, "init_blocks"),
    (dict(init_blocks=1.0), TypeError, "init_blocks"),
    (dict(init_blocks=True), TypeError, "init_blocks"),
    (dict(local_blocks=0), ValueError, "local_blocks"),
    (dict(local_blocks=None), TypeError, "local_blocks"),
    (dict(init_blocks=2, local_blocks=2), ValueError, "at most topk"),
    (dict(local_blocks=4), ValueError, "at most topk"),
])
def test_bad_forced_blocks_raise(kw, exc, match):
    qi, ki, cu_q, cu_k = index_inputs([(4, 8)], 1, 16, gen_for("bad"), "cpu")
    with pytest.raises(exc, match=match):
        openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=4, topk=3, **kw)
    q = torch.randn(4, 1, 16)
    with pytest.raises(exc, match=match):
        openmsa.msa_attention(q, q.new_zeros(8, 1, 16), q.new_zeros(8, 1, 16), qi, ki, cu_q, cu_k,
                              block_size=4, topk=3, **kw)
    with pytest.raises(exc, match=match):
        MSADecodeWrapper(4, 1, 16, 16, block_size=16, topk=3, **kw)


# ------------------------------------------------------------------ serving


@pytest.mark.parametrize("topk,init_blocks,local_blocks,plan_kw", [
    (4, 1, 1, {}),
    (5, 1, 2, dict(index_splits=3)),
    (3, 0, 3, {}),  # nothing ranked: forced blocks only
    (8, 2, 2, dict(index_splits=18)),  # K > a request's blocks; two merge levels
])
def test_decode_matches_reference(topk, init_blocks, local_blocks, plan_kw):
    gen = gen_for("decode", topk, init_blocks)
    bs = 16
    args = list(make_paged([200, 77, 10], [2, 1, 3], 8, 2, 32, 32, bs, torch.float32, gen))
    args[1] = dyadic(args[1].shape, gen).to(DEV)  # qi
    args[4] = dyadic(args[4].shape, gen).to(DEV)  # ki_cache
    q, qi, kc, vc, kic, cu_q, kv, pt = args
    kw = dict(topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    w = MSADecodeWrapper(8, 2, 32, 32, block_size=bs, **kw)
    w.plan(cu_q, kv, pt, dtype=torch.float32, **plan_kw)
    out, lse, idx = w.run(q, qi, kc, vc, kic, return_lse=True)
    ref_idx, _ = paged_indexer_topk_reference(qi, kic, pt, kv, cu_q, block_size=bs, **kw)
    assert torch.equal(idx, ref_idx)
    ref_out, ref_lse = openmsa.serving.paged_sparse_attention_reference(q, kc, vc, ref_idx, pt, kv, cu_q)
    assert rel(out, ref_out) <= TOL and rel(lse, ref_lse) <= TOL


def test_prefill_matches_reference():
    gen = gen_for("prefill")
    bs = 64
    args = list(make_paged([300, 64, 20], [100, 64, 20], 4, 2, 32, 64, bs, torch.float32, gen))
    args[1] = dyadic(args[1].shape, gen).to(DEV)
    args[4] = dyadic(args[4].shape, gen).to(DEV)
    q, qi, kc, vc, kic, cu_q, kv, pt = args
    kw = dict(topk=3, init_blocks=1, local_blocks=1)
    w = MSAPrefillWrapper(4, 2, 32, 64, block_size=bs, deterministic=True, **kw)
    w.plan(cu_q, kv, pt, dtype=torch.float32)
    out, idx = w.run(q, qi, kc, vc, kic)
    ref_idx, _ = paged_indexer_topk_reference(qi, kic, pt, kv, cu_q, block_size=bs, **kw)
    assert torch.equal(idx, ref_idx)
    ref_out, _ = openmsa.serving.paged_sparse_attention_reference(q, kc, vc, ref_idx, pt, kv, cu_q)
    assert rel(out, ref_out) <= TOL


def test_msattention_layer_takes_the_forced_blocks(monkeypatch):
    from openmsa.layers import msa_attention as layer_module
    seen = {}
    real = layer_module.msa_attention

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)
    monkeypatch.setattr(layer_module, "msa_attention", spy)
    layer = openmsa.MSAttention(32, 4, 2, 8, index_head_dim=8, block_size=4, topk=4, init_blocks=1,
                                local_blocks=2)
    x = torch.randn(1, 30, 32, generator=gen_for("layer"))
    layer(x)
    assert seen["init_blocks"] == 1 and seen["local_blocks"] == 2
    assert layer.kl_loss is not None
    with pytest.raises(ValueError, match="at most topk"):
        openmsa.MSAttention(32, 4, 2, 8, topk=2, init_blocks=1, local_blocks=2)
