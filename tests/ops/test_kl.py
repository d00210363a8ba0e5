"""Triton sparse KL loss (docs/spec.md section 6) against the PyTorch reference.

On a CPU the kernels run under Triton's interpreter (tiny shapes, float16/float32: the
interpreter's bfloat16 dot is wrong). With a GPU, the `gpu` tests run the realistic
configuration (bf16, Hq=64, Hkv=4, D=Di=128, B=128, K=16, 8K tokens and a varlen pack).

Tolerances. float32: everything is float32 math on both sides (exact "ieee" dots), so
the loss and the gradients agree to rounding (<= 1e-5). float16: the scores are fp16
products accumulated in float32 on both sides, so the loss is as exact as in float32;
the kernel rounds dz = P_S - P_T to fp16 (2**-11 relative) for the two gradient MMAs
(dqi = dz @ ki, dki = dz^T @ qi), so the gradients differ by ~1e-3 relative: <= 5e-3.
"""

import pytest
import torch

import openmsa
from helpers import rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def cu(lens, device=DEV):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)


def make(lens_q, lens_k, hq, hkv, d, di, dtype, gen, device=DEV):
    tq, tk = sum(lens_q), sum(lens_k)

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    return (rnd(tq, hq, d), rnd(tk, hkv, d), rnd(tq, hkv, di), rnd(tk, 1, di),
            cu(lens_q, device), cu(lens_k, device))


def kl_and_grads(q, k, qi, ki, idx, cu_q, cu_k, backend, **kw):
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    a, b = qi.clone().requires_grad_(), ki.clone().requires_grad_()
    loss = openmsa.indexer_kl_loss(qq, kk, a, b, idx, cu_q, cu_k, backend=backend, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert qq.grad is None and kk.grad is None  # q, k never get a gradient from the KL
    return loss.detach(), a.grad, b.grad


def check(q, k, qi, ki, idx, cu_q, cu_k, tol_loss, tol_grad, **kw):
    got = kl_and_grads(q, k, qi, ki, idx, cu_q, cu_k, "triton", **kw)
    want = kl_and_grads(q, k, qi, ki, idx, cu_q, cu_k, "reference", **kw)
    assert rel(got[0], want[0]) <= tol_loss, (got[0].item(), want[0].item())
    assert rel(got[1], want[1]) <= tol_grad, "dqi"
    assert rel(got[2], want[2]) <= tol_grad, "dki"
    return got


CPU_CASES = [
    # lens_q, lens_k, hq, hkv, d, di, block, topk, dtype
    ([70], [70], 4, 4, 32, 32, 16, 2, torch.float32),  # G = 1
    ([40, 1, 0, 33], [90, 16, 5, 33], 4, 2, 32, 32, 16, 3, torch.float32),  # varlen, Lq<Lk, Lq=0, short
    ([64], [128], 8, 2, 32, 32, 16, 16, torch.float16),  # G = 4, K >= number of blocks
    ([50], [80], 16, 1, 32, 64, 16, 2, torch.float32),  # G = 16, Di != D
    ([20, 30], [64, 30], 16, 4, 32, 32, 32, 3, torch.float16),  # G = 4, block 32
    ([30, 7], [50, 20], 6, 2, 32, 32, 16, 1, torch.float32),  # G = 3 (padded heads), K = 1
    ([17, 40], [33, 40], 32, 2, 32, 32, 16, 4, torch.float16),  # G = 16, fp16
]


def _tols(dtype):
    return (1e-5, 1e-5) if dtype == torch.float32 else (1e-5, 5e-3)


@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_matches_reference_recomputed_lse(case):
    lens_q, lens_k, hq, hkv, d, di, block, topk, dtype = CPU_CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, hq, hkv, d, di, dtype, gen)
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=block, topk=topk, backend="reference")
    check(q, k, qi, ki, idx, cu_q, cu_k, *_tols(dtype), block_size=block, coeff=1.0 + 0.25 * case)


