"""Launcher of the Triton sparse KL loss (docs/spec.md section 6; kernels.py).

Forward = two passes over one KV-outer schedule of the sparse attention
(``openmsa.ops.attention.schedule``): the teacher pass (main scores -> group-mean
softmax P_T per entry) and the student pass, which computes the loss and, when qi or
ki needs a gradient, d loss / d qi and d ki at the same time (like a fused
cross-entropy). The gradients are stored (float32) and the backward only multiplies
them by grad_output.

Missing LSEs are recomputed first:

* ``lse`` (teacher normaliser) by the Triton sparse attention forward
  (``sparse_attention_forward(q, k, k, ..., lse_only=True)``: its output is computed and
  thrown away; a waste of the PV product, fine for a fallback path);
* ``index_lse`` by the indexer's KV-outer selected-LSE pass
  (``openmsa.ops.indexer.lse.index_lse_kv_outer``), which works for any given indices.

Query rows are processed in chunks (at most 65536 rows) so that the per-entry partials
(P_T [B] float32, a [Di] float32 dqi partial and the KL per (row, group, slot)) stay within
``OPENMSA_PARTIAL_BYTES`` (the sparse attention's scratch budget, read by the same
function). Chunk sizes depend only on shapes: the
launcher never reads device values on the host (no synchronisation), also for
``topk_indices=None``, the dense warmup KL (``dense.py``: the same kernels, chunk by chunk).

Memory kept for the backward: dqi float32 [total_q, Hkv, Di] and dki float32
[total_k, Di] (2.5 GB at 1M tokens with Hkv = 4, Di = 128); none when neither qi nor ki
requires a gradient (the kernel then skips the gradient work: WITH_GRAD=False).

Determinism: the loss (per-entry KL values summed by torch) and dqi (per-row reduce in
slot order) are deterministic; dki is accumulated with float32 atomics across the
segments of a key block (and across groups, which share ki), like dK/dV of the
attention backward, unless ``deterministic=True``: then each group accumulates its own
float32 dki_g (the segments of a block cut into several through scratch slots added in
tile order, see ``openmsa.ops.attention.schedule``) and dki = dki_0 + ... + dki_{Hkv-1}.
Extra memory, during the forward only: the dki_g, Hkv x total_k x Di x 4 bytes (2 GB at
1M tokens with Hkv = 4, Di = 128), and the slots (B x Di x 4 bytes, at most 2 per tile of
entries), which are counted in the partial budget.
"""

from __future__ import annotations

import os

import torch
import triton

from ..attention.schedule import build_schedule, row_info, slots_bound
from ..attention.triton_impl import _partial_bytes, reduce_key_partials, sparse_attention_forward
from ..indexer.lse import index_lse_kv_outer
from .dense import dense_kl_forward
from .kernels import LOG2E, dqi_reduce_kernel, kl_student_kernel, kl_teacher_kernel

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (32, 64, 128)
MAX_TOPK = 64
# Also bounds the schedule's temporaries (build_schedule: a few int64 per (group, row,
# slot) and a [Hkv, rows, K, K] duplicate mask) when the partials are small (no grad).
_MAX_ROWS_PER_CHUNK = 1 << 16


def _knobs(g_pad: int, dtype: torch.dtype):
    """Launch settings: teacher (tile rows = TOKENS x G_PAD, tiles per segment, warps,
    stages) and student (entries per tile, warps, stages).

    The teacher tile is the attention forward's (S, P [rows, B] float32, no output
    accumulator); the student's holds z, P_T, P_S [ROWS, B] float32 and the segment's
    dki [B, Di] float32 accumulator (128 registers per thread with 4 warps at
    B = Di = 128). Defaults for bf16, G = 16, B = D = Di = 128 on the H100
    (benchmarks/results/h100/session2/run*_kl_*.log, 128K): teacher 128 rows (8 tokens)
    / 4 warps / 3 stages, 41.0 ms in all against 48.4 ms with 64 rows (64 rows: 117
    registers, 68 KB shared memory); 128 tiles (1024 entries) per segment: 35.1 (64)
    against 41.4 ms (16), then 32.6 (128) against 33.6 (64) after the schedule change,
    mostly fewer dki flushes (float32 atomics of [B, Di] per segment) in the student; student 32 rows / 4 warps / 2 stages, 255 registers without spills
    (64-row tiles spill; 52.7-67.8 ms). float32
    (ieee dots on CUDA cores; not a production dtype): small tiles. Every knob can be
    overridden from the environment.
    """
    rows = max(32, g_pad) if dtype == torch.float32 else max(128, g_pad)
    env = os.environ.get
    return ((int(env("OPENMSA_KL_TILE_ROWS", rows)), int(env("OPENMSA_KL_SEGMENT_TILES", 128)),
             int(env("OPENMSA_KL_WARPS", 4)), int(env("OPENMSA_KL_STAGES", 3))),
            (int(env("OPENMSA_KL_STUDENT_ROWS", 32)), int(env("OPENMSA_KL_STUDENT_WARPS", 4)),
             int(env("OPENMSA_KL_STUDENT_STAGES", 2))))


