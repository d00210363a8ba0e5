"""Paged chunked prefill (openmsa.serving.prefill) against the paged reference
(openmsa.serving.paged_msa_reference, itself checked against the non-paged reference ops
in test_serving_cache.py).

Pools hold the requests' pages at shuffled physical pages; each request's new chunk is its
last Lq positions on top of a cached prefix. On a CPU the kernels run under Triton's
interpreter (float32/float16); with a GPU the `gpu` test runs the realistic configuration
in bf16. Indices must be equal (deterministic order on both sides); out/lse relative error
norms: float32 1e-5, float16/bfloat16 1e-2 (P rounded for the P V product).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if __import__("torch").cuda.is_available() else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from openmsa.serving import paged_msa_reference  # noqa: E402
from openmsa.serving.prefill import MSAPrefillWrapper  # noqa: E402
from helpers import make_paged, rel, replay_after_replan  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"






def check(kv_lens, qlens, hq=8, hkv=2, d=32, di=64, bs=64, topk=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged(kv_lens, qlens, hq, hkv, d, di, bs, dtype, gen)
    w = MSAPrefillWrapper(hq, hkv, d, di, block_size=bs, topk=topk, deterministic=True)
    w.plan(cu_q, kv, pt, dtype=dtype)
    out, lse, idx = w.run(q, qi, kc, vc, kic, return_lse=True)
    ref_out, ref_lse, ref_idx, _ = paged_msa_reference(q, qi, kc, vc, kic, pt, kv, cu_q, topk=topk,
                                                       deterministic=True)
    assert torch.equal(idx, ref_idx)
    assert rel(out, ref_out) <= (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel(lse, ref_lse) <= 1e-5


# The Triton indexer supports blocks (pages) of 64 and 128 tokens and Di >= 64.
@pytest.mark.parametrize("kv_lens,qlens,hq,hkv,topk", [
    ([400, 256, 100], [70, 256, 1], 8, 2, 3),  # chunk on a prefix, whole prompt, one token
    ([280, 200], [0, 40], 8, 2, 4),  # a request without queries this step
    ([30, 330], [30, 2], 4, 4, 5),  # a request shorter than a page; G = 1
    ([384], [64], 32, 2, 16),  # G = 16; K >= number of blocks; exact page multiple
    ([300, 150], [45, 20], 12, 4, 2),  # G = 3 (padded heads)
])
def test_prefill_matches_reference(kv_lens, qlens, hq, hkv, topk):
    check(kv_lens, qlens, hq=hq, hkv=hkv, topk=topk, seed=sum(kv_lens))


def test_prefill_float16():
    check([320, 160], [50, 60], dtype=torch.float16, topk=4, seed=3)


def test_plan_and_run_errors():
    w = MSAPrefillWrapper(8, 2, 32, 64, block_size=64, topk=3)
    gen = torch.Generator().manual_seed(1)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([40], [10], 8, 2, 32, 64, 64, torch.float32, gen)
    with pytest.raises(RuntimeError, match="plan"):
        w.run(q, qi, kc, vc, kic)
    with pytest.raises(ValueError, match="kv_lens\\[0\\] = 5 is smaller"):
        w.plan(cu_q, torch.tensor([5], dtype=torch.int32, device=DEV), pt, dtype=torch.float32)
    w.plan(cu_q, kv, pt, dtype=torch.float32)
    with pytest.raises(ValueError, match="v_cache must have shape"):
        w.run(q, qi, kc, vc[:, :8], kic)
    with pytest.raises(ValueError, match="block_size"):
        MSAPrefillWrapper(8, 2, 32, 64, block_size=32)
    with pytest.raises(TypeError, match="deterministic"):
        MSAPrefillWrapper(8, 2, 32, 64, deterministic=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_chunked_prefill_bf16():
    """Chunks of 2K and 3K new tokens on 10K and 20K cached tokens, realistic shapes."""
    check([12000, 23000], [2048, 3000], hq=64, hkv=4, d=128, di=128, bs=128, topk=16,
          dtype=torch.bfloat16, seed=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_prefill_run_replays_in_a_cuda_graph():
    """run() captured once (its schedule scratch comes from the graph's pool); plan() with
    new lengths of the same shapes and new queries, then a replay gives the reference's
    results."""
    gen = torch.Generator().manual_seed(4)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([6000, 9000], [1000, 2000], 64, 4, 128, 128, 128,
                                            torch.bfloat16, gen)
    w = MSAPrefillWrapper(64, 4, 128, 128, deterministic=True)
    w.plan(cu_q, kv, pt)
    kv2 = torch.tensor([5000, 9100], dtype=torch.int32, device=DEV)
    out, lse, idx = replay_after_replan(w, q, qi, kc, vc, kic, cu_q, kv2, pt, gen)
    ref_out, ref_lse, ref_idx, _ = paged_msa_reference(q, qi, kc, vc, kic, pt, kv2, cu_q, topk=16,
                                                       deterministic=True)
    assert torch.equal(idx, ref_idx)
    assert rel(out, ref_out) <= 1e-2 and rel(lse, ref_lse) <= 1e-5
