"""Triton sparse attention (KV-outer forward) against the PyTorch reference.

On a CPU the kernels run under Triton's interpreter (tiny shapes, float16/float32:
the interpreter's bfloat16 dot is wrong). With a GPU, the `gpu` tests run the
realistic configuration (bf16, Hq=64, Hkv=4, D=128, B=128, K=16, 8K-32K tokens).
"""

import pytest
import torch

import openmsa
from helpers import rel_finite as rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(lens_q, lens_k, hq, hkv, d, dtype, gen, device=DEV):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    tq, tk = sum(lens_q), sum(lens_k)

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    return rnd(tq, hq, d), rnd(tk, hkv, d), rnd(tk, hkv, d), cu_q, cu_k


def indices_for(lens_q, lens_k, hkv, block, topk, gen, device=DEV):
    qi = torch.randn(sum(lens_q), hkv, 16, generator=gen).to(device)
    ki = torch.randn(sum(lens_k), 1, 16, generator=gen).to(device)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=block, topk=topk, backend="reference")
    return idx


CPU_CASES = [
    # lens_q, lens_k, hq, hkv, block, topk, dtype
    ([70], [70], 4, 4, 16, 2, torch.float32),  # G = 1
    ([40, 1, 0, 33], [90, 16, 5, 33], 4, 2, 16, 3, torch.float32),  # varlen, Lq < Lk, Lq = 0, short
    ([64], [128], 8, 2, 16, 16, torch.float16),  # K >= number of blocks, exact multiples
    ([50], [80], 16, 1, 16, 2, torch.float32),  # G = 16
    ([20, 30], [64, 30], 16, 4, 32, 3, torch.float16),  # G = 4, block 32
]


@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_forward_matches_reference(case):
    lens_q, lens_k, hq, hkv, block, topk, dtype = CPU_CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, hq, hkv, 32, dtype, gen)
    idx = indices_for(lens_q, lens_k, hkv, block, topk, gen)
    out, lse = openmsa.sparse_attention(q, k, v, idx, cu_q, cu_k, block_size=block, backend="triton")
    ref_out, ref_lse = openmsa.sparse_attention(q, k, v, idx, cu_q, cu_k, block_size=block,
                                                backend="reference")
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: P is rounded to fp16 for the PV product
    assert rel(out, ref_out) <= tol
    assert rel(lse, ref_lse) <= 1e-5


def test_hand_made_indices_duplicates_padding_out_of_range_and_empty():
    gen = torch.Generator().manual_seed(7)
    lens_q, lens_k, block = [24, 9], [60, 40], 16
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, 8, 2, 32, torch.float32, gen)
    idx = torch.randint(-1, 5, (2, sum(lens_q), 4), generator=gen, dtype=torch.int32)
    idx[:, 3] = -1  # empty token set: out 0, lse -inf
    idx[1, 4] = torch.tensor([2, 2, 2, 0], dtype=torch.int32)  # duplicates count once
    idx[0, 5] = torch.tensor([3, 9, 100, -1], dtype=torch.int32)  # future / out-of-range blocks
    out, lse = openmsa.sparse_attention(q, k, v, idx, cu_q, cu_k, block_size=block, backend="triton")
    ref_out, ref_lse = openmsa.sparse_attention(q, k, v, idx, cu_q, cu_k, block_size=block,
                                                backend="reference")
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[3], torch.zeros_like(out[3])) and (lse[3] == float("-inf")).all()
    assert rel(out, ref_out) <= 1e-5 and rel(lse, ref_lse) <= 1e-5


def _grads(q, k, v, idx, cu_q, cu_k, block, backend, dout):
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out, _ = openmsa.sparse_attention(qq, kk, vv, idx, cu_q, cu_k, block_size=block, backend=backend)
    out.backward(dout)
    return qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_backward_matches_reference(case):
    lens_q, lens_k, hq, hkv, block, topk, dtype = CPU_CASES[case]
    gen = torch.Generator().manual_seed(200 + case)
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, hq, hkv, 32, dtype, gen)
    idx = indices_for(lens_q, lens_k, hkv, block, topk, gen)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    got = _grads(q, k, v, idx, cu_q, cu_k, block, "triton", dout)
    want = _grads(q, k, v, idx, cu_q, cu_k, block, "reference", dout)
    tol = 1e-5 if dtype == torch.float32 else 5e-3  # fp16: P and dS rounded to fp16 for the MMAs
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert rel(a, b) <= tol, name


