"""The public functional API of openmsa (docs/spec.md section 10).

Every function accepts either the packed varlen layout of docs/spec.md section 3
(``[total, heads, dim]`` plus int32 ``cu_seqlens_q``/``cu_seqlens_k``) or the batched
layout ``[batch, seqlen, heads, dim]`` with both cu_seqlens left as ``None`` (every
sequence then has the same Lq and Lk, queries bottom-right aligned to the keys).

Batched shapes of the other tensors are the packed ones with ``total_q`` split into
``[batch, seqlen_q]`` in place (free views):
``topk_indices [Hkv, batch, Lq, K]``, ``index_lse [Hkv, batch, Lq]``, ``lse [batch, Lq, Hq]``.

Query fragments over a shared KV (the fragment form of docs/spec.md section 3): pass
``kv_start``/``kv_len`` (int32 ``[num_seqs]``, the key range of every query sequence) with
``cu_seqlens_q`` and ``cu_seqlens_k=None``; several query sequences may use keys of one range.

All arguments are validated before any work (``_validation``); bad input raises
ValueError/TypeError naming the argument. No input is modified. Then each function calls
the ops ``torch.ops.openmsa.*`` (``openmsa.library``, which says which implementation
runs), so that torch.compile traces these functions without a graph break.
"""

from __future__ import annotations

import torch

from . import _validation as V
from .library import require_triton, resolve

__all__ = ["indexer_topk", "sparse_attention", "indexer_kl_loss", "msa_attention"]


class _Batch:
    """Batch size and query length of batched inputs, to reshape results back."""

    def __init__(self, batch: int, seqlen_q: int):
        self.batch, self.seqlen_q = batch, seqlen_q


def _packed(q_side, k_side, cu_seqlens_q, cu_seqlens_k, fragments=False):
    """Validate the layout choice; return packed tensors, cu_seqlens and a _Batch or None.

    q_side/k_side: lists of (name, tensor) indexed by query rows / key rows.
    fragments: kv_start/kv_len were given (the fragment form, always packed).
    """
    if fragments:
        if cu_seqlens_q is None or cu_seqlens_k is not None:
            raise ValueError("kv_start/kv_len (the fragment form) take packed 3-D inputs with "
                             "cu_seqlens_q and cu_seqlens_k=None: the key ranges replace cu_seqlens_k")
        return [t for _, t in q_side], [t for _, t in k_side], cu_seqlens_q, None, None
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (or both None "
                         "for batched [batch, seqlen, heads, dim] inputs)")
    if cu_seqlens_q is not None:
        return [t for _, t in q_side], [t for _, t in k_side], cu_seqlens_q, cu_seqlens_k, None
    for name, t in q_side + k_side:
        V.check_tensor(name, t, 4, "[batch, seqlen, heads, dim] (batched form; pass "
                       "cu_seqlens_q/cu_seqlens_k for the packed 3-D form)")
    (qname, q0), (kname, k0) = q_side[0], k_side[0]
    batch, lq, lk = q0.shape[0], q0.shape[1], k0.shape[1]
    for name, t in q_side + k_side:
        if t.shape[0] != batch:
            raise ValueError(f"{name} must have batch size {batch} like {qname}, got {t.shape[0]}")
    for side, length, ref in ((q_side, lq, qname), (k_side, lk, kname)):
        for name, t in side:
            if t.shape[1] != length:
                raise ValueError(f"{name} must have seqlen {length} like {ref}, got {t.shape[1]}")
    if lq > lk:
        raise ValueError(f"{qname} seqlen ({lq}) must be <= {kname} seqlen ({lk}): queries are "
                         f"the last Lq positions of the keys")
    dev = q0.device
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev) * lq
    cu_k = torch.arange(batch + 1, dtype=torch.int32, device=dev) * lk
    return ([t.flatten(0, 1) for _, t in q_side], [t.flatten(0, 1) for _, t in k_side],
            cu_q, cu_k, _Batch(batch, lq))


