"""Triton Index Branch (openmsa/ops/indexer) against the PyTorch reference (docs/spec.md section 4).

On a CPU the kernel runs under Triton's interpreter: small packs, float16/float32 only
(the interpreter's bfloat16 dot is wrong). Index inputs are dyadic (small multiples of
1/4), so every dot product is exact in float32 and the block ranking must equal the
reference's EXACTLY, ties included. With a GPU, the `gpu` tests run the realistic
configuration (bf16, Hkv=4, Di=128, B=128, K=16, 8K-32K tokens, varlen pack).
"""



import pytest
import torch

import openmsa
from helpers import assert_selection_matches, block_scores64, gen_for, make_cu, rounding_bound
from helpers import rel_finite as rel
from openmsa.ops.indexer import triton_impl

pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5

# (Lq, Lk) per sequence; queries are the LAST Lq positions of their keys. Mixed packs:
# Lq < Lk (chunked prefill), sequences shorter than a block, exact block multiples,
# Lq = 0 (and Lk = 0) sequences.
PACK_64 = [(70, 200), (64, 64), (30, 30), (0, 50), (128, 128), (1, 129), (0, 0), (40, 256)]
PACK_128 = [(60, 300), (128, 128), (0, 40), (20, 20), (130, 256), (2, 385)]
PACK_LONG = [(200, 520)]  # one sequence, many blocks and several query tiles




def dyadic(shape, gen, lo=-8, hi=8):
    return torch.randint(lo, hi + 1, shape, generator=gen).float() / 4


def make_inputs(pack, hkv, di, dtype, gen):
    cu_q, cu_k = make_cu(pack)
    qi = dyadic((int(cu_q[-1]), hkv, di), gen).to(DEV, dtype)
    ki = dyadic((int(cu_k[-1]), 1, di), gen).to(DEV, dtype)
    return qi, ki, cu_q, cu_k


def as_sets(idx):
    """Rows with the non-local (selected earlier) entries sorted: the set view of docs/spec.md section 3."""
    n_sel = (idx >= 0).sum(-1, keepdim=True) - 1
    col = torch.arange(idx.shape[-1], device=idx.device)
    head = torch.where(col < n_sel, idx, torch.iinfo(torch.int32).max).sort(-1).values
    return torch.where(col < n_sel, head, idx)


def index_lse_of(qi, ki, idx, cu_q, cu_k, block_size):
    """Reference index_lse over a given selection: the Main Branch LSE with the index
    heads as query heads (G = 1) and the shared index key as every group's key."""
    k = ki.expand(-1, qi.shape[1], -1)
    _, lse = openmsa.sparse_attention(qi, k, k, idx, cu_q, cu_k, block_size=block_size,
                                      backend="reference")
    return lse.t()


def check(qi, ki, cu_q, cu_k, *, block_size, topk, scale=None, tol=TOL):
    kw = dict(block_size=block_size, topk=topk, softmax_scale=scale)
    ref_idx, ref_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", **kw)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton", deterministic=True, **kw)
    assert idx.dtype == torch.int32 and lse.dtype == torch.float32
    assert idx.shape == ref_idx.shape and lse.shape == ref_lse.shape
    assert torch.equal(idx, ref_idx), f"{(idx != ref_idx).any(-1).sum().item()} rows differ"
    assert rel(lse, ref_lse) <= tol
    idx_nd, lse_nd = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton",
                                          deterministic=False, **kw)
    assert torch.equal(as_sets(idx_nd), as_sets(ref_idx))
    assert rel(lse_nd, ref_lse) <= tol
    return ref_idx


@pytest.fixture
def tuning(monkeypatch):
    """Override the launcher's (BLOCK_M, num_warps, num_stages) for one test."""
    def set_(block_m):
        monkeypatch.setattr(triton_impl, "config", lambda *args, **kwargs: (block_m, 4, 2))
    return set_


