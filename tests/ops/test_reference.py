"""openmsa's PyTorch reference backend against an independent brute force (tests/brute_force.py).

Packed varlen form only (docs/spec.md sections 3-6 and 10). Every test draws fresh inputs
from its own seeded torch.Generator (seed = crc32 of the test id, so each parametrisation
gets a different one).

Exactness: index inputs are dyadic (small multiples of 1/4), so every dot product is exact in
float32 and the block ranking of openmsa must equal the float64 brute force EXACTLY (ties
included). Float results are compared with the relative error norm ||a-b|| / ||b||:
1e-5 for float32, 2e-3 for float16, 1e-2 for bfloat16.
"""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import openmsa
from helpers import rel
from helpers import make_cu as _make_cu
from brute_force import (
    bf_all_blocks_indices,
    bf_block_scores_matrix,
    bf_dense_masked_attention,
    bf_index_lse,
    bf_indexer_topk,
    bf_kl,
    bf_kl_grad,
    bf_sparse_attention,
    bf_token_set,
    num_blocks,
    query_rows,
)

REF = dict(backend="reference")
TOL32 = 1e-5
TOL_LOW = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

# ----------------------------------------------------------------------------- packs
# (Lq, Lk) per sequence. Queries are the LAST Lq positions of the keys.
# Mixed packs: short sequences (< block), exact block multiples, Lq < Lk (chunked
# prefill), Lq = 0 (and Lk = 0) sequences.
PACK_SMALL = [(5, 5), (0, 7), (13, 13), (3, 20), (16, 16), (1, 1), (0, 0), (9, 33)]
PACK_SMALL2 = [(2, 2), (8, 8), (11, 27), (0, 4), (24, 24), (4, 17)]
PACK_64 = [(70, 200), (64, 64), (30, 30), (0, 50), (128, 128), (1, 129)]
PACK_128 = [(60, 300), (128, 128), (0, 40), (20, 20), (130, 256), (2, 385)]
PACK_TINY = [(3, 6), (5, 5), (0, 2), (2, 9)]


def make_cu(pack):
    return _make_cu(pack, "cpu")  # the reference tests run on CPU tensors



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead, and on a busy 2-core machine the
    OpenMP spin-waits of 2 threads make each small op take milliseconds. Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def dyadic(shape, gen, levels=4, denom=4.0, dtype=torch.float32):
    """Integers in [-levels, levels] / denom: exact in fp32/fp16/bf16, exact dot products."""
    return (torch.randint(-levels, levels + 1, shape, generator=gen).to(torch.float64)
            / denom).to(dtype)


def randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def assert_rel(a, b, tol, what):
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = rel(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_lse(a, b, tol, what):
    """LSE with possible -inf entries (empty T) or NaN (NaN scores): same pattern, then rel."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    assert a.shape == b.shape
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN pattern differs"
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), f"{what}: -inf pattern differs"
    assert not torch.isposinf(a).any()
    fin = torch.isfinite(b)
    if fin.any():
        err = rel(a[fin], b[fin])
        assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def random_indices(cu_q, cu_k, hkv, width, block_size, gen):
    """Arbitrary indices: -1 anywhere, duplicates, ids >= block count, future blocks."""
    rows = query_rows(cu_q, cu_k)
    idx = torch.empty((hkv, len(rows), width), dtype=torch.int32)
    for t, (_, lk, _) in enumerate(rows):
        nb = num_blocks(lk, block_size)
        idx[:, t] = torch.randint(-1, nb + 2, (hkv, width), generator=gen).to(torch.int32)
    return idx


def index_inputs(pack, hkv, di, gen, dtype=torch.float32):
    cu_q, cu_k = make_cu(pack)
    qi = dyadic((int(cu_q[-1]), hkv, di), gen, dtype=dtype)
    ki = dyadic((int(cu_k[-1]), 1, di), gen, dtype=dtype)
    return qi, ki, cu_q, cu_k


def main_inputs(pack, hkv, grp, d, gen, dtype=torch.float32):
    cu_q, cu_k = make_cu(pack)
    q = randn((int(cu_q[-1]), hkv * grp, d), gen, dtype)
    k = randn((int(cu_k[-1]), hkv, d), gen, dtype)
    v = randn((int(cu_k[-1]), hkv, d), gen, dtype)
    return q, k, v, cu_q, cu_k


def check_rows_as_sets(a, b):
    """Same valid count, -1 suffix, local block last, same set of non-local blocks."""
    assert a.shape == b.shape
    for g in range(a.shape[0]):
        for t in range(a.shape[1]):
            ra, rb = a[g, t].tolist(), b[g, t].tolist()
            na = sum(x != -1 for x in ra)
            nb_ = sum(x != -1 for x in rb)
            assert na == nb_, (g, t, ra, rb)
            assert all(x == -1 for x in ra[na:]), (g, t, ra)
            assert ra[na - 1] == rb[nb_ - 1], (g, t, ra, rb)
            assert sorted(ra[:na - 1]) == sorted(rb[:nb_ - 1]), (g, t, ra, rb)


def sdpa_dense(q, k, v, cu_q, cu_k, scale):
    """Dense causal GQA attention with torch SDPA and an explicit bottom-right bool mask."""
    hq, hkv = q.shape[1], k.shape[1]
    grp = hq // hkv
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs = []
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if lq == 0:
            continue
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]
        kb = k[ck[b]:ck[b + 1]].repeat_interleave(grp, 1).transpose(0, 1)[None]
        vb = v[ck[b]:ck[b + 1]].repeat_interleave(grp, 1).transpose(0, 1)[None]
        mask = torch.arange(lk)[None, :] <= (lk - lq + torch.arange(lq))[:, None]
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0)


# ======================================================================= brute-force sanity
def test_bruteforce_self_consistency(gen):
    """The two brute-force references agree with each other (dense masked vs per-query loops,
    analytical KL gradient vs autograd through bf_kl)."""
    pack = PACK_SMALL2
    q, k, v, cu_q, cu_k = main_inputs(pack, 2, 2, 8, gen, torch.float64)
    out, _ = bf_sparse_attention(q, k, v, None, cu_q, cu_k, 4, 0.3)
    ref = bf_dense_masked_attention(q, k, v, cu_q, cu_k, 0.3)
    assert rel(out, ref) < 1e-12
    qi, ki = randn((q.shape[0], 2, 8), gen, torch.float64), randn((k.shape[0], 1, 8), gen, torch.float64)
    idx, _ = bf_indexer_topk(qi, ki, cu_q, cu_k, 4, 3, 0.5)
    qi.requires_grad_(True)
    ki.requires_grad_(True)
    loss = bf_kl(q, k, qi, ki, idx, cu_q, cu_k, 4, 0.3, 0.5, coeff=1.7)
    gqi, gki = torch.autograd.grad(loss, (qi, ki))
    aqi, aki = bf_kl_grad(q, k, qi, ki, idx, cu_q, cu_k, 4, 0.3, 0.5, coeff=1.7)
    assert rel(gqi, aqi) < 1e-12 and rel(gki, aki) < 1e-12
    # token set rules
    assert bf_token_set([-1, 0, 0, 9], p=5, lk=8, block_size=4) == [0, 1, 2, 3]
    assert bf_token_set([1], p=5, lk=8, block_size=4) == [4, 5]
    assert bf_token_set([2, -1], p=5, lk=8, block_size=4) == []


# ======================================================================= Index Branch
TOPK_CASES = [
    # (pack, block_size, Hkv, Di, topk, scale)
    (PACK_SMALL, 4, 2, 64, 1, None),
    (PACK_SMALL, 4, 2, 64, 2, None),
    (PACK_SMALL, 4, 1, 128, 3, 0.25),
    (PACK_SMALL, 4, 4, 64, 5, None),
    (PACK_SMALL, 4, 2, 64, 16, None),      # K >= number of blocks
    (PACK_SMALL, 8, 2, 128, 2, None),
    (PACK_SMALL, 8, 3, 64, 4, 0.125),
    (PACK_SMALL2, 8, 2, 64, 8, None),
    (PACK_SMALL2, 16, 2, 64, 2, None),
    (PACK_SMALL2, 16, 1, 128, 1, 1.0),
    (PACK_64, 64, 2, 128, 2, None),
    (PACK_64, 64, 1, 64, 3, None),
    (PACK_64, 64, 2, 64, 16, None),
    (PACK_128, 128, 1, 128, 2, None),
    (PACK_128, 128, 2, 64, 4, 0.5),
]


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("pack,bs,hkv,di,topk,scale", TOPK_CASES)
def test_indexer_topk_matches_bruteforce(gen, pack, bs, hkv, di, topk, scale, deterministic):
    qi, ki, cu_q, cu_k = index_inputs(pack, hkv, di, gen)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=topk,
                                    softmax_scale=scale, deterministic=deterministic, **REF)
    bidx, blse = bf_indexer_topk(qi, ki, cu_q, cu_k, bs, topk, di ** -0.5 if scale is None else scale)
    assert idx.dtype == torch.int32 and idx.shape == (hkv, qi.shape[0], topk)
    assert lse.dtype == torch.float32 and lse.shape == (hkv, qi.shape[0])
    if deterministic:
        assert torch.equal(idx, bidx)
    else:
        check_rows_as_sets(idx, bidx)
    assert_lse(lse, blse, TOL32, "index_lse")


@pytest.mark.parametrize("seed", range(8))
def test_indexer_topk_many_seeds(seed):
    """Many random small packs (random lengths, Lq <= Lk, Lq = 0 allowed), exact match."""
    gen = torch.Generator().manual_seed(1000 + seed)
    nseq = int(torch.randint(1, 6, (1,), generator=gen))
    pack = []
    for _ in range(nseq):
        lk = int(torch.randint(0, 30, (1,), generator=gen))
        lq = int(torch.randint(0, lk + 1, (1,), generator=gen))
        pack.append((lq, lk))
    if sum(lq for lq, _ in pack) == 0:
        pack.append((3, 7))
    bs = [4, 8, 16, 4][seed % 4]
    topk = int(torch.randint(1, 9, (1,), generator=gen))
    hkv = 1 + seed % 3
    qi, ki, cu_q, cu_k = index_inputs(pack, hkv, 64, gen)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=topk,
                                    deterministic=True, **REF)
    bidx, blse = bf_indexer_topk(qi, ki, cu_q, cu_k, bs, topk, 64 ** -0.5)
    assert torch.equal(idx, bidx), pack
    assert_lse(lse, blse, TOL32, "index_lse")


@pytest.mark.parametrize("pack,bs,hkv,di,topk", [
    (PACK_SMALL, 4, 2, 64, 3),
    (PACK_SMALL2, 8, 2, 128, 2),
    (PACK_64, 64, 2, 128, 2),
    (PACK_128, 128, 1, 64, 2),
])
def test_indexer_topk_gaussian_is_a_valid_topk(gen, pack, bs, hkv, di, topk):
    """Gaussian inputs (near-ties may legitimately flip between fp32 and fp64): the selected
    blocks must be a top-k up to fp32 rounding, in spec layout, and index_lse must be the
    logsumexp over the tokens openmsa selected."""
    cu_q, cu_k = make_cu(pack)
    qi = randn((int(cu_q[-1]), hkv, di), gen)
    ki = randn((int(cu_k[-1]), 1, di), gen)
    scale = di ** -0.5
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=topk,
                                    deterministic=True, **REF)
    bidx, _ = bf_indexer_topk(qi, ki, cu_q, cu_k, bs, topk, scale)
    scores = bf_block_scores_matrix(qi, ki, cu_q, cu_k, bs, scale)
    tol = 1e-5
    flips = 0
    for (g, t), sc in scores.items():
        row = idx[g, t].tolist()
        loc = bidx[g, t][(bidx[g, t] != -1).sum() - 1].item()
        n = min(topk, loc + 1)
        assert row[n - 1] == loc and all(x == -1 for x in row[n:]), (g, t, row)
        sel = row[:n - 1]
        assert len(set(sel)) == len(sel) and all(0 <= c < loc for c in sel)
        rest = [sc[c] for c in range(loc) if c not in sel]
        if sel and rest:
            assert min(sc[c] for c in sel) >= max(rest) - tol, (g, t, row)
        # deterministic order: descending scores up to rounding
        for a, b in zip(sel, sel[1:]):
            assert sc[a] >= sc[b] - tol, (g, t, row)
        flips += row != bidx[g, t].tolist()
    assert flips <= 2, f"{flips} rows differ from fp64 ranking: more than near-ties explain"
    assert_lse(lse, bf_index_lse(qi, ki, idx, cu_q, cu_k, bs, scale), TOL32, "index_lse")


def test_indexer_topk_empty_query_side(gen):
    """Packs where every sequence has Lq = 0 (total_q = 0): empty, well-shaped results."""
    cu_q, cu_k = make_cu([(0, 5), (0, 0), (0, 9)])
    qi = dyadic((0, 2, 64), gen)
    ki = dyadic((14, 1, 64), gen)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=4, topk=3, **REF)
    assert idx.shape == (2, 0, 3) and idx.dtype == torch.int32
    assert lse.shape == (2, 0) and lse.dtype == torch.float32
    q = randn((0, 4, 64), gen)
    k, v = randn((14, 2, 64), gen), randn((14, 2, 64), gen)
    for ind in (idx, None):
        out, lse2 = openmsa.sparse_attention(q, k, v, ind, cu_q, cu_k, block_size=4, **REF)
        assert out.shape == (0, 4, 64) and lse2.shape == (0, 4)


def _repeated_block_ki(pack, bs, di, gen, period):
    """ki whose blocks repeat with the given period inside each sequence (exact score ties)."""
    base = dyadic((period * bs, 1, di), gen)
    parts = []
    for _, lk in pack:
        reps = (lk + base.shape[0] - 1) // base.shape[0]
        parts.append(base.repeat(reps, 1, 1)[:lk])
    return torch.cat(parts, 0)


@pytest.mark.parametrize("kind", ["repeated_blocks", "ternary", "zeros", "repeated_64"])
@pytest.mark.parametrize("topk", [1, 2, 3, 6])
def test_indexer_topk_ties(gen, kind, topk):
    """Exactly equal block scores: the smaller block id wins, also for the SET of blocks
    (deterministic=False too), and the order is by id among ties with deterministic=True."""
    bs, hkv, pack = 4, 2, PACK_SMALL
    if kind == "repeated_64":
        bs, pack = 64, PACK_64
    cu_q, cu_k = make_cu(pack)
    tq = int(cu_q[-1])
    if kind in ("repeated_blocks", "repeated_64"):
        di = 64
        qi = dyadic((tq, hkv, di), gen)
        ki = _repeated_block_ki(pack, bs, di, gen, period=2)
    elif kind == "ternary":
        di = 8
        qi = dyadic((tq, hkv, di), gen, levels=1, denom=1.0)
        ki = dyadic((int(cu_k[-1]), 1, di), gen, levels=1, denom=1.0)
    else:
        di = 64
        qi = dyadic((tq, hkv, di), gen)
        ki = torch.zeros((int(cu_k[-1]), 1, di))
    bidx, blse = bf_indexer_topk(qi, ki, cu_q, cu_k, bs, topk, di ** -0.5)
    # the inputs really have ties among the ranked blocks
    scores = bf_block_scores_matrix(qi, ki, cu_q, cu_k, bs, di ** -0.5)
    n_ties = sum(len(s) - len(set(s.values())) for s in scores.values())
    assert n_ties > 0
    for det in (True, False):
        idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=topk,
                                        deterministic=det, **REF)
        if det:
            assert torch.equal(idx, bidx)
        else:
            check_rows_as_sets(idx, bidx)
        assert_lse(lse, blse, TOL32, "index_lse")


def _check_nan_rows(idx, bidx, scores, deterministic):
    """Rows where NaN blocks may need to be chosen: numbers first in brute-force order,
    then only NaN blocks; same count, local block last, -1 padding."""
    for (g, t), sc in scores.items():
        ra, rb = idx[g, t].tolist(), bidx[g, t].tolist()
        n = sum(x != -1 for x in rb)
        assert sum(x != -1 for x in ra) == n and all(x == -1 for x in ra[n:]), (g, t, ra, rb)
        assert ra[n - 1] == rb[n - 1], (g, t, ra, rb)
        sel_a, sel_b = ra[:n - 1], rb[:n - 1]
        assert len(set(sel_a)) == len(sel_a) and all(0 <= c < rb[n - 1] for c in sel_a)
        num_a = [c for c in sel_a if not math.isnan(sc[c])]
        num_b = [c for c in sel_b if not math.isnan(sc[c])]
        if deterministic:
            assert sel_a[:len(num_a)] == num_a, (g, t, ra, "NaN ranked above a number")
            assert num_a == num_b, (g, t, ra, rb)
        else:
            assert sorted(num_a) == sorted(num_b), (g, t, ra, rb)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("topk", [2, 3, 5, 16])
def test_indexer_topk_nan_ranks_below(gen, topk, deterministic):
    bs, hkv, di, pack = 4, 2, 64, PACK_SMALL
    qi, ki, cu_q, cu_k = index_inputs(pack, hkv, di, gen)
    # NaN keys: every block holding one scores NaN (for all queries that rank it)
    nan_tok = torch.randperm(ki.shape[0], generator=gen)[: ki.shape[0] // 6]
    ki[nan_tok, 0, 3] = float("nan")
    # NaN index queries: every block scores NaN for that (t, g)
    nan_q = torch.randperm(qi.shape[0], generator=gen)[:5]
    qi[nan_q, 1, 0] = float("nan")
    scale = di ** -0.5
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=topk,
                                    deterministic=deterministic, **REF)
    bidx, blse = bf_indexer_topk(qi, ki, cu_q, cu_k, bs, topk, scale)
    scores = bf_block_scores_matrix(qi, ki, cu_q, cu_k, bs, scale)
    assert any(math.isnan(m) for s in scores.values() for m in s.values())
    _check_nan_rows(idx, bidx, scores, deterministic)
    # index_lse: NaN exactly where T holds a NaN score; T(openmsa) may differ from T(bf)
    # only by which NaN blocks were taken, which keeps the lse NaN.
    assert_lse(lse, blse, TOL32, "index_lse")


def test_indexer_topk_nan_tie_order(gen):
    """NaN blocks tie with each other; with deterministic=True we expect ties by block id
    (brute force), i.e. exact equality."""
    bs, hkv, di, pack = 4, 2, 64, PACK_SMALL
    qi, ki, cu_q, cu_k = index_inputs(pack, hkv, di, gen)
    ki[torch.randperm(ki.shape[0], generator=gen)[: ki.shape[0] // 4], 0, 5] = float("nan")
    qi[torch.randperm(qi.shape[0], generator=gen)[:4], 0, 1] = float("nan")
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=4,
                                  deterministic=True, **REF)
    bidx, _ = bf_indexer_topk(qi, ki, cu_q, cu_k, bs, 4, di ** -0.5)
    assert torch.equal(idx, bidx)


# ======================================================================= Main Branch
ATTN_CASES = [
    # (pack, block_size, Hkv, G, D, indices kind, width)
    (PACK_SMALL, 4, 2, 1, 64, "topk", 3),
    (PACK_SMALL, 4, 2, 2, 64, "random", 5),
    (PACK_SMALL, 4, 1, 4, 128, "topk", 1),
    (PACK_SMALL, 8, 2, 4, 64, "random", 3),
    (PACK_SMALL, 8, 1, 16, 64, "topk", 2),
    (PACK_SMALL2, 16, 1, 16, 128, "random", 4),
    (PACK_SMALL2, 4, 2, 2, 128, "topk", 16),
    (PACK_64, 64, 2, 2, 64, "topk", 2),
    (PACK_64, 64, 1, 4, 128, "random", 3),
    (PACK_64, 64, 1, 16, 64, "topk", 4),
    (PACK_128, 128, 1, 4, 128, "topk", 2),
    (PACK_128, 128, 1, 2, 64, "random", 2),
]


def _make_indices(kind, pack, bs, hkv, width, gen):
    cu_q, cu_k = make_cu(pack)
    if kind == "random":
        return random_indices(cu_q, cu_k, hkv, width, bs, gen)
    qi, ki, _, _ = index_inputs(pack, hkv, 64, gen)
    return bf_indexer_topk(qi, ki, cu_q, cu_k, bs, width, 0.125)[0]


@pytest.mark.parametrize("pack,bs,hkv,grp,d,kind,width", ATTN_CASES)
def test_sparse_attention_fwd_bwd(gen, pack, bs, hkv, grp, d, kind, width):
    q, k, v, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen)
    idx = _make_indices(kind, pack, bs, hkv, width, gen)
    scale = None if grp % 2 else 0.3
    s = d ** -0.5 if scale is None else scale
    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    out, lse = openmsa.sparse_attention(qa, ka, va, idx, cu_q, cu_k, block_size=bs,
                                        softmax_scale=scale, **REF)
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    bout, blse = bf_sparse_attention(q64, k64, v64, idx, cu_q, cu_k, bs, s)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[1])
    assert not lse.requires_grad
    assert_rel(out, bout, TOL32, "out")
    assert_lse(lse, blse, TOL32, "lse")
    dout = randn(out.shape, gen)
    out.backward(dout)
    bout.backward(dout.double())
    for name, a, b in (("dq", qa, q64), ("dk", ka, k64), ("dv", va, v64)):
        assert_rel(a.grad, b.grad, TOL32, name)
    # blocks nobody selected get zero dk, dv
    used = torch.zeros(k.shape[:2], dtype=torch.bool)
    for t, (k0, lk, p) in enumerate(query_rows(cu_q, cu_k)):
        for g in range(hkv):
            for j in bf_token_set(idx[g, t], p, lk, bs):
                used[k0 + j, g] = True
    assert (ka.grad[~used] == 0).all() and (va.grad[~used] == 0).all()


def test_sparse_attention_matches_dense_masked_grads(gen):
    """Gradients against a second float64 reference: dense attention with a mask that keeps
    exactly T (independent of the per-query loops), for indices made by the Index Branch."""
    pack, bs, hkv, grp, d = PACK_SMALL2, 4, 2, 2, 64
    q, k, v, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen)
    qi, ki, _, _ = index_inputs(pack, hkv, 64, gen)
    idx = bf_indexer_topk(qi, ki, cu_q, cu_k, bs, 3, 0.125)[0]
    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    out, _ = openmsa.sparse_attention(qa, ka, va, idx, cu_q, cu_k, block_size=bs, **REF)
    # dense masked float64: scores [Hq, total_q, total_k] with mask from T
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    mask = torch.zeros((hkv * grp, q.shape[0], k.shape[0]), dtype=torch.bool)
    for t, (k0, lk, p) in enumerate(query_rows(cu_q, cu_k)):
        for h in range(hkv * grp):
            tok = bf_token_set(idx[h // grp, t], p, lk, bs)
            mask[h, t, [k0 + j for j in tok]] = True
    kk = k64.repeat_interleave(grp, 1).transpose(0, 1)
    vv = v64.repeat_interleave(grp, 1).transpose(0, 1)
    sc = (d ** -0.5) * (q64.transpose(0, 1) @ kk.transpose(1, 2))
    ref = (torch.softmax(sc.masked_fill(~mask, -math.inf), -1) @ vv).transpose(0, 1)
    assert_rel(out, ref, TOL32, "out")
    dout = randn(out.shape, gen)
    out.backward(dout)
    ref.backward(dout.double())
    for name, a, b in (("dq", qa, q64), ("dk", ka, k64), ("dv", va, v64)):
        assert_rel(a.grad, b.grad, TOL32, name)


@pytest.mark.parametrize("kind", ["random", "topk"])
def test_sparse_attention_gradcheck(gen, kind):
    pack, bs, hkv, grp, d = PACK_TINY, 4, 2, 2, 8
    q, k, v, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen, torch.float64)
    idx = _make_indices(kind, pack, bs, hkv, 3, gen)
    if kind == "random":
        idx[0, 0] = -1                      # one empty T
    inputs = tuple(x.clone().requires_grad_(True) for x in (q, k, v))

    def fn(q_, k_, v_):
        return openmsa.sparse_attention(q_, k_, v_, idx, cu_q, cu_k, block_size=bs,
                                        softmax_scale=0.4, **REF)[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("pack,bs,hkv,grp,d", [
    (PACK_SMALL, 4, 2, 1, 64),
    (PACK_SMALL, 8, 1, 4, 128),
    (PACK_SMALL2, 16, 2, 2, 64),
    (PACK_64, 64, 1, 16, 64),
    (PACK_64, 64, 2, 2, 128),
    (PACK_128, 128, 1, 4, 64),
])
def test_dense_equivalence_vs_sdpa(gen, pack, bs, hkv, grp, d):
    """topk >= number of blocks gives dense causal attention; so does topk_indices=None."""
    q, k, v, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen)
    qi, ki, _, _ = index_inputs(pack, hkv, 64, gen)
    nbmax = max(num_blocks(lk, bs) for _, lk in pack)
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=nbmax + 1, **REF)
    ref = sdpa_dense(q, k, v, cu_q, cu_k, d ** -0.5)
    out, lse = openmsa.sparse_attention(q, k, v, idx, cu_q, cu_k, block_size=bs, **REF)
    assert_rel(out, ref, TOL32, "out (topk >= blocks) vs sdpa")
    out_d, lse_d = openmsa.sparse_attention(q, k, v, None, cu_q, cu_k, block_size=bs, **REF)
    assert_rel(out_d, ref, TOL32, "out (indices None) vs sdpa")
    assert_rel(lse_d, lse, TOL32, "lse (indices None) vs lse (all blocks)")
    ref64 = bf_dense_masked_attention(q, k, v, cu_q, cu_k, d ** -0.5)
    assert_rel(out_d, ref64, TOL32, "out (indices None) vs fp64 dense")
    # dense backward vs float64 brute force
    if bs <= 16:
        qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
        o, _ = openmsa.sparse_attention(qa, ka, va, None, cu_q, cu_k, block_size=bs, **REF)
        q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
        b, blse = bf_sparse_attention(q64, k64, v64, None, cu_q, cu_k, bs, d ** -0.5)
        assert_lse(lse_d, blse, TOL32, "dense lse")
        dout = randn(o.shape, gen)
        o.backward(dout)
        b.backward(dout.double())
        for name, a, bb in (("dq", qa, q64), ("dk", ka, k64), ("dv", va, v64)):
            assert_rel(a.grad, bb.grad, TOL32, name)


@pytest.mark.parametrize("bs,grp,kind", [(4, 2, "topk"), (8, 4, "random"), (64, 1, "topk")])
def test_sparse_attention_large_logits(gen, bs, grp, kind):
    """Scores in the hundreds: the softmax must be computed stably (no overflow / NaN).
    Dyadic q, k and a dyadic scale make every score exact in fp32."""
    pack = PACK_SMALL if bs < 64 else PACK_64
    hkv, d = 2, 64
    cu_q, cu_k = make_cu(pack)
    q = dyadic((int(cu_q[-1]), hkv * grp, d), gen, levels=32, denom=4.0)
    k = dyadic((int(cu_k[-1]), hkv, d), gen, levels=32, denom=4.0)
    v = randn((int(cu_k[-1]), hkv, d), gen)
    idx = _make_indices(kind, pack, bs, hkv, 3, gen)
    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    out, lse = openmsa.sparse_attention(qa, ka, va, idx, cu_q, cu_k, block_size=bs,
                                        softmax_scale=0.5, **REF)
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    bout, blse = bf_sparse_attention(q64, k64, v64, idx, cu_q, cu_k, bs, 0.5)
    assert blse[torch.isfinite(blse)].abs().max() > 200
    assert not torch.isnan(out).any()
    assert_rel(out, bout, TOL32, "out")
    assert_lse(lse, blse, TOL32, "lse")
    dout = randn(out.shape, gen)
    out.backward(dout)
    bout.backward(dout.double())
    for name, a, b in (("dq", qa, q64), ("dk", ka, k64), ("dv", va, v64)):
        assert_rel(a.grad, b.grad, TOL32, name)


def test_sparse_attention_empty_token_set(gen):
    """Rows whose T is empty (all -1; only ids >= block count; only future blocks): out 0,
    lse -inf, no NaN anywhere, finite gradients, zero dq on those rows."""
    pack, bs, hkv, grp, d = [(3, 20), (4, 4), (6, 13)], 4, 2, 2, 64
    q, k, v, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen)
    rows = query_rows(cu_q, cu_k)
    idx = random_indices(cu_q, cu_k, hkv, 3, bs, gen)
    empty = []
    for t, (_, lk, p) in enumerate(rows):
        nb = num_blocks(lk, bs)
        if t % 3 == 0:
            idx[0, t] = -1
            empty.append((0, t))
        elif t % 3 == 1:
            idx[1, t] = torch.tensor([nb, nb + 5, -1], dtype=torch.int32)
            empty.append((1, t))
        elif p // bs + 1 < nb:                 # a strictly future block only
            idx[0, t] = torch.tensor([p // bs + 1, -1, p // bs + 1], dtype=torch.int32)
            empty.append((0, t))
    assert len(empty) >= 5
    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    out, lse = openmsa.sparse_attention(qa, ka, va, idx, cu_q, cu_k, block_size=bs, **REF)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    for g, t in empty:
        hs = slice(g * grp, (g + 1) * grp)
        assert (out[t, hs] == 0).all()
        assert torch.isneginf(lse[t, hs]).all()
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    bout, blse = bf_sparse_attention(q64, k64, v64, idx, cu_q, cu_k, bs, d ** -0.5)
    assert_rel(out, bout, TOL32, "out")
    assert_lse(lse, blse, TOL32, "lse")
    dout = randn(out.shape, gen)
    out.backward(dout)
    bout.backward(dout.double())
    for name, a, b in (("dq", qa, q64), ("dk", ka, k64), ("dv", va, v64)):
        assert torch.isfinite(a.grad).all(), name
        assert_rel(a.grad, b.grad, TOL32, name)
    for g, t in empty:
        assert (qa.grad[t, g * grp:(g + 1) * grp] == 0).all()
    # the sparse KL stays finite (an empty T contributes nothing)
    qi, ki, _, _ = index_inputs(pack, hkv, 64, gen)
    qia, kia = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    loss = openmsa.indexer_kl_loss(q, k, qia, kia, idx, cu_q, cu_k, block_size=bs, **REF)
    assert torch.isfinite(loss)
    assert_rel(loss, bf_kl(q, k, qi, ki, idx, cu_q, cu_k, bs, d ** -0.5, 64 ** -0.5), TOL32, "kl")
    loss.backward()
    assert torch.isfinite(qia.grad).all() and torch.isfinite(kia.grad).all()
    bqi, bki = bf_kl_grad(q, k, qi, ki, idx, cu_q, cu_k, bs, d ** -0.5, 64 ** -0.5)
    assert_rel(qia.grad, bqi, TOL32, "kl dqi")
    assert_rel(kia.grad, bki, TOL32, "kl dki")


def test_sparse_attention_all_empty_fully_masked(gen):
    """Every row empty (indices all -1): all zeros, all -inf, zero grads, no NaN."""
    pack, bs = [(5, 9), (0, 3), (4, 4)], 4
    q, k, v, cu_q, cu_k = main_inputs(pack, 1, 2, 64, gen)
    idx = torch.full((1, q.shape[0], 2), -1, dtype=torch.int32)
    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    out, lse = openmsa.sparse_attention(qa, ka, va, idx, cu_q, cu_k, block_size=bs, **REF)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.backward(torch.ones_like(out))
    for x in (qa, ka, va):
        assert x.grad is None or (x.grad == 0).all()


# ----------------------------------------------------------------------- NaN / Inf
# The rule of api.sparse_attention / api.indexer_kl_loss: IEEE arithmetic of the math.
_TOK, _ROW, _SOLO_KEY, _SOLO_ROW = 14, 10, 61, 37  # PACK_SMALL: key 14 and query row 10 are
# in sequence 2 (13 x 13); key 61 is the only key of sequence 5 (1 x 1), whose query is row 37


def _rule_nan_rows(q, k, v, idx, cu_q, cu_k, bs, scale):
    """[total_q, Hq] bool, by a float64 loop over T: the rows (t, h) with a NaN or +inf
    score on T(t, g), or a token of T(t, g) with a non-finite v (whatever its score)."""
    q, k, v = q.double(), k.double(), v.double()
    hq, hkv = q.shape[1], k.shape[1]
    grp = hq // hkv
    nan = torch.zeros(q.shape[:2], dtype=torch.bool)
    for t, (k0, lk, p) in enumerate(query_rows(cu_q, cu_k)):
        for g in range(hkv):
            tok = bf_token_set(None if idx is None else idx[g, t], p, lk, bs)
            if not tok:
                continue
            sel = torch.tensor(tok, dtype=torch.long) + k0
            s = scale * (q[t, g * grp:(g + 1) * grp] @ k[sel, g].T)  # [G, n]
            v_bad = ~torch.isfinite(v[sel, g]).all(-1)
            nan[t, g * grp:(g + 1) * grp] = (s.isnan() | (s == math.inf)).any(1) | v_bad.any()
    return nan


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("kind", ["q_nan", "k_nan", "v_nan", "v_inf", "k_posinf", "k_neginf",
                                  "k_neginf_v_nan"])
def test_sparse_attention_non_finite_rule(gen, kind, dense):
    """One NaN/Inf in q (one row, one head), k or v (one token, one group): out and lse are
    NaN exactly on the rows of the rule (every entry of out), the other rows are the float64
    brute force's; a -inf score weighs 0 (k_neginf: the one-key sequence then has an all -inf
    row, out 0 and lse -inf like an empty T), but a non-finite v counts whatever its weight
    (k_neginf_v_nan). The backward runs."""
    pack, bs, hkv, grp, d = PACK_SMALL, 4, 2, 2, 64
    q, k, v, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen)
    idx = None if dense else _make_indices("topk", pack, bs, hkv, 3, gen)
    if kind == "q_nan":
        q[_ROW, 3, 7] = math.nan
    elif kind == "k_nan":
        k[_TOK, 1, 5] = math.nan
    elif kind in ("v_nan", "v_inf"):
        v[_TOK, 1, 5] = math.nan if kind == "v_nan" else math.inf
    elif kind == "k_posinf":  # +inf or -inf scores by the sign of q[..., 5]
        k[_TOK, 1, 5] = math.inf
    else:  # -inf scores for every query: a -inf component where every query is positive
        q[..., 0] = q[..., 0].abs() + 0.1
        for j in (_TOK, _SOLO_KEY):
            k[j, 1] = 0.0
            k[j, 1, 0] = -math.inf
        if kind == "k_neginf_v_nan":
            v[_TOK, 1, 5] = math.nan
    expected = _rule_nan_rows(q, k, v, idx, cu_q, cu_k, bs, d ** -0.5)
    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    out, lse = openmsa.sparse_attention(qa, ka, va, idx, cu_q, cu_k, block_size=bs, **REF)
    assert torch.equal(lse.isnan(), expected)
    assert torch.equal(out.isnan(), expected[..., None].expand_as(out))
    assert (kind == "k_neginf") != bool(expected.any())
    if kind == "k_neginf_v_nan":  # the rows a NaN in k of that token would make NaN
        k_nan = k.clone()
        k_nan[_TOK, 1, 0] = math.nan
        v_fin = v.nan_to_num(0.0)
        assert torch.equal(expected, _rule_nan_rows(q, k_nan, v_fin, idx, cu_q, cu_k, bs, d ** -0.5))
    assert not out.isinf().any() and not lse.isposinf().any()
    # v at tokens no finite row weighs does not matter: the brute force gets them zeroed
    v_clean = v.masked_fill(~torch.isfinite(v).all(-1, keepdim=True), 0.0)
    bout, blse = bf_sparse_attention(q, k, v_clean, idx, cu_q, cu_k, bs, d ** -0.5)
    fin = ~expected
    if kind.startswith("k_neginf"):  # the brute force's softmax of an all -inf row is NaN
        fin[_SOLO_ROW, grp:] = False
    assert_rel(out.detach()[fin], bout[fin], TOL32, "out")
    assert_lse(lse[fin], blse[fin], TOL32, "lse")
    if kind.startswith("k_neginf"):
        assert (out[_SOLO_ROW, grp:] == 0).all() and torch.isneginf(lse[_SOLO_ROW, grp:]).all()
        assert torch.isfinite(lse[_SOLO_ROW, :grp]).all()
    out.backward(randn(out.shape, gen))
    assert qa.grad.shape == q.shape and ka.grad.shape == k.shape and va.grad.shape == v.shape


@pytest.mark.parametrize("dense", [False, True])
def test_kl_non_finite_rule(gen, dense):
    """The KL is NaN when a NaN reaches a contributing row (q of a row, k or ki of a token
    of T), +inf when the student gives 0 (index score -inf) to a token the teacher
    weighs, and the float64 brute force's when the NaN reaches no row (a row with empty T,
    a key nobody selects)."""
    pack, bs, hkv, grp, d, di = PACK_SMALL, 4, 2, 2, 64, 64
    q, k, _, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen)
    qi, ki, _, _ = index_inputs(pack, hkv, di, gen)
    idx = None if dense else _make_indices("topk", pack, bs, hkv, 3, gen)
    s, si = d ** -0.5, di ** -0.5

    def loss(q, k, qi, ki, idx):
        qia, kia = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        out = openmsa.indexer_kl_loss(q, k, qia, kia, idx, cu_q, cu_k, block_size=bs, **REF)
        out.backward()  # runs, whatever the values
        return out.detach()

    for name, x, at in (("q", q, (_ROW, 3, 7)), ("k", k, (_TOK, 1, 5)), ("qi", qi, (_ROW, 1, 2)),
                        ("ki", ki, (_TOK, 0, 2))):
        bad = x.clone()
        bad[at] = math.nan
        args = {"q": q, "k": k, "qi": qi, "ki": ki, name: bad}
        assert loss(args["q"], args["k"], args["qi"], args["ki"], idx).isnan(), name
    qi_pos = qi.clone()
    qi_pos[..., 0] = qi_pos[..., 0].abs() + 0.25
    ki_neg = ki.clone()
    ki_neg[_TOK] = 0.0
    ki_neg[_TOK, 0, 0] = -math.inf
    assert loss(q, k, qi_pos, ki_neg, idx) == math.inf
    if not dense:  # NaN that reaches no row: row 10 with empty T, key 14 in no T
        idx = idx.clone()
        idx[:, _ROW] = -1
        idx[:, 5:18][idx[:, 5:18] == 0] = -1  # sequence 2: block 0 (keys 12-15) nobody's
        q_bad, k_bad, ki_bad = q.clone(), k.clone(), ki.clone()
        q_bad[_ROW, 3, 7] = math.nan
        k_bad[_TOK, 1, 5] = math.nan
        ki_bad[_TOK, 0, 2] = math.nan
        want = bf_kl(q, k, qi, ki, idx, cu_q, cu_k, bs, s, si)
        assert_rel(loss(q_bad, k_bad, qi, ki_bad, idx), want, TOL32, "kl")


# ======================================================================= sparse KL
KL_CASES = [
    # (pack, block_size, Hkv, G, D, Di, topk, coeff, scales)
    (PACK_SMALL, 4, 2, 1, 64, 64, 3, 1.0, None),
    (PACK_SMALL, 4, 1, 4, 128, 64, 2, 0.5, (0.1, 0.2)),
    (PACK_SMALL, 8, 2, 2, 64, 128, 16, 2.5, None),
    (PACK_SMALL2, 16, 2, 16, 64, 64, 1, 1.0, None),
    (PACK_SMALL2, 4, 3, 2, 128, 128, 4, 1.0, (0.09, 0.11)),
    (PACK_64, 64, 1, 4, 64, 128, 2, 1.0, None),
    (PACK_128, 128, 1, 2, 128, 64, 2, 3.0, None),
    (PACK_SMALL, 4, 2, 2, 64, 64, "random", 1.0, None),      # arbitrary indices
    (PACK_SMALL2, 8, 1, 4, 64, 128, "random", 0.7, (0.2, 0.05)),
]


@pytest.mark.parametrize("pack,bs,hkv,grp,d,di,topk,coeff,scales", KL_CASES)
def test_kl_matches_bruteforce(gen, pack, bs, hkv, grp, d, di, topk, coeff, scales):
    q, k, _, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen)
    qi, ki, _, _ = index_inputs(pack, hkv, di, gen)
    s, si = (d ** -0.5, di ** -0.5) if scales is None else scales
    kw = {} if scales is None else dict(softmax_scale=s, index_softmax_scale=si)
    if topk == "random":   # -1 anywhere, duplicates, ids >= block count, empty T rows
        idx = bidx = random_indices(cu_q, cu_k, hkv, 4, bs, gen)
    else:
        idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=topk,
                                      softmax_scale=kw.get("index_softmax_scale"), **REF)
        bidx, _ = bf_indexer_topk(qi, ki, cu_q, cu_k, bs, topk, si)
        check_rows_as_sets(idx, bidx)
    qa, ka = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    qia, kia = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    loss = openmsa.indexer_kl_loss(qa, ka, qia, kia, idx, cu_q, cu_k, block_size=bs,
                                   coeff=coeff, **kw, **REF)
    assert loss.dim() == 0
    bloss = bf_kl(q, k, qi, ki, bidx, cu_q, cu_k, bs, s, si, coeff)
    assert_rel(loss, bloss, TOL32, "kl loss")
    loss.backward()
    assert qa.grad is None and ka.grad is None, "the KL must not reach q or k"
    bqi, bki = bf_kl_grad(q, k, qi, ki, bidx, cu_q, cu_k, bs, s, si, coeff)
    assert_rel(qia.grad, bqi, TOL32, "dqi")
    assert_rel(kia.grad, bki, TOL32, "dki")


def test_kl_gradcheck_and_no_grad_to_q_k(gen):
    pack, bs, hkv, grp, d, di = PACK_TINY, 4, 2, 2, 8, 8
    q, k, _, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen, torch.float64)
    qi = randn((q.shape[0], hkv, di), gen, torch.float64)
    ki = randn((k.shape[0], 1, di), gen, torch.float64)
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=2, **REF)

    def fn(qi_, ki_):
        return openmsa.indexer_kl_loss(q, k, qi_, ki_, idx, cu_q, cu_k, block_size=bs,
                                       coeff=1.3, **REF)

    inputs = (qi.clone().requires_grad_(True), ki.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-5)
    # also dense warmup (indices None)
    fn_dense = lambda a, b: openmsa.indexer_kl_loss(q, k, a, b, None, cu_q, cu_k,  # noqa: E731
                                                    block_size=bs, **REF)
    assert torch.autograd.gradcheck(fn_dense, inputs, eps=1e-6, atol=1e-8, rtol=1e-5)
    # q, k requiring grad get none from the KL
    qa, ka = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    qia = qi.clone().requires_grad_(True)
    loss = openmsa.indexer_kl_loss(qa, ka, qia, ki, idx, cu_q, cu_k, block_size=bs, **REF)
    loss.backward()
    assert qa.grad is None and ka.grad is None
    assert qia.grad is not None and torch.isfinite(qia.grad).all()


@pytest.mark.parametrize("dense", [False, True])
def test_kl_grad_finite_differences(gen, dense):
    """Autograd of the loss against central differences of the loss (float64)."""
    pack, bs, hkv, grp, d, di = PACK_SMALL2, 4, 2, 2, 16, 16
    q, k, _, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen, torch.float64)
    qi = randn((q.shape[0], hkv, di), gen, torch.float64)
    ki = randn((k.shape[0], 1, di), gen, torch.float64)
    idx = None if dense else openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs,
                                                  topk=3, **REF)[0]

    def loss_fn(a, b):
        return openmsa.indexer_kl_loss(q, k, a, b, idx, cu_q, cu_k, block_size=bs,
                                       coeff=2.0, **REF)

    qia, kia = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    loss_fn(qia, kia).backward()
    eps = 1e-5
    num, ana = [], []
    with torch.no_grad():
        for x, grad, n in ((qi, qia.grad, 40), (ki, kia.grad, 40)):
            flat = x.view(-1)
            for pos in torch.randperm(flat.numel(), generator=gen)[:n].tolist():
                old = flat[pos].item()
                flat[pos] = old + eps
                lp = loss_fn(qi, ki).item()
                flat[pos] = old - eps
                lm = loss_fn(qi, ki).item()
                flat[pos] = old
                num.append((lp - lm) / (2 * eps))
                ana.append(grad.view(-1)[pos].item())
        # random directions
        for _ in range(3):
            u, w = randn(qi.shape, gen, torch.float64), randn(ki.shape, gen, torch.float64)
            lp = loss_fn(qi + eps * u, ki + eps * w).item()
            lm = loss_fn(qi - eps * u, ki - eps * w).item()
            num.append((lp - lm) / (2 * eps))
            ana.append(((qia.grad * u).sum() + (kia.grad * w).sum()).item())
    assert_rel(torch.tensor(ana), torch.tensor(num), TOL32, "KL grad vs finite differences")
    # and against the analytical brute-force gradient
    s, si = d ** -0.5, di ** -0.5
    bqi, bki = bf_kl_grad(q, k, qi, ki, idx, cu_q, cu_k, bs, s, si, 2.0)
    assert_rel(qia.grad, bqi, 1e-10, "dqi (float64) vs analytical")
    assert_rel(kia.grad, bki, 1e-10, "dki (float64) vs analytical")


@pytest.mark.parametrize("pack,bs,d", [(PACK_SMALL, 4, 64), (PACK_64, 64, 128)])
def test_kl_zero_when_student_equals_teacher(gen, pack, bs, d):
    """G = 1, Hkv = 1, qi = q, ki = k, same scale: P_S = P_T, so the KL is 0."""
    q, k, _, cu_q, cu_k = main_inputs(pack, 1, 1, d, gen)
    qi, ki = q.clone(), k.clone()
    for idx in (openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=2, **REF)[0], None):
        qia, kia = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        loss = openmsa.indexer_kl_loss(q, k, qia, kia, idx, cu_q, cu_k, block_size=bs, **REF)
        assert abs(loss.item()) < 1e-6
        loss.backward()
        assert qia.grad.abs().max().item() < 1e-6 and kia.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("pack,bs,hkv,grp", [(PACK_SMALL, 4, 2, 2), (PACK_SMALL2, 8, 1, 4),
                                             (PACK_64, 64, 1, 2)])
def test_kl_dense_warmup(gen, pack, bs, hkv, grp):
    """topk_indices=None: T = all visible tokens, equal to indices selecting every block."""
    d = di = 64
    q, k, _, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen)
    qi, ki, _, _ = index_inputs(pack, hkv, di, gen)
    qia, kia = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    loss = openmsa.indexer_kl_loss(q, k, qia, kia, None, cu_q, cu_k, block_size=bs, **REF)
    all_idx = bf_all_blocks_indices(cu_q, cu_k, hkv, bs)
    bloss = bf_kl(q, k, qi, ki, all_idx, cu_q, cu_k, bs, d ** -0.5, di ** -0.5)
    assert_rel(loss, bf_kl(q, k, qi, ki, None, cu_q, cu_k, bs, d ** -0.5, di ** -0.5), TOL32,
               "kl dense")
    assert_rel(loss, bloss, TOL32, "kl dense vs all-block indices (bf)")
    loss.backward()
    bqi, bki = bf_kl_grad(q, k, qi, ki, all_idx, cu_q, cu_k, bs, d ** -0.5, di ** -0.5)
    assert_rel(qia.grad, bqi, TOL32, "dqi")
    assert_rel(kia.grad, bki, TOL32, "dki")
    loss2 = openmsa.indexer_kl_loss(q, k, qi, ki, all_idx, cu_q, cu_k, block_size=bs, **REF)
    assert_rel(loss2, loss, TOL32, "openmsa all-block indices vs None")


@pytest.mark.parametrize("pack,bs,hkv,grp,topk", [(PACK_SMALL, 4, 2, 2, 3), (PACK_64, 64, 1, 4, 2)])
def test_kl_lse_passed_vs_recomputed(gen, pack, bs, hkv, grp, topk):
    d, di = 64, 128
    q, k, v, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen)
    qi, ki, _, _ = index_inputs(pack, hkv, di, gen)
    idx, index_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=topk, **REF)
    _, lse = openmsa.sparse_attention(q, k, v, idx, cu_q, cu_k, block_size=bs, **REF)
    grads = []
    losses = []
    for kw in ({}, dict(lse=lse), dict(index_lse=index_lse), dict(lse=lse, index_lse=index_lse)):
        qia, kia = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
        loss = openmsa.indexer_kl_loss(q, k, qia, kia, idx, cu_q, cu_k, block_size=bs, **kw, **REF)
        loss.backward()
        losses.append(loss)
        grads.append((qia.grad, kia.grad))
    bloss = bf_kl(q, k, qi, ki, idx, cu_q, cu_k, bs, d ** -0.5, di ** -0.5)
    for i in range(4):
        assert_rel(losses[i], bloss, TOL32, f"loss variant {i}")
        assert_rel(losses[i], losses[0], TOL32, f"loss variant {i} vs recomputed")
        assert_rel(grads[i][0], grads[0][0], TOL32, f"dqi variant {i}")
        assert_rel(grads[i][1], grads[0][1], TOL32, f"dki variant {i}")


# ======================================================================= msa_attention
@pytest.mark.parametrize("pack,bs,hkv,grp,d,di,topk,det", [
    (PACK_SMALL, 4, 2, 2, 64, 64, 3, True),
    (PACK_SMALL2, 8, 1, 4, 128, 64, 2, False),
    (PACK_64, 64, 1, 16, 64, 128, 2, True),
])
def test_msa_attention_is_the_composition(gen, pack, bs, hkv, grp, d, di, topk, det):
    q, k, v, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen)
    qi, ki, _, _ = index_inputs(pack, hkv, di, gen)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, qi, ki)]
    out, kl, idx = openmsa.msa_attention(*leaves, cu_q, cu_k, block_size=bs, topk=topk,
                                         deterministic=det, **REF)
    # the three calls
    idx3, ilse3 = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=topk,
                                       deterministic=det, **REF)
    leaves3 = [x.clone().requires_grad_(True) for x in (q, k, v, qi, ki)]
    out3, lse3 = openmsa.sparse_attention(*leaves3[:3], idx3, cu_q, cu_k, block_size=bs, **REF)
    kl3 = openmsa.indexer_kl_loss(q, k, leaves3[3], leaves3[4], idx3, cu_q, cu_k,
                                  block_size=bs, lse=lse3, index_lse=ilse3, **REF)
    assert torch.equal(idx, idx3)
    assert_rel(out, out3, TOL32, "out")
    assert_rel(kl, kl3, TOL32, "kl")
    # and the brute force
    bidx, _ = bf_indexer_topk(qi, ki, cu_q, cu_k, bs, topk, di ** -0.5)
    if det:
        assert torch.equal(idx, bidx)
    else:
        check_rows_as_sets(idx, bidx)
    bout, _ = bf_sparse_attention(q, k, v, bidx, cu_q, cu_k, bs, d ** -0.5)
    assert_rel(out, bout, TOL32, "out vs bf")
    assert_rel(kl, bf_kl(q, k, qi, ki, bidx, cu_q, cu_k, bs, d ** -0.5, di ** -0.5), TOL32, "kl vs bf")
    # gradient routing: out -> q, k, v only; kl -> qi, ki only
    dout = randn(out.shape, gen)
    out.backward(dout, retain_graph=True)
    assert leaves[3].grad is None and leaves[4].grad is None
    out3.backward(dout)
    for i, name in enumerate("qkv"):
        assert_rel(leaves[i].grad, leaves3[i].grad, TOL32, f"d{name}")
    grads_qkv = [leaves[i].grad.clone() for i in range(3)]
    kl.backward()
    for i in range(3):
        assert torch.equal(leaves[i].grad, grads_qkv[i]), "kl must not reach q, k, v"
    kl3.backward()
    assert_rel(leaves[3].grad, leaves3[3].grad, TOL32, "dqi")
    assert_rel(leaves[4].grad, leaves3[4].grad, TOL32, "dki")


# ======================================================================= low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pack,bs,hkv,grp,d,topk", [(PACK_SMALL, 4, 2, 2, 64, 3),
                                                    (PACK_64, 64, 1, 4, 128, 2),
                                                    (PACK_128, 128, 1, 16, 64, 2)])
def test_low_precision_close_to_float32(gen, dtype, pack, bs, hkv, grp, d, topk):
    tol = TOL_LOW[dtype]
    di = 64
    q, k, v, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen, dtype)
    qi, ki, _, _ = index_inputs(pack, hkv, di, gen, dtype)
    idx, ilse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=topk,
                                     deterministic=True, **REF)
    bidx, blse = bf_indexer_topk(qi, ki, cu_q, cu_k, bs, topk, di ** -0.5)
    assert torch.equal(idx, bidx)            # dyadic inputs are exact in half precision
    assert ilse.dtype == torch.float32
    assert_lse(ilse, blse, tol, "index_lse")
    qa, ka, va = (x.clone().requires_grad_(True) for x in (q, k, v))
    out, lse = openmsa.sparse_attention(qa, ka, va, idx, cu_q, cu_k, block_size=bs, **REF)
    assert out.dtype == dtype and lse.dtype == torch.float32
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    bout, blse2 = bf_sparse_attention(q64, k64, v64, idx, cu_q, cu_k, bs, d ** -0.5)
    assert_rel(out, bout, tol, "out")
    assert_lse(lse, blse2, tol, "lse")
    dout = randn(out.shape, gen, dtype)
    out.backward(dout)
    bout.backward(dout.double())
    for name, a, b in (("dq", qa, q64), ("dk", ka, k64), ("dv", va, v64)):
        assert a.grad.dtype == dtype
        assert_rel(a.grad, b.grad, tol, name)
    qia, kia = qi.clone().requires_grad_(True), ki.clone().requires_grad_(True)
    loss = openmsa.indexer_kl_loss(q, k, qia, kia, idx, cu_q, cu_k, block_size=bs,
                                   lse=lse, index_lse=ilse, **REF)
    assert_rel(loss, bf_kl(q, k, qi, ki, idx, cu_q, cu_k, bs, d ** -0.5, di ** -0.5), tol, "kl")
    loss.backward()
    bqi, bki = bf_kl_grad(q, k, qi, ki, idx, cu_q, cu_k, bs, d ** -0.5, di ** -0.5)
    assert qia.grad.dtype == dtype
    assert_rel(qia.grad, bqi, tol, "kl dqi")
    assert_rel(kia.grad, bki, tol, "kl dki")


# ======================================================================= no input modified
def test_inputs_not_modified(gen):
    pack, bs, hkv, grp, d, di = PACK_SMALL, 4, 2, 2, 64, 64
    q, k, v, cu_q, cu_k = main_inputs(pack, hkv, grp, d, gen)
    qi, ki, _, _ = index_inputs(pack, hkv, di, gen)
    ridx = random_indices(cu_q, cu_k, hkv, 4, bs, gen)
    tensors = dict(q=q, k=k, v=v, qi=qi, ki=ki, cu_q=cu_q, cu_k=cu_k, ridx=ridx)
    before = {n: t.clone() for n, t in tensors.items()}
    idx, ilse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=3, **REF)
    idx_b, ilse_b = idx.clone(), ilse.clone()
    for ind in (idx, ridx, None):
        qa, ka, va = (x.requires_grad_(True) for x in (q, k, v))
        out, lse = openmsa.sparse_attention(qa, ka, va, ind, cu_q, cu_k, block_size=bs, **REF)
        out.backward(torch.ones_like(out))
        lse_b = lse.clone()
        qia, kia = qi.requires_grad_(True), ki.requires_grad_(True)
        loss = openmsa.indexer_kl_loss(q, k, qia, kia, ind, cu_q, cu_k, block_size=bs,
                                       lse=lse if ind is idx else None,
                                       index_lse=ilse if ind is idx else None, **REF)
        loss.backward()
        assert torch.equal(lse, lse_b)
        for x in (q, k, v, qi, ki):
            x.grad = None
            x.requires_grad_(False)
    out, kl, idx2 = openmsa.msa_attention(q.requires_grad_(True), k, v, qi.requires_grad_(True),
                                          ki, cu_q, cu_k, block_size=bs, topk=3, **REF)
    (out.sum() + kl).backward()
    for n, t in tensors.items():
        assert torch.equal(t.detach(), before[n]), f"{n} was modified"
    assert torch.equal(idx, idx_b) and torch.equal(ilse, ilse_b)