@pytest.mark.parametrize("case", [1, 2, 3])
def test_matches_reference_passed_lse(case):
    """lse / index_lse from sparse_attention / indexer_topk: same loss as recomputing them."""
    lens_q, lens_k, hq, hkv, d, di, block, topk, dtype = CPU_CASES[case]
    gen = torch.Generator().manual_seed(300 + case)
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, hq, hkv, d, di, dtype, gen)
    idx, index_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=block, topk=topk,
                                          backend="reference")
    _, lse = openmsa.sparse_attention(q, k, k, idx, cu_q, cu_k, block_size=block, backend="reference")
    got = check(q, k, qi, ki, idx, cu_q, cu_k, *_tols(dtype), block_size=block, coeff=0.5,
                lse=lse, index_lse=index_lse)
    again = kl_and_grads(q, k, qi, ki, idx, cu_q, cu_k, "triton", block_size=block, coeff=0.5)
    tol_loss, tol_grad = _tols(dtype)
    assert rel(got[0], again[0]) <= tol_loss
    assert rel(got[1], again[1]) <= tol_grad and rel(got[2], again[2]) <= tol_grad


def test_passed_lse_values_are_used():
    """Perturbed lse / index_lse: the kernel must use the given values, like the reference."""
    gen = torch.Generator().manual_seed(5)
    lens_q, lens_k, block = [30, 12], [45, 12], 16
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, 8, 2, 32, 32, torch.float32, gen)
    idx, index_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=block, topk=2,
                                          backend="reference")
    _, lse = openmsa.sparse_attention(q, k, k, idx, cu_q, cu_k, block_size=block, backend="reference")
    lse = lse + 0.3 * torch.rand(lse.shape, generator=gen)
    index_lse = (index_lse - 0.2 * torch.rand(index_lse.shape, generator=gen)).t().contiguous().t()
    check(q, k, qi, ki, idx, cu_q, cu_k, 1e-5, 1e-5, block_size=block, lse=lse, index_lse=index_lse)


@pytest.mark.parametrize("pass_lse", [False, True])
def test_hand_made_indices(pass_lse):
    """-1 padding, duplicates, future and out-of-range ids, and an all -1 row (empty T:
    contributes 0, no NaN, zero gradient)."""
    gen = torch.Generator().manual_seed(7)
    lens_q, lens_k, block = [24, 9], [60, 40], 16
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, 8, 2, 32, 32, torch.float32, gen)
    idx = torch.randint(-1, 5, (2, sum(lens_q), 4), generator=gen, dtype=torch.int32)
    idx[:, 3] = -1  # empty token set in both groups
    idx[1, 4] = torch.tensor([2, 2, 2, 0], dtype=torch.int32)  # duplicates count once
    idx[0, 5] = torch.tensor([3, 9, 100, -1], dtype=torch.int32)  # future / out-of-range blocks
    kw = dict(block_size=block, coeff=2.0)
    if pass_lse:
        _, kw["lse"] = openmsa.sparse_attention(q, k, k, idx, cu_q, cu_k, block_size=block,
                                                backend="reference")
        assert (kw["lse"][3] == float("-inf")).all()
    got = check(q, k, qi, ki, idx, cu_q, cu_k, 1e-5, 1e-5, **kw)
    assert torch.isfinite(got[0])
    assert torch.equal(got[1][3], torch.zeros_like(got[1][3]))


def test_small_tiles_segments_and_row_chunks(launch):
    """One token per teacher tile (G = 16), one tile per segment (a hot block is split
    over many programs whose dki meet in the atomics) and query rows in chunks of a few
    rows (tiny partial budget)."""
    launch("kl_teacher", tile_rows=16, segment_tiles=1)
    launch("scratch", partial_bytes=4096)
    gen = torch.Generator().manual_seed(6)
    lens_q, lens_k, block = [20, 9], [40, 9], 16
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, 32, 2, 32, 32, torch.float32, gen)
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=block, topk=2, backend="reference")
    check(q, k, qi, ki, idx, cu_q, cu_k, 1e-5, 1e-5, block_size=block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_student_walks_several_tiles_per_segment(dtype, launch):
    """Segments longer than the student's tile: the student pass loops over several
    16-entry tiles of one key block and accumulates dki across them."""
    launch("kl_student", rows=16)
    launch("kl_teacher", segment_tiles=16)
    gen = torch.Generator().manual_seed(16)
    lens_q, lens_k, block = [90], [100], 16
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, 4, 2, 32, 32, dtype, gen)
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=block, topk=3, backend="reference")
    check(q, k, qi, ki, idx, cu_q, cu_k, *_tols(dtype), block_size=block)