def _flatten_rows(name, t, batched: _Batch | None, row_dim: int):
    if t is None or batched is None:
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    b, lq = batched.batch, batched.seqlen_q
    if t.dim() < row_dim + 2 or tuple(t.shape[row_dim:row_dim + 2]) != (b, lq):
        raise ValueError(f"{name} must have dims {row_dim}, {row_dim + 1} equal to "
                         f"(batch, seqlen_q) = ({b}, {lq}) for batched inputs, got {tuple(t.shape)}")
    return t.flatten(row_dim, row_dim + 1)


def _unflatten_rows(t, batched: _Batch | None, row_dim: int):
    return t if batched is None else t.unflatten(row_dim, (batched.batch, batched.seqlen_q))


def indexer_topk(qi, ki, cu_seqlens_q=None, cu_seqlens_k=None, *, block_size=128, topk=16,
                 softmax_scale=None, deterministic=False, backend="auto", init_blocks=0,
                 local_blocks=1, kv_start=None, kv_len=None, index_dtype=None):
    """Index Branch (docs/spec.md section 4): exp-free Top-k key blocks per query and KV group.

    Args:
        qi: ``[total_q, Hkv, Di]`` index queries (one head per KV group).
        ki: ``[total_k, 1, Di]`` index keys (one head shared by the groups).
        cu_seqlens_q, cu_seqlens_k: int32 ``[num_seqs + 1]``; None for batched inputs.
        block_size: tokens per key block (B). topk: blocks kept per query and group (K).
        softmax_scale: scale_i, default ``Di ** -0.5``.
        deterministic: order the non-local entries by score desc, then block id asc.
        init_blocks, local_blocks: forced blocks (docs/spec.md section 4), taken before any
            ranked one: blocks ``0 .. init_blocks-1`` and the ``local_blocks`` blocks ending
            at the query's own block, where visible; ``init_blocks + local_blocks <= topk``.
        kv_start, kv_len: int32 ``[num_seqs]``, the fragment form (module docstring).
        index_dtype: None, or ``torch.float8_e4m3fn`` to rank blocks by the scores of the
            E4M3 quantization of qi and ki (one float32 scale per query row and per key
            token, ``openmsa.serving.quantize_fp8_per_token`` with ``finite_payload=True``:
            a non-finite vector scores NaN; an FP8 MMA on Hopper). The
            selection is exact for the dequantized values; ``index_lse`` is still taken
            over the scores of qi and ki as given, so the KL stays in their precision.
    Returns:
        ``topk_indices`` int32 ``[Hkv, total_q, topk]``: the selected earlier blocks, then
        the forced blocks in ascending order (the local block last), then -1 padding.
        ``index_lse`` float32 ``[Hkv, total_q]``: the logsumexp of the index scores over
        the selected visible tokens. No autograd.
    """
    backend = V.check_backend(backend)
    block_size = V.check_positive_int("block_size", block_size)
    topk = V.check_positive_int("topk", topk)
    init_blocks, local_blocks = V.check_forced_blocks(init_blocks, local_blocks, topk)
    forced = dict(init_blocks=init_blocks, local_blocks=local_blocks)
    V.check_bool("deterministic", deterministic)
    fp8 = V.check_index_dtype(index_dtype)
    (qi,), (ki,), cu_q, cu_k, batched = _packed([("qi", qi)], [("ki", ki)], cu_seqlens_q, cu_seqlens_k,
                                                 kv_start is not None or kv_len is not None)
    V.check_index_qk(qi, ki)
    scale = V.check_scale("softmax_scale", softmax_scale, qi.shape[2] ** -0.5)
    impl = resolve("indexer_topk", backend, qi.device)
    varlen = V.check_varlen(cu_q, cu_k, qi.shape[0], ki.shape[0], qi.device,
                            read_values=impl == "reference", kv_start=kv_start, kv_len=kv_len)
    if impl == "triton":
        require_triton("indexer_topk")
    with torch.no_grad():
        idx, lse = torch.ops.openmsa.indexer_topk(
            qi, ki, varlen.cu_seqlens_q, varlen.cu_seqlens_k, block_size=block_size, topk=topk,
            scale=scale, deterministic=deterministic, **forced, kv_start=varlen.kv_start,
            kv_len=varlen.kv_len, fp8=fp8, impl=impl)
    return _unflatten_rows(idx, batched, 1), _unflatten_rows(lse, batched, 1)


