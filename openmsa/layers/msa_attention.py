"""MSAttention: a MiniMax-M3 style attention layer with MSA (docs/spec.md section 7).

    q, k, v = x Wq, x Wk, x Wv           (optional per-head RMSNorm on q, k)
    qi, ki  = sg(x) Wqi, sg(x) Wki       (Hkv index heads, one shared index key head)
    qi, ki get the same RMSNorm option and (partial) RoPE as q, k
    sparse: indices = Index Branch(qi, ki); o = Main Branch(q, k, v, indices)
    dense:  o = full causal attention; KL over all visible tokens (warmup), chosen by
            dense_warmup_attention (shared with the transformers integration)
    out = o Wo;  self.kl_loss = KL (unscaled; the trainer adds lambda * kl_loss)

The index projections read a detached input, so the KL trains only Wqi/Wki (and
their norms) and the language-model loss never reaches them.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _validation as V
from ..library import resolve
from ..ops.utils.shapes import all_stages_support
from ..api import indexer_kl_loss, msa_attention, sparse_attention
from ..distributed.cp import cp_plan, dense_attention_cp, msa_attention_cp
from .rope import apply_rope, rope_cos_sin

MODES = ("sparse", "dense")


def dense_causal_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """The dense-mode Main Branch for equal-length sequences without a cached prefix:
    q ``[b, s, Hq, D]``, k, v ``[b, s, Hkv, D]`` -> ``[b, s, Hq, D]``, causal GQA through
    torch's SDPA (its fused kernels; openmsa has no dense Triton kernel)."""
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True,
        scale=scale)
    return o.transpose(1, 2)


