"""The fragment form of docs/spec.md section 3: every query sequence names its key range
(``kv_start``, ``kv_len``) in one packed KV that several query sequences may share.

A sequence cut into query fragments, each over the prefix of the sequence's keys that
ends at the fragment's last query, is the same computation as the uncut sequence: every
result (indices, LSEs, out, KL) and every gradient must equal the ordinary form's, on the
reference and on the Triton kernels (interpreter, float32). Index inputs are dyadic (every
dot exact in float32), so the selections are equal exactly. Fragments are packed in a
shuffled order, so that fragments of one sequence are not neighbours.
"""

import pytest
import torch

import openmsa
from helpers import rel
from openmsa import _validation as V

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HQ, HKV, D, DI = 4, 2, 32, 64


def dyadic(shape, gen, lo=-8, hi=8):
    return torch.randint(lo, hi + 1, shape, generator=gen).float() / 4


def ordinary(pack, gen):
    """Random float32 inputs of the ordinary form for pack [(Lq, Lk), ...]."""
    tq, tk = sum(p[0] for p in pack), sum(p[1] for p in pack)
    cq, ck = [0], [0]
    for lq, lk in pack:
        cq.append(cq[-1] + lq)
        ck.append(ck[-1] + lk)
    x = dict(q=torch.randn(tq, HQ, D, generator=gen), k=torch.randn(tk, HKV, D, generator=gen),
             v=torch.randn(tk, HKV, D, generator=gen), qi=dyadic((tq, HKV, DI), gen),
             ki=dyadic((tk, 1, DI), gen))
    x = {n: t.to(DEV) for n, t in x.items()}
    return x, torch.tensor(cq, dtype=torch.int32, device=DEV), torch.tensor(ck, dtype=torch.int32, device=DEV)


def fragment_form(pack, cuts, gen):
    """The fragments of every sequence b of ``pack``: its queries cut at ``cuts[b]`` (local
    query indices), each fragment over the keys [cu_k[b], cu_k[b] + Lk - Lq + end), in a
    shuffled order. Returns (cu_q, kv_start, kv_len, rows): rows[i] is the ordinary-form
    query row of fragment-form row i."""
    frags, ck, cq = [], 0, 0
    for (lq, lk), cut in zip(pack, cuts):
        edges = [0, *cut, lq]
        for a, e in zip(edges, edges[1:]):
            frags.append((list(range(cq + a, cq + e)), ck, lk - lq + e))
        ck, cq = ck + lk, cq + lq
    order = torch.randperm(len(frags), generator=gen).tolist()
    frags = [frags[i] for i in order]
    cu, rows = [0], []
    for r, _, _ in frags:
        cu.append(cu[-1] + len(r))
        rows += r
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=DEV)  # noqa: E731
    return (as_t(cu), as_t([f[1] for f in frags]), as_t([f[2] for f in frags]),
            torch.tensor(rows, dtype=torch.long, device=DEV))


def check_equal_forms(pack, cuts, block, topk, backend, seed, deterministic=False):
    gen = torch.Generator().manual_seed(seed)
    x, cu_q, cu_k = ordinary(pack, gen)
    cu_f, kv_start, kv_len, rows = fragment_form(pack, cuts, gen)
    dout = torch.randn(x["q"].shape, generator=gen).to(DEV)
    kw = dict(block_size=block, topk=topk, backend=backend, deterministic=deterministic)

    t = {n: v.clone().requires_grad_() for n, v in x.items()}
    out, kl, idx = openmsa.msa_attention(t["q"], t["k"], t["v"], t["qi"], t["ki"], cu_q, cu_k, **kw)
    torch.autograd.backward([out, kl], [dout, torch.tensor(3.0, device=DEV)])

    f = {n: (v[rows] if n in ("q", "qi") else v).clone().requires_grad_() for n, v in x.items()}
    out_f, kl_f, idx_f = openmsa.msa_attention(f["q"], f["k"], f["v"], f["qi"], f["ki"], cu_f, None,
                                               kv_start=kv_start, kv_len=kv_len, **kw)
    torch.autograd.backward([out_f, kl_f], [dout[rows], torch.tensor(3.0, device=DEV)])

    assert torch.equal(idx_f, idx[:, rows])
    assert rel(out_f, out[rows]) <= 1e-5
    assert rel(kl_f, kl) <= 1e-5
    for n in ("q", "qi"):
        assert rel(f[n].grad, t[n].grad[rows]) <= 1e-5, n
    for n in ("k", "v", "ki"):
        assert rel(f[n].grad, t[n].grad) <= 1e-5, n
    # the parts on their own: indexer LSE and the dense (warmup) forms
    _, ilse = openmsa.indexer_topk(x["qi"], x["ki"], cu_q, cu_k, block_size=block, topk=topk,
                                   backend=backend)
    _, ilse_f = openmsa.indexer_topk(f["qi"].detach(), x["ki"], cu_f, None, block_size=block,
                                     topk=topk, backend=backend, kv_start=kv_start, kv_len=kv_len)
    assert rel(ilse_f, ilse[:, rows]) <= 1e-5
    return x, cu_f, kv_start, kv_len, rows