# pack, block_size, Di, Hkv, topk, dtype
CASES = [
    (PACK_64, 64, 64, 2, 4, torch.float32),
    (PACK_64, 64, 128, 4, 3, torch.float16),
    (PACK_64, 64, 64, 1, 1, torch.float32),  # K = 1: only the local block
    (PACK_128, 128, 64, 1, 16, torch.float32),  # K >= number of blocks
    (PACK_128, 128, 128, 2, 2, torch.float16),
    (PACK_LONG, 64, 64, 4, 5, torch.float32),
    (PACK_LONG, 64, 256, 1, 3, torch.float16),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(case):
    pack, block_size, di, hkv, topk, dtype = CASES[case]
    qi, ki, cu_q, cu_k = make_inputs(pack, hkv, di, dtype, gen_for("cases", case))
    check(qi, ki, cu_q, cu_k, block_size=block_size, topk=topk, scale=0.375)


@pytest.mark.parametrize("block_m", [16, 64])
def test_query_tile_sizes(tuning, block_m):
    """Tiles smaller than a block, and several tiles per block and per sequence."""
    tuning(block_m)
    qi, ki, cu_q, cu_k = make_inputs(PACK_64, 2, 64, torch.float32, gen_for("tile", block_m))
    check(qi, ki, cu_q, cu_k, block_size=64, topk=3)


def test_ties_zero_signs_nan_inf():
    """Exact ties from repeated key blocks and zero queries (-0.0 vs +0.0 block scores),
    NaN queries (NaN ranks below every number), a NaN key (its block is NaN for every
    row) and a -inf block (overflow), all against the reference."""
    gen = gen_for("ties")
    pack = [(200, 520), (64, 70)]
    hkv, di, b = 3, 64, 64
    qi, ki, cu_q, cu_k = make_inputs(pack, hkv, di, torch.float32, gen)
    ki[1 * b:2 * b] = ki[3 * b:4 * b] = ki[5 * b:6 * b] = ki[0:b]  # tied blocks 0, 1, 3, 5
    ki[2 * b:3 * b] = -dyadic((b, 1, di), gen, 1, 8).abs()  # all negative: 0 * x = -0.0
    qi[40:60, 1] = 0.0  # all-zero scores: -0.0 and +0.0 must tie
    qi[100:110, 0] = float("nan")  # NaN rows: all blocks NaN, id order, NaN lse
    qi[300:310, 2] = float("nan")  # NaN rows in the second sequence
    ki[4 * b + 7, 0, 5] = float("nan")  # block 4 scores NaN for every row
    # group 2 (where not NaN): positive queries, block 6 of huge negative keys -> -inf
    qi[:, 2] = qi[:, 2].abs() + 0.25
    qi[300:310, 2] = float("nan")
    ki[6 * b:7 * b] = -(2.0 ** 120)
    check(qi, ki, cu_q, cu_k, block_size=b, topk=5)
    check(qi, ki, cu_q, cu_k, block_size=b, topk=9)


def test_signed_zero_scores_tie():
    """Scores that underflow to -0.0 and +0.0 (tiny dot products times a small scale)
    tie, so the ranking falls back to block ids, as in the reference."""
    pack = [(100, 600)]
    cu_q, cu_k = make_cu(pack)
    qi = torch.zeros(100, 2, 64)
    ki = torch.zeros(600, 1, 64)
    qi[:, :, 0] = 2.0 ** -70
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    ki[:, 0, 0] = sign.repeat_interleave(64)[:600] * 2.0 ** -70  # dot = +-2**-140
    qi, ki = qi.to(DEV), ki.to(DEV)
    idx = check(qi, ki, cu_q, cu_k, block_size=64, topk=6, scale=2.0 ** -20)  # z = +-0.0
    assert torch.equal(idx[0, -1], torch.tensor([0, 1, 2, 3, 4, 9], dtype=torch.int32, device=DEV))


def test_nan_propagating_reduce_path(tuning, monkeypatch):
    """The compiled-mode block max (a custom NaN-propagating tl.reduce) under the
    interpreter, where it is slow: one small pack."""
    monkeypatch.setattr(triton_impl, "NAN_MAX_REDUCE", True)
    tuning(16)
    qi, ki, cu_q, cu_k = make_inputs([(20, 200)], 1, 64, torch.float32, gen_for("nanreduce"))
    qi[3, 0] = float("nan")
    ki[70, 0, 1] = float("nan")
    check(qi, ki, cu_q, cu_k, block_size=64, topk=2)


def test_batched_layout_and_non_contiguous():
    gen = gen_for("batched")
    qi = dyadic((2, 150, 4, 64), gen).to(DEV)[:, :, ::2]  # strided heads: [2, 150, 2, 64]
    ki = dyadic((2, 200, 1, 64), gen).to(DEV)
    kw = dict(block_size=64, topk=3, deterministic=True)
    idx, lse = openmsa.indexer_topk(qi, ki, backend="triton", **kw)
    ref_idx, ref_lse = openmsa.indexer_topk(qi, ki, backend="reference", **kw)
    assert idx.shape == (2, 2, 150, 3) and lse.shape == (2, 2, 150)
    assert torch.equal(idx, ref_idx)
    assert rel(lse, ref_lse) <= TOL


def test_selection_check_accepts_only_near_ties():
    """The tie-tolerant comparison the GPU tests use must still catch a wrong block, a
    wrong order and a wrong local block, and accept a swap of two tied blocks."""
    pack = [(40, 640)]
    qi, ki, cu_q, cu_k = make_inputs(pack, 2, 64, torch.float32, gen_for("selcheck"))
    ki[64:128] = ki[192:256]  # blocks 1 and 3 tie for every query
    kw = dict(block_size=64, topk=4, deterministic=True)
    ref, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", **kw)
    scores, mag = block_scores64(qi, ki, cu_q, cu_k, 64, 64 ** -0.5)
    bound = rounding_bound(mag, 64)
    assert_selection_matches(ref, ref, scores, bound, ordered=True)
    row = next(t for t in range(40) if 1 in ref[0, t, :3].tolist() and 3 not in ref[0, t].tolist())
    bad = ref.clone()  # a block far below the K-th score instead of a selected one
    worst = scores[0, row, :9].argmin().item()
    bad[0, row, ref[0, row, :3].tolist().index(1)] = worst
    with pytest.raises(AssertionError, match="not near the K-th"):
        assert_selection_matches(bad, ref, scores, bound)
    tied = ref.clone()  # block 3 ties block 1: either may be kept
    tied[0, row, ref[0, row, :3].tolist().index(1)] = 3
    assert_selection_matches(tied, ref, scores, bound)
    swapped = ref.clone()
    swapped[0, row, :2] = ref[0, row, :2].flip(0)
    assert_selection_matches(swapped, ref, scores, bound)  # as a set
    if scores[0, row, ref[0, row, 0]] - scores[0, row, ref[0, row, 1]] > bound[0, row]:
        with pytest.raises(AssertionError, match="out of order"):
            assert_selection_matches(swapped, ref, scores, bound, ordered=True)
    local = ref.clone()
    local[0, row, 3] = 8
    with pytest.raises(AssertionError, match="local"):
        assert_selection_matches(local, ref, scores, bound)


def test_empty():
    qi = torch.zeros(0, 2, 64, device=DEV)
    ki = torch.zeros(100, 1, 64, device=DEV)
    cu_q, cu_k = make_cu([(0, 60), (0, 40)])
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=64, topk=4, backend="triton")
    assert idx.shape == (2, 0, 4) and lse.shape == (2, 0)


