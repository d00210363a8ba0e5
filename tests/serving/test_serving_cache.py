"""Paged KV + index-key cache (docs/spec.md section 8): slot mapping, the append op (Triton under
the interpreter on CPU, and its reference), gather_paged, and the paged references
against the non-paged reference ops on the same data.

Expectations are built by hand, token by token, from the documented layout (physical page
page_table[b, j // B], row j % B), never from the code under test. Pools start filled
with random garbage and physical pages are shuffled, so a wrong page, row or length
shows up as a mismatch.
"""

import re


import pytest
import torch

import openmsa
from helpers import rel_finite as rel
from openmsa.serving import (
    PagedMSACache, append_paged_kv, gather_paged, paged_indexer_topk_reference,
    paged_msa_reference, paged_sparse_attention_reference, slot_mapping,
)

I32 = torch.int32


def i32(x):
    return torch.tensor(x, dtype=I32)


def cumsum0(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return i32(out)


def shuffled_page_table(lens, page_size, gen, extra_cols=2, spare_pages=3, fill=-1):
    """Each request gets ceil(len / B) distinct physical pages drawn from a random
    permutation (so logical and physical order never agree); the table is wider than
    needed and padded with ``fill``. Returns (page_table, num_pages)."""
    need = [(n + page_size - 1) // page_size for n in lens]
    num_pages = sum(need) + spare_pages
    perm = torch.randperm(num_pages, generator=gen).tolist()
    width = max(need + [0]) + extra_cols
    table = torch.full((len(lens), width), fill, dtype=I32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(perm[used:used + n], dtype=I32)
        used += n
    return table, num_pages


def expected_slots(page_table, starts, news, page_size):
    """Hand-built slot list: token i of request b sits at position starts[b] + i."""
    out = []
    for b, (s, n) in enumerate(zip(starts, news)):
        for i in range(n):
            p = s + i
            out.append(int(page_table[b, p // page_size]) * page_size + p % page_size)
    return out


def place(pool, rows, page_table, lens, page_size):
    """Hand-placed copy of packed per-request rows into a pool (token by token)."""
    pool = pool.clone()
    t = 0
    for b, n in enumerate(lens):
        for j in range(n):
            pool[int(page_table[b, j // page_size]), j % page_size] = rows[t]
            t += 1
    return pool


# --------------------------------------------------------------------------- slot mapping

def test_slot_mapping_matches_hand_built():
    gen = torch.Generator().manual_seed(1)
    B = 8
    starts = [0, 5, 16, 7, 3, 30]  # empty prefix, mid-page, page boundary, crosses pages
    news = [3, 11, 1, 0, 5, 2]  # includes a request with no new token
    table, num_pages = shuffled_page_table([s + n for s, n in zip(starts, news)], B, gen)
    got = slot_mapping(table, i32(starts), cumsum0(news), page_size=B, num_pages=num_pages)
    assert got.dtype == torch.int64 and got.shape == (sum(news),)
    assert got.tolist() == expected_slots(table, starts, news, B)
    # num_new_tokens given on the host gives the same answer (and the cache's method too)
    cache = PagedMSACache(num_pages, B, 1, 4, 4, dtype=torch.float32)
    got2 = cache.slot_mapping(table, i32(starts), cumsum0(news), num_new_tokens=sum(news))
    assert torch.equal(got, got2)


def test_slot_mapping_empty_and_zero_width():
    table = torch.zeros((2, 0), dtype=I32)
    got = slot_mapping(table, i32([0, 0]), i32([0, 0, 0]), page_size=4)
    assert got.shape == (0,) and got.dtype == torch.int64
    got = slot_mapping(torch.zeros((0, 3), dtype=I32), i32([]), i32([0]), page_size=4)
    assert got.shape == (0,)


@pytest.mark.parametrize("case", [
    # (page_table, start_lens, cu_seqlens_new, kwargs, error, words in the message)
    ([[0, 1]], [6], [0, 3], {}, ValueError, "page_table"),  # position 8 -> logical page 2
    ([[0, -1]], [3], [0, 2], {}, ValueError, "page_table[0, 1] = -1"),
    ([[0, 9]], [3], [0, 2], {"num_pages": 4}, ValueError, "page_table[0, 1] = 9"),
    ([[0, 1]], [-1], [0, 1], {}, ValueError, "start_lens"),
    ([[0, 1]], [0], [1, 2], {}, ValueError, "cu_seqlens_new must start at 0"),
    ([[0], [1]], [0, 0], [0, 2, 1], {}, ValueError, "non-decreasing"),
    ([[0, 1]], [0, 0], [0, 1], {}, ValueError, "start_lens"),  # batch mismatch
    ([[0, 1]], [0], [0, 1, 1], {}, ValueError, "cu_seqlens_new"),  # batch mismatch
    ([[0, 1]], [0], [0, 2], {"num_new_tokens": 3}, ValueError, "num_new_tokens"),
    ([[0, 1]], [0], [0, 2], {"page_size": 0}, ValueError, "page_size"),
])
def test_slot_mapping_errors(case):
    table, starts, cu, kw, exc, words = case
    with pytest.raises(exc, match=re.escape(words)):
        slot_mapping(i32(table), i32(starts), i32(cu), **{"page_size": 4, **kw})


def test_slot_mapping_dtype_errors():
    with pytest.raises(TypeError, match="page_table"):
        slot_mapping(torch.zeros((1, 2), dtype=torch.int64), i32([0]), i32([0, 1]), page_size=4)
    with pytest.raises(TypeError, match="start_lens"):
        slot_mapping(i32([[0, 1]]), torch.tensor([0.0]), i32([0, 1]), page_size=4)
    with pytest.raises(TypeError, match="cu_seqlens_new"):
        slot_mapping(i32([[0, 1]]), i32([0]), torch.tensor([0, 1]), page_size=4)
    with pytest.raises(ValueError, match="page_table"):
        slot_mapping(i32([0, 1]), i32([0]), i32([0, 1]), page_size=4)


def test_slot_mapping_unchecked_marks_unresolvable_tokens():
    """check=False (the CUDA default) never raises on values: tokens past the table's
    width or on a negative / too-large physical page get slot -1 (skipped by the append)."""
    table = i32([[2, -1], [1, 7]])
    got = slot_mapping(table, i32([3, 2]), i32([0, 3, 6]), page_size=4, num_pages=4, check=False)
    # request 0: positions 3 (page 2 row 3 -> 11), 4, 5 (logical page 1 = -1 -> -1)
    # request 1: positions 2, 3 (page 1 -> 6, 7), 4 (page 7 >= num_pages -> -1), 5 (-1)
    assert got.tolist() == [11, -1, -1, 6, 7, -1]
    got = slot_mapping(i32([[2]]), i32([0]), i32([0, 6]), page_size=4, check=False)
    assert got.tolist() == [8, 9, 10, 11, -1, -1]  # logical page 1 is past the width


# --------------------------------------------------------------------------- append

def _garbage_pools(num_pages, B, hkv, d, di, dtype, gen):
    def rnd(*s):
        return torch.randn(*s, generator=gen).to(dtype)
    return rnd(num_pages, B, hkv, d), rnd(num_pages, B, hkv, d), rnd(num_pages, B, di)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ki_rank", [3, 2])
def test_append_matches_hand_built(backend, dtype, ki_rank):
    gen = torch.Generator().manual_seed(2)
    B, hkv, d, di = 8, 3, 8, 12  # Hkv*D = 24 and Di = 12: not powers of two (masking)
    starts = [0, 13, 8, 5, 0]
    news = [21, 1, 16, 0, 3]  # long prefill over 3 pages, decode, exact pages, empty, short
    table, num_pages = shuffled_page_table([s + n for s, n in zip(starts, news)], B, gen)
    kc, vc, kic = _garbage_pools(num_pages, B, hkv, d, di, dtype, gen)
    n = sum(news)
    k = torch.randn(n, hkv, d, generator=gen).to(dtype)
    v = torch.randn(n, hkv, d, generator=gen).to(dtype)
    ki = torch.randn(n, di, generator=gen).to(dtype)
    slots = slot_mapping(table, i32(starts), cumsum0(news), page_size=B)
    skipped = [2, 17, n - 1]  # padding tokens: their rows must keep the old contents
    slots[skipped] = -1
    exp_k, exp_v, exp_ki = kc.clone(), vc.clone(), kic.clone()
    for t, s in enumerate(expected_slots(table, starts, news, B)):
        if t in skipped:
            continue
        exp_k[s // B, s % B], exp_v[s // B, s % B], exp_ki[s // B, s % B] = k[t], v[t], ki[t]
    inputs = [x.clone() for x in (k, v, ki)]
    ki_arg = ki.unsqueeze(1) if ki_rank == 3 else ki
    append_paged_kv(k, v, ki_arg, kc, vc, kic, slots, backend=backend)
    assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v) and torch.equal(kic, exp_ki)
    for x, y in zip(inputs, (k, v, ki)):
        assert torch.equal(x, y), "an input was modified"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_append_strided_views_and_int32_slots(backend):
    """Pools as views of one FlashInfer-style [P, 2, B, Hkv, D] tensor, k/v sliced out of a
    fused projection (non-contiguous), int32 slots: strides must be honoured."""
    gen = torch.Generator().manual_seed(3)
    P, B, hkv, d, di, n = 5, 4, 2, 8, 8, 7
    kv = torch.randn(P, 2, B, hkv, d, generator=gen)
    kv0 = kv.clone()
    kc, vc = kv[:, 0], kv[:, 1]
    kic_base = torch.randn(P, B, 2 * di, generator=gen)
    kic = kic_base[:, :, :di]  # last dim strided view
    fused = torch.randn(n, 3 * hkv, d, generator=gen)
    k, v = fused[:, :hkv], fused[:, hkv:2 * hkv]
    ki = torch.randn(n, 1, 2 * di, generator=gen)[:, :, ::2]  # stride 2 in the last dim
    slots = torch.tensor([19, 0, 7, -5, 12, 3, 9], dtype=I32)
    exp_kv, exp_kic = kv0.clone(), kic_base.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            exp_kv[s // B, 0, s % B] = k[t]
            exp_kv[s // B, 1, s % B] = v[t]
            exp_kic[s // B, s % B, :di] = ki[t, 0]
    append_paged_kv(k, v, ki, kc, vc, kic, slots, backend=backend)
    assert torch.equal(kv, exp_kv) and torch.equal(kic_base, exp_kic)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_append_wide_rows(backend):
    """Hkv * D = 1280 > 1024 splits a token's row over two programs (only the first copies
    ki), and Di = 320 takes two passes of the index-key loop."""
    gen = torch.Generator().manual_seed(12)
    P, B, hkv, d, di = 3, 2, 5, 256, 320
    kc, vc, kic = _garbage_pools(P, B, hkv, d, di, torch.float16, gen)
    k, v = (torch.randn(3, hkv, d, generator=gen).half() for _ in range(2))
    ki = torch.randn(3, 1, di, generator=gen).half()
    exp = [x.clone() for x in (kc, vc, kic)]
    for t, s in enumerate([5, 0, 2]):
        exp[0][s // B, s % B], exp[1][s // B, s % B], exp[2][s // B, s % B] = k[t], v[t], ki[t, 0]
    append_paged_kv(k, v, ki, kc, vc, kic, torch.tensor([5, 0, 2]), backend=backend)
    for got, want in zip((kc, vc, kic), exp):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_append_without_index_keys_and_empty(backend):
    gen = torch.Generator().manual_seed(4)
    kc, vc, _ = _garbage_pools(3, 4, 2, 4, 4, torch.float32, gen)
    exp_k, exp_v = kc.clone(), vc.clone()
    k, v = torch.randn(2, 2, 4, generator=gen), torch.randn(2, 2, 4, generator=gen)
    append_paged_kv(k, v, None, kc, vc, None, torch.tensor([5, 11]), backend=backend)
    exp_k[1, 1], exp_k[2, 3], exp_v[1, 1], exp_v[2, 3] = k[0], k[1], v[0], v[1]
    assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v)
    # no new token: a no-op
    append_paged_kv(k[:0], v[:0], None, kc, vc, None, torch.tensor([], dtype=torch.int64),
                    backend=backend)
    assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_append_unchecked_out_of_range_slot_is_skipped(backend):
    """With check=False (what CUDA does by default) an out-of-range slot is dropped, never
    written out of bounds; checked, it raises."""
    gen = torch.Generator().manual_seed(5)
    P, B = 3, 4
    kc, vc, kic = _garbage_pools(P, B, 1, 4, 4, torch.float32, gen)
    k, v, ki = (torch.randn(2, 1, 4, generator=gen) for _ in range(3))
    slots = torch.tensor([P * B, 2])
    exp = [x.clone() for x in (kc, vc, kic)]
    exp[0][0, 2], exp[1][0, 2], exp[2][0, 2] = k[1], v[1], ki[1, 0]
    with pytest.raises(ValueError, match="slot_mapping"):
        append_paged_kv(k, v, ki, kc, vc, kic, slots, backend=backend)
    append_paged_kv(k, v, ki, kc, vc, kic, slots, backend=backend, check=False)
    for got, want in zip((kc, vc, kic), exp):
        assert torch.equal(got, want)


def _append_args(gen, dtype=torch.float32):
    kc, vc, kic = _garbage_pools(4, 4, 2, 8, 6, dtype, gen)
    k, v = torch.randn(3, 2, 8, generator=gen).to(dtype), torch.randn(3, 2, 8, generator=gen).to(dtype)
    ki = torch.randn(3, 1, 6, generator=gen).to(dtype)
    return dict(k=k, v=v, ki=ki, k_cache=kc, v_cache=vc, ki_cache=kic, slot_mapping=torch.tensor([0, 5, 9]))


@pytest.mark.parametrize("change, exc, words", [
    (lambda a: a.update(k=a["k"][0]), ValueError, "k must be 3-D"),
    (lambda a: a.update(v=a["v"][:, :1]), ValueError, "v must have the shape of k"),
    (lambda a: a.update(k=a["k"][:, :, :4], v=a["v"][:, :, :4]), ValueError, "k must have [num_kv_heads, head_dim]"),
    (lambda a: a.update(k=a["k"].half(), v=a["v"].half()), TypeError, "k must have the same dtype as k_cache"),
    (lambda a: a.update(ki=a["ki"].half()), TypeError, "ki must have the same dtype as ki_cache"),
    (lambda a: a.update(ki=a["ki"][:, :, :5]), ValueError, "ki must have total_new"),
    (lambda a: a.update(ki=a["ki"].expand(3, 2, 6)), ValueError, "ki must have exactly one"),
    (lambda a: a.update(ki=None), ValueError, "ki and ki_cache"),
    (lambda a: a.update(v_cache=a["v_cache"][:3]), ValueError, "v_cache must have the shape of k_cache"),
    (lambda a: a.update(ki_cache=a["ki_cache"][:, :2]), ValueError, "ki_cache must have [num_pages, page_size]"),
    (lambda a: a.update(k_cache=a["k_cache"].int(), v_cache=a["v_cache"].int()), TypeError, "k_cache must be"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"].float()), TypeError, "slot_mapping must be int64"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"][:2]), ValueError, "one slot per new token"),
    (lambda a: a.update(slot_mapping=torch.tensor([0, 16, 1])), ValueError, "slot_mapping[1] = 16"),
    (lambda a: a.update(slot_mapping=torch.tensor([3, 5, 3])), ValueError, "more than once"),
    (lambda a: a.update(k_cache=a["k_cache"].to("meta"), v_cache=a["v_cache"].to("meta")),
     ValueError, "device"),
])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_append_bad_inputs_raise_and_change_nothing(change, exc, words, backend):
    gen = torch.Generator().manual_seed(6)
    args = _append_args(gen)
    change(args)
    before = {n: t.clone() for n, t in args.items() if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
    with pytest.raises(exc, match=re.escape(words)):
        append_paged_kv(**args, backend=backend)
    for name, t in before.items():
        assert torch.equal(args[name], t), f"{name} was modified"


def test_append_bad_backend():
    args = _append_args(torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="backend"):
        append_paged_kv(**args, backend="cuda")


def test_paged_cache_constructor():
    c = PagedMSACache(6, 16, 2, 32, 24, dtype=torch.float16)
    assert c.k_cache.shape == c.v_cache.shape == (6, 16, 2, 32)
    assert c.ki_cache.shape == (6, 16, 24)
    assert c.k_cache.dtype == c.ki_cache.dtype == torch.float16 and c.block_size == 16
    assert c.num_slots == 96 and not c.k_cache.any()
    for kwargs, exc, name in [
        (dict(num_pages=0), ValueError, "num_pages"),
        (dict(page_size=-4), ValueError, "page_size"),
        (dict(num_kv_heads=1.5), TypeError, "num_kv_heads"),
        (dict(head_dim=True), TypeError, "head_dim"),
        (dict(index_head_dim=None), TypeError, "index_head_dim"),
        (dict(dtype=torch.int8), TypeError, "dtype"),
        (dict(dtype="float16"), TypeError, "dtype"),
        (dict(device="nonsense"), ValueError, "device"),
    ]:
        full = dict(num_pages=2, page_size=4, num_kv_heads=1, head_dim=8, index_head_dim=8)
        full.update(kwargs)
        with pytest.raises(exc, match=name):
            PagedMSACache(**full)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_paged_cache_bad_page_ids(backend):
    """The cache's slot_mapping checks page ids against its num_pages: checked (CPU tensors)
    it raises naming page_table; unchecked (the CUDA default) the token gets slot -1 and
    the append leaves the pools alone for it."""
    gen = torch.Generator().manual_seed(13)
    cache = PagedMSACache(4, 4, 1, 4, 4, dtype=torch.float32)
    table = i32([[1, 4], [-1, 2]])
    starts, cu = i32([2, 0]), i32([0, 4, 5])
    with pytest.raises(ValueError, match=re.escape("page_table[0, 1] = 4 (request 0, logical page 1")):
        cache.slot_mapping(table, starts, cu)
    with pytest.raises(ValueError, match=re.escape("page_table[1, 0] = -1")):
        cache.slot_mapping(i32([[1, 3], [-1, 2]]), starts, cu)
    slots = cache.slot_mapping(table, starts, cu, check=False)
    assert slots.tolist() == [6, 7, -1, -1, -1]  # positions 2, 3 on page 1; page 4 and -1: none
    k, v, ki = (torch.randn(5, 1, 4, generator=gen) for _ in range(3))
    want = [x.clone() for x in (cache.k_cache, cache.v_cache, cache.ki_cache)]
    for t, s in ((0, 6), (1, 7)):
        want[0][s // 4, s % 4], want[1][s // 4, s % 4], want[2][s // 4, s % 4] = k[t], v[t], ki[t, 0]
    cache.append(k, v, ki, slots, backend=backend)
    for got, w in zip((cache.k_cache, cache.v_cache, cache.ki_cache), want):
        assert torch.equal(got, w)


def test_paged_cache_append_method_round_trip():
    """slot_mapping + append (Triton, interpreted) in a cache, then gather_paged returns
    exactly the packed tokens: a two-step (prefill, then decode) fill of shuffled pages."""
    gen = torch.Generator().manual_seed(8)
    B, hkv, d, di = 4, 2, 8, 8
    first, second = [9, 0, 4, 3], [1, 5, 2, 0]
    lens = [a + b for a, b in zip(first, second)]
    table, num_pages = shuffled_page_table(lens, B, gen, fill=0)  # stale 0s past the pages
    cache = PagedMSACache(num_pages, B, hkv, d, di, dtype=torch.float16)
    cache.k_cache.normal_(generator=gen)  # garbage everywhere else
    full_k, full_v, full_ki = ([torch.randn(n, *shape, generator=gen).half() for n in lens]
                               for shape in ((hkv, d), (hkv, d), (1, di)))
    full_k, full_v, full_ki = list(full_k), list(full_v), list(full_ki)
    for step, (start, new) in enumerate([([0] * 4, first), (first, second)]):
        pick = [slice(s, s + n) for s, n in zip(start, new)]
        k = torch.cat([x[p] for x, p in zip(full_k, pick)])
        v = torch.cat([x[p] for x, p in zip(full_v, pick)])
        ki = torch.cat([x[p] for x, p in zip(full_ki, pick)])
        slots = cache.slot_mapping(table, i32(start), cumsum0(new))
        cache.append(k, v, ki, slots, backend="triton")
    k, v, ki, cu_k = gather_paged(cache.k_cache, cache.v_cache, cache.ki_cache, table, i32(lens))
    assert torch.equal(cu_k, cumsum0(lens))
    assert torch.equal(k, torch.cat(full_k)) and torch.equal(v, torch.cat(full_v))
    assert torch.equal(ki, torch.cat(full_ki)) and ki.shape[1] == 1


# --------------------------------------------------------------------------- gather

def test_gather_paged_matches_hand_placed_and_partial_pools():
    gen = torch.Generator().manual_seed(9)
    B, lens = 8, [20, 8, 0, 3, 16]
    table, num_pages = shuffled_page_table(lens, B, gen)
    kc, vc, kic = _garbage_pools(num_pages, B, 2, 4, 4, torch.float32, gen)
    k, v, ki = gather_paged(kc, vc, kic, table, i32(lens))[:3]
    # hand-built expectation, token by token
    want = [(kc[int(table[b, j // B]), j % B], kic[int(table[b, j // B]), j % B])
            for b, n in enumerate(lens) for j in range(n)]
    assert torch.equal(k, torch.stack([w[0] for w in want]))
    assert torch.equal(ki[:, 0], torch.stack([w[1] for w in want]))
    assert v.shape == k.shape
    k2, v2, ki2, cu = gather_paged(None, None, kic, table, i32(lens))
    assert k2 is None and v2 is None and torch.equal(ki2, ki) and cu.tolist() == cumsum0(lens).tolist()
    k3, v3, ki3, _ = gather_paged(kc, vc, None, table, i32(lens))
    assert ki3 is None and torch.equal(k3, k) and torch.equal(v3, v)


@pytest.mark.parametrize("change, exc, words", [
    (dict(kv_lens=i32([20, 9])), ValueError, "page_table"),  # request 1 needs a 2nd page
    (dict(kv_lens=i32([-1, 2])), ValueError, "kv_lens must be >= 0"),
    (dict(kv_lens=torch.tensor([3, 2])), TypeError, "kv_lens must be int32"),
    (dict(kv_lens=i32([3])), ValueError, "kv_lens must have one entry per request"),
    (dict(page_table=i32([[0, 1, 2], [7, -1, -1]])), ValueError, "page_table[1, 0] = 7"),
    (dict(page_table=i32([[0, -1, 2], [3, -1, -1]])), ValueError, "page_table[0, 1] = -1"),
    (dict(ki_cache=torch.zeros(5, 4, 4)), ValueError, "ki_cache must have [num_pages, page_size]"),
])
def test_gather_paged_errors(change, exc, words):
    args = dict(k_cache=torch.zeros(6, 8, 1, 4), v_cache=torch.zeros(6, 8, 1, 4),
                ki_cache=torch.zeros(6, 8, 4), page_table=i32([[0, 1, 2], [3, -1, -1]]),
                kv_lens=i32([20, 8]))
    args.update(change)
    with pytest.raises(exc, match=re.escape(words)):
        gather_paged(**args)


# --------------------------------------------------------------------------- paged references

SCENARIOS = {
    # name: (kv_lens, Lq per request, block/page size, Hq, Hkv, topk)
    "chunked_prefill": ([150], [40], 16, 4, 2, 3),  # 110 cached + 40 new, crosses pages
    "prefill_from_empty": ([37, 64], [37, 64], 16, 2, 1, 4),  # Lq = Lk, exact page multiple
    "decode_1": ([1, 16, 17, 90], [1, 1, 1, 1], 16, 4, 2, 2),  # shorter than a page, exact
    "decode_2": ([5, 33, 48], [2, 2, 2], 16, 4, 4, 3),
    "decode_8": ([8, 70, 128], [8, 8, 8], 32, 8, 2, 2),
    "decode_16": ([16, 100, 31], [16, 16, 16], 16, 2, 2, 16),  # K >= blocks, all blocks kept
    "mixed_with_empty": ([60, 12, 0, 45, 96, 7], [60, 0, 0, 16, 1, 3], 16, 4, 2, 2),
}


def _scenario(name, dtype, gen):
    kv_lens, lq, B, hq, hkv, topk = SCENARIOS[name]
    d, di = 16, 8
    tk, tq = sum(kv_lens), sum(lq)

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(dtype)

    k, v, ki = rnd(tk, hkv, d), rnd(tk, hkv, d), rnd(tk, 1, di)
    q, qi = rnd(tq, hq, d), rnd(tq, hkv, di)
    table, num_pages = shuffled_page_table(kv_lens, B, gen)
    kc, vc, kic = _garbage_pools(num_pages, B, hkv, d, di, dtype, gen)
    kc, vc = place(kc, k, table, kv_lens, B), place(vc, v, table, kv_lens, B)
    kic = place(kic, ki[:, 0], table, kv_lens, B)
    return dict(q=q, qi=qi, k=k, v=v, ki=ki, kc=kc, vc=vc, kic=kic, table=table,
                kv_lens=i32(kv_lens), cu_q=cumsum0(lq), cu_k=cumsum0(kv_lens), B=B, topk=topk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_paged_references_equal_non_paged(name, dtype):
    """Bitwise equal: the paged references gather the very same values and then run the
    same reference ops with the same shapes, so not even rounding may differ."""
    gen = torch.Generator().manual_seed(10 + list(SCENARIOS).index(name))
    s = _scenario(name, dtype, gen)
    ref_idx, ref_ilse = openmsa.indexer_topk(s["qi"], s["ki"], s["cu_q"], s["cu_k"], block_size=s["B"],
                                             topk=s["topk"], backend="reference")
    ref_out, ref_lse = openmsa.sparse_attention(s["q"], s["k"], s["v"], ref_idx, s["cu_q"], s["cu_k"],
                                                block_size=s["B"], backend="reference")
    idx, ilse = paged_indexer_topk_reference(s["qi"], s["kic"], s["table"], s["kv_lens"], s["cu_q"],
                                             block_size=s["B"], topk=s["topk"])
    assert torch.equal(idx, ref_idx) and torch.equal(ilse, ref_ilse)
    out, lse = paged_sparse_attention_reference(s["q"], s["kc"], s["vc"], ref_idx, s["table"],
                                                s["kv_lens"], s["cu_q"])
    assert out.dtype == dtype and torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    # the whole step: the same indices and outputs
    out2, lse2, idx2, ilse2 = paged_msa_reference(s["q"], s["qi"], s["kc"], s["vc"], s["kic"], s["table"],
                                                  s["kv_lens"], s["cu_q"], block_size=s["B"], topk=s["topk"])
    assert torch.equal(idx2, ref_idx) and torch.equal(ilse2, ref_ilse)
    assert torch.equal(out2, ref_out) and torch.equal(lse2, ref_lse)
    # the logical ids are request-local blocks: the local block of the last query of each
    # request with queries is (kv_len - 1) // B, whatever its physical page is
    cu_q = s["cu_q"].tolist()
    for b, n in enumerate(s["kv_lens"].tolist()):
        if cu_q[b + 1] > cu_q[b]:
            row = idx2[:, cu_q[b + 1] - 1]
            last = (row >= 0).sum(-1) - 1
            assert torch.all(row.gather(1, last[:, None])[:, 0] == (n - 1) // s["B"])


def test_paged_dense_attention_and_a_wrong_page_is_seen():
    """topk_indices=None: dense causal attention over the cache (dense layers). And a
    sanity check that the comparison can fail: swapping two physical pages changes out."""
    gen = torch.Generator().manual_seed(30)
    s = _scenario("mixed_with_empty", torch.float32, gen)
    ref, _ = openmsa.sparse_attention(s["q"], s["k"], s["v"], None, s["cu_q"], s["cu_k"],
                                      block_size=s["B"], backend="reference")
    out, _ = paged_sparse_attention_reference(s["q"], s["kc"], s["vc"], None, s["table"], s["kv_lens"], s["cu_q"])
    assert torch.equal(out, ref)
    bad = s["table"].clone()
    bad[0, [0, 1]] = bad[0, [1, 0]]
    out_bad, _ = paged_sparse_attention_reference(s["q"], s["kc"], s["vc"], None, bad, s["kv_lens"], s["cu_q"])
    assert rel(out_bad, ref) > 1e-2


def test_serving_loop_append_then_reference():
    """Chunked prefill, then decode steps of 1-3 tokens per request: each step appends its
    new k, v, ki (Triton, interpreted) at slot_mapping's slots and runs paged_msa_reference;
    it must equal the non-paged MSA forward on the same full sequences so far."""
    gen = torch.Generator().manual_seed(31)
    B, hq, hkv, d, di, topk = 8, 4, 2, 16, 8, 2
    dtype = torch.float16
    steps = [[13, 0, 20], [7, 9, 1], [1, 3, 2], [2, 1, 0]]  # new tokens per request and step
    final = [sum(col) for col in zip(*steps)]
    table, num_pages = shuffled_page_table(final, B, gen)
    cache = PagedMSACache(num_pages, B, hkv, d, di, dtype=dtype)
    seqs = [dict(k=[], v=[], ki=[]) for _ in final]
    kv_lens = [0] * len(final)
    for new in steps:
        n = sum(new)
        k, v, q = (torch.randn(n, h, d, generator=gen).to(dtype) for h in (hkv, hkv, hq))
        ki, qi = torch.randn(n, 1, di, generator=gen).to(dtype), torch.randn(n, hkv, di, generator=gen).to(dtype)
        cu_new = cumsum0(new)
        slots = cache.slot_mapping(table, i32(kv_lens), cu_new)
        cache.append(k, v, ki, slots, backend="triton")
        for b, (a, e) in enumerate(zip(cu_new[:-1].tolist(), cu_new[1:].tolist())):
            for name, x in (("k", k), ("v", v), ("ki", ki)):
                seqs[b][name].append(x[a:e])
            kv_lens[b] += e - a
        out, _, idx, _ = paged_msa_reference(q, qi, cache.k_cache, cache.v_cache, cache.ki_cache, table,
                                             i32(kv_lens), cu_new, topk=topk)
        full = {name: torch.cat([torch.cat(sq[name]) for sq in seqs]) for name in ("k", "v", "ki")}
        cu_k = cumsum0(kv_lens)
        ref_idx, _ = openmsa.indexer_topk(qi, full["ki"], cu_new, cu_k, block_size=B, topk=topk,
                                          backend="reference")
        ref_out, _ = openmsa.sparse_attention(q, full["k"], full["v"], ref_idx, cu_new, cu_k,
                                              block_size=B, backend="reference")
        assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out)


@pytest.mark.parametrize("fn, change, exc, words", [
    ("attn", dict(block_size=32), ValueError, "block_size (32) must equal the page size"),
    ("index", dict(block_size=8), ValueError, "block_size (8) must equal the page size"),
    ("attn", dict(cu_seqlens_q=i32([0, 1, 4])), ValueError, "request 1 has Lq = 3"),
    ("attn", dict(cu_seqlens_q=i32([0, 2])), ValueError, "cu_seqlens_q must have batch + 1"),
    ("attn", dict(cu_seqlens_q=torch.tensor([0, 2, 4])), TypeError, "cu_seqlens_q must be int32"),
    ("attn", dict(cu_seqlens_q=i32([0, 2, 3])), ValueError, "cu_seqlens_q[-1] must equal total_q"),
    ("attn", dict(page_table=i32([[1, 0], [3, -1]]), kv_lens=i32([20, 17]), cu_seqlens_q=i32([0, 2, 4])),
     ValueError, "page_table[1, 1] = -1"),
    ("attn", dict(kv_lens=i32([33, 2])), ValueError, "needs logical page 2"),
    ("attn", dict(topk_indices=torch.zeros(1, 4, 2, dtype=I32)), ValueError, "topk_indices"),
    ("attn", dict(q=torch.zeros(4, 3, 8)), ValueError, "multiple of k_cache heads"),
    ("attn", dict(q=torch.zeros(4, 4, 4)), ValueError, "head_dim of q"),
    ("attn", dict(q=torch.zeros(4, 4, 8).half()), TypeError, "k_cache must have the same dtype as q"),
    ("attn", dict(page_table=i32([[0, 1], [2, 3], [4, 5]])), ValueError, "kv_lens must have one entry"),
    ("index", dict(qi=torch.zeros(4, 2, 6)), ValueError, "index_head_dim of qi"),
    ("index", dict(qi=torch.zeros(4, 2, 4).half()), TypeError, "ki_cache must have the same dtype as qi"),
    ("index", dict(topk=0), ValueError, "topk"),
    ("index", dict(kv_lens=i32([3, 1])), ValueError, "request 1 has Lq = 2"),
])
def test_paged_reference_errors(fn, change, exc, words):
    page_table = i32([[1, 0], [3, 2]])  # physical pages 0..3 of 4, page size 16
    base = dict(page_table=page_table, kv_lens=i32([20, 2]), cu_seqlens_q=i32([0, 2, 4]))
    if fn == "attn":
        args = dict(q=torch.zeros(4, 4, 8), k_cache=torch.zeros(4, 16, 2, 8), v_cache=torch.zeros(4, 16, 2, 8),
                    topk_indices=torch.zeros(2, 4, 2, dtype=I32), **base)
        call = paged_sparse_attention_reference
    else:
        args = dict(qi=torch.zeros(4, 2, 4), ki_cache=torch.zeros(4, 16, 4), **base)
        call = paged_indexer_topk_reference
    call(**args)  # control: the unchanged arguments are valid
    args.update(change)
    with pytest.raises(exc, match=re.escape(words)):
        call(**args)


def test_paged_msa_reference_validates_both_branches_first():
    args = dict(q=torch.zeros(2, 2, 8), qi=torch.zeros(2, 2, 4), k_cache=torch.zeros(2, 4, 2, 8),
                v_cache=torch.zeros(2, 4, 2, 8), ki_cache=torch.zeros(2, 4, 4), page_table=i32([[0, 1]]),
                kv_lens=i32([5]), cu_seqlens_q=i32([0, 2]))
    out, lse, idx, ilse = paged_msa_reference(**args, topk=2)
    assert out.shape == (2, 2, 8) and idx.shape == (2, 2, 2) and ilse.shape == (2, 2) and lse.shape == (2, 2)
    for change, exc, words in [
        (dict(qi=torch.zeros(3, 2, 4)), ValueError, "qi must have total_q = 2"),
        (dict(qi=torch.zeros(2, 1, 4)), ValueError, "one index head per KV head"),
        (dict(ki_cache=torch.zeros(3, 4, 4)), ValueError, "ki_cache must have [num_pages, page_size]"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
        (dict(index_softmax_scale="x"), TypeError, "index_softmax_scale"),
        (dict(deterministic=1), TypeError, "deterministic"),
    ]:
        with pytest.raises(exc, match=re.escape(words)):
            paged_msa_reference(**{**args, **change}, topk=2)


@pytest.mark.gpu
def test_append_triton_cuda_large_pool_int64_offsets():
    """A pool of more than 2**31 elements: a token in the last page must land there
    (int32 offsets would wrap). Also auto (Triton on CUDA) = reference on a random step,
    and the Triton path runs inside a CUDA graph."""
    P, B, hkv, d = 16400, 128, 8, 128  # 16400 * 128 * 8 * 128 = 2.15e9 > 2**31 elements
    kc = torch.zeros(P, B, hkv, d, dtype=torch.float16, device="cuda")
    vc = torch.zeros_like(kc)
    k = torch.randn(3, hkv, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    slots = torch.tensor([(P - 1) * B + 127, 5, -1], device="cuda")
    append_paged_kv(k, v, None, kc, vc, None, slots)
    assert torch.equal(kc[P - 1, 127], k[0]) and torch.equal(vc[0, 5], v[1])
    assert int((kc != 0).sum()) == 2 * hkv * d
    del kc, vc
    torch.cuda.empty_cache()

    gen = torch.Generator().manual_seed(40)
    lens = [300, 17, 1024, 5]
    table, num_pages = shuffled_page_table(lens, 128, gen)
    pools = [x.cuda() for x in _garbage_pools(num_pages, 128, 4, 128, 128, torch.bfloat16, gen)]
    ref = [x.clone() for x in pools]
    new = [100, 1, 16, 5]
    n = sum(new)
    k, v = (torch.randn(n, 4, 128, device="cuda").bfloat16() for _ in range(2))
    ki = torch.randn(n, 1, 128, device="cuda").bfloat16()
    slots = slot_mapping(table.cuda(), i32([a - b for a, b in zip(lens, new)]).cuda(), cumsum0(new).cuda(),
                         page_size=128, num_new_tokens=n)
    append_paged_kv(k, v, ki, *ref, slots, backend="reference")
    graph = torch.cuda.CUDAGraph()
    append_paged_kv(k, v, ki, *[x.clone() for x in pools], slots)  # warm up (compile)
    with torch.cuda.graph(graph):
        append_paged_kv(k, v, ki, *pools, slots)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(pools, ref):
        assert torch.equal(got, want)
