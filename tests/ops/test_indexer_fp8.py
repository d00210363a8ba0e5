"""The FP8 Index Branch (``index_dtype=torch.float8_e4m3fn``) against the PyTorch reference.

The reference ranks the dequantized E4M3 values (``ops/utils/fp8.py``: one scale per
query row and per key token) in float32 and takes index_lse over the unquantized inputs;
the kernel ranks with an FP8 MMA and the key scales. Two kinds of inputs:

* lossless: every row's largest |value| is 7 and the others are multiples of 1/4 in
  [-4, 4], so the scale is 2**-6, the E4M3 values are exact (16 j, |j| <= 16, and 448) and
  every dot product is exact in float32 whatever the summation order: the selection must
  equal the reference's exactly, and equal the 16-bit path's on the same inputs;
* random normal values: the quantization rounds, so kernel and reference may differ only
  between blocks within the rounding bound of the K-th score (float64 scores of the
  dequantized values, ``helpers.assert_selection_matches``): the float32 bound under the
  interpreter, the FP8 MMA's (about 14 bits of accumulation) on a GPU.
"""

import pytest
import torch

import openmsa
from helpers import FP32_UNIT_ROUNDOFF, FP8_MMA_UNIT_ROUNDOFF, assert_selection_matches, block_scores64
from helpers import fp8_lossless as lossless
from helpers import gen_for, make_cu, rounding_bound
from helpers import rel_finite as rel
from openmsa.ops.utils.fp8 import dequantize_fp8, quantize_fp8_per_token

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
TOL = 1e-5


def dequantized(x):
    return dequantize_fp8(*quantize_fp8_per_token(x))


def fp8_bound(magnitude, di, device):
    """How far the kernel's and the reference's block scores of the same FP8 values may lie
    apart: float32 rounding under the interpreter, the FP8 MMA's accumulation on a GPU."""
    u = FP8_MMA_UNIT_ROUNDOFF if torch.device(device).type == "cuda" else FP32_UNIT_ROUNDOFF
    return rounding_bound(magnitude, di, unit_roundoff=u)


def fp8_reference_lse_check(qi, ki, cu_q, cu_k, idx, lse, block_size, scale=None):
    """index_lse of the FP8 path is the unquantized inputs' LSE over the selection."""
    k = ki.expand(-1, qi.shape[1], -1)
    _, ref = openmsa.sparse_attention(qi, k, k, idx, cu_q, cu_k, block_size=block_size,
                                      softmax_scale=scale, backend="reference")
    assert rel(lse, ref.t()) <= TOL


@pytest.mark.parametrize("pack,block_size,di,hkv,topk,dtype", [
    ([(70, 200), (64, 64), (0, 50), (128, 128), (1, 129), (0, 0), (40, 256)], 64, 64, 2, 3, torch.float32),
    ([(60, 300), (20, 20), (130, 256), (2, 385)], 128, 128, 1, 2, torch.bfloat16),
    ([(200, 520)], 64, 64, 4, 5, torch.float16),
])
def test_lossless_inputs_select_exactly(pack, block_size, di, hkv, topk, dtype):
    gen = gen_for("fp8-lossless", block_size, di, hkv)
    cu_q, cu_k = make_cu(pack)
    qi = lossless((int(cu_q[-1]), hkv, di), gen).to(DEV, dtype)
    ki = lossless((int(cu_k[-1]), 1, di), gen).to(DEV, dtype)
    ki[block_size:2 * block_size] = ki[:block_size]  # tied blocks 0 and 1
    assert torch.equal(dequantized(qi), qi.float()) and torch.equal(dequantized(ki), ki.float())
    kw = dict(block_size=block_size, topk=topk)
    plain_idx, plain_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", **kw)
    kw["index_dtype"] = FP8
    ref_idx, ref_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", **kw)
    assert torch.equal(ref_idx, plain_idx) and rel(ref_lse, plain_lse) <= TOL
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton", deterministic=True, **kw)
    assert torch.equal(idx, ref_idx), f"{(idx != ref_idx).any(-1).sum().item()} rows differ"
    assert rel(lse, ref_lse) <= TOL


