"""Triton building blocks shared by the KV-outer kernels (attention forward and backward,
index LSE, KL teacher and student) and the decode kernels.

A KV-outer program works on one segment of a schedule (schedule.py): one key block of one
group and a run of the CSR entries (query rows) that selected it. ``segment_block`` says
which; ``key_block`` loads the block's keys once; ``entry_tokens`` gives, for a tile of
entries, their query rows and causal positions. Scores are kept in log2 units where a
softmax follows (``LOG2E`` folded into the scale), so the kernels use exp2.
"""

import triton
import triton.language as tl

# constexpr: a compiled kernel may read a module global only if it is a tl.constexpr (the
# interpreter reads any); host code takes the float as LOG2E.value.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN2


@triton.jit
def mma(a, b, IEEE: tl.constexpr):
    """a @ b, float32 accumulation: exact products and sums ("ieee") for float32 operands,
    the tensor-core default (tf32 for float32, native for 16-bit) otherwise."""
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def segment_block(w, tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start,
                  seq_len_k, block_base, num_blocks_bound):
    """What program w of a schedule works on: its CSR entry range [e0, e1) (empty for the
    programs past the real count), its group g, the key block's id c within its sequence,
    the sequence's first key row (int64) and its key count."""
    e0 = tl.load(tile_start + w)
    e1 = tl.load(tile_end + w)
    grp = tl.load(tile_group + w)
    g = grp // num_blocks_bound
    seq = tl.load(row_seq + tl.load(entry_row + e0))
    c = grp % num_blocks_bound - tl.load(block_base + seq)
    k_start = tl.load(seq_k_start + seq).to(tl.int64)
    len_k = tl.load(seq_len_k + seq)
    return e0, e1, g, c, k_start, len_k


@triton.jit
def key_block(X, k_start, j, key_ok, stride_xt, head_offset, d):
    """Rows j (key positions of the sequence, masked by key_ok: 0 past its end) of packed
    keys X [total_k, H, Dx] at head offset ``head_offset`` (= head * stride_xh): [len(j), Dx]."""
    krow = k_start + j.to(tl.int64)
    return tl.load(X + krow[:, None] * stride_xt + head_offset + d[None, :],
                   mask=key_ok[:, None], other=0.0)


@triton.jit
def entry_tokens(entry_row, row_pos, e, ok):
    """Query row t (int64) and causal position of CSR entries e (masked by ok: t = 0 and
    position -1, which sees no key)."""
    t = tl.load(entry_row + e, mask=ok, other=0).to(tl.int64)
    pos = tl.load(row_pos + t, mask=ok, other=-1)
    return t, pos
