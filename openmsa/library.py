"""openmsa's ops as PyTorch custom ops (``torch.ops.openmsa.*``), and which implementation
runs: the one place that dispatches between the PyTorch references and the Triton kernels.

Every op is registered with ``torch.library.custom_op``, with a fake (meta) implementation
(output shapes follow from the inputs' shapes: no data-dependent shape) and, where it is
differentiable, its autograd (``register_autograd``) through a backward op. So
``torch.compile`` sees each op as one opaque node whose outputs it knows without running
it, ``torch.library.opcheck`` passes for each, and a CUDA graph captures them like any
other op.

Ops (docs/spec.md section 10 lists them with their arguments):

    openmsa::indexer_topk                 Index Branch (no autograd)
    openmsa::sparse_attention             Main Branch forward; topk_indices=None: dense
    openmsa::sparse_attention_backward    its backward (dq, dk, dv)
    openmsa::indexer_kl_loss              sparse / dense KL, with the gradients of the loss
    openmsa::indexer_kl_loss_backward     its backward (scales those gradients)
    openmsa::append_paged_kv              serving: write new tokens into the paged pools
    openmsa::decode_topk                  serving: MSADecodeWrapper's Index Branch
    openmsa::decode_attention             serving: MSADecodeWrapper's Main Branch
    openmsa::prefill                      serving: MSAPrefillWrapper's run

Each op but ``indexer_kl_loss_backward`` (plain torch arithmetic) takes its implementation
as the last argument ``impl``: "reference" (PyTorch) or "triton" (the kernels; on CPU
tensors under Triton's interpreter; the decode and prefill ops have only these).
:func:`resolve` turns a public ``backend`` ("auto" | "triton" | "reference") into it. The ops take *validated*
arguments (the public functions of ``openmsa.api`` and the serving wrappers validate, then
call them); only the reference reads cu_seqlens on the host, inside the op, where the
compiler does not see it, and checks their values there.

Each op is written in one place: its signature (the schema), its dispatch to the
implementations, its fake and its autograd follow each other below. An argument added to
an op is added to those four.

Kernel modules are imported on the first call that needs them (``_backend._load``: the
interpreter switch must be set before the Triton kernels are imported).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import _validation as V
from ._backend import _load
from .ops.append.reference import append_reference
from .ops.attention.reference import attention_backward, attention_forward
from .ops.indexer.reference import indexer_topk_reference
from .ops.kl.reference import kl_backward, kl_forward
from .ops.utils.fp8 import dequantize_fp8, quantize_fp8_per_token
from .ops.utils.reference import compute_dtype, key_ranges

# Triton launchers: name -> "module:function" (loaded on first use; tests may replace an
# entry by a callable, or remove it). The names of the public ops here ("indexer_topk",
# "sparse_attention", "dense_attention" (its topk_indices=None form), "indexer_kl_loss",
# "append_paged_kv") are those that :func:`resolve` takes.
TRITON_KERNELS: dict = {
    "indexer_topk": "openmsa.ops.indexer.triton_impl:indexer_topk_triton",
    "sparse_attention": "openmsa.ops.attention.triton_impl:sparse_attention_triton",
    "sparse_attention_backward": "openmsa.ops.attention.triton_impl:sparse_attention_backward_triton",
    "dense_attention": "openmsa.ops.attention.triton_impl:dense_attention_triton",
    "dense_attention_backward": "openmsa.ops.attention.triton_impl:dense_attention_backward_triton",
    "indexer_kl_loss": "openmsa.ops.kl.triton_impl:indexer_kl_loss_triton",
    "append_paged_kv": "openmsa.ops.append.triton_impl:append_triton",
    "decode_topk": "openmsa.serving.decode:launch_decode_topk",
    "decode_attention": "openmsa.serving.decode:launch_decode_attention",
    "prefill": "openmsa.serving.prefill:launch_prefill",
}

IMPLS = ("reference", "triton")


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The ``impl`` of ``op`` for a public ``backend``: "triton" or "reference". "auto"
    picks the kernels for CUDA tensors when ``op`` has them. Never raises: an explicit
    "triton" whose kernels are missing raises in :func:`require_triton`, after the
    arguments have been validated."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and op in TRITON_KERNELS else "reference"
    return backend


def require_triton(op: str) -> None:
    if op not in TRITON_KERNELS:
        raise NotImplementedError(
            f"the Triton backend of {op} is not implemented yet; "
            f"use backend='reference' (or 'auto', which falls back to it)"
        )


def _kernel(name: str, device: torch.device):
    require_triton(name)
    fn = TRITON_KERNELS[name]
    return _load(fn, device) if isinstance(fn, str) else fn


def _upcast_bf16(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


def _run_kernel(name: str, like_inputs: tuple, *args, **kwargs):
    """Call the Triton launcher ``name``. On CPU, Triton's interpreter computes bfloat16
    dots wrongly; bfloat16 -> float32 is exact, so there it runs the float32 kernels and
    casts the outputs at the positions ``like_inputs`` back to bfloat16."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    fn = _kernel(name, device)
    if device.type == "cpu" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16
                                    for a in (*args, *kwargs.values())):
        out = fn(*map(_upcast_bf16, args), **{k: _upcast_bf16(v) for k, v in kwargs.items()})
        return tuple(o.to(torch.bfloat16) if i in like_inputs else o for i, o in enumerate(out))
    return fn(*args, **kwargs)


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _varlen(cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor], total_q: int, total_k: int,
            impl: str, kv_start: Optional[Tensor] = None, kv_len: Optional[Tensor] = None):
    """The packed layout for ``impl`` (with ``kv_start``/``kv_len``: the fragment form,
    ``cu_seqlens_k`` None): the reference gets the host lists, read here and checked (the
    op is opaque to torch.compile, so this read is no graph break); the kernels get the
    device tensors only (never read on the host)."""
    varlen = V.Varlen(cu_seqlens_q, cu_seqlens_k, total_q, total_k, kv_start=kv_start, kv_len=kv_len)
    if impl != "reference":
        return varlen
    return V._check_fragment_values(varlen) if kv_start is not None else V._check_values(varlen)