def test_all_empty_gives_zero_loss():
    gen = torch.Generator().manual_seed(8)
    q, k, qi, ki, cu_q, cu_k = make([10], [20], 4, 2, 32, 32, torch.float32, gen)
    idx = torch.full((2, 10, 3), -1, dtype=torch.int32)
    loss, dqi, dki = kl_and_grads(q, k, qi, ki, idx, cu_q, cu_k, "triton", block_size=16)
    assert loss.item() == 0.0
    assert not dqi.any() and not dki.any()


def test_no_grad_and_partial_grad():
    """Without any gradient needed the kernel skips the gradient work; same loss. With
    only ki requiring a gradient, qi gets none."""
    gen = torch.Generator().manual_seed(9)
    lens_q, lens_k, block = [40, 25], [70, 25], 16
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, 8, 2, 32, 32, torch.float32, gen)
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=block, topk=3, backend="reference")
    want = openmsa.indexer_kl_loss(q, k, qi, ki, idx, cu_q, cu_k, block_size=block, backend="reference")
    got = openmsa.indexer_kl_loss(q, k, qi, ki, idx, cu_q, cu_k, block_size=block, backend="triton")
    assert not got.requires_grad and rel(got, want) <= 1e-5
    b = ki.clone().requires_grad_()
    loss = openmsa.indexer_kl_loss(q, k, qi, b, idx, cu_q, cu_k, block_size=block, backend="triton")
    loss.backward(torch.tensor(3.0))
    b_ref = ki.clone().requires_grad_()
    ref = openmsa.indexer_kl_loss(q, k, qi, b_ref, idx, cu_q, cu_k, block_size=block,
                                  backend="reference")
    ref.backward(torch.tensor(3.0))
    assert rel(b.grad, b_ref.grad) <= 1e-5


DENSE_CASES = [
    # lens_q, lens_k, hq, hkv, d, di, block, chunk (blocks per kernel call), dtype
    ([20, 5], [30, 5], 4, 2, 32, 32, 16, 64, torch.float32),  # one chunk
    ([70, 1, 0, 33], [100, 16, 5, 33], 4, 2, 32, 32, 16, 2, torch.float32),  # 4 chunks, varlen, Lq<Lk
    ([64], [96], 8, 2, 32, 64, 16, 4, torch.float16),  # G = 4, Di != D, exact block multiple
    ([30, 7], [50, 20], 6, 2, 32, 32, 16, 1, torch.float32),  # G = 3, one block per chunk
    ([40], [40], 16, 4, 32, 32, 32, 1, torch.float16),  # block 32, a sequence shorter than a chunk set
]


@pytest.mark.parametrize("case", range(len(DENSE_CASES)))
@pytest.mark.parametrize("pass_lse", [False, True])
def test_dense_warmup_kl_in_chunks_matches_reference(case, pass_lse, launch):
    """topk_indices=None (T = every visible token) runs the sparse kernels over chunks of
    blocks with the normalisers of all visible tokens; chunks of 1-4 blocks here so that
    small shapes take several (the GPU runs chunks of 64)."""
    lens_q, lens_k, hq, hkv, d, di, block, chunk, dtype = DENSE_CASES[case]
    launch("dense_chunks", blocks=chunk)
    gen = torch.Generator().manual_seed(400 + case)
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, hq, hkv, d, di, dtype, gen)
    q = q * 2.0  # a peakier teacher than unit-scale random data
    kw = dict(block_size=block, coeff=0.5 + case)
    if pass_lse:  # the dense normalisers, as the reference computes them
        _, kw["lse"] = openmsa.sparse_attention(q, k, k, None, cu_q, cu_k, block_size=block,
                                                backend="reference")
        kw["index_lse"] = _dense_index_lse(qi, ki, lens_q, lens_k)
    check(q, k, qi, ki, None, cu_q, cu_k, *_tols(dtype), **kw)