@pytest.mark.parametrize("mode", ["kv_outer", "union"])
def test_random_inputs_select_like_the_dequantized_reference(mode, launch):
    """Both places index_lse is computed (after the Top-k, or inside the kernel from the
    unquantized copies) give the unquantized inputs' LSE over the FP8 selection."""
    launch("indexer", lse_mode=mode)
    gen = gen_for("fp8-random")
    pack = [(300, 700), (0, 90), (129, 129), (64, 400)]
    cu_q, cu_k = make_cu(pack)
    hkv, di, b = 2, 64, 64
    qi = torch.randn(int(cu_q[-1]), hkv, di, generator=gen).to(DEV)
    ki = (torch.randn(int(cu_k[-1]), 1, di, generator=gen)
          * torch.rand(int(cu_k[-1]), 1, 1, generator=gen) * 4).to(DEV)  # keys of varied norm
    kw = dict(block_size=b, topk=4, index_dtype=FP8)
    ref_idx, ref_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", **kw)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton", deterministic=True, **kw)
    scores, magnitude = block_scores64(dequantized(qi), dequantized(ki), cu_q, cu_k, b, di ** -0.5)
    assert_selection_matches(idx, ref_idx, scores, fp8_bound(magnitude, di, qi.device), ordered=True)
    fp8_reference_lse_check(qi, ki, cu_q, cu_k, idx, lse, b)
    # the ranking is the dequantized values' one, not the unquantized inputs': rows differ
    plain_idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", block_size=b, topk=4)
    assert bool((plain_idx != ref_idx).any())


def test_forced_blocks_and_fragments():
    """init/local forced blocks and the fragment form (kv_start/kv_len) with FP8."""
    gen = gen_for("fp8-forced")
    cu_q = torch.tensor([0, 90, 150], dtype=torch.int32)
    kv_start = torch.tensor([0, 0], dtype=torch.int32)  # two query fragments of one sequence
    kv_len = torch.tensor([300, 500], dtype=torch.int32)
    qi = lossless((150, 2, 64), gen).to(DEV)
    ki = lossless((500, 1, 64), gen).to(DEV)
    kw = dict(block_size=64, topk=5, init_blocks=1, local_blocks=2, index_dtype=FP8,
              kv_start=kv_start.to(DEV), kv_len=kv_len.to(DEV))
    ref_idx, ref_lse = openmsa.indexer_topk(qi, ki, cu_q.to(DEV), None, backend="reference", **kw)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q.to(DEV), None, backend="triton", deterministic=True, **kw)
    assert torch.equal(idx, ref_idx)
    assert rel(lse, ref_lse) <= TOL


def test_non_finite_inputs():
    """A vector with a NaN or infinite entry quantizes to a zero payload and a NaN scale:
    its scores are NaN, ranked as the reference ranks them (NaN below every number)."""
    gen = gen_for("fp8-nonfinite")
    cu_q, cu_k = make_cu([(150, 400)])
    qi = lossless((150, 2, 64), gen).to(DEV)
    ki = lossless((400, 1, 64), gen).to(DEV)
    qi[10:20, 1] = float("nan")
    ki[70, 0, 3] = float("nan")  # block 1 NaN for every row
    ki[200, 0, 0] = float("inf")  # block 3 NaN for every row
    kw = dict(block_size=64, topk=3, index_dtype=FP8)
    ref_idx, ref_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", **kw)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton", deterministic=True, **kw)
    assert torch.equal(idx, ref_idx)
    # index_lse of the unquantized inputs: rows over the infinite key are inf in the
    # reference, NaN in the kernels' online logsumexp; non-finite in both
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    ok = torch.isfinite(ref_lse)
    assert bool((~ok).any()) and rel(lse[ok], ref_lse[ok]) <= TOL