def _ranges(varlen) -> tuple:
    """The references' (starts, lens) key range of every query sequence."""
    return key_ranges(varlen.cu_k, varlen.kv_ranges)


def _named(op: str, inputs: tuple) -> dict:
    """An op's inputs (as ``setup_context`` gets them, defaults filled in) by argument name."""
    schema = getattr(torch.ops.openmsa, op).default._schema
    return {a.name: x for a, x in zip(schema.arguments, inputs)}


def _no_grads(ctx) -> tuple:
    return (None,) * len(ctx.needs_input_grad)


def _fresh(*xs):
    """Outputs in the layout the fakes give (contiguous); a no-op for the usual ones."""
    return tuple(x.contiguous() for x in xs)


# --------------------------------------------------------------------------- indexer_topk

@custom_op("openmsa::indexer_topk", mutates_args=())
def indexer_topk(qi: Tensor, ki: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor],
                 block_size: int, topk: int, scale: float, deterministic: bool = False,
                 init_blocks: int = 0, local_blocks: int = 1, kv_start: Optional[Tensor] = None,
                 kv_len: Optional[Tensor] = None, fp8: bool = False,
                 impl: str = "reference") -> tuple[Tensor, Tensor]:
    """Index Branch (docs/spec.md section 4): (topk_indices int32 [Hkv, total_q, topk],
    index_lse float32 [Hkv, total_q]). Not differentiable. ``init_blocks``,
    ``local_blocks``: the forced blocks; ``kv_start``, ``kv_len``: the fragment form;
    ``fp8``: rank the E4M3 quantization of qi and ki (one scale per vector,
    ``ops/utils/fp8.py``), index_lse from the inputs as given."""
    _check_impl(impl)
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, qi.shape[0], ki.shape[0], impl, kv_start, kv_len)
    forced = dict(init_blocks=init_blocks, local_blocks=local_blocks)
    if impl == "reference":
        ranked = tuple(dequantize_fp8(*quantize_fp8_per_token(x, finite_payload=True))
                       for x in (qi, ki)) if fp8 else (qi, ki)
        idx, lse = indexer_topk_reference(*ranked, varlen.cu_q, varlen.cu_k, block_size=block_size,
                                          topk=topk, scale=scale, kv_ranges=varlen.kv_ranges,
                                          lse_inputs=(qi, ki) if fp8 else None, **forced)
    else:
        idx, lse = _run_kernel("indexer_topk", (), qi, ki, varlen, block_size=block_size,
                               topk=topk, scale=scale, deterministic=deterministic, fp8=fp8, **forced)
    return _fresh(idx, lse)


