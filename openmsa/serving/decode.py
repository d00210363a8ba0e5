"""Paged MSA decode with a FlashInfer-style lifecycle (docs/spec.md section 8).

    wrapper = MSADecodeWrapper(num_heads=64, num_kv_heads=4, head_dim=128, index_head_dim=128)
    wrapper.plan(cu_seqlens_q, kv_lens, page_table)   # request metadata; may allocate / sync
    out, topk_indices = wrapper.run(q, qi, k_cache, v_cache, ki_cache)   # per layer

``plan()`` takes the step's request metadata: ``cu_seqlens_q`` int32 [batch + 1] (1 to
``max_q_per_request`` new query tokens per request, 0 allowed), ``kv_lens`` int32 [batch]
(cached tokens per request, the new ones included: they were appended first, see
``openmsa.serving.cache``) and ``page_table`` int32 [batch, max_pages]. It reads the lengths
on the host, picks the split counts, and allocates every buffer ``run()`` needs. One plan
serves every layer of a step. Page ids a request uses (its first ceil(kv_lens[b] / B)
columns) must be in [0, num_pages): plan() raises on a negative one, and on one >=
``num_pages`` when given that (optional) argument; run() raises on one past its pools
(checked on the host against the ids plan() read: no sync).

``run()`` takes one layer's tensors: ``q [total_q, Hq, D]``, ``qi [total_q, Hkv, Di]`` and
the pools ``k_cache, v_cache [num_pages, B, Hkv, D]``, ``ki_cache [num_pages, B, Di]``. It
allocates nothing, never synchronises with the host and can be captured in a CUDA graph.
It returns the wrapper's own ``out [total_q, Hq, D]`` (and ``lse [total_q, Hq]`` float32
with ``return_lse=True``) and ``topk_indices [Hkv, total_q, K]`` (logical block ids in the
spec's deterministic order: score descending, ties to the smaller id, then the forced
blocks ascending (``init_blocks``, ``local_blocks``; by default the local block alone),
then -1); the next ``run()`` overwrites them. The kernels never address memory
through a page id outside [0, num_pages) (say, a bad id written into the planned page table
behind plan()'s back): the index scan reads the id clamped into [0, num_pages) (page 0 or
the last page), the attention gets no K/V tokens from it; other requests are unaffected.

A captured ``run()`` stays valid when ``plan()`` is called again with the same batch size,
the same total and maximum query count per request and the same page-table width: plan
then only copies the new metadata into the buffers the graph reads.

Query token i of request b sits at position kv_lens[b] - Lq_b + i (bottom-right causal,
as everywhere in openmsa). The Index Branch is exact (same ranking as the reference, docs/spec.md
section 4); serving needs no index LSE, so none is computed.
"""

from __future__ import annotations

import torch
import triton

from .. import _backend, library  # noqa: F401 (library: the ops torch.ops.openmsa.decode_*)
from ..ops.utils.configs import launch_config
from ..ops.utils.tiles import LOG2E
from .checks import check_int, check_page_ids, check_planned_pages, check_step_metadata, check_wrapper_config

_KERNELS = ("decode_topk_split_kernel", "decode_topk_reduce_kernel", "decode_topk_merge_kernel",
            "decode_attention_split_kernel", "decode_attention_merge_kernel")
FP8 = torch.float8_e4m3fn
_MAX_INDEX_SPLITS = 1024  # an explicit index_splits may go this far
_DEFAULT_MAX_INDEX_SPLITS = 256  # the default's cap (more was slower at batch 1 / 1M on the H100)
_MERGE_GROUP = 16  # above this many splits, a first merge level runs in parallel over groups


def _kernels(device: torch.device) -> dict:
    return {name: _backend._load(f"openmsa.serving.decode_kernels:{name}", device)
            for name in _KERNELS}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