def _check_supported(q, qi, topk_indices, block_size):
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size: the Triton indexer KL loss supports {SUPPORTED_BLOCK_SIZES}, "
                         f"got {block_size} (use backend='reference')")
    if q.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: the Triton indexer KL loss supports head_dim in {SUPPORTED_HEAD_DIMS}, "
                         f"got {q.shape[2]} (use backend='reference')")
    if qi.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"qi: the Triton indexer KL loss supports index_head_dim in "
                         f"{SUPPORTED_HEAD_DIMS}, got {qi.shape[2]} (use backend='reference')")
    for name, x in (("q", q), ("qi", qi)):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name}: the Triton indexer KL loss supports bfloat16, float16 and "
                            f"float32, got {x.dtype} (use backend='reference')")
    if topk_indices is not None and not 1 <= topk_indices.shape[2] <= MAX_TOPK:
        raise ValueError(f"topk_indices: the Triton indexer KL loss supports topk in "
                         f"[1, {MAX_TOPK}], got {topk_indices.shape[2]} (use backend='reference')")


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def indexer_kl_forward(q, k, qi, ki, topk_indices, varlen, block_size, scale, scale_i, coeff,
                       lse, index_lse, with_grad, deterministic=False):
    """Returns (loss float32 0-d, dqi float32 [total_q, Hkv, Di] or None,
    dki float32 [total_k, Di] or None); the gradients are d loss / d qi, ki.
    ``deterministic``: dki without float atomics between programs (module docstring)."""
    total_q, hq, d = q.shape
    total_k, hkv = k.shape[0], k.shape[1]
    di = qi.shape[2]
    g = hq // hkv
    g_pad = triton.next_power_of_2(g)
    (tile_rows, segment_tiles, warps, stages), (s_rows, s_warps, s_stages) = _knobs(g_pad, q.dtype)
    tokens = max(1, tile_rows // g_pad, triton.cdiv(16, g_pad))  # tl.dot needs M >= 16
    s_rows = max(16, s_rows)
    topk = topk_indices.shape[2]
    dev = q.device
    total = torch.zeros((), dtype=torch.float32, device=dev)
    # every row of dqi is written by dqi_reduce_kernel (0 where the row has no entry)
    dqi = torch.empty((total_q, hkv, di), dtype=torch.float32, device=dev) if with_grad else None
    deterministic = deterministic and with_grad
    dki = torch.zeros((total_k, di), dtype=torch.float32, device=dev) if with_grad else None
    if total_q == 0:
        return total, dqi, dki
    # per-group accumulators: the groups' segments of a block then never share an address
    dki_acc = torch.zeros((hkv, total_k, di), dtype=torch.float32, device=dev) if deterministic else dki
    norm = coeff / (hkv * total_q)

    if lse is None:
        _, lse = sparse_attention_forward(q, k, k, topk_indices, varlen, block_size, scale,
                                          lse_only=True)
    if index_lse is None:
        index_lse = index_lse_kv_outer(qi, ki, topk_indices, varlen, block_size=block_size,
                                       scale=scale_i)

    info = row_info(varlen.cu_seqlens_q, varlen.cu_seqlens_k, total_q, total_k, block_size)
    entries_per_tile = tokens * segment_tiles
    per_entry = block_size * 4 + (di * 4 if with_grad else 0) + 4
    if deterministic:  # dki slots, at most 2 per entries_per_tile entries
        per_entry += 2 * block_size * di * 4 / entries_per_tile
    rows_per_chunk = max(1, min(total_q, _MAX_ROWS_PER_CHUNK,
                                int(_partial_bytes() // (hkv * topk * per_entry))))
    n_part = hkv * rows_per_chunk * topk
    part_pt = torch.empty((n_part, block_size), dtype=torch.float32, device=dev)
    part_kl = torch.empty((n_part,), dtype=torch.float32, device=dev)
    part_dqi = torch.empty((n_part, di), dtype=torch.float32, device=dev) if with_grad else None
    dummy = torch.empty((1,), dtype=torch.float32, device=dev)
    part_dki = (torch.empty((slots_bound(n_part, entries_per_tile) * block_size, di),
                            dtype=torch.float32, device=dev) if deterministic else dummy)
    for row0 in range(0, total_q, rows_per_chunk):
        rows = min(rows_per_chunk, total_q - row0)
        sched = build_schedule(topk_indices[:, row0:row0 + rows], row0, info, block_size,
                               entries_per_tile, deterministic)
        grid = (sched.num_tiles_bound,)
        sched_args = (sched.tile_group, sched.tile_start, sched.tile_end, sched.entry_row,
                      info.seq, info.pos, info.seq_k_start, info.seq_len_k, info.block_base,
                      info.num_blocks_bound)
        n_ent = hkv * rows * topk  # CSR positions of this chunk; invalid entries sort last
        part_kl[:n_ent].zero_()  # positions of invalid entries are never written
        kl_teacher_kernel[grid](
            q, k, lse, part_pt, *sched_args, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), lse.stride(1),
            G=g, G_PAD=g_pad, TOKENS=tokens, BLOCK=block_size, D=d,
            IEEE=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
        kl_student_kernel[grid](
            qi, ki, index_lse, part_pt, part_kl,
            part_dqi if with_grad else dummy, dki_acc if with_grad else dummy,
            sched.tile_slot if deterministic else sched.tile_group, part_dki,
            *sched_args, scale_i * LOG2E, norm * scale_i,
            qi.stride(0), qi.stride(1), ki.stride(0), index_lse.stride(0), index_lse.stride(1),
            dki_acc.stride(-2) if with_grad else 0, dki_acc.stride(0) if deterministic else 0,
            ROWS=s_rows, BLOCK=block_size, DI=di, IEEE=qi.dtype == torch.float32,
            WITH_GRAD=with_grad, DETERMINISTIC=deterministic, num_warps=s_warps,
            num_stages=s_stages)
        if deterministic:
            reduce_key_partials(sched, info, part_dki, dki_acc, dki_acc.stride(1),
                                dki_acc.stride(0), block_size)
        total += part_kl[:n_ent].sum()
        if with_grad:
            reduce_rows = 16
            dqi_reduce_kernel[(triton.cdiv(rows, reduce_rows), hkv)](
                part_dqi, sched.entry_of, dqi, row0, rows, topk, dqi.stride(0), dqi.stride(1),
                DI=di, ROWS=reduce_rows, num_warps=4)
    if deterministic:
        for g_acc in dki_acc:  # group order
            dki += g_acc
    return total * norm, dqi, dki


class IndexerKLTriton(torch.autograd.Function):
    """Forward computes the loss and the gradients in one pass; backward scales them."""

    @staticmethod
    def forward(ctx, q, k, qi, ki, topk_indices, varlen, block_size, scale, scale_i, coeff,
                lse, index_lse, deterministic):
        with_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        if topk_indices is None:  # dense warmup KL: the same kernels, chunk by chunk (dense.py)
            loss, dqi, dki = dense_kl_forward(q, k, qi, ki, varlen, block_size, scale, scale_i,
                                              coeff, lse, index_lse, with_grad, indexer_kl_forward,
                                              deterministic)
        else:
            loss, dqi, dki = indexer_kl_forward(q, k, qi, ki, topk_indices, varlen, block_size,
                                                scale, scale_i, coeff, lse, index_lse, with_grad,
                                                deterministic)
        if with_grad:
            ctx.save_for_backward(dqi, dki)
        ctx.shapes = (qi.dtype, ki.dtype, ki.shape)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dqi, dki = ctx.saved_tensors
        qi_dtype, ki_dtype, ki_shape = ctx.shapes
        dqi = (dqi * grad).to(qi_dtype) if ctx.needs_input_grad[2] else None
        dki = (dki * grad).to(ki_dtype).view(ki_shape) if ctx.needs_input_grad[3] else None
        return (None, None, dqi, dki) + (None,) * 9


def indexer_kl_loss_triton(q, k, qi, ki, topk_indices, varlen, *, block_size, scale, scale_i,
                           coeff, lse, index_lse, deterministic=False):
    """Sparse KL of docs/spec.md section 6: float32 0-d loss, differentiable w.r.t. qi and ki only.
    ``topk_indices=None``: the dense warmup KL (T = every visible token), through the same
    kernels a chunk of blocks at a time (dense.py). ``deterministic``: bitwise-repeatable
    dki (no float atomics between programs; module docstring)."""
    _check_supported(q, qi, topk_indices, block_size)
    q, k, qi, ki = (_last_dim_contiguous(x.detach() if i < 2 else x)
                    for i, x in enumerate((q, k, qi, ki)))
    if topk_indices is not None:
        topk_indices = topk_indices.contiguous()
    return IndexerKLTriton.apply(q, k, qi, ki, topk_indices, varlen, block_size,
                                 scale, scale_i, coeff, lse, index_lse, deterministic)