def _dense_index_lse(qi, ki, lens_q, lens_k):
    """[Hkv, total_q] logsumexp of the index scores over each row's visible keys."""
    out, q0, k0 = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        z = torch.einsum("tgd,jd->gtj", qi[q0:q0 + lq].float(), ki[k0:k0 + lk, 0].float())
        z = z * qi.shape[2] ** -0.5
        vis = torch.arange(lk)[None, :] <= (lk - lq + torch.arange(lq))[:, None]
        out.append(torch.logsumexp(z.masked_fill(~vis, float("-inf")), -1))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(out, 1)


def test_batched_layout():
    gen = torch.Generator().manual_seed(11)
    q, k, qi, ki, cu_q, cu_k = make([2 * 24], [2 * 40], 4, 2, 32, 32, torch.float32, gen)
    q, qi = q.view(2, 24, 4, 32), qi.view(2, 24, 2, 32)
    k, ki = k.view(2, 40, 2, 32), ki.view(2, 40, 1, 32)
    idx, _ = openmsa.indexer_topk(qi, ki, block_size=16, topk=2, backend="reference")
    check(q, k, qi, ki, idx, None, None, 1e-5, 1e-5, block_size=16)


@pytest.mark.parametrize("kw,name", [(dict(block_size=24), "block_size"), (dict(di=48), "qi"),
                                     (dict(d=48), "q"), (dict(topk=65), "topk")])
def test_unsupported_shapes_name_the_argument(kw, name):
    gen = torch.Generator().manual_seed(3)
    d, di, topk = kw.get("d", 32), kw.get("di", 32), kw.get("topk", 1)
    q, k, qi, ki, cu_q, cu_k = make([8], [8], 2, 1, d, di, torch.float32, gen)
    idx = torch.zeros(1, 8, topk, dtype=torch.int32)
    with pytest.raises(ValueError, match=name):
        openmsa.indexer_kl_loss(q, k, qi, ki, idx, cu_q, cu_k, block_size=kw.get("block_size", 16),
                                backend="triton")


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("lens_q,lens_k", [([8192], [8192]),
                                           ([3000, 128, 4000, 77, 1000], [3000, 600, 6000, 77, 2500])])
@pytest.mark.parametrize("pass_lse", [False, True])
def test_gpu_realistic_bf16(lens_q, lens_k, pass_lse):
    """bf16 tolerances: scores are bf16 products accumulated in float32 on both sides, so
    the loss agrees to float32 rounding (1e-4 leaves room for summation order over ~10^5
    entries); dz is rounded to bf16 (2**-8 relative) for the gradient MMAs: <= 1e-2."""
    gen = torch.Generator().manual_seed(sum(lens_q))
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, 64, 4, 128, 128, torch.bfloat16, gen)
    q = q * 3.0  # a peakier teacher than unit-scale random data
    idx, index_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=128, topk=16,
                                          backend="reference")
    kw = dict(block_size=128, coeff=0.1)
    if pass_lse:
        _, kw["lse"] = openmsa.sparse_attention(q, k, k, idx, cu_q, cu_k, backend="reference")
        kw["index_lse"] = index_lse
    got = check(q, k, qi, ki, idx, cu_q, cu_k, 1e-4, 1e-2, **kw)
    again = kl_and_grads(q, k, qi, ki, idx, cu_q, cu_k, "triton", **kw)
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("lens_q,lens_k,hq,hkv,d,b", [([16384], [16384], 8, 2, 64, 64),
                                                      ([8192], [8192], 64, 4, 128, 128),
                                                      ([3000, 77, 5000], [9000, 77, 5000], 64, 4, 128, 128)])
def test_gpu_dense_warmup_kl_bf16(lens_q, lens_k, hq, hkv, d, b):
    """The dense KL through the kernels (several chunks of 64 blocks) against the reference;
    bf16 tolerances as in test_gpu_realistic_bf16."""
    gen = torch.Generator().manual_seed(sum(lens_k))
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, hq, hkv, d, d, torch.bfloat16, gen)
    check(q * 3.0, k, qi, ki, None, cu_q, cu_k, 1e-4, 1e-2, block_size=b, coeff=0.1)


# --------------------------------------------------------------------------- deterministic


