"""Streaming Top-k of key blocks in registers, shared by the Index Branch kernel
(ops/indexer) and the decode index scan (serving): block max, sort keys, insertion.

Each (score, block id) pair is one int64 sort key

    key = (ordered(score) << 32) | (0x7FFFFFFF - id)

where ordered() maps the float32 bits to an order-preserving int32 (-0.0 normalised to
+0.0, NaN just below -inf). A larger key is a better block: score descending, then id
ascending, the spec's order. Keys of different blocks are distinct, so "replace the row's
minimum" replaces exactly one slot.

The Top-k state of a row is KPAD int64 slots (a power of two). Slots s < NSEL start as
distinct padding keys below every real key (PAD_BASE + s), so they fill in slot order and
the filled slots are always a prefix; slots s >= NSEL hold INT64_MAX and are never
replaced.

The block max propagates NaN: a NaN-propagating ``tl.reduce`` when compiled; under the
interpreter, whose custom-combine reductions run per element in Python, ``tl.max`` plus a
NaN count (``NAN_MAX_REDUCE=False``, the same result).
"""

import triton
import triton.language as tl

NAN_ORD = tl.constexpr(-0x7F800002)  # ordered int32 of NaN: just below -inf (-0x7F800001)
PAD_BASE = tl.constexpr(-9223372036854775807)  # -(2**63 - 1): padding keys PAD_BASE + slot
INT64_MAX = tl.constexpr(9223372036854775807)


@triton.jit
def max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def block_max(z, AXIS: tl.constexpr, NAN_MAX_REDUCE: tl.constexpr):
    """Max of z along AXIS; NaN if any element is NaN."""
    if NAN_MAX_REDUCE:
        m = tl.reduce(z, AXIS, max_nan)
    else:
        m = tl.max(z, axis=AXIS)
        m = tl.where(tl.sum((z != z).to(tl.int32), axis=AXIS) > 0, float("nan"), m)
    return m


@triton.jit
def score_key(score, block_id):
    """The int64 sort key of (score, block id) (module docstring)."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 -> +0.0
    u = score.to(tl.int32, bitcast=True)
    o = tl.where(u < 0, u ^ 0x7FFFFFFF, u)
    o = tl.where(score != score, NAN_ORD, o)
    return (o.to(tl.int64) << 32) | (0x7FFFFFFF - block_id)


@triton.jit
def key_block_id(keys):
    """Block ids (int32) of sort keys."""
    return (0x7FFFFFFF - (keys & 0xFFFFFFFF)).to(tl.int32)


@triton.jit
def empty_topk(ROWS: tl.constexpr, KPAD: tl.constexpr, NSEL: tl.constexpr):
    """The initial [ROWS, KPAD] state and its row minimum (module docstring)."""
    col = tl.arange(0, KPAD)
    keys = tl.where(col[None, :] < NSEL, PAD_BASE + col[None, :].to(tl.int64),
                    tl.full([ROWS, KPAD], INT64_MAX, tl.int64))
    return keys, tl.min(keys, axis=1)


@triton.jit
def topk_insert(keys, kmin, cand, ins):
    """Rows where ``ins`` and cand beats the row's minimum replace that slot by cand."""
    ins = ins & (cand > kmin)
    keys = tl.where(ins[:, None] & (keys == kmin[:, None]), cand[:, None], keys)
    return keys, tl.min(keys, axis=1)


@triton.jit
def sorted_topk(keys, NSEL: tl.constexpr, KPAD: tl.constexpr):
    """The first NSEL slots sorted best first, padding after them."""
    col = tl.arange(0, KPAD)
    keys = tl.where(col[None, :] < NSEL, keys, PAD_BASE)
    return tl.sort(keys, dim=1, descending=True)