# (Lq, Lk) per sequence and the cuts of its queries: fragments shorter than a block, empty
# fragments, Lq < Lk (a cached prefix), exact block multiples, a sequence without queries.
CASES = [
    ([(150, 150)], [[70]], 2),
    ([(130, 130), (10, 80), (0, 30), (90, 200), (128, 128)], [[64], [3, 3], [], [5, 60], [40]], 3),
    ([(70, 70), (100, 140)], [[1, 2, 66], [0, 99]], 4),  # K above the block count
]
# the interpreter is slow: one smaller pack with every feature of the above
TRITON_CASE = ([(100, 100), (10, 80), (0, 30), (60, 140)], [[40], [3, 3], [], [5, 30]], 2)
BLOCK = 64


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fragments_equal_the_uncut_sequences(case):
    pack, cuts, topk = CASES[case]
    check_equal_forms(pack, cuts, BLOCK, topk, "reference", seed=10 + case)


def test_fragments_equal_the_uncut_sequences_triton():
    pack, cuts, topk = TRITON_CASE
    check_equal_forms(pack, cuts, BLOCK, topk, "triton", seed=20)


def test_fragments_share_hot_blocks_in_small_segments(launch):
    """One tile per segment, deterministic: the blocks that both fragments of a sequence
    select are cut into many segments of one group, whose dK, dV, dki meet in the scratch
    slots of that group (the non-deterministic atomics are the test above)."""
    launch("attention_bwd", tile_rows=16, segment_tiles=1)
    launch("kl_teacher", tile_rows=16, segment_tiles=1)
    check_equal_forms([(100, 130)], [[50]], BLOCK, 2, "triton", seed=3, deterministic=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dense_forms(backend):
    """topk_indices=None (dense attention, dense KL) in the fragment form."""
    gen = torch.Generator().manual_seed(4)
    pack, cuts, block = [(70, 90), (20, 20)], [[11], [19]], BLOCK
    x, cu_q, cu_k = ordinary(pack, gen)
    cu_f, kv_start, kv_len, rows = fragment_form(pack, cuts, gen)
    frag = dict(kv_start=kv_start, kv_len=kv_len)
    kw = dict(block_size=block, backend=backend)
    out, lse = openmsa.sparse_attention(x["q"], x["k"], x["v"], None, cu_q, cu_k, **kw)
    out_f, lse_f = openmsa.sparse_attention(x["q"][rows], x["k"], x["v"], None, cu_f, None, **kw, **frag)
    assert rel(out_f, out[rows]) <= 1e-5 and rel(lse_f, lse[rows]) <= 1e-5
    kl = openmsa.indexer_kl_loss(x["q"], x["k"], x["qi"], x["ki"], None, cu_q, cu_k, **kw)
    kl_f = openmsa.indexer_kl_loss(x["q"][rows], x["k"], x["qi"][rows], x["ki"], None, cu_f, None,
                                   **kw, **frag)
    assert rel(kl_f, kl) <= 1e-5


def test_overlapping_fragments_add_their_key_gradients():
    """Two query sequences over the same keys (a query fragment given twice): Triton equals
    the reference, and the key gradients are twice those of one of them."""
    gen = torch.Generator().manual_seed(6)
    x, cu_q, cu_k = ordinary([(40, 100)], gen)
    q2 = {n: (torch.cat([v, v]) if n in ("q", "qi") else v) for n, v in x.items()}
    cu2 = torch.tensor([0, 40, 80], dtype=torch.int32, device=DEV)
    frag = dict(kv_start=torch.zeros(2, dtype=torch.int32, device=DEV),
                kv_len=torch.full((2,), 100, dtype=torch.int32, device=DEV))
    grads = {}
    for backend in ("reference", "triton"):
        for two in (False, True):
            t = {n: v.clone().requires_grad_() for n, v in (q2 if two else x).items()}
            out, kl, _ = openmsa.msa_attention(
                t["q"], t["k"], t["v"], t["qi"], t["ki"], cu2 if two else cu_q, None,
                block_size=BLOCK, topk=2, backend=backend,
                **(frag if two else dict(kv_start=frag["kv_start"][:1], kv_len=frag["kv_len"][:1])))
            (out.sum() + kl * (2 if two else 1)).backward()
            grads[backend, two] = [t[n].grad for n in ("k", "v", "ki")]
    for backend in ("reference", "triton"):
        for g1, g2 in zip(grads[backend, False], grads[backend, True]):
            assert rel(g2, 2 * g1) <= 1e-5
    for g, r in zip(grads["triton", True], grads["reference", True]):
        assert rel(g, r) <= 1e-5


def _frag_args():
    qi = torch.zeros(10, HKV, DI, device=DEV)
    ki = torch.zeros(20, 1, DI, device=DEV)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEV)
    return qi, ki, cu


