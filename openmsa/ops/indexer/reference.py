"""PyTorch reference of the Index Branch (docs/spec.md section 4).

For each sequence and chunk of its queries: index scores z = scale_i * <qi, ki>
(float32 accumulation), causal block max, exp-free Top-(K-F) of the candidate blocks
(ties to the smaller block id, NaN below every number), the F forced blocks appended in
ascending order (init blocks 0..I-1 and the L local blocks ending at the query's own
block; I = 0, L = 1 by default, so F = 1: the local block), -1 padding, and the
logsumexp of z over the selected visible tokens.

Memory per chunk is O(rows x Lk); rows are chosen so that a chunk stays within
``openmsa.ops.utils.reference.chunk_bytes()``. Output is always in deterministic order (score descending,
then block id ascending), which satisfies both ``deterministic`` settings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.reference import chunk_rows, compute_dtype, key_ranges, sequences


def _rank_blocks(block_score: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Block ids of each row ordered by (candidate first, non-NaN first, score
    descending, id ascending). Two stable sorts give the lexicographic order."""
    nan = torch.isnan(block_score)
    value = torch.where(nan | ~candidate, torch.full_like(block_score, float("-inf")), block_score)
    # -0.0 and +0.0 compare equal in a sort, so they tie and keep id order.
    order = torch.sort(value, dim=-1, descending=True, stable=True).indices
    tier = (candidate.long() * 2 + (candidate & ~nan).long()).gather(-1, order)
    return order.gather(-1, torch.sort(tier, dim=-1, descending=True, stable=True).indices)


def indexer_topk_reference(qi, ki, cu_q: tuple, cu_k: tuple | None, *, block_size: int, topk: int,
                           scale: float, init_blocks: int = 0, local_blocks: int = 1,
                           kv_ranges: tuple | None = None, lse_inputs: tuple | None = None):
    """qi [total_q, Hkv, Di], ki [total_k, 1, Di]; cu_q/cu_k host tuples, or cu_q and the
    fragment form's ``kv_ranges`` (starts, lens) in place of cu_k;
    init_blocks + local_blocks <= topk. ``lse_inputs``: (qi, ki) of the same shapes whose
    scores the index_lse is taken over (the selection still ranks ``qi``, ``ki``): the
    FP8 path ranks the dequantized values and normalises with the unquantized ones.

    Returns (topk_indices int32 [Hkv, total_q, topk], index_lse float32 [Hkv, total_q]).
    """
    total_q, hkv, _ = qi.shape
    device = qi.device
    cdt = compute_dtype(qi.dtype)
    topk_indices = torch.full((hkv, total_q, topk), -1, dtype=torch.int32, device=device)
    index_lse = torch.full((hkv, total_q), float("-inf"), dtype=torch.float32, device=device)
    slots = torch.arange(topk, device=device)
    for q0, lq, k0, lk in sequences(cu_q, key_ranges(cu_k, kv_ranges)):
        num_blocks = (lk + block_size - 1) // block_size
        ki_seq = ki[k0:k0 + lk, 0].to(cdt)  # [Lk, Di]
        if lse_inputs is not None:
            ki_lse = lse_inputs[1][k0:k0 + lk, 0].to(cdt)
        keys = torch.arange(lk, device=device)
        block_ids = torch.arange(num_blocks, device=device)
        # z, its masked copy and the token mask dominate: ~4 float-sized tensors of Hkv x Lk.
        rows = chunk_rows(4 * hkv * num_blocks * block_size * 8)
        for r0 in range(0, lq, rows):
            r1 = min(lq, r0 + rows)
            pos = (lk - lq) + torch.arange(r0, r1, device=device)  # [R]
            qi_rows = qi[q0 + r0:q0 + r1].to(cdt).transpose(0, 1)  # [Hkv, R, Di]
            # Scale after the product (not q * scale first) so that equal dot products
            # give equal scores: ties must be exact.
            z = torch.matmul(qi_rows, ki_seq.t()) * scale  # [Hkv, R, Lk]
            visible = keys[None, :] <= pos[:, None]  # [R, Lk]
            z = z.masked_fill(~visible, float("-inf"))
            padded = F.pad(z, (0, num_blocks * block_size - lk), value=float("-inf"))
            block_score = padded.view(hkv, r1 - r0, num_blocks, block_size).amax(-1)

            local = pos // block_size  # [R]
            # forced blocks [0, n_init) and [lo_local, local]; candidates [I, cand_end)
            cand_end = local - (local_blocks - 1)
            lo_local = cand_end.clamp(min=0)
            n_init = lo_local.clamp(max=init_blocks)
            n_forced = n_init + local + 1 - lo_local
            candidate = ((block_ids[None, :] >= init_blocks)
                         & (block_ids[None, :] < cand_end[:, None])).expand_as(block_score)
            order = _rank_blocks(block_score, candidate)
            nsel = topk - init_blocks - local_blocks  # ranked slots
            n_sel = (cand_end - init_blocks).clamp(min=0, max=nsel)  # how many are kept
            width = min(nsel, num_blocks)
            chosen = torch.full((hkv, r1 - r0, topk), -1, dtype=torch.long, device=device)
            chosen[..., :width] = order[..., :width]
            f = slots[None, :] - n_sel[:, None]  # index among the forced blocks
            forced = torch.where(f < n_init[:, None], f, lo_local[:, None] + f - n_init[:, None])
            row = torch.where(slots < n_sel[:, None], chosen,
                              torch.where(f < n_forced[:, None], forced, -1))
            topk_indices[:, q0 + r0:q0 + r1] = row.to(torch.int32)

            # Selected LSE over T(t, g): tokens of chosen blocks that are visible.
            if lse_inputs is not None:
                z = torch.matmul(lse_inputs[0][q0 + r0:q0 + r1].to(cdt).transpose(0, 1), ki_lse.t()) * scale
                z = z.masked_fill(~visible, float("-inf"))
            in_set = torch.zeros(hkv, r1 - r0, num_blocks + 1, dtype=torch.bool, device=device)
            in_set.scatter_(-1, torch.where(row < 0, num_blocks, row), True)
            token_in_set = in_set[..., :num_blocks].repeat_interleave(block_size, -1)[..., :lk]
            z = z.masked_fill(~token_in_set, float("-inf"))
            index_lse[:, q0 + r0:q0 + r1] = torch.logsumexp(z, dim=-1).float()
    return topk_indices, index_lse
