"""Helpers shared by the kernel tests: relative error norms, packed layouts, seeds and
random paged pools."""

import zlib

import torch


def gen_for(*key):
    """A generator seeded by the test's parameters (the same inputs on every run)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_cu(pack, device=None):
    """int32 (cu_seqlens_q, cu_seqlens_k) of a pack of (Lq, Lk) pairs, on ``device``
    (default: the GPU when there is one, as the kernel tests run)."""
    device = DEV if device is None else device
    cq, ck = [0], [0]
    for lq, lk in pack:
        assert lq <= lk
        cq.append(cq[-1] + lq)
        ck.append(ck[-1] + lk)
    return (torch.tensor(cq, dtype=torch.int32, device=device),
            torch.tensor(ck, dtype=torch.int32, device=device))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; same shapes, every entry of both finite."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite entries"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rel_finite(a: torch.Tensor, b: torch.Tensor) -> float:
    """The relative error norm over the finite entries of ``b``; non-finite entries (-inf LSE
    of an empty row, NaN propagated from the inputs) must sit at the same places with the
    same values in ``a``."""
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a)), "non-finite entries differ"
    assert torch.equal(a[~fin].nan_to_num(), b[~fin].nan_to_num()), "non-finite values differ"
    if not fin.any():
        return 0.0
    return ((a - b)[fin].norm() / b[fin].norm().clamp_min(1e-30)).item()


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_paged(kv_lens, qlens, hq, hkv, d, di, bs, dtype, gen, device=DEV, spare_pages=3):
    """Random queries and K / V / index-key pools with each request's pages at shuffled
    physical pages (one page-table column to spare, ``spare_pages`` unused pages).
    Returns (q, qi, k_cache, v_cache, ki_cache, cu_seqlens_q, kv_lens, page_table) on
    ``device`` (default: the GPU when there is one, as the kernel tests run); values drawn on the CPU from ``gen``, so the same seed gives the same
    inputs on any device."""
    batch = len(kv_lens)
    max_pages = max([-(-n // bs) for n in kv_lens] + [1]) + 1
    num_pages = batch * max_pages + spare_pages
    perm = torch.randperm(num_pages, generator=gen)
    page_table = perm[:batch * max_pages].view(batch, max_pages).to(torch.int32)

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(dtype)
    k_cache, v_cache = rnd(num_pages, bs, hkv, d), rnd(num_pages, bs, hkv, d)
    ki_cache = rnd(num_pages, bs, di)
    tq = sum(qlens)
    q, qi = rnd(tq, hq, d), rnd(tq, hkv, di)
    cu_q = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    kv = torch.tensor(kv_lens, dtype=torch.int32)
    return tuple(x.to(device) for x in (q, qi, k_cache, v_cache, ki_cache, cu_q, kv, page_table))


def replay_after_replan(wrapper, q, qi, k_cache, v_cache, ki_cache, cu_q, new_kv_lens, page_table, gen):
    """The CUDA-graph contract of a serving wrapper: run() captured once (after a compiling
    call), then plan() with new lengths of the same shapes and new query values in place;
    returns the replay's (out, lse, topk_indices)."""
    wrapper.run(q, qi, k_cache, v_cache, ki_cache)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse, idx = wrapper.run(q, qi, k_cache, v_cache, ki_cache, return_lse=True)
    wrapper.plan(cu_q, new_kv_lens, page_table)
    q.copy_(torch.randn(q.shape, generator=gen).to(q))
    qi.copy_(torch.randn(qi.shape, generator=gen).to(qi))
    graph.replay()
    torch.cuda.synchronize()
    return out, lse, idx


# ------------------------------------------------------------------ selection comparison
# Two correct implementations of the Index Branch may disagree only where block scores
# (nearly) tie: each rounds the dot products its own way. A test accepts a difference from
# the reference only where the float64 scores of the blocks involved lie within the
# rounding bound of the K-th score (never a share of matching rows), so it still fails on
# a real bug. Exact-equality tests instead use dyadic inputs, whose dots are exact in
# float32 whatever the summation order.

FP32_UNIT_ROUNDOFF = 2.0 ** -24
# Hopper's FP8 MMA does not accumulate in full float32: DeepSeek-V3's report (section 3.3.2)
# measured "around 14 bits" of accumulation precision on H800s. One bit of slack: the unit
# roundoff of a 13-bit significand. (Triton's interpreter accumulates FP8 products exactly
# in float32, so there the float32 bound holds.)
FP8_MMA_UNIT_ROUNDOFF = 2.0 ** -13