class MSADecodeWrapper:
    """Paged MSA decode (Index Branch Top-k + sparse attention) for a batch of requests
    with 1 to ``max_q_per_request`` query tokens each. See the module docstring."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, index_head_dim: int, *,
                 block_size: int = 128, topk: int = 16, softmax_scale: float | None = None,
                 index_softmax_scale: float | None = None, max_q_per_request: int = 16,
                 init_blocks: int = 0, local_blocks: int = 1):
        check_wrapper_config(self, num_heads, num_kv_heads, head_dim, index_head_dim, block_size, topk,
                             softmax_scale, index_softmax_scale, init_blocks, local_blocks)
        self.max_q_per_request = check_int("max_q_per_request", max_q_per_request)
        self._plan = None

    # ------------------------------------------------------------------ plan
    def plan(self, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, page_table: torch.Tensor,
             *, dtype: torch.dtype = torch.bfloat16, index_splits: int | None = None,
             attention_splits: int | None = None, num_pages: int | None = None) -> None:
        """Request metadata of one step (see the module docstring); ``dtype`` is the dtype
        of q and of the output. ``index_splits`` (programs per request scanning its index
        keys, at most 1024) and ``attention_splits`` (programs per (query, group) sharing its
        K selected blocks, at most K) override the defaults, which aim at two programs per
        SM. ``num_pages``: the pools' page count, to check the page ids here rather than in
        run() (a replayed graph runs no check)."""
        cu, lens, qlens = check_step_metadata(cu_seqlens_q, kv_lens, page_table, dtype,
                                              self.block_size, self.max_q_per_request)
        max_page = check_page_ids(page_table, lens, self.block_size, num_pages)
        batch, device, max_pages = len(lens), page_table.device, page_table.shape[1]
        bs = self.block_size
        total_q = cu[-1]
        hkv, g = self.num_kv_heads, self.num_heads // self.num_kv_heads
        g_pad = max(16, triton.next_power_of_2(g))  # a group's heads are the MMA rows: >= 16
        qmax = max(qlens) if qlens else 0
        rows = max(16, triton.next_power_of_2(max(1, qmax) * hkv))
        nsel = self.topk - self.init_blocks - self.local_blocks  # ranked slots per row
        kpad = max(2, triton.next_power_of_2(max(nsel, 1)))
        sms = _sm_count(device)
        max_blocks = max((-(-kl // bs) for kl in lens), default=0)
        # split counts depend on shapes only (batch, page-table width, query count), so a
        # re-plan with the same shapes keeps a captured graph valid
        idx_splits = max(1, min(_DEFAULT_MAX_INDEX_SPLITS, -(-2 * sms // max(batch, 1)), max_pages))
        rows_q = total_q * hkv
        attn_splits = 1 if rows_q >= 2 * sms else min(self.topk, triton.next_power_of_2(-(-2 * sms // max(rows_q, 1))))
        if index_splits is not None:
            idx_splits = check_int("index_splits", index_splits)
            if idx_splits > _MAX_INDEX_SPLITS:
                raise ValueError(f"index_splits must be at most {_MAX_INDEX_SPLITS}, got {idx_splits}")
        if attention_splits is not None:
            attn_splits = check_int("attention_splits", attention_splits)
            if attn_splits > self.topk:
                raise ValueError(f"attention_splits must be at most topk = {self.topk}, got {attn_splits}")
        key = (batch, total_q, qmax, max_pages, dtype, device, idx_splits, attn_splits)
        p = self._plan
        if p is None or p["key"] != key:
            p = dict(key=key, batch=batch, total_q=total_q, qmax=qmax, rows=rows, kpad=kpad, g_pad=g_pad,
                     idx_splits=idx_splits, attn_splits=attn_splits, device=device, dtype=dtype,
                     cu_q=torch.empty(batch + 1, dtype=torch.int32, device=device),
                     kv_lens=torch.empty(batch, dtype=torch.int32, device=device),
                     page_table=torch.empty((batch, max_pages), dtype=torch.int32, device=device),
                     row_seq=torch.empty(total_q, dtype=torch.int32, device=device),
                     row_pos=torch.empty(total_q, dtype=torch.int32, device=device),
                     pages_per_split=torch.empty(1, dtype=torch.int32, device=device),
                     cand=torch.empty((batch * idx_splits * rows * kpad,), dtype=torch.int64, device=device),
                     cand2=torch.empty((batch * -(-idx_splits // _MERGE_GROUP) * rows * kpad,),
                                       dtype=torch.int64, device=device),
                     topk=torch.empty((hkv, total_q, self.topk), dtype=torch.int32, device=device),
                     out=torch.empty((total_q, self.num_heads, self.head_dim), dtype=dtype, device=device),
                     lse=torch.empty((total_q, self.num_heads), dtype=torch.float32, device=device),
                     part_o=torch.empty((total_q * hkv * attn_splits * g_pad, self.head_dim)
                                        if attn_splits > 1 else (1, 1), dtype=torch.float32, device=device),
                     part_lse=torch.empty((total_q * hkv * attn_splits * g_pad,)
                                          if attn_splits > 1 else (1,), dtype=torch.float32, device=device))
        seq = [b for b, n in enumerate(qlens) for _ in range(n)]
        pos = [lens[b] - n + i for b, n in enumerate(qlens) for i in range(n)]
        p["cu_q"].copy_(cu_seqlens_q)
        p["kv_lens"].copy_(kv_lens)
        p["page_table"].copy_(page_table)
        p["row_seq"].copy_(torch.tensor(seq, dtype=torch.int32))
        p["row_pos"].copy_(torch.tensor(pos, dtype=torch.int32))
        p["pages_per_split"].fill_(max(1, -(-max_blocks // idx_splits)))
        p["scan"] = self._scan_config(rows, device)
        p["lens"], p["max_page"] = lens, max_page
        self._plan = p

    # ------------------------------------------------------------------- run
    def _require_plan(self):
        if self._plan is None:
            raise RuntimeError("MSADecodeWrapper: call plan() before run() / run_index()")
        return self._plan

    def _check_tensor(self, name, x, shape):
        p = self._plan
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
        if x.device != p["device"]:
            raise ValueError(f"{name} must be on the planned device {p['device']}, got {x.device}")

    def _check_pool(self, name, x, tail):
        p = self._plan
        if not isinstance(x, torch.Tensor) or x.dim() != len(tail) + 1 or tuple(x.shape[1:]) != tail:
            raise ValueError(f"{name} must have shape [num_pages, {', '.join(map(str, tail))}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
        if x.device != p["device"]:
            raise ValueError(f"{name} must be on the planned device {p['device']}, got {x.device}")

    def _check_run(self, q, qi, k_cache, v_cache, ki_cache):
        p = self._require_plan()
        hq, hkv, d, di, bs = self.num_heads, self.num_kv_heads, self.head_dim, self.index_head_dim, self.block_size
        self._check_tensor("q", q, (p["total_q"], hq, d))
        self._check_tensor("qi", qi, (p["total_q"], hkv, di))
        self._check_pool("k_cache", k_cache, (bs, hkv, d))
        self._check_pool("v_cache", v_cache, (bs, hkv, d))
        self._check_pool("ki_cache", ki_cache, (bs, di))
        if q.dtype != p["dtype"]:
            raise TypeError(f"q must have the planned dtype {p['dtype']}, got {q.dtype}")
        if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, FP8):
            raise TypeError(f"k_cache and v_cache must both have q's dtype ({q.dtype}) or both be "
                            f"{FP8}, got {k_cache.dtype} and {v_cache.dtype}")
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("ki_cache", ki_cache)):
            check_planned_pages(p, x.shape[0], name, bs)

    def run(self, q, qi, k_cache, v_cache, ki_cache, *, return_lse: bool = False,
            ki_scale=None, k_scale: float | None = None, v_scale: float | None = None):
        """Index Branch then Main Branch: ``(out, topk_indices)`` (``(out, lse,
        topk_indices)`` with ``return_lse``).

        FP8 (E4M3, ``torch.float8_e4m3fn``) paths, the scale contract:

        * index keys: ``ki_cache`` FP8 with ``ki_scale`` float32 ``[num_pages, B]``, one scale
          per token (the key is ``ki_cache[p, r] * ki_scale[p, r]``; e.g. amax / 448 per
          token, see ``openmsa.serving.quantize_fp8_per_token``); qi is FP8 (its per-row
          scale does not change a row's ranking, so none is passed) or q's 16-bit dtype.
        * K, V pages: ``k_cache``, ``v_cache`` FP8 with one float scale each for the layer
          (``k_scale``, ``v_scale``, as vLLM's FP8 KV cache); the tiles are converted to q's
          dtype after the load.
        """
        self._check_run(q, qi, k_cache, v_cache, ki_cache)
        ki_scale = self._check_index_fp8(qi, ki_cache, ki_scale)
        if k_cache.dtype == FP8:
            for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0:
                    raise ValueError(f"{name} must be a positive float for FP8 k_cache / v_cache, got {x!r}")
        elif k_scale is not None or v_scale is not None:
            raise ValueError("k_scale / v_scale are only for FP8 k_cache / v_cache")
        topk_idx = self._topk(qi, ki_cache, ki_scale)
        out, lse = self._attend(q, k_cache, v_cache, topk_idx, k_scale or 1.0, v_scale or 1.0)
        return (out, lse, topk_idx) if return_lse else (out, topk_idx)

    def run_index(self, qi, ki_cache, *, ki_scale=None):
        """The Index Branch alone: ``topk_indices [Hkv, total_q, K]`` (the wrapper's buffer)."""
        p = self._require_plan()
        self._check_tensor("qi", qi, (p["total_q"], self.num_kv_heads, self.index_head_dim))
        self._check_pool("ki_cache", ki_cache, (self.block_size, self.index_head_dim))
        check_planned_pages(p, ki_cache.shape[0], "ki_cache", self.block_size)
        ki_scale = self._check_index_fp8(qi, ki_cache, ki_scale)
        return self._topk(qi, ki_cache, ki_scale)

    def _check_index_fp8(self, qi, ki_cache, ki_scale):
        if ki_cache.dtype == FP8:
            if qi.dtype not in (FP8, torch.bfloat16, torch.float16, torch.float32):
                raise TypeError(f"qi must be {FP8} or a float dtype with an FP8 ki_cache, got {qi.dtype}")
            shape = tuple(ki_cache.shape[:2])
            if (not isinstance(ki_scale, torch.Tensor) or ki_scale.dtype != torch.float32
                    or tuple(ki_scale.shape) != shape or ki_scale.stride(-1) != 1
                    or ki_scale.device != ki_cache.device):
                raise ValueError(f"ki_scale must be a float32 tensor of shape {shape} (one scale per "
                                 f"token) on {ki_cache.device} for an FP8 ki_cache, got "
                                 f"{tuple(ki_scale.shape) if isinstance(ki_scale, torch.Tensor) else ki_scale!r}")
            return ki_scale
        if ki_scale is not None:
            raise ValueError("ki_scale is only for an FP8 ki_cache")
        if qi.dtype != ki_cache.dtype:
            raise TypeError(f"qi and ki_cache must have the same dtype, got {qi.dtype} and {ki_cache.dtype}")
        return None

    @staticmethod
    def _index_pages(rows: int, fp8: bool, device) -> int:
        """Index-key pages per scan step (``configs.DecodeIndex.pages``; None: by rows): for
        up to 16 rows 2 pages (more bytes in flight for the few programs of a small batch:
        1M tokens, batch 1, H100: 110 vs 112 us with 128 splits), 4 with FP8 keys (the same
        bytes per step: H200, 63 vs 67 us); 1 page for more rows (register pressure: 128K,
        batch 64, 8 tokens: 1014 us with 1 page, 1321 with 2;
        benchmarks/results/h100/decode/sweeps/)."""
        pages = launch_config("decode_index", device).pages
        if pages is not None and pages > 0:
            return pages
        return (4 if fp8 else 2) if rows <= 16 else 1

    @classmethod
    def _scan_config(cls, rows: int, device=None) -> dict:
        """The index scan's launch settings, read once per plan() (not on every run(), the
        hot path): pages per step for 16-bit and FP8 keys, warps, pipeline stages."""
        cfg = launch_config("decode_index", device)
        return dict(pages=cls._index_pages(rows, False, device),
                    pages_fp8=cls._index_pages(rows, True, device),
                    warps=cfg.num_warps, stages=cfg.num_stages)

    def _topk(self, qi, ki_cache, ki_scale=None):
        p = self._plan
        if p["total_q"] > 0:
            torch.ops.openmsa.decode_topk(*self._topk_op_args(qi, ki_cache, ki_scale))
        return p["topk"]

    def _topk_op_args(self, qi, ki_cache, ki_scale=None) -> tuple:
        """The arguments of the op openmsa::decode_topk for this plan (its outputs: the
        plan's candidate and topk buffers)."""
        p, scan = self._plan, self._plan["scan"]
        return (qi, ki_cache, ki_scale, p["page_table"], p["cu_q"], p["kv_lens"], p["pages_per_split"],
                p["cand"], p["cand2"], p["topk"], self.index_softmax_scale, max(1, p["qmax"]),
                p["rows"], p["kpad"], p["idx_splits"], scan["pages_fp8" if ki_scale is not None else "pages"],
                scan["warps"], scan["stages"], self.init_blocks, self.local_blocks, "triton")

    def _attend(self, q, k_cache, v_cache, topk_idx, k_scale=1.0, v_scale=1.0):
        p = self._plan
        if p["total_q"] > 0:
            torch.ops.openmsa.decode_attention(
                *self._attention_op_args(q, k_cache, v_cache, topk_idx, k_scale, v_scale))
        return p["out"], p["lse"]

    def _attention_op_args(self, q, k_cache, v_cache, topk_idx, k_scale=1.0, v_scale=1.0) -> tuple:
        """The arguments of the op openmsa::decode_attention for this plan (its outputs: the
        plan's out, lse and partial buffers)."""
        p = self._plan
        return (q, k_cache, v_cache, topk_idx, p["page_table"], p["row_seq"], p["row_pos"], p["kv_lens"],
                p["out"], p["lse"], p["part_o"], p["part_lse"], self.softmax_scale,
                float(k_scale), float(v_scale), p["g_pad"], p["attn_splits"], "triton")


# --------------------------------------------------------------------------- launchers
# Reached through the ops openmsa::decode_topk / openmsa::decode_attention (openmsa.library).

def launch_decode_topk(qi, ki_cache, ki_scale, page_table, cu_q, kv_lens, pages_per_split, cand, cand2,
                       topk_idx, *, index_scale, max_q, rows, kpad, index_splits, pages, num_warps,
                       num_stages, init_blocks, local_blocks):
    """Split index scan of every request's pages, then the exact Top-k merge into topk_idx."""
    kern = _kernels(qi.device)
    batch, hkv, di = page_table.shape[0], qi.shape[1], qi.shape[2]
    bs, topk, nsplit = ki_cache.shape[1], topk_idx.shape[2], index_splits
    kern["decode_topk_split_kernel"][(batch, nsplit)](
        qi, ki_cache, page_table, cu_q, kv_lens, cand, pages_per_split,
        ki_scale if ki_scale is not None else pages_per_split,
        index_scale, nsplit, ki_cache.shape[0],
        qi.stride(0), qi.stride(1), ki_cache.stride(0), ki_cache.stride(1), page_table.stride(0),
        ki_scale.stride(0) if ki_scale is not None else 0,
        HKV=hkv, QMAX=max_q, ROWS=rows, BLOCK=bs, DI=di,
        TOPK=topk, KPAD=kpad, PAGES=pages,
        DOT_PRECISION="ieee" if qi.dtype == torch.float32 else "tf32",
        NAN_MAX_REDUCE=not _backend._interpreting(), KI_FP8=ki_scale is not None,
        INIT_BLOCKS=init_blocks, LOCAL_BLOCKS=local_blocks,
        num_warps=num_warps, num_stages=num_stages)
    nlists = nsplit
    if nsplit > _MERGE_GROUP:
        ngroups = -(-nsplit // _MERGE_GROUP)
        kern["decode_topk_reduce_kernel"][(batch, rows, ngroups)](
            cand, cand2, cu_q, nsplit, ngroups,
            HKV=hkv, QMAX=max_q, ROWS=rows, TOPK=topk, KPAD=kpad,
            GROUP=_MERGE_GROUP, LOG2_GROUP=_MERGE_GROUP.bit_length() - 1,
            NSEL=topk - init_blocks - local_blocks, num_warps=4)
        cand, nlists = cand2, ngroups
    npad = triton.next_power_of_2(nlists)
    kern["decode_topk_merge_kernel"][(batch, rows)](
        cand, cu_q, kv_lens, topk_idx, nlists, topk_idx.stride(0), topk_idx.stride(1),
        HKV=hkv, QMAX=max_q, ROWS=rows, BLOCK=bs, TOPK=topk, KPAD=kpad,
        KOUT=triton.next_power_of_2(topk), NSPLIT_PAD=npad, LOG2_NSPLIT=npad.bit_length() - 1,
        INIT_BLOCKS=init_blocks, LOCAL_BLOCKS=local_blocks, num_warps=4)


def launch_decode_attention(q, k_cache, v_cache, topk_idx, page_table, row_seq, row_pos, kv_lens, out,
                            lse, part_o, part_lse, *, scale, k_scale, v_scale, g_pad, attention_splits):
    """Split sparse attention over the selected pages into out / lse (merged when split)."""
    kern = _kernels(q.device)
    total_q, hq, d = q.shape
    hkv, bs, topk, asplit = k_cache.shape[2], k_cache.shape[1], topk_idx.shape[2], attention_splits
    g = hq // hkv
    kern["decode_attention_split_kernel"][(total_q, hkv, asplit)](
        q, k_cache, v_cache, topk_idx, page_table, row_seq, row_pos, kv_lens,
        out, lse, part_o, part_lse,
        scale * k_scale * LOG2E.value, float(v_scale), -(-topk // asplit), asplit, hkv,
        min(k_cache.shape[0], v_cache.shape[0]),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        topk_idx.stride(0), topk_idx.stride(1), page_table.stride(0),
        out.stride(0), out.stride(1), lse.stride(0),
        G=g, G_PAD=g_pad, BLOCK=bs, D=d, TOPK=topk,
        KPAD=triton.next_power_of_2(topk), SPLIT=asplit > 1, IEEE=q.dtype == torch.float32,
        KV_FP8=k_cache.dtype == FP8,
        num_warps=4, num_stages=2)
    if asplit > 1:
        nsp = triton.next_power_of_2(asplit)
        hc = max(1, min(g_pad, 4096 // (nsp * d)))  # a [nsp, hc, D] tile: ~32 floats a thread
        kern["decode_attention_merge_kernel"][(total_q, hkv, g_pad // hc)](
            part_o, part_lse, out, lse, asplit, hkv,
            out.stride(0), out.stride(1), lse.stride(0),
            G=g, G_PAD=g_pad, HC=hc, D=d, NSPLIT_PAD=nsp, num_warps=4)