@indexer_topk.register_fake
def _(qi, ki, cu_seqlens_q, cu_seqlens_k, block_size, topk, scale, deterministic=False,
      init_blocks=0, local_blocks=1, kv_start=None, kv_len=None, fp8=False, impl="reference"):
    total_q, hkv = qi.shape[0], qi.shape[1]
    return (qi.new_empty((hkv, total_q, topk), dtype=torch.int32),
            qi.new_empty((hkv, total_q), dtype=torch.float32))


def _indexer_topk_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _indexer_topk_backward(ctx, _didx, _dlse):
    return _no_grads(ctx)


torch.library.register_autograd("openmsa::indexer_topk", _indexer_topk_backward,
                                setup_context=_indexer_topk_setup)


# --------------------------------------------------------------------------- sparse_attention

def _lse_dtype(q: Tensor) -> torch.dtype:
    return compute_dtype(q.dtype)  # float32; float64 for float64 inputs (the reference's)


@custom_op("openmsa::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, topk_indices: Optional[Tensor],
                     cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor], block_size: int, scale: float,
                     deterministic: bool = False, kv_start: Optional[Tensor] = None,
                     kv_len: Optional[Tensor] = None, impl: str = "reference") -> tuple[Tensor, Tensor]:
    """Main Branch forward (docs/spec.md section 5): (out like q, lse [total_q, Hq] float32,
    float64 for float64 inputs). ``topk_indices=None``: every visible token (dense).
    ``deterministic`` is the backward's (the forward is deterministic either way).
    ``kv_start``, ``kv_len``: the fragment form."""
    _check_impl(impl)
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], impl, kv_start, kv_len)
    if impl == "reference":
        out, lse = attention_forward(q, k, v, topk_indices, varlen.cu_q, _ranges(varlen), block_size,
                                     scale)
    elif topk_indices is None:
        out, lse = _run_kernel("dense_attention", (0,), q, k, v, varlen, block_size=block_size,
                               scale=scale)
    else:
        out, lse = _run_kernel("sparse_attention", (0,), q, k, v, topk_indices, varlen,
                               block_size=block_size, scale=scale)
    return _fresh(out, lse)


@sparse_attention.register_fake
def _(q, k, v, topk_indices, cu_seqlens_q, cu_seqlens_k, block_size, scale, deterministic=False,
      kv_start=None, kv_len=None, impl="reference"):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:2], dtype=_lse_dtype(q)))