def sparse_attention(q, k, v, topk_indices, cu_seqlens_q=None, cu_seqlens_k=None, *,
                     block_size=128, softmax_scale=None, deterministic=False, backend="auto",
                     kv_start=None, kv_len=None):
    """Main Branch (docs/spec.md section 5): exact attention over the selected blocks.

    Args:
        q ``[total_q, Hq, D]``, k, v ``[total_k, Hkv, D]`` (Hq a multiple of Hkv).
        topk_indices: int32 ``[Hkv, total_q, K]`` block ids; -1 and out-of-range ids are
            ignored, duplicates count once. ``None`` attends to every visible token
            (dense causal attention, the warmup phase of docs/spec.md section 6).
        softmax_scale: default ``D ** -0.5``.
        deterministic: a bitwise-repeatable backward. The Triton kernels then add the dk,
            dv sums of a key block that is split over several programs (a block many
            queries select) in a fixed order instead of with float atomics, through
            scratch inside their partial budget (about 1/8 of the dq partials). The forward
            and dq are deterministic either way. The reference backend is deterministic on
            CPU tensors; on CUDA tensors its scatter-adds are those of ``index_add_``.
        kv_start, kv_len: int32 ``[num_seqs]``, the fragment form (module docstring); the
            gradients of keys that several query sequences use are summed over them.
    Returns:
        ``out`` like q (differentiable w.r.t. q, k, v) and ``lse`` float32 ``[total_q, Hq]``
        (not differentiable). A query with no selected visible token gets out = 0 and
        lse = -inf.

    Non-finite inputs, the same on every backend: IEEE arithmetic of the math, as SDPA
    does. Row (t, h) is NaN (every entry of out[t, h], and lse[t, h]) when a token j of
    T(t, g) has a NaN or +inf score s(h, j), or a non-finite v[j, g] (whatever its weight:
    0 * NaN = NaN). A score of -inf gives its token weight 0 (exp(-inf) = 0); a row whose
    scores are all -inf is like an empty T (out 0, lse -inf). Tokens outside T(t, g) never
    reach row (t, h). The backward does not fail on non-finite values: gradients they
    reach are NaN, and through zero weights (0 * NaN) NaN may also reach the gradients of
    rows that share a key block with them.
    """
    backend = V.check_backend(backend)
    block_size = V.check_positive_int("block_size", block_size)
    V.check_bool("deterministic", deterministic)
    (q,), (k, v), cu_q, cu_k, batched = _packed([("q", q)], [("k", k), ("v", v)],
                                                 cu_seqlens_q, cu_seqlens_k,
                                                 kv_start is not None or kv_len is not None)
    V.check_qkv(q, k, v)
    if topk_indices is not None:
        topk_indices = _flatten_rows("topk_indices", topk_indices, batched, 1)
        V.check_topk_indices(topk_indices, k.shape[1], q.shape[0], q.device)
    scale = V.check_scale("softmax_scale", softmax_scale, q.shape[2] ** -0.5)
    op = "sparse_attention" if topk_indices is not None else "dense_attention"
    impl = resolve(op, backend, q.device)
    varlen = V.check_varlen(cu_q, cu_k, q.shape[0], k.shape[0], q.device,
                            read_values=impl == "reference", kv_start=kv_start, kv_len=kv_len)
    if impl == "triton":
        require_triton(op)
    out, lse = torch.ops.openmsa.sparse_attention(
        q, k, v, topk_indices, varlen.cu_seqlens_q, varlen.cu_seqlens_k, block_size=block_size,
        scale=scale, deterministic=deterministic, kv_start=varlen.kv_start, kv_len=varlen.kv_len,
        impl=impl)
    lse = lse.float()  # the reference's float64 LSE of float64 inputs (kept for its backward)
    return _unflatten_rows(out, batched, 0), _unflatten_rows(lse, batched, 0)


