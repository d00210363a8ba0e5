"""Backend dispatch: bfloat16 on the interpreter (backend="triton" with CPU tensors).

Triton's interpreter computes bfloat16 dots wrongly, so the dispatcher runs the float32
kernels on the exactly upcast inputs and casts ``out`` back. The result must match the
reference on the same bfloat16 inputs (bf16 output rounding: 1e-2; float32 KL: 1e-5).
"""

import pytest
import torch

import openmsa
from helpers import assert_selection_matches, block_scores64, rel, rounding_bound


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU tensors")
def test_bfloat16_on_the_interpreter_matches_the_reference():
    gen = torch.Generator().manual_seed(7)
    t, hq, hkv, d, bs = 260, 8, 2, 64, 64

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).requires_grad_()
    q, k, v = rnd(t, hq, d), rnd(t, hkv, d), rnd(t, hkv, d)
    qi, ki = rnd(t, hkv, d), rnd(t, 1, d)
    cu = torch.tensor([0, 60, t], dtype=torch.int32)
    do = torch.randn(t, hq, d, generator=gen).to(torch.bfloat16)
    res = {}
    for backend in ("reference", "triton"):
        out, kl, idx = openmsa.msa_attention(q, k, v, qi, ki, cu, cu, block_size=bs, topk=3,
                                             deterministic=True, backend=backend)
        grads = torch.autograd.grad((out * do).float().sum() + kl, (q, k, v, qi, ki))
        res[backend] = (out, kl, idx, grads)
    (out, kl, idx, grads), (r_out, r_kl, r_idx, r_grads) = res["triton"], res["reference"]
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    scores, mag = block_scores64(qi.detach(), ki.detach(), cu, cu, bs, d ** -0.5)
    assert_selection_matches(idx, r_idx, scores, rounding_bound(mag, d), ordered=True)
    if torch.equal(idx, r_idx):  # a near-tie flip changes what is attended to
        assert rel(out, r_out) <= 1e-2
        assert rel(kl, r_kl) <= 1e-5
        for g, r in zip(grads, r_grads):
            assert rel(g, r) <= 1e-2