def test_backward_hand_made_indices():
    gen = torch.Generator().manual_seed(12)
    lens_q, lens_k, block = [24, 9], [60, 40], 16
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, 8, 2, 32, torch.float32, gen)
    idx = torch.randint(-1, 5, (2, sum(lens_q), 4), generator=gen, dtype=torch.int32)
    idx[:, 3] = -1
    idx[1, 4] = torch.tensor([2, 2, 2, 0], dtype=torch.int32)
    dout = torch.randn(q.shape, generator=gen)
    got = _grads(q, k, v, idx, cu_q, cu_k, block, "triton", dout)
    want = _grads(q, k, v, idx, cu_q, cu_k, block, "reference", dout)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert rel(a, b) <= 1e-5, name
    assert torch.equal(got[0][3], torch.zeros_like(got[0][3]))  # empty token set: no gradient


DENSE_CASES = [
    # lens_q, lens_k, hq, hkv, block, chunk (blocks per kernel call), dtype
    ([70, 1, 0, 33], [100, 16, 5, 33], 4, 2, 16, 2, torch.float32),  # 4 chunks, varlen, Lq<Lk, Lq=0
    ([64], [96], 8, 2, 16, 4, torch.float16),  # G = 4, exact block multiple, a partial chunk
    ([30, 7], [50, 20], 6, 2, 16, 1, torch.float32),  # G = 3, one block per chunk
    ([40], [40], 16, 4, 32, 64, torch.float16),  # one chunk
]


@pytest.mark.parametrize("case", range(len(DENSE_CASES)))
def test_dense_attention_in_chunks_matches_reference(case, launch):
    """topk_indices=None (every visible token) on the Triton backend: the sparse kernels over
    chunks of blocks, merged like split-KV decoding; forward and backward against the
    reference. Chunks of 1-4 blocks here so that small shapes take several (the GPU runs 64)."""
    lens_q, lens_k, hq, hkv, block, chunk, dtype = DENSE_CASES[case]
    launch("dense_chunks", blocks=chunk)
    gen = torch.Generator().manual_seed(500 + case)
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, hq, hkv, 32, dtype, gen)
    q = q * 2.0  # a peakier softmax than unit-scale random data
    out, lse = openmsa.sparse_attention(q, k, v, None, cu_q, cu_k, block_size=block, backend="triton")
    ref_out, ref_lse = openmsa.sparse_attention(q, k, v, None, cu_q, cu_k, block_size=block,
                                                backend="reference")
    fp32 = dtype == torch.float32
    assert rel(out, ref_out) <= (1e-5 if fp32 else 2e-3)
    assert rel(lse, ref_lse) <= 1e-5
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    got = _grads(q, k, v, None, cu_q, cu_k, block, "triton", dout)
    want = _grads(q, k, v, None, cu_q, cu_k, block, "reference", dout)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert rel(a, b) <= (1e-5 if fp32 else 5e-3), name


def test_dense_warmup_kl_chunk_indices():
    """Row t of chunk [c0, c0 + n) lists c0 .. min(c0 + n, local + 1) - 1, then -1."""
    from openmsa.ops.utils.schedule import dense_chunk_indices
    pos = torch.tensor([0, 15, 16, 47, 100], dtype=torch.int32)
    idx = dense_chunk_indices(pos, 2, 16, 2, 3)
    assert idx.shape == (2, 5, 3) and torch.equal(idx[0], idx[1])
    assert idx[0].tolist() == [[-1, -1, -1], [-1, -1, -1], [-1, -1, -1], [2, -1, -1], [2, 3, 4]]


def test_unsupported_block_size_names_the_argument():
    gen = torch.Generator().manual_seed(3)
    q, k, v, cu_q, cu_k = make([8], [8], 2, 1, 32, torch.float32, gen)
    idx = torch.zeros(1, 8, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_size"):
        openmsa.sparse_attention(q, k, v, idx, cu_q, cu_k, block_size=24, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[8192], [32768], [3000, 128, 9000, 77, 20000]])