def test_msa_attention_with_an_fp8_index():
    """msa_attention(index_dtype=fp8): the kernels' output, KL and gradients against the
    reference backend's (the selection of lossless index inputs is exact)."""
    gen = gen_for("fp8-msa")
    cu_q, cu_k = make_cu([(130, 130), (70, 200)])
    tq, tk, hq, hkv, d = int(cu_q[-1]), int(cu_k[-1]), 4, 2, 64
    q, k, v = (torch.randn(n, h, d, generator=gen).to(DEV).requires_grad_()
               for n, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    qi = lossless((tq, hkv, 64), gen).to(DEV).requires_grad_()
    ki = lossless((tk, 1, 64), gen).to(DEV).requires_grad_()
    res = {}
    for backend in ("reference", "triton"):
        out, kl, idx = openmsa.msa_attention(q, k, v, qi, ki, cu_q, cu_k, block_size=64, topk=3,
                                             backend=backend, index_dtype=FP8, deterministic=True)
        grads = torch.autograd.grad(out.square().sum() + kl, (q, k, v, qi, ki))
        res[backend] = (out, kl, idx, grads)
    (o0, kl0, i0, g0), (o1, kl1, i1, g1) = res["reference"], res["triton"]
    assert torch.equal(i0, i1)
    assert rel(o1, o0) <= TOL and rel(kl1, kl0) <= TOL
    for a, b in zip(g1, g0):
        assert rel(a, b) <= 1e-4


@pytest.mark.parametrize("finite_payload", [False, True])
def test_quantization_in_chunks_equals_one_pass(finite_payload, monkeypatch):
    """The chunked quantization (bounded temporaries) gives the bits of one pass over all
    vectors, non-finite ones included; the non-finite rule of each mode holds."""
    from openmsa.ops.utils import fp8
    x = torch.randn(300, 3, 64, generator=gen_for("fp8-chunks")).to(DEV, torch.bfloat16)
    x[5, 1, 3] = float("nan")
    x[7, 0, 0] = float("inf")
    x[9, 2] = 0.0
    whole, s_whole = fp8.quantize_fp8_per_token(x, finite_payload=finite_payload)
    monkeypatch.setattr(fp8, "CHUNK_VECTORS", 7)
    part, s_part = fp8.quantize_fp8_per_token(x, finite_payload=finite_payload)
    assert torch.equal(whole.view(torch.uint8), part.view(torch.uint8))
    assert torch.equal(s_whole.isnan(), s_part.isnan())
    assert torch.equal(s_whole.nan_to_num(), s_part.nan_to_num())
    assert s_whole[9, 2] == 1.0 and bool((whole[9, 2].float() == 0).all())  # a zero vector
    if finite_payload:
        assert bool(s_whole[5, 1].isnan()) and bool(s_whole[7, 0].isnan())
        assert bool((whole[5, 1].float() == 0).all()) and bool((whole[7, 0].float() == 0).all())
        assert bool(torch.isfinite(whole.float()).all())
    else:
        assert bool(whole[5, 1, 3].float().isnan()) and bool(s_whole[7, 0].isinf())
    ok = torch.isfinite(s_whole)
    assert rel(dequantize_fp8(whole, s_whole)[ok], x.float()[ok]) <= 2 ** -4  # E4M3: 3 mantissa bits


def test_index_dtype_checked():
    qi = torch.zeros(4, 1, 64, device=DEV)
    ki = torch.zeros(4, 1, 64, device=DEV)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEV)
    for bad in (torch.bfloat16, "fp8", torch.float8_e5m2):
        with pytest.raises(ValueError, match="index_dtype"):
            openmsa.indexer_topk(qi, ki, cu, cu, block_size=64, index_dtype=bad)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("pack", [
    [(8192, 8192)],
    [(3000, 3000), (0, 500), (1000, 9000), (77, 77), (4096, 4096), (2500, 16000)],
])
def test_gpu_realistic_bf16(pack):
    """bf16, Hkv=4, Di=128, B=128, K=16: lossless inputs exactly; random ones up to ties
    within the rounding bound of the dequantized values' scores, for the FP8 MMA's
    accumulation precision (``helpers.FP8_MMA_UNIT_ROUNDOFF``)."""
    hkv, di, b, k = 4, 128, 128, 16
    gen = gen_for("fp8-gpu", len(pack))
    cu_q, cu_k = make_cu(pack)
    kw = dict(block_size=b, topk=k, index_dtype=FP8, deterministic=True)
    qi = lossless((int(cu_q[-1]), hkv, di), gen).to(DEV, torch.bfloat16)
    ki = lossless((int(cu_k[-1]), 1, di), gen).to(DEV, torch.bfloat16)
    ref_idx, ref_lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", **kw)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton", **kw)
    assert torch.equal(idx, ref_idx)
    assert rel(lse, ref_lse) <= TOL
    qi = torch.randn(int(cu_q[-1]), hkv, di, generator=gen).to(DEV, torch.bfloat16)
    ki = torch.randn(int(cu_k[-1]), 1, di, generator=gen).to(DEV, torch.bfloat16)
    ref_idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="reference", **kw)
    idx, lse = openmsa.indexer_topk(qi, ki, cu_q, cu_k, backend="triton", **kw)
    scores, magnitude = block_scores64(dequantized(qi), dequantized(ki), cu_q, cu_k, b, di ** -0.5)
    assert_selection_matches(idx, ref_idx, scores, fp8_bound(magnitude, di, qi.device), ordered=True)
    fp8_reference_lse_check(qi, ki, cu_q, cu_k, idx, lse, b)