def all_blocks_topk(num_keys: int, block_size: int, head_dim: int, index_head_dim: int,
                    backend: str, device: torch.device) -> int | None:
    """The K that selects every block of ``num_keys`` keys, when the Triton kernels run all
    three MSA stages at these shapes with it; else None.

    With that K every query selects all of its visible blocks, so sparse mode *is* dense
    attention with the dense KL (docs/spec.md section 6, warmup), exactly; dense mode then runs
    all of it through the sparse kernels in one call, as long as the blocks fit the
    kernels' K (64: 4K tokens at B = 64, 8K at B = 128). Beyond, the Main Branch runs on
    torch SDPA and the dense KL through the same KL kernels a chunk of 64 blocks at a time
    (``openmsa.ops.kl.dense``)."""
    if any(resolve(op, backend, device) != "triton"
           for op in ("indexer_topk", "sparse_attention", "indexer_kl_loss")):
        return None
    nblocks = -(-num_keys // block_size)
    ok = all_stages_support(block_size, head_dim, index_head_dim, nblocks)
    return nblocks if ok else None


def dense_warmup_attention(q, k, v, qi, ki, cu_seqlens_q=None, cu_seqlens_k=None, *,
                           block_size: int, backend: str, softmax_scale: float | None = None,
                           compute_kl: bool = True, dense_block_size: int | None = None,
                           batch_shape: tuple[int, int] | None = None,
                           index_softmax_scale: float | None = None):
    """Dense mode of an MSA layer (the warmup of docs/spec.md section 6): full causal
    attention and, with ``compute_kl``, the indexer KL over all visible tokens. Returns
    ``(out, kl)``, kl None without ``compute_kl``.

    Every MSA attention module (:class:`MSAttention`, the transformers integration's
    ``MSAHFAttention``) runs its dense mode through this one function, so that for the
    same inputs they take the same path.

    Inputs in either form of the ops: batched q ``[b, Lq, Hq, D]``, k, v ``[b, Lk, Hkv,
    D]``, qi ``[b, Lq, Hkv, Di]``, ki ``[b, Lk, 1, Di]`` (the queries are the last Lq of the
    Lk keys) with no cu_seqlens; or packed ``[total, heads, dim]`` with ``cu_seqlens_q`` /
    ``cu_seqlens_k``, where ``batch_shape = (b, n)`` says that the pack is b sequences of n
    tokens each (queries and keys alike) and None that it is a varlen pack.

    The first path that applies:

    1. KL wanted, every sequence with the same number of keys, and the Triton kernels run
       all three stages at these shapes with K = every block (:func:`all_blocks_topk`):
       ``msa_attention`` with that K, which is dense attention and the dense KL exactly,
       at kernel speed.
    2. Equal-length sequences without a cached prefix, on a backend other than
       "reference": the Main Branch through torch SDPA (:func:`dense_causal_gqa`); SDPA
       gives no LSE, so the dense KL computes the teacher's normaliser itself. The
       reference backend stays on openmsa's own reference ops throughout.
    3. Otherwise (varlen packs, a cached prefix, the reference backend):
       ``sparse_attention`` with ``topk_indices=None`` (the sparse kernels over chunks of
       blocks, ``openmsa.ops.attention.dense``) and the dense KL reusing its LSE.

    ``block_size`` is the Index Branch's B, the block size of path 1. ``dense_block_size``
    is the one given to the dense ops of paths 2 and 3: it only sets how they cut the keys
    into chunks, not the result beyond float rounding; None leaves the ops' default.
    ``index_softmax_scale``: the student's scale in the KL (None: Di^-0.5, the ops' default).
    """
    if cu_seqlens_q is None:
        num_keys, no_prefix = k.shape[1], k.shape[1] == q.shape[1]
    else:
        num_keys = None if batch_shape is None else batch_shape[1]
        no_prefix = batch_shape is not None
    if compute_kl and num_keys is not None and (kall := all_blocks_topk(
            num_keys, block_size, q.shape[-1], qi.shape[-1], backend, q.device)):
        o, kl, _ = msa_attention(q, k, v, qi, ki, cu_seqlens_q, cu_seqlens_k, block_size=block_size,
                                 topk=kall, softmax_scale=softmax_scale, backend=backend,
                                 index_softmax_scale=index_softmax_scale)
        return o, kl
    dense_kw = dict(backend=backend, softmax_scale=softmax_scale)
    if dense_block_size is not None:
        dense_kw["block_size"] = dense_block_size
    if no_prefix and backend != "reference":
        if cu_seqlens_q is None:
            o = dense_causal_gqa(q, k, v, scale=softmax_scale)
        else:
            b, n = batch_shape
            o = dense_causal_gqa(*(y.view(b, n, -1, y.shape[-1]) for y in (q, k, v)),
                                 scale=softmax_scale).reshape(q.shape)
        lse = None
    else:
        o, lse = sparse_attention(q, k, v, None, cu_seqlens_q, cu_seqlens_k, **dense_kw)
    kl = indexer_kl_loss(q.detach(), k.detach(), qi, ki, None, cu_seqlens_q, cu_seqlens_k, lse=lse,
                         index_softmax_scale=index_softmax_scale, **dense_kw) if compute_kl else None
    return o, kl


_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what autocast casts


def check_input_dtype(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """The input ``name`` of an MSA layer must have the dtype of its parameters (``weight``);
    while ``torch.autocast`` is on for its device, any of float16 / bfloat16 / float32 (what
    autocast casts for the projections; float64 it leaves alone) next to parameters of one
    of those. A clear TypeError instead of a matmul's dtype mismatch."""
    if x.dtype == weight.dtype:
        return
    if x.is_floating_point():
        if (torch.is_autocast_enabled(x.device.type) and x.dtype in _AUTOCAST_DTYPES
                and weight.dtype in _AUTOCAST_DTYPES):
            return
        raise TypeError(
            f"{name} must have the dtype of the layer's parameters ({weight.dtype}), or under "
            f"torch.autocast float16/bfloat16/float32 with such parameters; got {x.dtype}: "
            f"convert the input ({name}.to({weight.dtype})) or the layer (.to({x.dtype}))")
    kind = "complex" if x.is_complex() else "non-floating"
    raise TypeError(
        f"{name} must be a floating-point tensor of the layer's parameter dtype "
        f"({weight.dtype}) holding hidden states, got a {kind} {x.dtype} tensor")


class IndexBranchMixin:
    """What every MSA attention module shares (openmsa's MSAttention, the transformers
    integration's MSAHFAttention): the mode ("sparse", or "dense" for the warmup of docs/spec.md
    section 6), the index-branch parameters (qi_proj, ki_proj, qi_norm, ki_norm) and
    ``kl_loss``, the unscaled KL of the module's last forward (None when it computed none).

    It is also the mark :func:`collect_kl_losses` looks for: every module of a model that
    derives from it is an MSA layer whose ``kl_loss`` is collected."""

    kl_loss: torch.Tensor | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value

    def index_parameters(self):
        """The parameters of the index branch: the only ones the KL reaches."""
        for m in (self.qi_proj, self.ki_proj, self.qi_norm, self.ki_norm):
            yield from m.parameters()


class MSAttention(IndexBranchMixin, nn.Module):
    """Self-attention with MiniMax Sparse Attention.

    Args:
        hidden_size: model width.
        num_heads / num_kv_heads: Hq and Hkv (GQA; Hq a multiple of Hkv).
        head_dim: D (default hidden_size // num_heads). index_head_dim: Di.
        block_size, topk: B and K of the Index Branch.
        init_blocks, local_blocks: the Index Branch's forced blocks (docs/spec.md section 4;
            default 0 and 1: the local block alone).
        index_dtype: None, or ``torch.float8_e4m3fn`` to rank the blocks by FP8 scores
            (``openmsa.indexer_topk``; sparse mode).
        qk_norm: per-head RMSNorm on q, k, qi, ki.
        rotary_dim: channels rotated by RoPE (None: all of head_dim; 0: no RoPE). Must be
            even and at most min(head_dim, index_head_dim).
        mode: "sparse" (MSA) or "dense" (warmup: full attention, dense KL).
        backend: passed to the openmsa ops.
        process_group: a torch.distributed process group to run the attention
            context-parallel over (None: no context parallelism; the attribute may be set
            later). Then ``forward(x, cu_seqlens)`` takes this rank's zigzag shard of the
            packed tokens, ``x [local_total, hidden]`` (``openmsa.distributed.shard``), with
            the global int32 ``cu_seqlens`` (the same on every rank); the output is the
            rank's shard of the output, ``kl_loss`` the rank's part of the KL (the parts sum
            to the single-process KL) and RoPE uses the tokens' global positions. Every rank
            must run forward and backward (``openmsa.distributed.msa_attention_cp``); the
            parameter gradients are partial sums over the ranks' tokens, to be all-reduced.

    ``forward(x, cu_seqlens=None, positions=None)`` takes ``x [batch, seqlen, hidden]``
    or packed ``x [total, hidden]`` with int32 ``cu_seqlens``; returns the output like x
    and stores the KL (a float32 scalar; float64 for a float64 layer) in ``self.kl_loss``.
    The packed form reads cu_seqlens on the host (to check them and derive RoPE
    positions): pass ``positions`` and use the batched form, or call the ops directly,
    where a CUDA graph must capture the layer. ``torch.compile`` traces either form
    without a graph break (the value checks are then skipped, as in the ops). x must have
    the parameters' dtype (under ``torch.autocast`` any of float16 / bfloat16 / float32);
    ``positions`` ``[total]`` or ``[batch, seqlen]`` is an integer tensor. Empty input
    (batch 0, seqlen 0, an empty pack) gives an empty output and ``kl_loss`` = 0, through
    which backward runs (zero gradients).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim=None, *,
                 index_head_dim: int = 128, block_size: int = 128, topk: int = 16,
                 qk_norm: bool = False, rotary_dim=None, rope_theta: float = 10000.0,
                 mode: str = "sparse", bias: bool = False, norm_eps: float = 1e-6,
                 backend: str = "auto", process_group=None, device=None, dtype=None,
                 init_blocks: int = 0, local_blocks: int = 1, index_dtype=None):
        super().__init__()
        hidden_size = V.check_positive_int("hidden_size", hidden_size)
        num_heads = V.check_positive_int("num_heads", num_heads)
        num_kv_heads = V.check_positive_int("num_kv_heads", num_kv_heads)
        V.check_heads(num_heads, num_kv_heads, "num_heads", "num_kv_heads")
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        self.head_dim = V.check_positive_int("head_dim", head_dim)
        self.index_head_dim = V.check_positive_int("index_head_dim", index_head_dim)
        self.block_size = V.check_positive_int("block_size", block_size)
        self.topk = V.check_positive_int("topk", topk)
        self.init_blocks, self.local_blocks = V.check_forced_blocks(init_blocks, local_blocks, self.topk)
        V.check_index_dtype(index_dtype)
        self.index_dtype = index_dtype
        rotary_dim = min(self.head_dim, self.index_head_dim) if rotary_dim is None else rotary_dim
        if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 0 \
                or rotary_dim % 2 or rotary_dim > min(self.head_dim, self.index_head_dim):
            raise ValueError(f"rotary_dim must be an even int in [0, min(head_dim, index_head_dim)"
                             f" = {min(self.head_dim, self.index_head_dim)}], got {rotary_dim!r}")
        self.rotary_dim = rotary_dim
        self.rope_theta = float(rope_theta)
        self.mode = mode  # validated by the property setter
        self.backend = V.check_backend(backend)
        self.process_group = process_group
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads

        kw = dict(device=device, dtype=dtype)
        d, di = self.head_dim, self.index_head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * d, bias=bias, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * d, bias=bias, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * d, bias=bias, **kw)
        self.o_proj = nn.Linear(num_heads * d, hidden_size, bias=bias, **kw)
        self.qi_proj = nn.Linear(hidden_size, num_kv_heads * di, bias=bias, **kw)
        self.ki_proj = nn.Linear(hidden_size, di, bias=bias, **kw)
        norm = (lambda n: nn.RMSNorm(n, eps=norm_eps, **kw)) if qk_norm else (lambda n: nn.Identity())
        self.q_norm, self.k_norm = norm(d), norm(d)
        self.qi_norm, self.ki_norm = norm(di), norm(di)
        self.kl_loss: torch.Tensor | None = None

    def _layout(self, x, cu_seqlens, positions):
        """Packed x [T, hidden], int32 cu_seqlens, positions [T] (any integer dtype)."""
        layout = "[batch, seqlen, hidden] or packed [total, hidden]"
        V.check_tensor("x", x, x.dim() if isinstance(x, torch.Tensor) and x.dim() in (2, 3) else 3, layout)
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have hidden size {self.hidden_size}, got {x.shape[-1]}")
        check_input_dtype("x", x, self.q_proj.weight)
        if x.dim() == 3:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens must be None for batched x [batch, seqlen, hidden]")
            b, n = x.shape[:2]
            cu = torch.arange(b + 1, dtype=torch.int32, device=x.device) * n
            local = torch.arange(n, device=x.device).repeat(b)
            x = x.reshape(b * n, self.hidden_size)  # not -1: b * n may be 0
        else:
            if cu_seqlens is None:
                raise ValueError("cu_seqlens is required for packed x [total, hidden]")
            cu = self._check_cu_seqlens(cu_seqlens, x)
            starts, ends = cu[:-1].long(), cu[1:].long()
            local = (torch.arange(x.shape[0], device=x.device)
                     - torch.repeat_interleave(starts, ends - starts, output_size=x.shape[0]))
        if positions is not None:
            ok_rank = isinstance(positions, torch.Tensor) and positions.dim() in (1, 2)
            V.check_tensor("positions", positions, positions.dim() if ok_rank else 1,
                           "[total] or [batch, seqlen] integer positions")
            if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
                raise TypeError(f"positions must be an integer tensor (e.g. int64 or int32), got "
                                f"{positions.dtype}")
            if positions.numel() != x.shape[0]:
                raise ValueError(f"positions must hold {x.shape[0]} positions (one per token of "
                                 f"x), got shape {tuple(positions.shape)}")
            if positions.device != x.device:
                raise ValueError(f"positions must be on {x.device} like x, got {positions.device}")
            local = positions.reshape(-1)
        return x, cu, local

    @staticmethod
    def _check_cu_seqlens(cu_seqlens, x: torch.Tensor) -> torch.Tensor:
        """cu_seqlens of packed x: a 1-D int32 tensor on x's device, 0 = cu[0] <= ... <=
        cu[-1] = x.shape[0] (values checked as the ops check them). Zero sequences
        (``[0]``) and empty ones are allowed."""
        V.check_tensor("cu_seqlens", cu_seqlens, 1, "[num_seqs + 1] int32")
        if cu_seqlens.dtype != torch.int32:
            raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype} "
                            f"(use cu_seqlens.to(torch.int32))")
        if cu_seqlens.numel() < 1:
            raise ValueError("cu_seqlens must have at least one entry (the leading 0)")
        if cu_seqlens.device != x.device:
            raise ValueError(f"cu_seqlens must be on {x.device} like x, got {cu_seqlens.device}")
        if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
            V._check_cu_values("cu_seqlens", tuple(cu_seqlens.tolist()), x.shape[0], "x.shape[0]")
            return cu_seqlens
        # On a GPU (and under torch.compile) the ops' rule: read once per tensor, or a
        # sanitised copy where no host read is allowed (capture, compile, value_checks(False)).
        return V.check_varlen(cu_seqlens, cu_seqlens, x.shape[0], x.shape[0], x.device,
                              read_values=False).cu_seqlens_q

    def _cp_layout(self, x, cu_seqlens, positions):
        """Context parallel: this rank's shard x [local_total, hidden], the global
        cu_seqlens and the shard's positions in their sequences."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or cu_seqlens is None:
            raise ValueError("with a process_group, x must be this rank's packed shard "
                             "[local_total, hidden] and cu_seqlens the global int32 layout")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have hidden size {self.hidden_size}, got {x.shape[-1]}")
        check_input_dtype("x", x, self.q_proj.weight)
        group = self.process_group
        plan = cp_plan(cu_seqlens, torch.distributed.get_world_size(group),
                       torch.distributed.get_rank(group))
        if x.shape[0] != plan.local_total:
            raise ValueError(f"x must hold this rank's shard of cu_seqlens ({plan.local_total} "
                             f"tokens), got {x.shape[0]} (openmsa.distributed.shard gives it)")
        if positions is not None:
            _, _, positions = self._layout(x, torch.tensor([0, x.shape[0]], dtype=torch.int32,
                                                           device=x.device), positions)
        return x, cu_seqlens, plan.positions if positions is None else positions

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        x_in = x
        cp = self.process_group is not None
        x, cu, pos = (self._cp_layout if cp else self._layout)(x, cu_seqlens, positions)
        t, hq, hkv, d, di = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim, self.index_head_dim
        q = self.q_norm(self.q_proj(x).view(t, hq, d))
        k = self.k_norm(self.k_proj(x).view(t, hkv, d))
        v = self.v_proj(x).view(t, hkv, d)
        xd = x.detach()  # stop-gradient: the KL trains only the index branch
        qi = self.qi_norm(self.qi_proj(xd).view(t, hkv, di))
        ki = self.ki_norm(self.ki_proj(xd).view(t, 1, di))
        # under CUDA autocast, RMSNorm runs (and returns) float32 next to a bf16 v; the ops
        # want one dtype, the projections' (as HF's RMSNorm casts back to its input's)
        q, k, qi, ki = (y.to(v.dtype) for y in (q, k, qi, ki))
        if self.rotary_dim:
            cos, sin = rope_cos_sin(pos, self.rotary_dim, self.rope_theta)
            q, k, qi, ki = (apply_rope(y, cos, sin) for y in (q, k, qi, ki))
        if cp:  # every rank runs the collectives, also one without tokens
            kw = dict(group=self.process_group, block_size=self.block_size, backend=self.backend)
            if self.mode == "sparse":
                o, kl, _ = msa_attention_cp(q, k, v, qi, ki, cu, topk=self.topk, init_blocks=self.init_blocks,
                                            local_blocks=self.local_blocks, index_dtype=self.index_dtype, **kw)
            else:
                o, kl = dense_attention_cp(q, k, v, qi, ki, cu, **kw)
        elif t == 0:
            # no tokens (batch 0, seqlen 0 or an empty pack): no op runs. The output is empty
            # and the KL a zero in the ops' KL dtype, both still in the graph of the
            # projections (sums over empty tensors are exact zeros) so that backward runs and
            # reaches the same parameters as for non-empty input, with zero gradients
            o = q + (k.sum() + v.sum()).to(q.dtype)
            kl_dtype = torch.promote_types(qi.dtype, torch.float32)
            kl = qi.to(kl_dtype).sum() + ki.to(kl_dtype).sum()
        elif self.mode == "sparse":
            o, kl, _ = msa_attention(q, k, v, qi, ki, cu, cu, block_size=self.block_size,
                                     topk=self.topk, backend=self.backend, index_dtype=self.index_dtype,
                                     init_blocks=self.init_blocks, local_blocks=self.local_blocks)
        else:  # batched x is a pack of equal-length sequences (batch_shape): faster paths
            o, kl = dense_warmup_attention(
                q, k, v, qi, ki, cu, cu, block_size=self.block_size, backend=self.backend,
                batch_shape=tuple(x_in.shape[:2]) if x_in.dim() == 3 else None)
        self.kl_loss = kl
        return self.o_proj(o.reshape(t, hq * d)).view(x_in.shape)


def collect_kl_losses(model: nn.Module) -> torch.Tensor:
    """Sum (a float32 scalar) of the KL losses of the last forward over every MSA layer in
    ``model``: ``loss = lm_loss + lam * collect_kl_losses(model)``.

    MSA layers are the modules deriving from :class:`IndexBranchMixin`: every
    :class:`MSAttention` and every attention module of a model converted with
    ``openmsa.integrations.transformers.convert_to_msa`` (that module re-exports this very
    function), ``model`` itself included. Each holds the unscaled KL of its own last
    forward in ``kl_loss``; collecting reads them and leaves them there (a later forward
    replaces them).

    A layer that holds no KL contributes nothing (zero): one that has not run a forward
    yet, or a converted transformers layer whose last forward skipped the KL
    (``compute_kl=False``, or the default ``compute_kl=None`` with autograd off, e.g.
    under ``torch.no_grad()``, generation or the first pass of reentrant gradient
    checkpointing). Every mode of MSAttention computes the KL (the dense warmup mode the
    dense one), on empty input a zero.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` contains no MSA layer.
        RuntimeError: no MSA layer of ``model`` holds a KL loss (call the model's forward
            first, with autograd on or ``compute_kl=True``); rather than returning None,
            which would break ``lam * kl``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, IndexBranchMixin)]
    if not layers:
        raise ValueError(
            f"collect_kl_losses: model ({type(model).__name__}) has no MSA layers (openmsa."
            f"MSAttention or attention converted with openmsa.integrations.transformers."
            f"convert_to_msa), so there is no KL loss to collect")
    losses = [m.kl_loss for m in layers if m.kl_loss is not None]
    if not losses:
        raise RuntimeError(
            f"collect_kl_losses: none of the {len(layers)} MSA layers of model "
            f"({type(model).__name__}) has computed a KL loss: call the model's forward first "
            f"(converted transformers layers compute it only while autograd records, e.g. not "
            f"under torch.no_grad(), unless compute_kl=True)")
    dev = losses[0].device
    return torch.stack([loss.float().to(dev) for loss in losses]).sum()