def test_gpu_realistic_bf16(lens):
    gen = torch.Generator().manual_seed(sum(lens))
    q, k, v, cu_q, cu_k = make(lens, lens, 64, 4, 128, torch.bfloat16, gen)
    qi = torch.randn(sum(lens), 4, 128, generator=gen).to(DEV, torch.bfloat16)
    ki = torch.randn(sum(lens), 1, 128, generator=gen).to(DEV, torch.bfloat16)
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference")
    out = torch.full_like(q, float("nan"))
    out, lse = openmsa.sparse_attention(q, k, v, idx, cu_q, cu_k, backend="triton")
    ref_out, ref_lse = openmsa.sparse_attention(q, k, v, idx, cu_q, cu_k, backend="reference")
    assert rel(out, ref_out) <= 1e-2  # bf16 output and bf16 P in the PV product
    assert rel(lse, ref_lse) <= 1e-5
    if sum(lens) <= 8192:  # the reference backward is slow; one size suffices
        dout = torch.randn(q.shape, generator=gen).to(DEV, q.dtype)
        got = _grads(q, k, v, idx, cu_q, cu_k, 128, "triton", dout)
        want = _grads(q, k, v, idx, cu_q, cu_k, 128, "reference", dout)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            assert rel(a, b) <= 2e-2, name  # bf16 P, dS and outputs


@pytest.mark.gpu
def test_gpu_dense_attention_varlen_bf16():
    """Dense attention (topk_indices=None) over a varlen pack through the kernels in chunks
    of 64 blocks (71 blocks in the longest sequence: two chunks, the second partial), against
    the reference; forward and backward, bf16 tolerances as above."""
    lens_q, lens_k = [3000, 77, 5000], [9000, 77, 5000]
    gen = torch.Generator().manual_seed(31)
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, 64, 4, 128, torch.bfloat16, gen)
    out, lse = openmsa.sparse_attention(q, k, v, None, cu_q, cu_k, backend="triton")
    ref_out, ref_lse = openmsa.sparse_attention(q, k, v, None, cu_q, cu_k, backend="reference")
    assert rel(out, ref_out) <= 1e-2 and rel(lse, ref_lse) <= 1e-5
    dout = torch.randn(q.shape, generator=gen).to(DEV, q.dtype)
    got = _grads(q, k, v, None, cu_q, cu_k, 128, "triton", dout)
    want = _grads(q, k, v, None, cu_q, cu_k, 128, "reference", dout)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert rel(a, b) <= 2e-2, name


@pytest.mark.parametrize("split,bwd_launch", [(False, "interleaved"), (True, "interleaved"),
                                              (True, "separate")])
def test_backward_split_and_fused_launches(split, bwd_launch, launch):
    """The fused backward (dQ, dK, dV in one pass) and the split one (dK/dV on half-block
    slices and dQ, as three interleaved roles of one grid or as two launches) give the
    reference's gradients."""
    launch("attention_bwd", split=split, launch=bwd_launch)
    gen = torch.Generator().manual_seed(300)
    lens_q, lens_k, block = [40, 25], [100, 64], 32
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, 8, 2, 32, torch.float32, gen)
    idx = indices_for(lens_q, lens_k, 2, block, 3, gen)
    dout = torch.randn(q.shape, generator=gen)
    got = _grads(q, k, v, idx, cu_q, cu_k, block, "triton", dout)
    want = _grads(q, k, v, idx, cu_q, cu_k, block, "reference", dout)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert rel(a, b) <= 1e-5, name


@pytest.mark.gpu
def test_gpu_msa_attention_forward_backward_in_a_cuda_graph():
    """No host synchronisation in the layer's ops: indexer, sparse attention forward and
    backward and the KL (forward + backward) capture in one CUDA graph, and replaying it
    on new inputs gives the eager results."""
    lens = [3000, 5000]
    gen = torch.Generator().manual_seed(5)
    q, k, v, cu_q, cu_k = make(lens, lens, 64, 4, 128, torch.bfloat16, gen)
    qi = torch.randn(sum(lens), 4, 128, generator=gen).to(DEV, torch.bfloat16)
    ki = torch.randn(sum(lens), 1, 128, generator=gen).to(DEV, torch.bfloat16)
    static = [x.clone().requires_grad_() for x in (q, k, v, qi, ki)]

    def step():
        for x in static:
            x.grad = None
        out, kl, _ = openmsa.msa_attention(*static, cu_q, cu_k)
        (out.float().square().mean() + kl).backward()
        return out, kl

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_kl = step()
    new = [torch.randn(x.shape, generator=gen).to(DEV, x.dtype) for x in static]
    with torch.no_grad():
        for x, n in zip(static, new):
            x.copy_(n)
    graph.replay()
    torch.cuda.synchronize()
    got = (g_out.clone(), g_kl.clone(), *[x.grad.clone() for x in static])
    eager = [n.clone().requires_grad_() for n in new]
    out, kl, _ = openmsa.msa_attention(*eager, cu_q, cu_k)
    (out.float().square().mean() + kl).backward()
    want = (out, kl, *[x.grad for x in eager])
    for a, b in zip(got, want):
        assert rel(a, b) <= 1e-3  # same kernels; dK/dV/dki atomics reorder float sums