def indexer_kl_loss(q, k, qi, ki, topk_indices, cu_seqlens_q=None, cu_seqlens_k=None, *,
                    block_size=128, softmax_scale=None, index_softmax_scale=None, coeff=1.0,
                    lse=None, index_lse=None, deterministic=False, backend="auto", kv_start=None,
                    kv_len=None):
    """Sparse KL of docs/spec.md section 6: a scalar, differentiable w.r.t. qi and ki only.

    The teacher is the group-mean of the Main Branch softmax on T (q, k are detached);
    the student is the index softmax on T. ``lse`` (``[total_q, Hq]``) and ``index_lse``
    (``[Hkv, total_q]``) from ``sparse_attention`` / ``indexer_topk`` are reused when
    given, else recomputed. ``topk_indices=None`` takes T = all visible tokens (the
    dense warmup phase of docs/spec.md section 6). ``kv_start``/``kv_len``: the fragment
    form (module docstring).

    ``deterministic``: bitwise-repeatable gradients. The Triton kernels then sum the dki
    of a key block over programs and groups in a fixed order instead of with float
    atomics, through per-group float32 accumulators (Hkv x total_k x Di x 4 bytes during
    the forward, 2 GB at 1M tokens with the defaults) and scratch inside their partial
    budget. The loss and dqi are deterministic either way.

    Non-finite inputs, the same on every backend: IEEE arithmetic of the math, where the
    term of a token with P_T(j) = 0 is 0 (0 log 0 = 0) and the normalisers are
    max + log(sum(exp(. - max))). So the KL of (t, g) is NaN when a head of group g of row
    t has a NaN or +inf main score on T (the teacher's LSE is NaN; so too when a given
    ``lse`` is NaN there, e.g. from a row ``sparse_attention`` made NaN through v), or the
    index score is NaN at a token with P_T(j) != 0, or the index LSE is NaN (recomputed:
    a NaN or +inf index score on T); it is +inf when the student gives 0 (index score
    -inf) to a token with P_T(j) > 0. The loss is NaN as soon as one (t, g) is, and is
    unaffected by values that reach no (t, g). The backward does not fail on non-finite
    values; their gradients are NaN (and may reach other rows sharing a key block).
    """
    backend = V.check_backend(backend)
    block_size = V.check_positive_int("block_size", block_size)
    coeff = V.check_finite_float("coeff", coeff)
    V.check_bool("deterministic", deterministic)
    (q, qi), (k, ki), cu_q, cu_k, batched = _packed([("q", q), ("qi", qi)], [("k", k), ("ki", ki)],
                                                     cu_seqlens_q, cu_seqlens_k,
                                                     kv_start is not None or kv_len is not None)
    V.check_qkv(q, k, k)
    V.check_index_qk(qi, ki, total_q=q.shape[0], hkv=k.shape[1])
    V.check_same("device", [("q", q), ("qi", qi)], "device")
    if ki.shape[0] != k.shape[0]:
        raise ValueError(f"ki must have total_k = {k.shape[0]} rows like k, got {ki.shape[0]}")
    if topk_indices is not None:
        topk_indices = _flatten_rows("topk_indices", topk_indices, batched, 1)
        V.check_topk_indices(topk_indices, k.shape[1], q.shape[0], q.device)
    lse = _flatten_rows("lse", lse, batched, 0)
    index_lse = _flatten_rows("index_lse", index_lse, batched, 1)
    V.check_lse("lse", lse, (q.shape[0], q.shape[1]), q.device)
    V.check_lse("index_lse", index_lse, (k.shape[1], q.shape[0]), q.device)
    scale = V.check_scale("softmax_scale", softmax_scale, q.shape[2] ** -0.5)
    scale_i = V.check_scale("index_softmax_scale", index_softmax_scale, qi.shape[2] ** -0.5)
    impl = resolve("indexer_kl_loss", backend, q.device)
    varlen = V.check_varlen(cu_q, cu_k, q.shape[0], k.shape[0], q.device,
                            read_values=impl == "reference", kv_start=kv_start, kv_len=kv_len)
    lse = None if lse is None else lse.detach()
    index_lse = None if index_lse is None else index_lse.detach()
    if impl == "triton":
        require_triton("indexer_kl_loss")
    with_grad = torch.is_grad_enabled() and (qi.requires_grad or ki.requires_grad)
    loss, _, _ = torch.ops.openmsa.indexer_kl_loss(
        q.detach(), k.detach(), qi, ki, topk_indices, varlen.cu_seqlens_q, varlen.cu_seqlens_k,
        lse=lse, index_lse=index_lse, block_size=block_size, scale=scale, index_scale=scale_i,
        coeff=coeff, deterministic=deterministic, with_grad=with_grad, kv_start=varlen.kv_start,
        kv_len=varlen.kv_len, impl=impl)
    return loss


