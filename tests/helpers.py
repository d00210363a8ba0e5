"""Helpers shared by the kernel tests: relative error norms and random paged pools."""

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; every entry of both must be finite."""
    a, b = a.double(), b.double()
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