def _det_kl(q, k, qi, ki, idx, cu_q, cu_k, block, deterministic):
    a, b = qi.clone().requires_grad_(), ki.clone().requires_grad_()
    loss = openmsa.indexer_kl_loss(q, k, a, b, idx, cu_q, cu_k, block_size=block,
                                   deterministic=deterministic, backend="triton")
    loss.backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("dense,dtype", [(False, torch.float32), (False, torch.float16),
                                         (True, torch.float32)])
def test_deterministic_dki_hot_block(dense, dtype, launch):
    """deterministic=True: per-group dki accumulators and, for a key block cut into many
    segments (block 0 selected by every row of the first sequence, 4 entries per
    segment), scratch slots added in tile order. Bitwise-repeatable, reference tolerances,
    the same as the default path to rounding. The dense KL (topk_indices=None, chunks of
    2 blocks) too."""
    from openmsa.ops.utils.schedule import build_schedule, row_info
    launch("kl_teacher", tile_rows=16, segment_tiles=1)  # 4 tokens x G_PAD = 4 heads
    launch("scratch", partial_bytes=1 << 17)  # query rows in chunks
    launch("dense_chunks", blocks=2)
    gen = torch.Generator().manual_seed(910)
    lens_q, lens_k, block = [60, 20], [80, 20], 16
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, 8, 2, 32, 32, dtype, gen)
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=block, topk=3, backend="reference")
    idx[:, :60, 0] = 0
    info = row_info(cu_q, cu_k, q.shape[0], k.shape[0], block)
    assert build_schedule(idx, 0, info, block, 4, deterministic=True).reduce_count.max() >= 5
    idx = None if dense else idx
    first = _det_kl(q, k, qi, ki, idx, cu_q, cu_k, block, True)
    second = _det_kl(q, k, qi, ki, idx, cu_q, cu_k, block, True)
    default = _det_kl(q, k, qi, ki, idx, cu_q, cu_k, block, False)
    want = kl_and_grads(q, k, qi, ki, idx, cu_q, cu_k, "reference", block_size=block)
    tol_loss, tol_grad = _tols(dtype)
    tol_same = 1e-6 if dtype == torch.float32 else 1e-3  # float16 dki: another summation order
    for name, a, b, c, d, tol in zip(("loss", "dqi", "dki"), first, second, want, default,
                                     (tol_loss, tol_grad, tol_grad)):
        assert torch.equal(a, b), name
        assert rel(a, c) <= tol, name
        assert rel(a, d) <= tol_same, name


@pytest.mark.gpu
@pytest.mark.parametrize("dense", [False, True])
def test_gpu_deterministic_bf16(dense):
    """Realistic configuration (bf16, Hq=64, Hkv=4, D=Di=128, B=128, K=16), 16K tokens:
    with deterministic=True two passes give bitwise-equal loss, dqi and dki; without it
    dki agrees to float32 summation order (atomics). The dense KL on 8K tokens."""
    n = 8192 if dense else 16384
    gen = torch.Generator().manual_seed(n + dense)
    q, k, qi, ki, cu_q, cu_k = make([n], [n], 64, 4, 128, 128, torch.bfloat16, gen)
    q = q * 3.0
    idx = None if dense else openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton")[0]
    det = [_det_kl(q, k, qi, ki, idx, cu_q, cu_k, 128, True) for _ in range(2)]
    fast = [_det_kl(q, k, qi, ki, idx, cu_q, cu_k, 128, False) for _ in range(2)]
    for i, name in enumerate(("loss", "dqi", "dki")):
        assert torch.equal(det[0][i], det[1][i]), name
        assert rel(fast[0][i], det[0][i]) <= 1e-2, name
        assert rel(fast[1][i], fast[0][i]) <= 1e-2, name


# --------------------------------------------------------------------------- NaN / Inf