def block_scores64(qi, ki, cu_q, cu_k, block_size, scale, rows_per_chunk=512):
    """float64 Index Branch block scores of docs/spec.md section 4 and their rounding scale.

    Returns ``scores [Hkv, total_q, max_blocks]`` (block max of scale * <qi, ki> over the
    visible keys; -inf for blocks with no visible key; NaN scores as -inf, since NaN ranks
    below every number) and ``magnitude [Hkv, total_q]``: scale * max_j sum_d |qi_d ki_jd|
    over the visible keys j, the quantity a float32 dot's rounding error is relative to.
    """
    cq, ck = cu_q.tolist(), cu_k.tolist()
    hkv, total_q, dev = qi.shape[1], qi.shape[0], qi.device
    max_blocks = max([-(-(ck[b + 1] - ck[b]) // block_size) for b in range(len(ck) - 1)] + [1])
    scores = torch.full((hkv, total_q, max_blocks), float("-inf"), dtype=torch.float64, device=dev)
    magnitude = torch.zeros(hkv, total_q, dtype=torch.float64, device=dev)
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        keys = ki[ck[b]:ck[b + 1], 0].double()
        nb = -(-lk // block_size)
        for r0 in range(0, lq, rows_per_chunk):
            rows = slice(cq[b] + r0, cq[b] + min(lq, r0 + rows_per_chunk))
            q = qi[rows].double()
            pos = lk - lq + torch.arange(r0, r0 + q.shape[0], device=dev)
            visible = torch.arange(lk, device=dev)[None, :] <= pos[:, None]
            z = scale * torch.einsum("rhd,jd->hrj", q, keys)
            z = z.nan_to_num(nan=float("-inf")).masked_fill(~visible, float("-inf"))
            z = torch.nn.functional.pad(z, (0, nb * block_size - lk), value=float("-inf"))
            scores[:, rows, :nb] = z.view(hkv, -1, nb, block_size).amax(-1)
            mag = scale * torch.einsum("rhd,jd->hrj", q.abs(), keys.abs())
            magnitude[:, rows] = mag.nan_to_num(0.0).masked_fill(~visible, 0.0).amax(-1) if lk else 0.0
    return scores, magnitude


def rounding_bound(magnitude, index_head_dim, unit_roundoff=FP32_UNIT_ROUNDOFF):
    """How far two implementations' block scores may lie apart: each float32 dot of Di
    terms (plus the scale and a few more roundings) is within gamma_(Di+4) * magnitude of
    the exact value (Higham's bound for any summation order), so two of them within twice
    that."""
    n = index_head_dim + 4
    return 2 * n * unit_roundoff / (1 - n * unit_roundoff) * magnitude


def assert_selection_matches(idx, ref_idx, scores, bound, *, ordered=False):
    """``idx`` selects like ``ref_idx`` up to ties within ``bound``.

    Exact: shapes, the number of valid entries per row, the last valid entry (the local
    block) and the -1 padding. The earlier blocks of a row may differ from the
    reference's only by blocks whose float64 score is within ``bound`` of the row's K-th
    score (the smallest score the exact ranking keeps); with ``ordered`` the entries must
    also be in descending score order up to ``bound``, equal scores by ascending id.
    ``scores``/``bound`` as from ``block_scores64``/``rounding_bound``.
    """
    assert idx.shape == ref_idx.shape, (idx.shape, ref_idx.shape)
    idx, ref_idx = idx.long().flatten(1, -2), ref_idx.long().flatten(1, -2)
    scores, bound = scores.to(idx.device), bound.to(idx.device).flatten(1)[..., None]
    valid, ref_valid = idx >= 0, ref_idx >= 0
    n_valid = valid.sum(-1)
    assert torch.equal(n_valid, ref_valid.sum(-1)), "numbers of valid entries differ"
    col = torch.arange(idx.shape[-1], device=idx.device)
    assert torch.equal(valid, col < n_valid[..., None]), "valid entries are not a prefix"
    last = (n_valid - 1).clamp_min(0)[..., None]
    assert torch.equal(idx.gather(-1, last), ref_idx.gather(-1, last)), "local blocks differ"
    earlier = col < (n_valid - 1)[..., None]
    local = ref_idx.gather(-1, last)
    assert bool(((idx < local) | ~earlier).all()), "an earlier entry is not an earlier block"
    sel = torch.where(earlier, idx, 0)
    srt = torch.where(earlier, sel, -1 - col).sort(-1).values
    assert not bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()), "duplicate ids"
    ref_sel = torch.where(earlier, ref_idx, 0)
    s = scores.gather(-1, sel)
    s_ref = scores.gather(-1, ref_sel)
    # The exact K-th score: the smallest the reference keeps is within bound of it too.
    kth = torch.where(earlier, s_ref, float("inf")).amin(-1, keepdim=True)
    in_ref = (sel[..., :, None] == ref_sel[..., None, :]).logical_and(earlier[..., None, :]).any(-1)
    in_idx = (ref_sel[..., :, None] == sel[..., None, :]).logical_and(earlier[..., None, :]).any(-1)

    def near_kth(x):
        return (x == kth) | ((x - kth).abs() <= bound)
    extra = earlier & ~in_ref & ~near_kth(s)
    missing = earlier & ~in_idx & ~near_kth(s_ref)
    assert not bool(extra.any()), f"{int(extra.any(-1).sum())} rows select a block not near the K-th score"
    assert not bool(missing.any()), f"{int(missing.any(-1).sum())} rows miss a block not near the K-th score"
    if ordered:
        pair = earlier[..., 1:]
        a, b = s[..., :-1], s[..., 1:]
        ok = (a > b) | ((a == b) & (sel[..., :-1] < sel[..., 1:])) | ((a - b).abs() <= bound)
        assert not bool((pair & ~ok).any()), f"{int((pair & ~ok).any(-1).sum())} rows out of order"


def fp8_lossless(shape, gen):
    """Values whose per-vector E4M3 quantization (``openmsa.ops.utils.fp8``) is exact and
    whose dot products are exact in float32: every vector's largest |value| is 7 (scale
    7 / 448 = 2**-6) and the others are multiples of 1/4 in [-4, 4] (E4M3 values 16 j,
    |j| <= 16: at most 4 significant bits)."""
    x = torch.randint(-16, 17, shape, generator=gen).float() / 4
    top = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    sign = torch.randint(0, 2, shape[:-1], generator=gen).float() * 2 - 1
    x.scatter_(-1, top[..., None], (7 * sign)[..., None])
    return x