def test_unsupported_configs_raise():
    qi, ki, cu_q, cu_k = make_inputs([(10, 10)], 1, 64, torch.float32, gen_for("bad"))
    with pytest.raises(ValueError, match="block_size"):
        openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=32, backend="triton")
    qi2, ki2, _, _ = make_inputs([(10, 10)], 1, 32, torch.float32, gen_for("bad"))
    with pytest.raises(ValueError, match="qi"):
        openmsa.indexer_topk(qi2, ki2, cu_q, cu_k, block_size=64, backend="triton")
    with pytest.raises(ValueError, match="topk"):
        openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=64, topk=65, backend="triton")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("pack", [
    [(8192, 8192)],
    [(3000, 3000), (0, 500), (1000, 9000), (77, 77), (4096, 4096), (2500, 16000)],  # ~32K keys
])
def test_gpu_realistic_bf16(pack):
    hkv, di, b, k = 4, 128, 128, 16
    gen = gen_for("gpu", len(pack))
    # dyadic bf16: dot products exact, so the ranking must match exactly
    qi, ki, cu_q, cu_k = make_inputs(pack, hkv, di, torch.bfloat16, gen)
    check(qi, ki, cu_q, cu_k, block_size=b, topk=k)
    # Realistic values: the kernel's fp32 summation order may flip near-ties, so a
    # difference is accepted only between blocks within the rounding bound of the K-th
    # score (float64 scores of the bf16 inputs; the dots' products are exact in fp32).
    cu_q, cu_k = make_cu(pack)
    qi = torch.randn(int(cu_q[-1]), hkv, di, generator=gen).to(DEV, torch.bfloat16)
    ki = torch.randn(int(cu_k[-1]), 1, di, generator=gen).to(DEV, torch.bfloat16)
    kw = dict(block_size=b, topk=k, deterministic=True)
    ref_idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", **kw)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton", **kw)
    scores, magnitude = block_scores64(qi, ki, cu_q, cu_k, b, di ** -0.5)
    assert_selection_matches(idx, ref_idx, scores, rounding_bound(magnitude, di), ordered=True)
    # The LSE over the kernel's own selection, so that a tie flip does not enter it.
    assert rel(lse, index_lse_of(qi, ki, idx, cu_q, cu_k, b)) <= 1e-5


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """No host synchronisation: the op captures in a CUDA graph and replays correctly."""
    pack = [(1000, 3000), (0, 100), (2048, 2048)]
    qi, ki, cu_q, cu_k = make_inputs(pack, 4, 128, torch.bfloat16, gen_for("graph"))
    kw = dict(block_size=128, topk=16, deterministic=True, backend="triton")
    openmsa.indexer_topk(qi, ki, cu_q, cu_k, **kw)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        openmsa.indexer_topk(qi, ki, cu_q, cu_k, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, **kw)
    qi.copy_(dyadic(tuple(qi.shape), gen_for("graph2")).to(DEV, qi.dtype))
    graph.replay()
    torch.cuda.synchronize()
    ref_idx, ref_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=128, topk=16,
                                            backend="reference")
    assert torch.equal(idx, ref_idx)
    assert rel(lse, ref_lse) <= TOL


@pytest.mark.parametrize("mode", ["kv_outer", "union"])
def test_index_lse_modes_match_reference(mode, launch):
    """Both ways of computing the selected LSE (openmsa/ops/indexer/lse.py and the
    in-kernel union walk) give the reference's index_lse on a varlen pack."""
    launch("indexer", lse_mode=mode)
    gen = gen_for("lse-" + mode)
    qi, ki, cu_q, cu_k = make_inputs([(90, 300), (1, 64), (70, 70)], 2, 64, torch.float32, gen)
    check(qi, ki, cu_q, cu_k, block_size=64, topk=3)
