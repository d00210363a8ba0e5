"""Triton sparse attention (KV-outer forward) against the PyTorch reference.

On a CPU the kernels run under Triton's interpreter (tiny shapes, float16/float32:
the interpreter's bfloat16 dot is wrong). With a GPU, the `gpu` tests run the
realistic configuration (bf16, Hq=64, Hkv=4, D=128, B=128, K=16, 8K-32K tokens).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if __import__("torch").cuda.is_available() else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import openmsa  # noqa: E402
from helpers import rel_finite as rel  # noqa: E402

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
def test_dense_attention_in_chunks_matches_reference(case, monkeypatch):
    """topk_indices=None (every visible token) on the Triton backend: the sparse kernels over
    chunks of blocks, merged like split-KV decoding; forward and backward against the
    reference. Chunks of 1-4 blocks here so that small shapes take several (the GPU runs 64)."""
    from openmsa.ops.attention import dense
    lens_q, lens_k, hq, hkv, block, chunk, dtype = DENSE_CASES[case]
    monkeypatch.setattr(dense, "DENSE_CHUNK_BLOCKS", chunk)
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
    from openmsa.ops.attention.dense import dense_chunk_indices
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
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
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
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
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


@pytest.mark.parametrize("split,launch", [("0", "interleaved"), ("1", "interleaved"),
                                          ("1", "separate")])
def test_backward_split_and_fused_launches(split, launch, monkeypatch):
    """The fused backward (dQ, dK, dV in one pass) and the split one (dK/dV on half-block
    slices and dQ, as three interleaved roles of one grid or as two launches) give the
    reference's gradients."""
    monkeypatch.setenv("OPENMSA_BWD_SPLIT", split)
    monkeypatch.setenv("OPENMSA_BWD_LAUNCH", launch)
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
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
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