# --------------------------------------------------------------------------- deterministic


def _hot_block_case(gen, dtype=torch.float32):
    """Block 0 of the first sequence selected by every row of it (slot 0), beside the
    Index Branch's choice: with 4-entry segments (see the knobs below) it is cut into
    many segments, whose dK/dV would meet in float atomics."""
    lens_q, lens_k, block = [60, 20], [80, 20], 16
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, 8, 2, 32, dtype, gen)
    idx = indices_for(lens_q, lens_k, 2, block, 3, gen)
    idx[:, :60, 0] = 0
    return q, k, v, cu_q, cu_k, idx, block


def _small_segments(launch):
    launch("attention_bwd", tile_rows=16, segment_tiles=1)  # 4 tokens x G_PAD = 4 heads
    launch("scratch", partial_bytes=1 << 19)  # query rows in 3 chunks


def _det_grads(q, k, v, idx, cu_q, cu_k, block, dout, deterministic):
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out, _ = openmsa.sparse_attention(qq, kk, vv, idx, cu_q, cu_k, block_size=block,
                                      deterministic=deterministic, backend="triton")
    out.backward(dout)
    return qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("split,bwd_launch", [(False, "interleaved"), (True, "interleaved"),
                                              (True, "separate")])
def test_deterministic_backward_hot_block(split, bwd_launch, launch):
    """deterministic=True: the segments of a hot block write their dK/dV sums to scratch
    slots, added in a fixed order (no atomics between programs). Two backward passes are
    bitwise equal and match the reference; the schedule really cuts the hot block (so the
    default path would race on a GPU; the interpreter runs programs one by one, so only
    the GPU test below can show the default path differ)."""
    from openmsa.ops.utils.schedule import build_schedule, row_info
    _small_segments(launch)
    launch("attention_bwd", split=split, launch=bwd_launch)
    gen = torch.Generator().manual_seed(900)
    q, k, v, cu_q, cu_k, idx, block = _hot_block_case(gen)
    info = row_info(cu_q, cu_k, q.shape[0], k.shape[0], block)
    sched = build_schedule(idx[:, :30], 0, info, block, 4, deterministic=True)
    assert sched.reduce_count.max() >= 5  # a group cut into >= 5 segments in one chunk
    dout = torch.randn(q.shape, generator=gen).to(DEV)
    first = _det_grads(q, k, v, idx, cu_q, cu_k, block, dout, True)
    second = _det_grads(q, k, v, idx, cu_q, cu_k, block, dout, True)
    want = _grads(q, k, v, idx, cu_q, cu_k, block, "reference", dout)
    default = _det_grads(q, k, v, idx, cu_q, cu_k, block, dout, False)
    for name, a, b, c, d in zip(("dq", "dk", "dv"), first, second, want, default):
        assert torch.equal(a, b), name
        assert rel(a, c) <= 1e-5, name
        assert rel(a, d) <= 1e-6, name