def _poison(kind, q, k, qi, ki):
    """Copies with one non-finite value: query row 18 (sequence 0; head 5 of group 1 / index
    head 1) or key row 20 (sequence 0; group 1 of k, the shared ki). ki_neginf: an index
    score of -inf for every query (a -inf component where all index queries are
    positive): the student gives 0 to a token the teacher weighs, KL = +inf."""
    q, k, qi, ki = q.clone(), k.clone(), qi.clone(), ki.clone()
    if kind == "q_nan":
        q[18, 5, 3] = float("nan")
    elif kind == "k_nan":
        k[20, 1, 4] = float("nan")
    elif kind == "k_posinf":
        k[20, 1, 4] = float("inf")
    elif kind == "qi_nan":
        qi[18, 1, 2] = float("nan")
    elif kind == "ki_nan":
        ki[20, 0, 2] = float("nan")
    elif kind == "ki_neginf":
        qi[..., 0] = qi[..., 0].abs() + 0.1
        ki[20, 0] = 0.0
        ki[20, 0, 0] = float("-inf")
    return q, k, qi, ki


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("kind", ["q_nan", "k_nan", "k_posinf", "qi_nan", "ki_nan", "ki_neginf"])
def test_non_finite_inputs_same_on_both_backends(kind, dense):
    """One NaN/Inf reaching a contributing row (the rule in api.indexer_kl_loss): the loss
    is NaN on both backends (+inf for ki_neginf); the backward runs, and the gradients of
    the other sequence (rows 24-35, keys 40-51) are finite and unchanged."""
    gen = torch.Generator().manual_seed(960)
    lens_q, lens_k, block = [24, 12], [40, 12], 16
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, 8, 2, 32, 32, torch.float32, gen)
    idx = None
    if not dense:  # key row 20 (block 1) in T of query row 18 (position 34) in both groups
        idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=block, topk=2,
                                      backend="reference")
        idx[:, 18, 0] = 1
    pq, pk, pqi, pki = _poison(kind, q, k, qi, ki)
    clean_qi = pqi if kind == "ki_neginf" else qi
    for backend in ("triton", "reference"):
        loss, dqi, dki = kl_and_grads(pq, pk, pqi, pki, idx, cu_q, cu_k, backend, block_size=block)
        assert (loss == float("inf")) if kind == "ki_neginf" else loss.isnan(), backend
        _, c_dqi, c_dki = kl_and_grads(q, k, clean_qi, ki, idx, cu_q, cu_k, backend, block_size=block)
        assert rel(dqi[24:], c_dqi[24:]) <= 1e-6 and rel(dki[40:], c_dki[40:]) <= 1e-6, backend


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_non_finite_inputs_that_reach_no_row(backend):
    """NaN in q of a row whose token set is empty, NaN in k / ki of a key no row selects:
    the loss and gradients are those without them."""
    gen = torch.Generator().manual_seed(961)
    lens_q, lens_k, block = [24, 12], [40, 12], 16
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, 8, 2, 32, 32, torch.float32, gen)
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=block, topk=2, backend="reference")
    idx[:, 5] = -1  # empty T
    idx[:, :24][idx[:, :24] == 0] = -1  # block 0 of sequence 0 (keys 0-15): nobody's
    pq, pk, pki = q.clone(), k.clone(), ki.clone()
    pq[5, 2, 0] = float("nan")
    pk[3, 0, 1] = float("nan")
    pki[7, 0, 1] = float("nan")
    got = kl_and_grads(pq, pk, qi, pki, idx, cu_q, cu_k, backend, block_size=block)
    want = kl_and_grads(q, k, qi, ki, idx, cu_q, cu_k, backend, block_size=block)
    for a, b in zip(got, want):
        assert rel(a, b) <= 1e-6


@pytest.mark.parametrize("dense", [False, True])
def test_neginf_main_score_weighs_zero(dense):
    """A key with a main score of -inf for every query (a -inf component of k where all
    queries are positive) gets teacher weight 0: the loss and gradients stay finite and the
    backends agree (the recomputed teacher LSE does not treat k as a V)."""
    gen = torch.Generator().manual_seed(962)
    lens_q, lens_k, block = [24, 12], [40, 12], 16
    q, k, qi, ki, cu_q, cu_k = make(lens_q, lens_k, 8, 2, 32, 32, torch.float32, gen)
    q[..., 0] = q[..., 0].abs() + 0.1
    k[20, 1] = 0.0
    k[20, 1, 0] = float("-inf")
    idx = None
    if not dense:
        idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=block, topk=2,
                                      backend="reference")
    got = check(q, k, qi, ki, idx, cu_q, cu_k, 1e-5, 1e-5, block_size=block)
    assert torch.isfinite(got[0])