def msa_attention(q, k, v, qi, ki, cu_seqlens_q=None, cu_seqlens_k=None, *, block_size=128,
                  topk=16, softmax_scale=None, index_softmax_scale=None, deterministic=False,
                  backend="auto", init_blocks=0, local_blocks=1, kv_start=None, kv_len=None,
                  index_dtype=None):
    """The whole MSA layer core: Index Branch -> Main Branch -> sparse KL.

    Returns ``(out, kl_loss, topk_indices)``: out like q (differentiable w.r.t. q, k, v),
    the unscaled KL (coeff 1; differentiable w.r.t. qi, ki only) and the indices.
    ``deterministic``: the indices in the deterministic order of ``indexer_topk`` and the
    bitwise-repeatable backward of ``sparse_attention`` and ``indexer_kl_loss`` (their
    ``deterministic`` option). ``init_blocks``, ``local_blocks``: the forced blocks of
    ``indexer_topk``. Non-finite inputs: the rules of those functions.
    ``kv_start``/``kv_len``: the fragment form (module docstring). ``index_dtype``: the
    Index Branch's ranking precision (``indexer_topk``; the KL keeps the inputs' own).
    """
    backend = V.check_backend(backend)
    # Validate everything up front, including what only the later stages read.
    (q_p, qi_p), (k_p, v_p, ki_p), cu_q, cu_k, batched = _packed(
        [("q", q), ("qi", qi)], [("k", k), ("v", v), ("ki", ki)], cu_seqlens_q, cu_seqlens_k,
        kv_start is not None or kv_len is not None)
    V.check_qkv(q_p, k_p, v_p)
    V.check_index_qk(qi_p, ki_p, total_q=q_p.shape[0], hkv=k_p.shape[1])
    V.check_same("device", [("q", q_p), ("qi", qi_p)], "device")
    if ki_p.shape[0] != k_p.shape[0]:
        raise ValueError(f"ki must have total_k = {k_p.shape[0]} rows like k, got {ki_p.shape[0]}")
    V.check_scale("softmax_scale", softmax_scale, 1.0)
    V.check_scale("index_softmax_scale", index_softmax_scale, 1.0)
    V.check_positive_int("block_size", block_size)
    V.check_positive_int("topk", topk)
    V.check_forced_blocks(init_blocks, local_blocks, topk)
    V.check_bool("deterministic", deterministic)
    V.check_index_dtype(index_dtype)
    stages = ("indexer_topk", "sparse_attention", "indexer_kl_loss")
    V.check_varlen(cu_q, cu_k, q_p.shape[0], k_p.shape[0], q_p.device,
                   read_values=any(resolve(op, backend, q_p.device) == "reference" for op in stages),
                   kv_start=kv_start, kv_len=kv_len)
    if backend == "triton":  # fail before any work if a stage has no kernels yet
        for op in stages:
            require_triton(op)
    kw = dict(block_size=block_size, backend=backend, kv_start=kv_start, kv_len=kv_len)
    idx, index_lse = indexer_topk(qi_p.detach(), ki_p.detach(), cu_q, cu_k, topk=topk,
                                  softmax_scale=index_softmax_scale, deterministic=deterministic,
                                  init_blocks=init_blocks, local_blocks=local_blocks,
                                  index_dtype=index_dtype, **kw)
    out, lse = sparse_attention(q_p, k_p, v_p, idx, cu_q, cu_k, softmax_scale=softmax_scale,
                                deterministic=deterministic, **kw)
    kl = indexer_kl_loss(q_p.detach(), k_p.detach(), qi_p, ki_p, idx, cu_q, cu_k,
                         softmax_scale=softmax_scale, index_softmax_scale=index_softmax_scale,
                         lse=lse, index_lse=index_lse, deterministic=deterministic, **kw)
    return _unflatten_rows(out, batched, 0), kl, _unflatten_rows(idx, batched, 1)