def test_deterministic_backward_float16_and_dense(launch):
    """deterministic=True in float16 (sparse) and on the dense path (topk_indices=None,
    chunks of 2 blocks): bitwise-repeatable, reference tolerances."""
    _small_segments(launch)
    launch("dense_chunks", blocks=2)
    gen = torch.Generator().manual_seed(901)
    for dtype, use_idx in ((torch.float16, True), (torch.float32, False)):
        q, k, v, cu_q, cu_k, idx, block = _hot_block_case(gen, dtype)
        idx = idx if use_idx else None
        dout = torch.randn(q.shape, generator=gen).to(DEV, dtype)
        first = _det_grads(q, k, v, idx, cu_q, cu_k, block, dout, True)
        second = _det_grads(q, k, v, idx, cu_q, cu_k, block, dout, True)
        want = _grads(q, k, v, idx, cu_q, cu_k, block, "reference", dout)
        for name, a, b, c in zip(("dq", "dk", "dv"), first, second, want):
            assert torch.equal(a, b), name
            assert rel(a, c) <= (5e-3 if dtype == torch.float16 else 1e-5), name


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[8192], [16384]])
def test_gpu_deterministic_backward_bf16(lens):
    """The realistic configuration (bf16, Hq=64, Hkv=4, D=128, B=128, K=16): with
    deterministic=True two backward passes are bitwise equal (dq, dk, dv); without it
    they agree to float32 summation order (dk, dv: atomics). At 8K also against the
    reference. Hot blocks are cut into many segments here: ~16K x 16 / 128 = 2K entries per
    (group, block) on average, against 512 entries per segment."""
    gen = torch.Generator().manual_seed(77 + sum(lens))
    q, k, v, cu_q, cu_k = make(lens, lens, 64, 4, 128, torch.bfloat16, gen)
    qi = torch.randn(sum(lens), 4, 128, generator=gen).to(DEV, torch.bfloat16)
    ki = torch.randn(sum(lens), 1, 128, generator=gen).to(DEV, torch.bfloat16)
    idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton")
    dout = torch.randn(q.shape, generator=gen).to(DEV, q.dtype)
    det = [_det_grads(q, k, v, idx, cu_q, cu_k, 128, dout, True) for _ in range(2)]
    fast = [_det_grads(q, k, v, idx, cu_q, cu_k, 128, dout, False) for _ in range(2)]
    for i, name in enumerate(("dq", "dk", "dv")):
        assert torch.equal(det[0][i], det[1][i]), name
        assert rel(fast[0][i], det[0][i]) <= 1e-2, name
        assert rel(fast[1][i], fast[0][i]) <= 1e-2, name
    if sum(lens) <= 8192:
        want = _grads(q, k, v, idx, cu_q, cu_k, 128, "reference", dout)
        for name, a, b in zip(("dq", "dk", "dv"), det[0], want):
            assert rel(a, b) <= 2e-2, name