@custom_op("openmsa::sparse_attention_backward", mutates_args=())
def sparse_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                              lse: Tensor, topk_indices: Optional[Tensor], cu_seqlens_q: Tensor,
                              cu_seqlens_k: Optional[Tensor], block_size: int, scale: float,
                              deterministic: bool = False, kv_start: Optional[Tensor] = None,
                              kv_len: Optional[Tensor] = None,
                              impl: str = "reference") -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) like q, k, v from ``sparse_attention``'s out and lse.
    ``deterministic``: a bitwise-repeatable dk, dv on the kernels (no float atomics)."""
    _check_impl(impl)
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], impl, kv_start, kv_len)
    if impl == "reference":
        grads = attention_backward(grad_out, q, k, v, out, lse, topk_indices, varlen.cu_q,
                                   _ranges(varlen), block_size, scale)
    elif topk_indices is None:
        grads = _run_kernel("dense_attention_backward", (0, 1, 2), grad_out, q, k, v, out, lse,
                            varlen, block_size=block_size, scale=scale, deterministic=deterministic)
    else:
        grads = _run_kernel("sparse_attention_backward", (0, 1, 2), grad_out, q, k, v, out, lse,
                            topk_indices, varlen, block_size=block_size, scale=scale,
                            deterministic=deterministic)
    return _fresh(*grads)


@sparse_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, topk_indices, cu_seqlens_q, cu_seqlens_k, block_size, scale,
      deterministic=False, kv_start=None, kv_len=None, impl="reference"):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _sparse_attention_setup(ctx, inputs, output):
    a = _named("sparse_attention", inputs)
    out, lse = output
    ctx.save_for_backward(a["q"], a["k"], a["v"], a["topk_indices"], a["cu_seqlens_q"],
                          a["cu_seqlens_k"], a["kv_start"], a["kv_len"], out, lse)
    ctx.args = {n: a[n] for n in ("block_size", "scale", "deterministic", "impl")}
    ctx.mark_non_differentiable(lse)


def _sparse_attention_grad(ctx, grad_out, _grad_lse):
    q, k, v, topk_indices, cu_q, cu_k, kv_start, kv_len, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.openmsa.sparse_attention_backward(
        grad_out, q, k, v, out, lse, topk_indices, cu_q, cu_k, kv_start=kv_start, kv_len=kv_len,
        **ctx.args)
    return (dq, dk, dv) + _no_grads(ctx)[3:]


torch.library.register_autograd("openmsa::sparse_attention", _sparse_attention_grad,
                                setup_context=_sparse_attention_setup)


# --------------------------------------------------------------------------- indexer_kl_loss

@custom_op("openmsa::indexer_kl_loss", mutates_args=())
def indexer_kl_loss(q: Tensor, k: Tensor, qi: Tensor, ki: Tensor, topk_indices: Optional[Tensor],
                    cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor], lse: Optional[Tensor],
                    index_lse: Optional[Tensor], block_size: int, scale: float, index_scale: float,
                    coeff: float, deterministic: bool = False, with_grad: bool = True,
                    kv_start: Optional[Tensor] = None, kv_len: Optional[Tensor] = None,
                    impl: str = "reference") -> tuple[Tensor, Tensor, Tensor]:
    """Sparse KL (docs/spec.md section 6; ``topk_indices=None``: the dense warmup KL).

    Returns (loss, dqi, dki): the 0-d loss (float32; float64 for float64 qi) and, with
    ``with_grad``, its gradients d loss / d qi ``[total_q, Hkv, Di]`` and d ki ``[total_k, 1,
    Di]`` in the loss's dtype, computed in the same pass (the kernels' one-pass KL); without,
    two empty tensors. Differentiable w.r.t. qi and ki (through those gradients); q, k, lse
    and index_lse get none."""
    _check_impl(impl)
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], impl, kv_start, kv_len)
    total_q, hkv = qi.shape[0], qi.shape[1]
    cdt = compute_dtype(qi.dtype)
    if impl == "reference":
        norm = coeff / (hkv * total_q) if total_q > 0 else 0.0
        args = (topk_indices, varlen.cu_q, _ranges(varlen), block_size, scale, index_scale, lse,
                index_lse)
        loss = (kl_forward(q, k, qi, ki, *args) * norm).to(cdt)
        # the gradients in the compute dtype (the reference computes in it anyway)
        dqi, dki = (kl_backward(norm, q, k, qi.to(cdt), ki.to(cdt), *args) if with_grad
                    else (None, None))
    else:
        loss, dqi, dki = _run_kernel("indexer_kl_loss", (), q, k, qi, ki, topk_indices, varlen,
                                     block_size=block_size, scale=scale, scale_i=index_scale,
                                     coeff=coeff, lse=lse, index_lse=index_lse,
                                     with_grad=with_grad, deterministic=deterministic)
    if not with_grad:
        return loss, qi.new_empty((0,), dtype=cdt), qi.new_empty((0,), dtype=cdt)
    return _fresh(loss, dqi, dki.view(ki.shape))


@indexer_kl_loss.register_fake
def _(q, k, qi, ki, topk_indices, cu_seqlens_q, cu_seqlens_k, lse, index_lse, block_size, scale,
      index_scale, coeff, deterministic=False, with_grad=True, kv_start=None, kv_len=None,
      impl="reference"):
    cdt = compute_dtype(qi.dtype)
    if not with_grad:
        return qi.new_empty((), dtype=cdt), qi.new_empty((0,), dtype=cdt), qi.new_empty((0,), dtype=cdt)
    return (qi.new_empty((), dtype=cdt), qi.new_empty(qi.shape, dtype=cdt),
            ki.new_empty(ki.shape, dtype=cdt))


@custom_op("openmsa::indexer_kl_loss_backward", mutates_args=())
def indexer_kl_loss_backward(grad: Tensor, dqi: Tensor, dki: Tensor, qi_dtype: torch.dtype,
                             ki_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(grad * dqi, grad * dki) in the dtypes of qi and ki: the backward of
    ``indexer_kl_loss`` from the gradients its forward returned."""
    return (dqi * grad).to(qi_dtype), (dki * grad).to(ki_dtype)


