"""Paged MSA decode (openmsa.serving.decode) against the non-paged reference.

The pools hold the requests' pages in shuffled physical order; the reference gathers them
back into packed sequences and runs the PyTorch reference ops (indexer with
deterministic=True: the decode indexer writes the spec's deterministic order). On a CPU
the kernels run under Triton's interpreter (float32/float16; the interpreter's bfloat16
dot is wrong); with a GPU the `gpu` tests run the realistic configuration in bf16.

Selection: with random float index inputs the kernel and the reference sum the index dot
products in different orders, so a near-tie may flip: the Top-k must equal the reference's
except where the float64 block scores lie within the rounding bound of the K-th score
(helpers.assert_selection_matches), and out/lse are checked against the reference
attention on the kernel's OWN selection. Tests that need exact ties use dyadic index
inputs (multiples of 1/4: every dot product is exact in float32 in any order) and
torch.equal. out/lse relative error norms: float32 1e-5 (both sides float32 math),
float16/bfloat16 1e-2 (P rounded to the input dtype for the P V product, as in every
flash-style kernel).
"""

import pytest
import torch

import openmsa
from openmsa.serving.decode import MSADecodeWrapper
from helpers import (
    assert_selection_matches, block_scores64, make_paged, rel, replay_after_replan, rounding_bound,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def dyadic(shape, gen):
    """Multiples of 1/4 in [-2, 2]: dot products of these are exact in float32."""
    return torch.randint(-8, 9, tuple(shape), generator=gen).float() / 4


def gather(k_cache, v_cache, ki_cache, kv_lens, page_table, bs):
    """The requests' tokens packed (k, v, ki [total_k, 1, Di], cu_k); None for a None pool."""
    ks, vs, kis = [], [], []
    for b, n in enumerate(kv_lens.tolist()):
        pages = page_table[b, :-(-n // bs)].long()
        for out, pool in ((ks, k_cache), (vs, v_cache), (kis, ki_cache)):
            if pool is not None:
                out.append(pool[pages].flatten(0, 1)[:n])
    k, v, ki = (torch.cat(x) if x else None for x in (ks, vs, kis))
    cu_k = torch.cat([kv_lens.new_zeros(1), kv_lens.cumsum(0)]).to(torch.int32)
    return k, v, None if ki is None else ki[:, None], cu_k


def reference(q, qi, k_cache, v_cache, ki_cache, cu_q, kv_lens, page_table, bs, topk, idx=None):
    """(out, lse, the reference's Top-k); the attention runs on ``idx`` when given (the
    kernel's own selection), else on the reference's."""
    k, v, ki, cu_k = gather(k_cache, v_cache, ki_cache, kv_lens, page_table, bs)
    ref_idx, _ = openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=bs, topk=topk,
                                      deterministic=True, backend="reference")
    out, lse = openmsa.sparse_attention(q, k, v, ref_idx if idx is None else idx, cu_q, cu_k,
                                        block_size=bs, backend="reference")
    return out, lse, ref_idx


def assert_selection(idx, ref_idx, qi, ki_cache, cu_q, kv_lens, page_table, bs):
    """``idx`` selects (in order) like ``ref_idx`` up to near-ties within float32 rounding."""
    _, _, ki, cu_k = gather(None, None, ki_cache, kv_lens, page_table, bs)
    di = qi.shape[-1]
    scores, magnitude = block_scores64(qi, ki, cu_q, cu_k, bs, di ** -0.5)
    assert_selection_matches(idx, ref_idx, scores, rounding_bound(magnitude, di), ordered=True)


def check_run(out, lse, idx, q, qi, k_cache, v_cache, ki_cache, cu_q, kv_lens, page_table, bs, topk,
              tol, lse_tol=1e-5):
    """A run's results against the reference on the reference-side tensors given (e.g.
    dequantized pools): the selection up to near-ties, out/lse on the kernel's selection."""
    ref_out, ref_lse, ref_idx = reference(q, qi, k_cache, v_cache, ki_cache, cu_q, kv_lens, page_table,
                                          bs, topk, idx=idx)
    assert_selection(idx, ref_idx, qi, ki_cache, cu_q, kv_lens, page_table, bs)
    assert rel(out, ref_out) <= tol
    assert rel(lse, ref_lse) <= lse_tol


def check(kv_lens, qlens, hq=8, hkv=2, d=32, di=32, bs=16, topk=3, dtype=torch.float32, seed=0,
          tol=None, **plan_kw):
    gen = torch.Generator().manual_seed(seed)
    args = make_paged(kv_lens, qlens, hq, hkv, d, di, bs, dtype, gen)
    q, qi, k_cache, v_cache, ki_cache, cu_q, kv, page_table = args
    w = MSADecodeWrapper(hq, hkv, d, di, block_size=bs, topk=topk)
    w.plan(cu_q, kv, page_table, dtype=dtype, **plan_kw)
    out, lse, idx = w.run(q, qi, k_cache, v_cache, ki_cache, return_lse=True)
    check_run(out, lse, idx, *args, bs, topk, tol or (1e-5 if dtype == torch.float32 else 1e-2))
    return w


CASES = [
    # kv_lens, qlens, hq, hkv, topk, plan overrides
    ([70, 33, 16], [1, 2, 3], 8, 2, 3, {}),  # mixed lengths, a request of one page
    ([200, 5], [8, 1], 8, 2, 4, {}),  # 8 draft tokens; a request shorter than a page
    ([160], [16], 8, 2, 5, {}),  # 16 query tokens, exact page multiple
    ([100, 40, 64], [0, 4, 1], 8, 2, 3, {}),  # a request without queries this step
    ([48], [2], 4, 4, 8, {}),  # G = 1; K >= number of blocks
    ([64, 20], [1, 1], 12, 4, 16, {}),  # G = 3 (padded heads), K = 16 > blocks
    ([90, 31], [1, 2], 32, 2, 3, {}),  # G = 16
    ([300, 77, 16], [1, 3, 2], 8, 2, 5, dict(attention_splits=2, index_splits=1)),
    ([300, 77], [2, 1], 8, 2, 5, dict(attention_splits=5, index_splits=64)),  # two merge levels
    ([2000, 77], [1, 2], 8, 2, 5, dict(attention_splits=4, index_splits=37)),  # partial last group
    ([200], [1], 8, 2, 1, dict(attention_splits=1, index_splits=3)),  # K = 1: local block only
    ([2000, 77], [1, 2], 8, 2, 5, dict(index_splits=300)),  # > 256 splits, most of them empty
]


@pytest.mark.parametrize("kv_lens,qlens,hq,hkv,topk,plan_kw", CASES)
def test_decode_matches_reference(kv_lens, qlens, hq, hkv, topk, plan_kw):
    check(kv_lens, qlens, hq=hq, hkv=hkv, topk=topk, seed=sum(kv_lens), **plan_kw)


@pytest.mark.parametrize("pages", [1, 4])
def test_index_scan_pages_per_iteration(pages, launch):
    """The scan reads PAGES pages per step; a split's page count need not divide by it."""
    launch("decode_index", pages=pages)
    check([300, 77, 16], [1, 3, 2], topk=5, seed=9, index_splits=3, attention_splits=2)


def test_attention_merge_in_head_chunks():
    """16 splits of a group of 32 heads (d = 128): the merge runs in chunks of 2 heads."""
    check([700, 300], [1, 2], hq=64, hkv=2, d=128, di=32, topk=16, seed=3, attention_splits=16)


def test_decode_float16():
    check([130, 47], [2, 1], dtype=torch.float16, topk=4, seed=5, attention_splits=2)


def test_ties_go_to_the_smaller_block_id():
    """Pages with identical index keys give equal block scores: the selection (and its
    order) must follow the ids, like the reference. Dyadic index inputs, so that the ties
    are exact whatever order a dot product is summed in (identical key columns at
    different positions need not round alike otherwise)."""
    gen = torch.Generator().manual_seed(11)
    bs, topk, kv_lens = 16, 4, [160, 96]
    args = list(make_paged(kv_lens, [1, 2], 8, 2, 32, 32, bs, torch.float32, gen))
    args[1] = dyadic(args[1].shape, gen).to(DEV)  # qi
    args[4] = dyadic(args[4].shape, gen).to(DEV)  # ki_cache
    ki_cache, page_table = args[4], args[7]
    for b in range(2):  # every page of the request holds the same index keys
        first = page_table[b, 0].long()
        ki_cache[page_table[b, :-(-kv_lens[b] // bs)].long()] = ki_cache[first].clone()
    w = MSADecodeWrapper(8, 2, 32, 32, block_size=bs, topk=topk)
    w.plan(args[5], args[6], page_table, dtype=torch.float32, index_splits=3)
    _, idx = w.run(*args[:5])
    _, _, ref_idx = reference(*args, bs, topk)
    assert torch.equal(idx, ref_idx)
    # every row: ties to the smallest ids first (across the 3 splits), then the local block
    want = [[0, 1, 2, 9]] + [[0, 1, 2, 5]] * 2
    assert idx.tolist() == [want, want]


def test_replan_reuses_buffers_for_the_same_shapes():
    gen = torch.Generator().manual_seed(3)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([100, 60], [2, 1], 8, 2, 32, 32, 16, torch.float32, gen)
    w = MSADecodeWrapper(8, 2, 32, 32, block_size=16, topk=3)
    w.plan(cu_q, kv, pt, dtype=torch.float32)
    out1, _ = w.run(q, qi, kc, vc, kic)
    ptr = out1.data_ptr()
    kv2 = torch.tensor([90, 75], dtype=torch.int32, device=DEV)
    w.plan(cu_q, kv2, pt, dtype=torch.float32)
    out2, lse2, idx2 = w.run(q, qi, kc, vc, kic, return_lse=True)
    assert out2.data_ptr() == ptr
    check_run(out2, lse2, idx2, q, qi, kc, vc, kic, cu_q, kv2, pt, 16, 3, 1e-5)


@pytest.mark.parametrize("kw,err", [
    (dict(cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int64)), "cu_seqlens_q must be int32"),
    (dict(kv_lens=torch.tensor([0], dtype=torch.int32)), "kv_lens\\[0\\] = 0 is smaller"),
    (dict(cu_seqlens_q=torch.tensor([0, 17], dtype=torch.int32)), "max_q_per_request"),
    (dict(kv_lens=torch.tensor([1000], dtype=torch.int32)), "needs 63 pages"),
    (dict(page_table=torch.zeros(2, 4, dtype=torch.int32)), "page_table must have batch"),
    # 20 tokens use 2 pages: columns 0 and 1
    (dict(page_table=torch.tensor([[0, -1, 0, 0]], dtype=torch.int32)), "page_table\\[0, 1\\] = -1"),
    (dict(page_table=torch.tensor([[-2**31, 0, 0, 0]], dtype=torch.int32)), "page_table\\[0, 0\\] = -2147483648"),
    (dict(page_table=torch.tensor([[3, 4, 0, 0]], dtype=torch.int32), num_pages=4),
     "page_table\\[0, 1\\] = 4.*\\[0, 4\\)"),
    (dict(num_pages=0), "num_pages"),
])
def test_plan_rejects_bad_metadata(kw, err):
    w = MSADecodeWrapper(8, 2, 32, 32, block_size=16, topk=3)
    args = dict(cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32),
                kv_lens=torch.tensor([20], dtype=torch.int32),
                page_table=torch.zeros(1, 4, dtype=torch.int32))
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=err):
        w.plan(**args, dtype=torch.float32)


def test_page_ids_checked_against_the_pools():
    """Columns past a request's pages may hold anything; a used id >= num_pages is caught
    by plan(num_pages=...) or, without it, by run() (host-side, against its pools)."""
    gen = torch.Generator().manual_seed(6)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([70, 33], [1, 2], 8, 2, 32, 32, 16, torch.float32, gen)
    num_pages = kc.shape[0]
    w = MSADecodeWrapper(8, 2, 32, 32, block_size=16, topk=3)
    stale = pt.clone()
    stale[1, 3:] = -7  # request 1 (33 tokens) uses columns 0-2 only
    stale[0, 5] = num_pages + 100  # request 0 (70 tokens) uses columns 0-4
    w.plan(cu_q, kv, stale, dtype=torch.float32, num_pages=num_pages)
    out, lse, idx = w.run(q, qi, kc, vc, kic, return_lse=True)
    check_run(out, lse, idx, q, qi, kc, vc, kic, cu_q, kv, pt, 16, 3, 1e-5)
    bad = pt.clone()
    bad[1, 2] = num_pages
    with pytest.raises(ValueError, match=f"page_table\\[1, 2\\] = {num_pages}: request 1"):
        w.plan(cu_q, kv, bad, dtype=torch.float32, num_pages=num_pages)
    w.plan(cu_q, kv, bad, dtype=torch.float32)  # the pool size is not known yet
    with pytest.raises(ValueError, match=f"page_table\\[1, 2\\] = {num_pages}.*k_cache"):
        w.run(q, qi, kc, vc, kic)
    with pytest.raises(ValueError, match=f"page_table\\[1, 2\\] = {num_pages}.*ki_cache"):
        w.run_index(qi, kic)
    w.run(q, qi, *(torch.cat([x, x[:1]]) for x in (kc, vc, kic)))  # one page more: valid


@pytest.mark.parametrize("fp8", [False, True])
def test_bad_page_ids_behind_plans_back_are_memory_safe(fp8):
    """Page ids outside [0, num_pages) written into the planned page table after plan()
    (nothing checks them then): the run finishes and the kernels address nothing outside
    the pools. Documented result: the index scan reads the id clamped into [0, num_pages),
    the attention takes no K/V tokens from such a page; the other requests are unaffected.
    Dyadic index inputs make the expected 16-bit selection exact."""
    from openmsa.serving import quantize_fp8_per_token

    gen = torch.Generator().manual_seed(7)
    bs, topk, kv_lens = 16, 4, [200, 90, 150]
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged(kv_lens, [2, 1, 3], 8, 2, 32, 32, bs, torch.float32, gen)
    qi, kic = dyadic(qi.shape, gen).to(DEV), dyadic(kic.shape, gen).to(DEV)
    last = kc.shape[0] - 1  # where 2**31 - 1 is clamped to: made a spare page
    spare = sorted(set(range(last + 1)) - set(pt.flatten().tolist()))
    pt[pt == last] = spare[0]
    # request 0: its keys >= 0, its queries <= 0, the last page's keys <= 0: the block read
    # from the last page ranks first
    kic[pt[0, :13].long()] = kic[pt[0, :13].long()].abs()
    kic[last] = -kic[last].abs()
    qi[:2] = -qi[:2].abs()
    kic_in, ksc = quantize_fp8_per_token(kic) if fp8 else (kic, None)
    w = MSADecodeWrapper(8, 2, 32, 32, block_size=bs, topk=topk)
    w.plan(cu_q, kv, pt, dtype=torch.float32, index_splits=3, attention_splits=2)
    # request 0: a page its index scan reads (block 3); request 1: its local block 5
    w._plan["page_table"][0, 3] = 2**31 - 1
    w._plan["page_table"][1, 5] = -2**31
    out, lse, idx = w.run(q, qi, kc, vc, kic_in, ki_scale=ksc, return_lse=True)
    clamped = pt.clone()
    clamped[0, 3] = last
    kic_ref = kic_in.float() * ksc[..., None] if fp8 else kic
    ref_idx = reference(q, qi, kc, vc, kic_ref, cu_q, kv, clamped, bs, topk)[2]
    if fp8:  # the FP8 scan rounds otherwise than the reference: up to near-ties
        assert_selection(idx, ref_idx, qi, kic_ref, cu_q, kv, clamped, bs)
    else:
        assert torch.equal(idx, ref_idx)
    assert (idx[:, :2, 0] == 3).all(), "the block read from the last page ranks first"
    clean = MSADecodeWrapper(8, 2, 32, 32, block_size=bs, topk=topk)
    clean.plan(cu_q, kv, pt, dtype=torch.float32, index_splits=3, attention_splits=2)
    out_c, lse_c, idx_c = clean.run(q, qi, kc, vc, kic_in, ki_scale=ksc, return_lse=True)
    assert torch.equal(idx[:, 2:], idx_c[:, 2:])  # request 1's local block is not scanned
    assert torch.equal(out[3:], out_c[3:]) and torch.equal(lse[3:], lse_c[3:])  # request 2
    attn_idx = idx.clone()  # the blocks on bad pages give no tokens
    attn_idx[:, :2] = torch.where(attn_idx[:, :2] == 3, -1, attn_idx[:, :2])
    attn_idx[:, 2] = torch.where(attn_idx[:, 2] == 5, -1, attn_idx[:, 2])
    ref_out, ref_lse, _ = reference(q, qi, kc, vc, kic, cu_q, kv, pt, bs, topk, idx=attn_idx)
    assert rel(out, ref_out) <= 1e-5 and rel(lse, ref_lse) <= 1e-5


def test_run_rejects_bad_tensors():
    gen = torch.Generator().manual_seed(4)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([40], [1], 8, 2, 32, 32, 16, torch.float32, gen)
    w = MSADecodeWrapper(8, 2, 32, 32, block_size=16, topk=3)
    with pytest.raises(RuntimeError, match="plan"):
        w.run(q, qi, kc, vc, kic)
    w.plan(cu_q, kv, pt, dtype=torch.float32)
    with pytest.raises(ValueError, match="q must have shape"):
        w.run(q[:, :4], qi, kc, vc, kic)
    with pytest.raises(ValueError, match="ki_cache must have shape"):
        w.run(q, qi, kc, vc, kic[:, :8])
    with pytest.raises(TypeError, match="planned dtype"):
        w.run(q.half(), qi, kc, vc, kic)
    with pytest.raises(ValueError, match="num_heads"):
        MSADecodeWrapper(6, 4, 32, 32)
    with pytest.raises(ValueError, match="block_size"):
        MSADecodeWrapper(8, 2, 32, 32, block_size=100)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_lens,qlens", [([8192, 20000, 130], [1, 1, 1]), ([32768, 5000], [8, 16])])
def test_gpu_realistic_bf16(kv_lens, qlens):
    check(kv_lens, qlens, hq=64, hkv=4, d=128, di=128, bs=128, topk=16, dtype=torch.bfloat16, seed=1)


@pytest.mark.gpu
def test_gpu_fp8_decode_bf16_queries():
    """The FP8 paths compiled for the GPU: FP8 index keys with FP8 and with bf16 index
    queries, FP8 K/V pages. Two checks, so that a flipped near-tie in the selection does not
    hide (or fake) an attention error: the selection against the reference Top-k on the
    dequantized index keys and queries (up to near-ties within float32 rounding), and the
    attention against the reference over the dequantized K/V *with the kernel's own
    selection*."""
    from openmsa.serving import quantize_fp8_per_token
    from openmsa.serving.reference import paged_sparse_attention_reference

    gen = torch.Generator().manual_seed(5)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([20000, 9000], [1, 8], 64, 4, 128, 128, 128,
                                                  torch.bfloat16, gen)
    ki8, ksc = quantize_fp8_per_token(kic)
    k_scale, v_scale = float(kc.float().abs().amax()) / 448, float(vc.float().abs().amax()) / 448
    k8, v8 = (kc.float() / k_scale).to(FP8), (vc.float() / v_scale).to(FP8)
    w = MSADecodeWrapper(64, 4, 128, 128, block_size=128, topk=16)
    w.plan(cu_q, kv, pt)
    kd, vd = (k8.float() * k_scale).to(torch.bfloat16), (v8.float() * v_scale).to(torch.bfloat16)
    kid = ki8.float() * ksc[..., None]  # float32: the selection reference rounds nothing
    qi8, qsc = quantize_fp8_per_token(qi)
    for qi_in, qi_ref in ((qi, qi.float()), (qi8, qi8.float() * qsc[..., None])):
        out, lse, idx = w.run(q, qi_in, k8, v8, ki8, ki_scale=ksc, k_scale=k_scale, v_scale=v_scale,
                              return_lse=True)
        _, _, ref_idx = reference(q.float(), qi_ref, kd.float(), vd.float(), kid, cu_q, kv, pt, 128, 16)
        # only near-ties may flip (the kernel accumulates the FP8 dot products in its own order)
        assert_selection(idx, ref_idx, qi_ref, kid, cu_q, kv, pt, 128)
        ref_out, ref_lse = paged_sparse_attention_reference(q.float(), kd.float(), vd.float(), idx, pt, kv,
                                                            cu_q, block_size=128)
        assert rel(out, ref_out) <= 1e-2
        assert rel(lse, ref_lse) <= 1e-3


@pytest.mark.gpu
def test_gpu_run_replays_in_a_cuda_graph():
    """run() captured once; plan() with new lengths (same shapes) and new query values,
    then a replay gives the reference's results."""
    hq, hkv, d, bs, topk = 64, 4, 128, 128, 16
    gen = torch.Generator().manual_seed(2)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([5000, 9000], [1, 8], hq, hkv, d, d, bs,
                                                  torch.bfloat16, gen)
    w = MSADecodeWrapper(hq, hkv, d, d, block_size=bs, topk=topk)
    w.plan(cu_q, kv, pt)
    kv2 = torch.tensor([7000, 6500], dtype=torch.int32, device=DEV)
    out, lse, idx = replay_after_replan(w, q, qi, kc, vc, kic, cu_q, kv2, pt, gen)
    check_run(out, lse, idx, q, qi, kc, vc, kic, cu_q, kv2, pt, bs, topk, 1e-2)


def test_prefill_then_decode_steps_through_the_cache():
    """The serving loop of the README: append a prompt, chunked prefill, then decode steps
    (append one token per request, plan, run), each step against the paged reference."""
    from openmsa.serving import (
        MSAPrefillWrapper, PagedMSACache, paged_msa_reference, paged_sparse_attention_reference,
    )

    gen = torch.Generator().manual_seed(21)
    bs, hq, hkv, d, di, topk = 64, 8, 2, 32, 64, 3
    cache = PagedMSACache(16, bs, num_kv_heads=hkv, head_dim=d, index_head_dim=di,
                          dtype=torch.float32, device=DEV)
    page_table = torch.randperm(16, generator=gen)[:12].view(2, 6).to(torch.int32).to(DEV)

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(DEV)

    def step(wrapper, lens_before, qlens):
        cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        slots = cache.slot_mapping(page_table, torch.tensor(lens_before, dtype=torch.int32, device=DEV), cu)
        n = sum(qlens)
        cache.append(rnd(n, hkv, d), rnd(n, hkv, d), rnd(n, 1, di), slots)
        kv = torch.tensor([a + b for a, b in zip(lens_before, qlens)], dtype=torch.int32, device=DEV)
        q, qi = rnd(n, hq, d), rnd(n, hkv, di)
        wrapper.plan(cu, kv, page_table, dtype=torch.float32)
        out, lse, idx = wrapper.run(q, qi, cache.k_cache, cache.v_cache, cache.ki_cache, return_lse=True)
        _, _, ref_idx, _ = paged_msa_reference(q, qi, cache.k_cache, cache.v_cache, cache.ki_cache,
                                               page_table, kv, cu, topk=topk, deterministic=True)
        assert_selection(idx, ref_idx, qi, cache.ki_cache, cu, kv, page_table, bs)
        ref_out, ref_lse = paged_sparse_attention_reference(q, cache.k_cache, cache.v_cache, idx, page_table,
                                                            kv, cu)
        assert rel(out, ref_out) <= 1e-5 and rel(lse, ref_lse) <= 1e-5
        return kv.tolist()

    lens = step(MSAPrefillWrapper(hq, hkv, d, di, block_size=bs, topk=topk, deterministic=True),
                [0, 0], [150, 90])
    dec = MSADecodeWrapper(hq, hkv, d, di, block_size=bs, topk=topk)
    for qlens in ([1, 1], [2, 1], [1, 3]):
        lens = step(dec, lens, qlens)


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("qi_fp8", [False, True])
def test_fp8_index_keys_rank_the_dequantized_keys(qi_fp8):
    """FP8 index keys (per-token scales) and FP8 or float32 index queries: the selection is
    the reference's on the dequantized values, up to near-ties within float32 rounding
    (qi's own per-row scale cannot change a row's ranking; the kernel scales its dot
    products by the key's scale afterwards, the reference dots the dequantized keys)."""
    from openmsa.serving import quantize_fp8_per_token

    gen = torch.Generator().manual_seed(31)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([300, 77, 40], [1, 3, 2], 8, 2, 32, 32, 16,
                                                  torch.float32, gen)
    ki8, ksc = quantize_fp8_per_token(kic * 3.0)
    qi_in = qi
    qi_ref = qi
    if qi_fp8:
        qi_in, qsc = quantize_fp8_per_token(qi)
        qi_ref = qi_in.float() * qsc[..., None]
    w = MSADecodeWrapper(8, 2, 32, 32, block_size=16, topk=5)
    w.plan(cu_q, kv, pt, dtype=torch.float32, index_splits=3)
    out, lse, idx = w.run(q, qi_in, kc, vc, ki8, ki_scale=ksc, return_lse=True)
    ki_deq = ki8.float() * ksc[..., None]
    check_run(out, lse, idx, q, qi_ref, kc, vc, ki_deq, cu_q, kv, pt, 16, 5, 1e-5)


def test_fp8_kv_pages_match_the_dequantized_reference():
    gen = torch.Generator().manual_seed(32)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([200, 64], [2, 1], 8, 2, 32, 32, 16, torch.float32, gen)
    k_scale, v_scale = 0.02, 0.05
    k8, v8 = (kc / k_scale).to(FP8), (vc / v_scale).to(FP8)
    w = MSADecodeWrapper(8, 2, 32, 32, block_size=16, topk=4)
    w.plan(cu_q, kv, pt, dtype=torch.float32, attention_splits=2)
    out, lse, idx = w.run(q, qi, k8, v8, kic, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    check_run(out, lse, idx, q, qi, k8.float() * k_scale, v8.float() * v_scale, kic, cu_q, kv, pt, 16, 4,
              1e-5)


def test_fp8_against_the_unquantized_reference_within_tolerance():
    """The accuracy cost of FP8 (stated tolerances). E4M3 keeps 3 mantissa bits: relative
    rounding up to 2**-4, RMS ~2**-4 / sqrt(3) = 3.6% per element. (1) FP8 K/V pages (per-
    tensor scales) with exact selection: the output, a convex combination of V rows,
    within 5% (RMS relative error; 3.8-4.0% measured on 3 seeds). (2) FP8 index keys:
    block recall of the selection >= 0.95 against the unquantized keys (0.98-1.0
    measured; random keys, whose block scores lie closest together, are the hard case). A
    swapped block changes the output a lot on random data, so (2) is judged by recall."""
    from openmsa.serving import quantize_fp8_per_token

    gen = torch.Generator().manual_seed(33)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([800, 500], [2, 2], 8, 2, 32, 32, 16, torch.float32, gen)
    w = MSADecodeWrapper(8, 2, 32, 32, block_size=16, topk=8)
    w.plan(cu_q, kv, pt, dtype=torch.float32)
    k_scale = float(kc.abs().amax()) / 448
    v_scale = float(vc.abs().amax()) / 448
    out, idx = w.run(q, qi, (kc / k_scale).to(FP8), (vc / v_scale).to(FP8), kic,
                     k_scale=k_scale, v_scale=v_scale)
    # (1) the unquantized reference on the kernel's own selection (checked up to near-ties)
    ref_out, _, ref_idx = reference(q, qi, kc, vc, kic, cu_q, kv, pt, 16, 8, idx=idx)
    assert_selection(idx, ref_idx, qi, kic, cu_q, kv, pt, 16)
    assert rel(out, ref_out) <= 0.05
    ki8, ksc = quantize_fp8_per_token(kic)
    _, idx = w.run(q, qi, kc, vc, ki8, ki_scale=ksc)
    hits = sum(len(set(a.tolist()) & set(b.tolist()) - {-1})
               for a, b in zip(idx.flatten(0, 1), ref_idx.flatten(0, 1)))
    assert hits / int((ref_idx >= 0).sum()) >= 0.95


def test_fp8_argument_checks():
    gen = torch.Generator().manual_seed(34)
    q, qi, kc, vc, kic, cu_q, kv, pt = make_paged([40], [1], 8, 2, 32, 32, 16, torch.float32, gen)
    w = MSADecodeWrapper(8, 2, 32, 32, block_size=16, topk=3)
    w.plan(cu_q, kv, pt, dtype=torch.float32)
    with pytest.raises(ValueError, match="ki_scale must be a float32 tensor"):
        w.run(q, qi, kc, vc, kic.to(FP8))
    with pytest.raises(ValueError, match="ki_scale is only for an FP8"):
        w.run(q, qi, kc, vc, kic, ki_scale=torch.ones(kic.shape[:2]))
    with pytest.raises(ValueError, match="k_scale must be a positive float"):
        w.run(q, qi, kc.to(FP8), vc.to(FP8), kic)
    with pytest.raises(ValueError, match="only for FP8 k_cache"):
        w.run(q, qi, kc, vc, kic, k_scale=1.0, v_scale=1.0)
    with pytest.raises(TypeError, match="k_cache and v_cache must both"):
        w.run(q, qi, kc.to(FP8), vc, kic, k_scale=1.0, v_scale=1.0)
