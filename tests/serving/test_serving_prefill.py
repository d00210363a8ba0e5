"""Paged chunked prefill (openmsa.serving.prefill) against the paged reference
(openmsa.serving.paged_msa_reference, itself checked against the non-paged reference ops
in test_serving_cache.py).

Pools hold the requests' pages at shuffled physical pages; each request's new chunk is its
last Lq positions on top of a cached prefix. On a CPU the kernels run under Triton's
interpreter (float32/float16); with a GPU the `gpu` test runs the realistic configuration
in bf16. Selection (deterministic order on both sides): with random float index inputs the
two sides sum the dot products in different orders, so the indices must equal the
reference's except where the float64 block scores lie within the rounding bound of the
K-th score (helpers.assert_selection_matches), and out/lse are checked against the
reference attention on the kernel's OWN selection. out/lse relative error norms: float32
1e-5, float16/bfloat16 1e-2 (P rounded for the P V product).
"""

import pytest
import torch

from openmsa.serving import (
    gather_paged, paged_indexer_topk_reference, paged_sparse_attention_reference,
)
from openmsa.serving.prefill import MSAPrefillWrapper
from helpers import (
    assert_selection_matches, block_scores64, make_paged, rel, replay_after_replan, rounding_bound,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def dyadic(shape, gen):
    """Multiples of 1/4 in [-2, 2]: dot products of these are exact in float32."""
    return torch.randint(-8, 9, tuple(shape), generator=gen).float() / 4


def check_run(out, lse, idx, q, qi, kc, vc, kic, cu_q, kv, pt, topk, tol, lse_tol=1e-5):
    """The selection against the paged reference's up to near-ties within float32 rounding
    (float64 scores of the gathered keys), out/lse against the paged reference attention on
    the kernel's own selection."""
    ref_idx, _ = paged_indexer_topk_reference(qi, kic, pt, kv, cu_q, topk=topk, deterministic=True)
    _, _, ki, cu_k = gather_paged(None, None, kic, pt, kv)
    di, bs = qi.shape[-1], kic.shape[1]
    scores, magnitude = block_scores64(qi, ki, cu_q, cu_k, bs, di ** -0.5)
    assert_selection_matches(idx, ref_idx, scores, rounding_bound(magnitude, di), ordered=True)
    ref_out, ref_lse = paged_sparse_attention_reference(q, kc, vc, idx, pt, kv, cu_q)
    assert rel(out, ref_out) <= tol
    assert rel(lse, ref_lse) <= lse_tol


def check(kv_lens, qlens, hq=8, hkv=2, d=32, di=64, bs=64, topk=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged(kv_lens, qlens, hq, hkv, d, di, bs, dtype, gen)
    w = MSAPrefillWrapper(hq, hkv, d, di, block_size=bs, topk=topk, deterministic=True)
    w.plan(cu_q, kv, pt, dtype=dtype)
    out, lse, idx = w.run(q, qi, kc, vc, kic, return_lse=True)
    check_run(out, lse, idx, q, qi, kc, vc, kic, cu_q, kv, pt, topk,
              1e-5 if dtype == torch.float32 else 1e-2)


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


def test_plan_checks_page_ids():
    """Every page id a request uses must be in [0, num_pages): plan() raises on a negative
    one and, given num_pages, on one past the pool; without it run() does (host-side).
    Columns past a request's pages may hold anything."""
    gen = torch.Generator().manual_seed(2)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([130, 40], [10, 5], 8, 2, 32, 64, 64, torch.float32, gen)
    num_pages = kc.shape[0]
    w = MSAPrefillWrapper(8, 2, 32, 64, block_size=64, topk=3, deterministic=True)
    for b, c, bad in ((0, 2, -1), (1, 0, -2**31)):  # request 0 uses 3 columns, request 1 one
        table = pt.clone()
        table[b, c] = bad
        with pytest.raises(ValueError, match=f"page_table\\[{b}, {c}\\] = {bad}: request {b}"):
            w.plan(cu_q, kv, table, dtype=torch.float32)
    table = pt.clone()
    table[0, 2] = num_pages
    with pytest.raises(ValueError, match=f"page_table\\[0, 2\\] = {num_pages}.*\\[0, {num_pages}\\)"):
        w.plan(cu_q, kv, table, dtype=torch.float32, num_pages=num_pages)
    w.plan(cu_q, kv, table, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"page_table\\[0, 2\\] = {num_pages}.*k_cache"):
        w.run(q, qi, kc, vc, kic)
    table = pt.clone()
    table[1, 1:] = -1
    table[0, 3] = 10**9
    w.plan(cu_q, kv, table, dtype=torch.float32, num_pages=num_pages)
    out, lse, idx = w.run(q, qi, kc, vc, kic, return_lse=True)
    check_run(out, lse, idx, q, qi, kc, vc, kic, cu_q, kv, pt, 3, 1e-5)


def test_bad_page_ids_behind_plans_back_are_memory_safe():
    """Page ids outside [0, num_pages) written into the planned page table after plan()
    (nothing checks them then): run() clamps the table into the pool first, so the run
    finishes; such a page reads another page of the pool (documented), and the other
    requests are unaffected. Dyadic index inputs make the selection exact."""
    gen = torch.Generator().manual_seed(5)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([200, 150, 300], [20, 5, 40], 8, 2, 32, 64, 64,
                                                  torch.float32, gen)
    qi, kic = dyadic(qi.shape, gen).to(DEV), dyadic(kic.shape, gen).to(DEV)
    w = MSAPrefillWrapper(8, 2, 32, 64, block_size=64, topk=3, deterministic=True)
    w.plan(cu_q, kv, pt, dtype=torch.float32)
    num_pages = kc.shape[0]
    w._plan["page_table"][0, 1] = 2**31 - 1  # request 0: a page its index scan reads
    w._plan["page_table"][1, 2] = -2**31  # request 1: its local page
    out, lse, idx = w.run(q, qi, kc, vc, kic, return_lse=True)
    clamped = pt.clone()
    clamped[0, 1], clamped[1, 2] = num_pages - 1, 0
    ref_idx, _ = paged_indexer_topk_reference(qi, kic, clamped, kv, cu_q, topk=3, deterministic=True)
    assert torch.equal(idx, ref_idx)
    ref_out, ref_lse = paged_sparse_attention_reference(q, kc, vc, idx, clamped, kv, cu_q)
    assert rel(out, ref_out) <= 1e-5 and rel(lse, ref_lse) <= 1e-5
    # request 2 (rows 25:65) as with the valid table
    good_idx, _ = paged_indexer_topk_reference(qi, kic, pt, kv, cu_q, topk=3, deterministic=True)
    assert torch.equal(idx[:, 25:], good_idx[:, 25:])
    good_out, good_lse = paged_sparse_attention_reference(q, kc, vc, good_idx, pt, kv, cu_q)
    assert rel(out[25:], good_out[25:]) <= 1e-5 and rel(lse[25:], good_lse[25:]) <= 1e-5


@pytest.mark.gpu
def test_gpu_chunked_prefill_bf16():
    """Chunks of 2K and 3K new tokens on 10K and 20K cached tokens, realistic shapes."""
    check([12000, 23000], [2048, 3000], hq=64, hkv=4, d=128, di=128, bs=128, topk=16,
          dtype=torch.bfloat16, seed=1)


@pytest.mark.gpu
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
    check_run(out, lse, idx, q, qi, kc, vc, kic, cu_q, kv2, pt, 16, 1e-2)