@pytest.mark.parametrize("starts, lens, match", [
    ([0, 5], [8, 10], "overlap without starting at the same row"),
    ([0, 15], [8, 10], r"must lie in \[0, total_k"),
    ([-1, 0], [8, 10], r"must lie in \[0, total_k"),
    ([0, 8], [3, 10], "Lq = 4 > kv_len = 3"),
])
def test_bad_key_ranges_raise(starts, lens, match):
    qi, ki, cu = _frag_args()
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=DEV)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        openmsa.indexer_topk(qi, ki, cu, None, block_size=4, topk=2, kv_start=as_t(starts),
                             kv_len=as_t(lens))


def test_fragment_argument_errors():
    qi, ki, cu = _frag_args()
    s, n = torch.tensor([0, 0], dtype=torch.int32), torch.tensor([10, 20], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k=None"):
        openmsa.indexer_topk(qi, ki, cu, cu, kv_start=s, kv_len=n)
    with pytest.raises(ValueError, match="kv_start and kv_len must be given together"):
        openmsa.indexer_topk(qi, ki, cu, None, kv_start=s)
    with pytest.raises(TypeError, match="kv_len must be int32"):
        openmsa.indexer_topk(qi, ki, cu, None, kv_start=s, kv_len=n.long())
    with pytest.raises(ValueError, match="kv_start must have num_seqs = 2"):
        openmsa.indexer_topk(qi, ki, cu, None, kv_start=s[:1], kv_len=n)
    with pytest.raises(ValueError, match="cu_seqlens_k=None"):  # batched inputs
        openmsa.indexer_topk(qi[None], ki[None], kv_start=s, kv_len=n)
    with pytest.raises(ValueError, match="total_q <= total_k"):
        openmsa.indexer_topk(qi, ki[:8], cu, None, kv_start=s, kv_len=torch.tensor([4, 6], dtype=torch.int32))
    # touching, nested-prefix and empty ranges are valid
    for cu_q, starts, lens in (([0, 4, 10], [0, 10], [10, 10]), ([0, 4, 10], [3, 3], [5, 9]),
                               ([0, 0, 10], [7, 0], [0, 20])):
        c, st, ln = (torch.tensor(x, dtype=torch.int32) for x in (cu_q, starts, lens))
        openmsa.indexer_topk(qi, ki, c, None, block_size=4, topk=2, kv_start=st, kv_len=ln)


def test_sanitised_fragments():
    """Unchecked values (capture, value_checks(False)) reach the kernels through a
    device-side repair: a valid layout is unchanged, an invalid one becomes one sequence
    of every query row over all keys."""
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    good = (torch.tensor([0, 0], dtype=torch.int32), torch.tensor([10, 20], dtype=torch.int32))
    got = V._sanitized_fragments(cu, *good, 10, 20)
    assert all(torch.equal(a, b) for a, b in zip(got, (cu, *good)))
    for starts, lens in (([0, 5], [8, 10]), ([0, 15], [8, 10]), ([0, 0], [3, 10])):
        bad = [torch.tensor(x, dtype=torch.int32) for x in (starts, lens)]
        cu2, s2, n2 = V._sanitized_fragments(cu, *bad, 10, 20)
        assert cu2.tolist() == [0, 10, 10] and s2.tolist() == [0, 0] and n2.tolist() == [20, 0]
    # an empty range inside another range overlaps nothing
    ok = [torch.tensor(x, dtype=torch.int32) for x in ([5, 0], [0, 20])]
    got = V._sanitized_fragments(torch.tensor([0, 0, 10], dtype=torch.int32), *ok, 10, 20)
    assert got[1].tolist() == [5, 0] and got[2].tolist() == [0, 20]