@indexer_kl_loss_backward.register_fake
def _(grad, dqi, dki, qi_dtype, ki_dtype):
    return torch.empty_like(dqi, dtype=qi_dtype), torch.empty_like(dki, dtype=ki_dtype)


def _indexer_kl_setup(ctx, inputs, output):
    a = _named("indexer_kl_loss", inputs)
    loss, dqi, dki = output
    ctx.mark_non_differentiable(dqi, dki)
    ctx.save_for_backward(dqi, dki)
    ctx.dtypes = (a["qi"].dtype, a["ki"].dtype)
    ctx.with_grad = a["with_grad"]


def _indexer_kl_grad(ctx, grad, _ddqi, _ddki):
    if not ctx.with_grad:
        raise RuntimeError("openmsa::indexer_kl_loss ran with with_grad=False: its forward "
                           "computed no gradients to go back through")
    dqi, dki = torch.ops.openmsa.indexer_kl_loss_backward(grad, *ctx.saved_tensors, *ctx.dtypes)
    need = ctx.needs_input_grad
    return (None, None, dqi if need[2] else None, dki if need[3] else None) + _no_grads(ctx)[4:]


torch.library.register_autograd("openmsa::indexer_kl_loss", _indexer_kl_grad,
                                setup_context=_indexer_kl_setup)


# --------------------------------------------------------------------------- serving

@custom_op("openmsa::append_paged_kv", mutates_args=("k_cache", "v_cache", "ki_cache"))
def append_paged_kv(k: Tensor, v: Tensor, ki: Optional[Tensor], k_cache: Tensor, v_cache: Tensor,
                    ki_cache: Optional[Tensor], slot_mapping: Tensor,
                    impl: str = "reference") -> None:
    """Write the new tokens into the paged pools in place (``openmsa.serving.append_paged_kv``
    without its checks): slot s is row s % page_size of page s // page_size; slots outside
    [0, num_pages * page_size) are skipped."""
    _check_impl(impl)
    if k.shape[0] == 0:
        return
    page_size = k_cache.shape[1]
    num_slots = k_cache.shape[0] * page_size
    if impl == "reference":
        append_reference(k, v, ki, k_cache, v_cache, ki_cache, slot_mapping, page_size, num_slots)
    else:
        _kernel("append_paged_kv", k.device)(k, v, ki, k_cache, v_cache, ki_cache, slot_mapping,
                                             page_size, num_slots)


@append_paged_kv.register_fake
def _(k, v, ki, k_cache, v_cache, ki_cache, slot_mapping, impl="reference"):
    return None


@custom_op("openmsa::decode_topk", mutates_args=("candidates", "merged_candidates", "topk_indices"))
def decode_topk(qi: Tensor, ki_cache: Tensor, ki_scale: Optional[Tensor], page_table: Tensor,
                cu_seqlens_q: Tensor, kv_lens: Tensor, pages_per_split: Tensor, candidates: Tensor,
                merged_candidates: Tensor, topk_indices: Tensor, index_scale: float, max_q: int,
                rows: int, kpad: int, index_splits: int, pages: int, num_warps: int,
                num_stages: int, init_blocks: int = 0, local_blocks: int = 1,
                impl: str = "triton") -> None:
    """``MSADecodeWrapper``'s Index Branch: the split index scan and the exact Top-k merge
    into ``topk_indices`` (the wrapper's plan() sets up every other argument). Kernels only."""
    if impl != "triton":
        raise NotImplementedError("openmsa::decode_topk has Triton kernels only; the paged "
                                  "reference is openmsa.serving.paged_indexer_topk_reference")
    _kernel("decode_topk", qi.device)(
        qi, ki_cache, ki_scale, page_table, cu_seqlens_q, kv_lens, pages_per_split, candidates,
        merged_candidates, topk_indices, index_scale=index_scale, max_q=max_q, rows=rows,
        kpad=kpad, index_splits=index_splits, pages=pages, num_warps=num_warps,
        num_stages=num_stages, init_blocks=init_blocks, local_blocks=local_blocks)


