"""Launcher of the Triton sparse KL loss (docs/spec.md section 6; kernels.py); the autograd
Function is in triton_impl.py.

Forward = two passes over one KV-outer schedule of the sparse attention
(``openmsa.ops.utils.schedule``): the teacher pass (main scores -> group-mean
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
the scratch budget (``configs.Scratch``, the sparse attention's). Chunk sizes depend only on shapes: the
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
tile order, see ``openmsa.ops.utils.schedule``) and dki = dki_0 + ... + dki_{Hkv-1}.
Extra memory, during the forward only: the dki_g, Hkv x total_k x Di x 4 bytes (2 GB at
1M tokens with Hkv = 4, Di = 128), and the slots (B x Di x 4 bytes, at most 2 per tile of
entries), which are counted in the partial budget.
"""

from __future__ import annotations

import torch
import triton

from ..attention.launch import sparse_attention_forward
from ..indexer.lse import index_lse_kv_outer
from ..utils.configs import launch_config
from ..utils.partials import reduce_key_partials, rows_per_chunk, sum_rows
from ..utils.schedule import row_info, schedule_args, schedule_chunks, slots_bound
from ..utils.shapes import check_kernel_shapes
from ..utils.tiles import LOG2E
from .kernels import kl_student_kernel, kl_teacher_kernel

# Also bounds the schedule's temporaries (build_schedule: a few int64 per (group, row,
# slot) and a [Hkv, rows, K, K] duplicate mask) when the partials are small (no grad).
_MAX_ROWS_PER_CHUNK = 1 << 16


def check_supported(q, qi, topk_indices, block_size):
    check_kernel_shapes("indexer_kl_loss", "indexer KL loss", block_size=block_size, q=q, qi=qi,
                        topk=None if topk_indices is None else topk_indices.shape[2])


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
    teacher = launch_config("kl_teacher", q.device)
    student = launch_config("kl_student", q.device)
    tile_rows = teacher.tile_rows
    if tile_rows is None:
        tile_rows = max(32, g_pad) if q.dtype == torch.float32 else max(128, g_pad)
    tokens = max(1, tile_rows // g_pad, triton.cdiv(16, g_pad))  # tl.dot needs M >= 16
    s_rows = max(16, student.rows)
    topk = topk_indices.shape[2]
    dev = q.device
    total = torch.zeros((), dtype=torch.float32, device=dev)
    # every row of dqi is written by row_sum_kernel (0 where the row has no entry)
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

    info = row_info(varlen.cu_seqlens_q, varlen.cu_seqlens_k, total_q, total_k, block_size,
                    varlen.kv_start, varlen.kv_len)
    entries_per_tile = tokens * teacher.segment_tiles
    per_entry = block_size * 4 + (di * 4 if with_grad else 0) + 4
    if deterministic:  # dki slots, at most 2 per entries_per_tile entries
        per_entry += 2 * block_size * di * 4 / entries_per_tile
    chunk = rows_per_chunk(total_q, hkv * topk * per_entry, dev, _MAX_ROWS_PER_CHUNK)
    n_part = hkv * chunk * topk
    part_pt = torch.empty((n_part, block_size), dtype=torch.float32, device=dev)
    part_kl = torch.empty((n_part,), dtype=torch.float32, device=dev)
    part_dqi = torch.empty((n_part, di), dtype=torch.float32, device=dev) if with_grad else None
    dummy = torch.empty((1,), dtype=torch.float32, device=dev)
    part_dki = (torch.empty((slots_bound(n_part, entries_per_tile) * block_size, di),
                            dtype=torch.float32, device=dev) if deterministic else dummy)
    for row0, rows, sched in schedule_chunks(topk_indices, info, block_size, entries_per_tile,
                                             chunk, deterministic):
        grid = (sched.num_tiles_bound,)
        sched_args = schedule_args(sched, info)
        n_ent = hkv * rows * topk  # CSR positions of this chunk; invalid entries sort last
        part_kl[:n_ent].zero_()  # positions of invalid entries are never written
        kl_teacher_kernel[grid](
            q, k, lse, part_pt, *sched_args, scale * LOG2E.value,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), lse.stride(1),
            G=g, G_PAD=g_pad, TOKENS=tokens, BLOCK=block_size, D=d,
            IEEE=q.dtype == torch.float32, num_warps=teacher.num_warps,
            num_stages=teacher.num_stages)
        kl_student_kernel[grid](
            qi, ki, index_lse, part_pt, part_kl,
            part_dqi if with_grad else dummy, dki_acc if with_grad else dummy,
            sched.tile_slot if deterministic else sched.tile_group, part_dki,
            *sched_args, scale_i * LOG2E.value, norm * scale_i,
            qi.stride(0), qi.stride(1), ki.stride(0), index_lse.stride(0), index_lse.stride(1),
            dki_acc.stride(-2) if with_grad else 0, dki_acc.stride(0) if deterministic else 0,
            ROWS=s_rows, BLOCK=block_size, DI=di, IEEE=qi.dtype == torch.float32,
            WITH_GRAD=with_grad, DETERMINISTIC=deterministic, num_warps=student.num_warps,
            num_stages=student.num_stages)
        if deterministic:
            reduce_key_partials(sched, info, part_dki, dki_acc, dki_acc.stride(1),
                                dki_acc.stride(0), block_size)
        total += part_kl[:n_ent].sum()
        if with_grad:
            sum_rows(part_dqi, sched.entry_of, dqi, row0, rows, 1, rows_per_program=16)
    if deterministic:
        for g_acc in dki_acc:  # group order
            dki += g_acc
    return total * norm, dqi, dki
