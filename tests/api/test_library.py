"""The ops of openmsa.library (torch.ops.openmsa.*): ``torch.library.opcheck`` over every op
(schema and mutations, autograd registration, fake implementation against the real one,
AOT dispatch with dynamic shapes, gradients included), on both implementations where the
op has both (the kernels under Triton's interpreter on CPU), small float32 inputs; and
the value checks the reference does inside its op."""

import pytest
import torch
from torch.library import opcheck

import openmsa
from openmsa import library
from openmsa.serving.decode import MSADecodeWrapper
from openmsa.serving.prefill import MSAPrefillWrapper
from helpers import make_paged

OPS = torch.ops.openmsa
IMPLS = ("reference", "triton")


def cu(*values):
    return torch.tensor(values, dtype=torch.int32)


# Two sequences: Lq = (3, 5) queries, the last of Lk = (20, 25) keys (a partial block each).
CU_Q, CU_K = cu(0, 3, 8), cu(0, 20, 45)


def _indices(hkv, block_size, topk):
    qi, ki = torch.randn(8, hkv, 8), torch.randn(45, 1, 8)
    idx, _ = openmsa.indexer_topk(qi, ki, CU_Q, CU_K, block_size=block_size, topk=topk,
                                  backend="reference")
    return idx


def check(op, args, kwargs=None):
    results = opcheck(op, args, kwargs)
    assert set(results.values()) == {"SUCCESS"}, results


def test_every_op_is_checked():
    """Every op of the namespace has an opcheck below (guard against a new op without one)."""
    registered = {name for name in dir(OPS)
                  if isinstance(getattr(OPS, name, None), torch._ops.OpOverloadPacket)}
    assert registered == {"indexer_topk", "sparse_attention", "sparse_attention_backward",
                          "indexer_kl_loss", "indexer_kl_loss_backward", "append_paged_kv",
                          "decode_topk", "decode_attention", "prefill"}


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_indexer_topk(impl):
    # the kernel's smallest block is 64: keys of 2 and 1 + a partial block
    qi, ki = torch.randn(8, 2, 64), torch.randn(220, 1, 64)
    check(OPS.indexer_topk.default, (qi, ki, CU_Q, cu(0, 150, 220), 64, 2, 0.125, True), dict(impl=impl))
    # forced blocks; the fragment form (the second sequence's keys as two overlapping ranges)
    check(OPS.indexer_topk.default, (qi, ki, CU_Q, cu(0, 150, 220), 64, 4, 0.125, True),
          dict(init_blocks=1, local_blocks=2, impl=impl))
    check(OPS.indexer_topk.default, (qi, ki, CU_Q, None, 64, 2, 0.125, True),
          dict(kv_start=cu(150, 150), kv_len=cu(40, 70), impl=impl))
    check(OPS.indexer_topk.default, (qi, ki, CU_Q, cu(0, 150, 220), 64, 2, 0.125, True),
          dict(fp8=True, impl=impl))  # FP8 ranking


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dense", [False, True])
def test_opcheck_sparse_attention(impl, dense):
    q = torch.randn(8, 4, 16, requires_grad=True)
    k, v = (torch.randn(45, 2, 16, requires_grad=True) for _ in range(2))
    idx = None if dense else _indices(2, 16, 2)
    check(OPS.sparse_attention.default, (q, k, v, idx, CU_Q, CU_K, 16, 0.25, False), dict(impl=impl))
    out, lse = OPS.sparse_attention(q.detach(), k.detach(), v.detach(), idx, CU_Q, CU_K, 16, 0.25,
                                    False, impl=impl)
    check(OPS.sparse_attention_backward.default,
          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, idx, CU_Q, CU_K,
           16, 0.25, True), dict(impl=impl))
    # the fragment form: the second sequence's keys as the ranges of both query sequences
    frag = dict(kv_start=cu(20, 20), kv_len=cu(12, 25), impl=impl)
    check(OPS.sparse_attention.default, (q, k, v, idx, CU_Q, None, 16, 0.25, False), frag)
    out, lse = OPS.sparse_attention(q.detach(), k.detach(), v.detach(), idx, CU_Q, None, 16, 0.25,
                                    False, **frag)
    check(OPS.sparse_attention_backward.default,
          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, idx, CU_Q, None,
           16, 0.25, True), frag)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dense", [False, True])