@decode_topk.register_fake
def _(qi, ki_cache, ki_scale, page_table, cu_seqlens_q, kv_lens, pages_per_split, candidates,
      merged_candidates, topk_indices, index_scale, max_q, rows, kpad, index_splits, pages,
      num_warps, num_stages, init_blocks=0, local_blocks=1, impl="triton"):
    return None


@custom_op("openmsa::decode_attention",
           mutates_args=("out", "lse", "partial_out", "partial_lse"))
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, topk_indices: Tensor,
                     page_table: Tensor, row_seq: Tensor, row_pos: Tensor, kv_lens: Tensor,
                     out: Tensor, lse: Tensor, partial_out: Tensor, partial_lse: Tensor,
                     scale: float, k_scale: float, v_scale: float, g_pad: int,
                     attention_splits: int, impl: str = "triton") -> None:
    """``MSADecodeWrapper``'s Main Branch: split sparse attention over the selected pages
    into ``out`` and ``lse`` (the wrapper's plan() sets up every other argument). Kernels only."""
    if impl != "triton":
        raise NotImplementedError("openmsa::decode_attention has Triton kernels only; the paged "
                                  "reference is openmsa.serving.paged_sparse_attention_reference")
    _kernel("decode_attention", q.device)(
        q, k_cache, v_cache, topk_indices, page_table, row_seq, row_pos, kv_lens, out, lse,
        partial_out, partial_lse, scale=scale, k_scale=k_scale, v_scale=v_scale, g_pad=g_pad,
        attention_splits=attention_splits)


@decode_attention.register_fake
def _(q, k_cache, v_cache, topk_indices, page_table, row_seq, row_pos, kv_lens, out, lse,
      partial_out, partial_lse, scale, k_scale, v_scale, g_pad, attention_splits, impl="triton"):
    return None


@custom_op("openmsa::prefill", mutates_args=("topk_indices", "out", "lse"))
def prefill(q: Tensor, qi: Tensor, k_cache: Tensor, v_cache: Tensor, ki_cache: Tensor,
            cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, page_table: Tensor, topk_indices: Tensor,
            out: Tensor, lse: Tensor, total_k: int, num_blocks_bound: int, scale: float,
            index_scale: float, deterministic: bool = False, init_blocks: int = 0,
            local_blocks: int = 1, impl: str = "triton") -> None:
    """``MSAPrefillWrapper``'s run: the paged Index Branch into ``topk_indices``, then the
    paged sparse attention forward into ``out`` and ``lse`` (the wrapper's plan() sets up
    every other argument; page ids must be in range). Kernels only."""
    if impl != "triton":
        raise NotImplementedError("openmsa::prefill has Triton kernels only; the paged "
                                  "reference is openmsa.serving.paged_msa_reference")
    varlen = V.Varlen(cu_seqlens_q, cu_seqlens_k, q.shape[0], total_k)
    _kernel("prefill", q.device)(q, qi, k_cache, v_cache, ki_cache, varlen, page_table,
                                 topk_indices, out, lse, num_blocks_bound=num_blocks_bound,
                                 scale=scale, index_scale=index_scale, deterministic=deterministic,
                                 init_blocks=init_blocks, local_blocks=local_blocks)


@prefill.register_fake
def _(q, qi, k_cache, v_cache, ki_cache, cu_seqlens_q, cu_seqlens_k, page_table, topk_indices,
      out, lse, total_k, num_blocks_bound, scale, index_scale, deterministic=False, init_blocks=0,
      local_blocks=1, impl="triton"):
    return None