@pytest.mark.gpu
def test_gpu_msa_attention_deterministic_bitwise():
    """msa_attention(deterministic=True): the same out, loss and five gradients, bitwise,
    on a repeat (indexer order, sparse attention backward, KL dki)."""
    lens = [3000, 9000]
    gen = torch.Generator().manual_seed(78)
    q, k, v, cu_q, cu_k = make(lens, lens, 64, 4, 128, torch.bfloat16, gen)
    qi = torch.randn(sum(lens), 4, 128, generator=gen).to(DEV, torch.bfloat16)
    ki = torch.randn(sum(lens), 1, 128, generator=gen).to(DEV, torch.bfloat16)

    def step():
        xs = [x.clone().requires_grad_() for x in (q, k, v, qi, ki)]
        out, kl, idx = openmsa.msa_attention(*xs, cu_q, cu_k, deterministic=True)
        (out.float().square().mean() + kl).backward()
        return (out, kl, idx, *[x.grad for x in xs])

    for a, b in zip(step(), step()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- NaN / Inf

POISONS = ["q_nan", "k_nan", "v_nan", "v_inf", "k_posinf", "k_neginf", "k_neginf_v_nan"]
_TOKEN, _GROUP, _ROW, _HEAD = 20, 1, 18, 5  # poisoned key row (sequence 0) / query row, head


def _poison(kind, q, k, v):
    """A copy of (q, k, v) with one non-finite value: q[_ROW, _HEAD] (one row), or key row
    _TOKEN of group _GROUP (k, v). k_neginf: a score of -inf for every query (a -inf
    component where all queries are positive, zeros elsewhere), so the key weighs 0;
    k_neginf_v_nan: and a NaN v, which counts whatever the weight."""
    q, k, v = q.clone(), k.clone(), v.clone()
    if kind == "q_nan":
        q[_ROW, _HEAD, 3] = float("nan")
    elif kind == "k_nan":
        k[_TOKEN, _GROUP, 4] = float("nan")
    elif kind == "v_nan":
        v[_TOKEN, _GROUP, 4] = float("nan")
    elif kind == "v_inf":
        v[_TOKEN, _GROUP, 4] = float("inf")
    elif kind == "k_posinf":  # +inf or -inf scores, by the sign of q[..., 4]
        k[_TOKEN, _GROUP, 4] = float("inf")
    elif kind.startswith("k_neginf"):
        q[..., 0] = q[..., 0].abs() + 0.1
        k[_TOKEN, _GROUP] = 0.0
        k[_TOKEN, _GROUP, 0] = float("-inf")
        if kind == "k_neginf_v_nan":
            v[_TOKEN, _GROUP, 4] = float("nan")
    return q, k, v


def _reached(kind, idx, cu_q, cu_k, block, hq, hkv):
    """[total_q, Hq] bool: the rows the poisoned value can reach (the poisoned query row,
    or the rows whose token set holds key row _TOKEN); every other row must not change."""
    total_q = int(cu_q[-1])
    hit = torch.zeros(total_q, hq, dtype=torch.bool)
    if kind.startswith("q"):
        hit[_ROW, _HEAD] = True
        return hit
    g = hq // hkv
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        if not ck[b] <= _TOKEN < ck[b + 1]:
            continue
        j = _TOKEN - ck[b]
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        for i in range(lq):
            t = cq[b] + i
            if j <= lk - lq + i and (idx is None or j // block in idx[_GROUP, t].tolist()):
                hit[t, _GROUP * g:(_GROUP + 1) * g] = True
    return hit


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("kind", POISONS)
def test_non_finite_inputs_same_on_both_backends(kind, dense, launch):
    """One NaN/Inf in q, k or v (spec rule in api.sparse_attention): the Triton kernels and
    the reference give the same out/lse, non-finite entries at the same places (NaN out and
    lse for the rows it reaches; a -inf score weighs 0), the same values elsewhere, and
    every row the value cannot reach is bitwise what it was without it. The backward
    runs on both, and the other sequence's gradients stay finite and unchanged."""
    launch("dense_chunks", blocks=2)
    gen = torch.Generator().manual_seed(950)
    lens_q, lens_k, block, hq, hkv = [24, 12], [40, 12], 16, 8, 2
    q, k, v, cu_q, cu_k = make(lens_q, lens_k, hq, hkv, 32, torch.float32, gen)
    idx = None if dense else indices_for(lens_q, lens_k, hkv, block, 3, gen)
    pq, pk, pv = _poison(kind, q, k, v)
    clean_q = pq if kind.startswith("k_neginf") else q  # they also make q[..., 0] positive
    reach = _reached(kind, idx, cu_q, cu_k, block, hq, hkv).to(DEV)
    got = {}
    for backend in ("triton", "reference"):
        out, lse = openmsa.sparse_attention(pq, pk, pv, idx, cu_q, cu_k, block_size=block,
                                            backend=backend)
        c_out, c_lse = openmsa.sparse_attention(clean_q, k, v, idx, cu_q, cu_k, block_size=block,
                                                backend=backend)
        assert torch.equal(out[~reach], c_out[~reach]) and torch.equal(lse[~reach], c_lse[~reach])
        assert not lse.isposinf().any() and not out.isinf().any()
        got[backend] = (out, lse)
    (out, lse), (ref_out, ref_lse) = got["triton"], got["reference"]
    assert rel(out, ref_out) <= 1e-5 and rel(lse, ref_lse) <= 1e-5
    nan_rows = ref_lse.isnan()
    assert torch.equal(ref_out.isnan(), nan_rows[..., None].expand_as(ref_out))
    assert not (nan_rows & ~reach).any()
    if kind == "k_neginf":  # weight 0: no NaN, and the rows it reaches do change
        assert not nan_rows.any() and not torch.equal(lse, c_lse)
    else:
        assert nan_rows.any()
    dout = torch.randn(q.shape, generator=gen).to(DEV)
    for backend in ("triton", "reference"):
        grads = _grads(pq, pk, pv, idx, cu_q, cu_k, block, backend, dout)
        clean = _grads(clean_q, k, v, idx, cu_q, cu_k, block, backend, dout)
        for a, b, rows in zip(grads, clean, (slice(24, 36), slice(40, 52), slice(40, 52))):
            assert rel(a[rows], b[rows]) <= 1e-6, backend