def test_opcheck_indexer_kl_loss(impl, dense):
    q, k = torch.randn(8, 4, 32), torch.randn(45, 2, 32)
    qi = torch.randn(8, 2, 32, requires_grad=True)
    ki = torch.randn(45, 1, 32, requires_grad=True)
    idx = None if dense else _indices(2, 16, 2)
    lse = None if dense else OPS.sparse_attention(q, k, k, idx, CU_Q, CU_K, 16, 0.2, False,
                                                  impl="reference")[1]
    for with_grad in (True, False):
        check(OPS.indexer_kl_loss.default,
              (q, k, qi if with_grad else qi.detach(), ki if with_grad else ki.detach(), idx, CU_Q,
               CU_K, lse, None, 16, 0.2, 0.3, 1.5, True, with_grad), dict(impl=impl))
    check(OPS.indexer_kl_loss.default,  # the fragment form
          (q, k, qi, ki, idx, CU_Q, None, None, None, 16, 0.2, 0.3, 1.5, True, True),
          dict(kv_start=cu(20, 20), kv_len=cu(12, 25), impl=impl))


def test_opcheck_indexer_kl_loss_backward():
    check(OPS.indexer_kl_loss_backward.default,
          (torch.randn(()), torch.randn(8, 2, 4), torch.randn(45, 1, 4), torch.bfloat16, torch.float32))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_ki", [True, False])
def test_opcheck_append_paged_kv(impl, with_ki):
    pages, bs, hkv, d, di = 4, 8, 2, 4, 4
    k, v, ki = torch.randn(5, hkv, d), torch.randn(5, hkv, d), torch.randn(5, 1, di)
    slots = torch.tensor([3, 17, -1, 30, 8])
    pools = (torch.zeros(pages, bs, hkv, d), torch.zeros(pages, bs, hkv, d),
             torch.zeros(pages, bs, di) if with_ki else None)
    check(OPS.append_paged_kv.default,
          (k, v, ki if with_ki else None, *pools, slots), dict(impl=impl))


@pytest.mark.parametrize("plan_kw", [{}, dict(attention_splits=2, index_splits=20)])
def test_opcheck_decode(plan_kw):
    """The decode ops with the arguments the wrapper's plan() gives them (one split each,
    then split attention and two merge levels of the index scan)."""
    gen = torch.Generator().manual_seed(0)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([40, 21], [2, 1], 4, 2, 16, 16, 16,
                                                  torch.float32, gen, device="cpu")
    w = MSADecodeWrapper(4, 2, 16, 16, block_size=16, topk=2)
    w.plan(cu_q, kv, pt, dtype=torch.float32, **plan_kw)
    check(OPS.decode_topk.default, w._topk_op_args(qi, kic))
    idx = w._topk(qi, kic).clone()
    check(OPS.decode_attention.default, w._attention_op_args(q, kc, vc, idx))


def test_opcheck_prefill():
    gen = torch.Generator().manual_seed(0)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([70, 30], [3, 2], 4, 2, 16, 64, 64,
                                                  torch.float32, gen, device="cpu")
    w = MSAPrefillWrapper(4, 2, 16, 64, block_size=64, topk=2)
    w.plan(cu_q, kv, pt, dtype=torch.float32)
    check(OPS.prefill.default, w._op_args(q, qi, kc, vc, kic))


@pytest.mark.parametrize("bad", [(cu(0, 3, 9), CU_K), (CU_Q, cu(0, 30, 25)), (cu(0, 8, 8), cu(0, 5, 45))])
def test_reference_ops_check_cu_seqlens_values(bad):
    """The reference reads cu_seqlens inside its op (where torch.compile does not trace),
    and checks them there: bad values raise the ValueError of the public API."""
    cu_q, cu_k = bad
    q, k = torch.randn(8, 4, 16), torch.randn(45, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        OPS.sparse_attention(q, k, k, None, cu_q, cu_k, 16, 0.25, False, impl="reference")
    with pytest.raises(ValueError, match="cu_seqlens"):
        OPS.indexer_topk(q[:, :2], k[:, :1], cu_q, cu_k, 16, 2, 0.25, False, impl="reference")


def test_unknown_impl_raises():
    q, k = torch.randn(8, 4, 16), torch.randn(45, 2, 16)
    with pytest.raises(ValueError, match="impl"):
        OPS.sparse_attention(q, k, k, None, CU_Q, CU_K, 16, 0.25, False, impl="cuda")


def test_resolve():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert library.resolve("sparse_attention", "auto", cpu) == "reference"
    assert library.resolve("sparse_attention", "auto", cuda) == "triton"
    assert library.resolve("sparse_attention", "reference", cuda) == "reference"
    assert library.resolve("no_such_op", "auto", cuda) == "reference"
    with pytest.raises(NotImplementedError, match="Triton"):
        library.require_triton("no_such_op")
