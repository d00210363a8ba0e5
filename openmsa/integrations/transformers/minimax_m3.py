"""transformers' MiniMax-M3 (``models/minimax_m3_vl``) on the openmsa ops.

transformers' M3 sparse layers (``layer_types`` entry ``"minimax_m3_sparse"``) score every
(query, key) pair in ``MiniMaxM3VLIndexer`` and hand the attention a dense
``[B, Hq, Sq, Sk]`` block mask: O(S^2) memory and time. :class:`MSAM3Attention` replaces such
a layer's attention module and runs both branches through openmsa instead
(:func:`openmsa.indexer_topk`, :func:`openmsa.sparse_attention`): no tensor of Sq x Sk
entries anywhere, the same selection and the same output.

What it reproduces of transformers' M3 (docs/spec.md sections 4 and 7):

- the projections, per-head Gemma RMSNorms and partial RoPE of q, k and of the indexer's
  qi, ki: the very submodules of the original layer (kept under their names, so state
  dicts and checkpoints are unchanged), called as transformers calls them;
- the block scores: raw index dot products (no Di^-0.5, ``softmax_scale=1.0``), block max,
  ``index_topk_blocks`` blocks per query and index head, with the ``index_local_blocks``
  blocks ending at the query's block forced (openmsa's ``local_blocks``). openmsa writes a
  row as ranked blocks, forced blocks, -1 (transformers: forced blocks first); the set,
  which is all the attention reads, is the same, and equal scores go to the smaller id;
- ``index_n_heads`` different from the KV heads: query head h uses KV head
  h // (Hq / Hkv) and index head h // (Hq / index_n_heads). Both are expressed as
  lcm(index_n_heads, Hkv) openmsa groups; when index_n_heads > Hkv, k and v are repeated
  to that many heads per forward (a copy of the layer's K/V, O(S));
- the index keys in the model's own cache (``MiniMaxM3VLSparseCacheLayer.update_index``
  of a ``DynamicCache``, what ``generate()`` builds), so prefill, chunked prefill and
  decode (Lq < Lk, bottom-right causal) need nothing special.

Decode on the Triton backend (at most 16 new tokens per sequence on at least
``DECODE_SCAN_MIN_KEYS`` cached keys, no KL wanted): the Index Branch runs the serving
decode's split index scan (``openmsa.serving.MSADecodeWrapper.run_index``, exact, the same
selection) directly on the cache's index keys, which a strided view presents as pages
(page p of sequence b starts at key row b·S + p·B); the query-tile indexer would scan a
long context with one program per index head. One plan per step and shape serves every
layer (it reads the step's lengths on the host once).

Training the indexer (transformers' M3 has no indexer loss): the index branch reads the
layer input with its gradient stopped (sg(x), spec section 7), and each layer stores the
spec's sparse KL (section 6; ``mode="dense"``: dense attention and the dense warmup KL) in
``kl_loss``, which :func:`openmsa.collect_kl_losses` sums. The student is the softmax of
the model's own (raw) index scores, ``index_softmax_scale=1.0``. With index_n_heads < Hkv
an index head serves several KV groups: the KL is then the mean of its per-group KLs,
whose gradient is exactly that of the KL against the group-mean teacher of all the
index head's query heads (the values differ by a constant, a Jensen gap).

Limitations (clear errors instead of wrong results): causal attention without padding
(batch 1 or equal lengths; padding masks raise ``ValueError``), dynamic caches only (a
static cache raises ``TypeError``), no attention dropout, the new tokens are the last of
the cached sequence (custom ``position_ids`` change only the RoPE angles), and
``output_attentions`` gives None for these layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ... import _validation as V
from ...library import resolve
from ...api import indexer_kl_loss, indexer_topk, sparse_attention
from ...layers.msa_attention import MODES, IndexBranchMixin, dense_warmup_attention
from ...ops.utils.shapes import SUPPORTED
from .cache import cache_argument
from .masks import adopt_attention, check_attention_mask, check_layer_inputs

__all__ = ["MSAM3Attention", "m3_attention_sites", "enable_minimax_m3"]

DECODE_MAX_QUERIES = 16  # new tokens per sequence that the split decode scan takes
DECODE_SCAN_MIN_KEYS = 4096  # cached keys from which decode uses the split scan
_DECODE_PLAN_ATTR = "_openmsa_m3_decode_plan"  # on the cache: (key, MSADecodeWrapper)


def _m3_classes():
    """(attention class, static cache layer class) of transformers' M3, or None when this
    transformers has no M3."""
    try:
        from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as m3
    except ImportError:
        return None
    return m3.MiniMaxM3VLAttention, m3.MiniMaxM3VLSparseStaticCacheLayer


def m3_attention_sites(model: nn.Module):
    """[(parent, attention module)] for every M3 sparse attention layer of ``model``
    (original or already :class:`MSAM3Attention`); [] for a model without one."""
    classes = _m3_classes()
    sites = []
    for parent in model.modules():
        attn = parent._modules.get("self_attn")
        if isinstance(attn, MSAM3Attention) or (
                classes is not None and isinstance(attn, classes[0])
                and getattr(attn, "indexer", None) is not None):
            sites.append((parent, attn))
    return sites


def check_m3_config(config, *, init_blocks: int, device: torch.device, backend: str) -> None:
    """Refuse an M3 text config that openmsa cannot run as transformers does, naming the
    config field; on the Triton backend also the shapes its kernels do not take."""
    where = f"{type(config).__name__}"
    hq, hkv, hidx = config.num_attention_heads, config.num_key_value_heads, config.index_n_heads
    if hidx < 1 or hq % hidx:
        raise ValueError(f"index_n_heads: {where}.num_attention_heads ({hq}) must be a multiple of "
                         f"index_n_heads ({hidx}); each index head serves whole query heads")
    if hq % hkv:
        raise ValueError(f"num_key_value_heads: {where}.num_attention_heads ({hq}) must be a multiple "
                         f"of num_key_value_heads ({hkv})")
    local, topk = config.index_local_blocks, config.index_topk_blocks
    if isinstance(local, bool) or not isinstance(local, int) or local < 1:
        raise ValueError(f"index_local_blocks: openmsa needs at least the query's own block forced "
                         f"(>= 1), got {local!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"index_topk_blocks must be a positive int, got {topk!r}")
    if init_blocks + local > topk:
        raise ValueError(f"index_local_blocks: index_local_blocks ({local}) + init_blocks "
                         f"({init_blocks}) must be at most index_topk_blocks ({topk})")
    for name in ("index_block_size", "index_head_dim", "head_dim"):
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"attention_dropout: the openmsa ops have no dropout; set "
                         f"config.attention_dropout = 0.0 (got {config.attention_dropout})")
    # the config fields each Triton op's supported shapes constrain (ops/utils/shapes.py)
    for op, what, fields in (
            ("indexer_topk", "indexer", (("index_block_size", "block_sizes"),
                                         ("index_head_dim", "index_head_dims"))),
            ("sparse_attention", "sparse attention", (("index_block_size", "block_sizes"),
                                                      ("head_dim", "head_dims")))):
        if resolve(op, backend, device) != "triton":
            continue
        s = SUPPORTED[op]
        for name, allowed in fields:
            if getattr(config, name) not in getattr(s, allowed):
                raise ValueError(f"{name}: the Triton {what} takes {getattr(s, allowed)}, got "
                                 f"{getattr(config, name)} (or backend='reference')")
        if op == "indexer_topk" and topk > s.max_topk:
            raise ValueError(f"index_topk_blocks: the Triton indexer takes at most {s.max_topk}, "
                             f"got {topk} (or backend='reference')")


def _cache_layer(cache, layer_idx: int):
    """This layer's entry of the model's cache: an M3 sparse layer of a dynamic cache."""
    from transformers.cache_utils import DynamicCache
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if isinstance(layers, list) and layer_idx < len(layers) else None
    static = _m3_classes()[1]
    if not isinstance(cache, DynamicCache) or layer is None or isinstance(layer, static) \
            or not hasattr(layer, "update_index"):
        kind = type(layer).__name__ if layer is not None else type(cache).__name__
        raise TypeError(
            f"cache (past_key_values): layer {layer_idx} is a MiniMax-M3 sparse layer and needs the "
            f"sparse dynamic cache layer of DynamicCache(config=model.config) (what generate() "
            f"builds), got {kind}; static caches are not supported")
    n_idx = 0 if layer.idx_keys is None else layer.idx_keys.shape[-2]
    if n_idx != layer.get_seq_length():
        raise RuntimeError(
            f"cache: layer {layer_idx} holds {n_idx} index keys for {layer.get_seq_length()} cached "
            f"tokens; it was filled by something that bypasses the layer's cache methods")
    return layer


class MSAM3Attention(IndexBranchMixin, nn.Module):
    """transformers' MiniMax-M3 sparse attention layer on openmsa (module docstring).

    Built from the original ``MiniMaxM3VLAttention`` ``attn`` (whose ``indexer`` is set):
    it takes over ``q_proj, k_proj, v_proj, o_proj, q_norm, k_norm`` and ``indexer`` under
    the same names and the attributes transformers reads. ``forward`` has the original's
    signature and returns ``(output, None)``; the KL of the last forward is in
    ``kl_loss`` (None when not computed).

    Args:
        mode: "sparse" (MSA, as transformers' M3) or "dense" (warmup: dense attention and
            the dense KL).
        compute_kl: None = compute the KL while autograd records, True = always, False = never.
        backend: openmsa backend of the ops.
        init_blocks: forced leading blocks (docs/spec.md section 4); transformers' M3 has none.
        index_softmax_scale: scale of the index scores in the KL's student (1.0: the raw
            scores the model ranks with).
    """

    def __init__(self, attn: nn.Module, *, mode: str = "sparse", compute_kl: bool | None = None,
                 backend: str = "auto", init_blocks: int = 0, index_softmax_scale: float = 1.0):
        super().__init__()
        adopt_attention(self, attn)
        cfg = attn.config
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        ix = self.indexer
        self.index_heads, self.index_head_dim = ix.num_heads, ix.head_dim
        self.block_size, self.topk, self.local_blocks = ix.block_size, ix.topk_blocks, ix.local_blocks
        self.init_blocks = init_blocks
        # openmsa groups: lcm of the index heads and the KV heads (module docstring)
        groups = math.lcm(self.index_heads, self.num_kv_heads)
        self.kv_repeat, self.index_repeat = groups // self.num_kv_heads, groups // self.index_heads
        self.mode = mode
        self.compute_kl = compute_kl
        self.backend = backend
        self.index_softmax_scale = index_softmax_scale
        self.kl_loss: torch.Tensor | None = None

    def index_parameters(self):
        """The indexer's parameters (its projections and norms): the only ones the KL reaches."""
        yield from self.indexer.parameters()

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, **kwargs):
        cache = cache_argument(cache, kwargs)
        check_layer_inputs(hidden_states, position_embeddings, self.q_proj.weight)
        b, s, _ = hidden_states.shape
        d, di, ix = self.head_dim, self.index_head_dim, self.indexer
        # the original layer's projections, norms and RoPE, as transformers computes them
        q = self.q_norm(self.q_proj(hidden_states).view(b, s, -1, d)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(b, s, -1, d)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, s, -1, d).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self._apply_rope(q, k, cos, sin)
        xd = hidden_states.detach()  # sg(x): the KL trains only the indexer
        qi = ix.q_norm(ix.q_proj(xd).view(b, s, -1, di)).transpose(1, 2)
        ki = ix.k_norm(ix.k_proj(xd).view(b, s, 1, di)).transpose(1, 2)
        qi, ki = self._apply_rope(qi, ki, cos[..., :di], sin[..., :di])

        past = 0
        if cache is not None:  # refuse unsupported caches before reading the mask
            past = _cache_layer(cache, self.layer_idx).get_seq_length()
        check_attention_mask(attention_mask, s, past + s)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
            ki = cache.layers[self.layer_idx].update_index(ki)
        # openmsa's batched form [b, seq, heads, dim]: the queries are the last s keys
        q, k, v, qi, ki = (y.transpose(1, 2) for y in (q, k, v, qi, ki))
        if self.kv_repeat > 1:
            k, v = k.repeat_interleave(self.kv_repeat, 2), v.repeat_interleave(self.kv_repeat, 2)
        want_kl = torch.is_grad_enabled() if self.compute_kl is None else self.compute_kl
        kw = dict(block_size=self.block_size, backend=self.backend)
        if self.mode == "sparse" and not want_kl and self._split_decode(cache, s, ki):
            idx = self._decode_index(cache, qi.detach(), ki.detach())
            if self.index_repeat > 1:
                idx = idx.repeat_interleave(self.index_repeat, 0)
            o, _ = sparse_attention(q, k, v, idx, softmax_scale=self.scaling, **kw)
            kl = None
        elif self.mode == "sparse":
            idx, index_lse = indexer_topk(qi.detach(), ki.detach(), topk=self.topk, softmax_scale=1.0,
                                          init_blocks=self.init_blocks, local_blocks=self.local_blocks,
                                          **kw)
            if self.index_repeat > 1:
                idx, index_lse = (y.repeat_interleave(self.index_repeat, 0) for y in (idx, index_lse))
            o, lse = sparse_attention(q, k, v, idx, softmax_scale=self.scaling, **kw)
            kl = None
            if want_kl:
                kl = indexer_kl_loss(
                    q.detach(), k.detach(), self._grouped(qi), ki, idx, softmax_scale=self.scaling,
                    index_softmax_scale=self.index_softmax_scale, lse=lse,
                    index_lse=index_lse if self.index_softmax_scale == 1.0 else None, **kw)
        else:
            o, kl = dense_warmup_attention(q, k, v, self._grouped(qi), ki, softmax_scale=self.scaling,
                                           index_softmax_scale=self.index_softmax_scale,
                                           compute_kl=want_kl, dense_block_size=self.block_size, **kw)
        self.kl_loss = kl
        return self.o_proj(o.reshape(b, s, -1)), None

    def _split_decode(self, cache, s: int, ki: torch.Tensor) -> bool:
        """Whether this step's Index Branch runs the split decode scan (module docstring)."""
        return (cache is not None and 0 < s <= DECODE_MAX_QUERIES and ki.shape[1] >= DECODE_SCAN_MIN_KEYS
                and ki.shape[1] >= self.block_size
                and resolve("indexer_topk", self.backend, ki.device) == "triton"
                and self.block_size in SUPPORTED["paged_decode"].block_sizes
                and self.index_head_dim in SUPPORTED["paged_decode"].index_head_dims
                and self.topk <= SUPPORTED["paged_decode"].max_topk)

    def _decode_index(self, cache, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        """topk_indices [index heads, b, s, K] of the split decode scan over the cached index
        keys ki [b, S, 1, Di] (contiguous, as the cache holds them)."""
        from ...serving import MSADecodeWrapper
        b, s, hidx, di = qi.shape
        n, bs = ki.shape[1], self.block_size
        key = (b, s, n, hidx, di, bs, self.topk, self.init_blocks, self.local_blocks, qi.dtype, qi.device)
        plan = getattr(cache, _DECODE_PLAN_ATTR, None)
        if plan is None or plan[0] != key:
            w = MSADecodeWrapper(hidx, hidx, di, di, block_size=bs, topk=self.topk, index_softmax_scale=1.0,
                                 max_q_per_request=DECODE_MAX_QUERIES, init_blocks=self.init_blocks,
                                 local_blocks=self.local_blocks)
            full, pages = n // bs, -(-n // bs)
            # page p of sequence b starts at key row b*n + p*bs; the partial last page is
            # never scanned (candidates lie before the local block), so it may point anywhere
            table = torch.zeros(b, pages, dtype=torch.int64)
            table[:, :full] = torch.arange(b)[:, None] * n + torch.arange(full)[None, :] * bs
            w.plan(torch.arange(b + 1, dtype=torch.int32, device=qi.device) * s,
                   torch.full((b,), n, dtype=torch.int32, device=qi.device),
                   table.to(device=qi.device, dtype=torch.int32), dtype=qi.dtype)
            plan = (key, w)
            setattr(cache, _DECODE_PLAN_ATTR, plan)
        rows = ki.reshape(b * n, di)
        pool = rows.as_strided((b * n - bs + 1, bs, di), (di, di, 1))
        idx = plan[1].run_index(qi.reshape(b * s, hidx, di), pool)
        return idx.view(hidx, b, s, self.topk)

    def _grouped(self, qi: torch.Tensor) -> torch.Tensor:
        """qi [b, s, index heads, Di] with one head per openmsa group."""
        return qi.repeat_interleave(self.index_repeat, 2) if self.index_repeat > 1 else qi

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, block_size={self.block_size}, topk={self.topk}, "
                f"local_blocks={self.local_blocks}, init_blocks={self.init_blocks}, "
                f"index_heads={self.index_heads}, backend={self.backend!r}")


def enable_minimax_m3(model: nn.Module, sites, *, mode: str = "sparse", compute_kl: bool | None = None,
                      backend: str = "auto", init_blocks: int = 0,
                      index_softmax_scale: float = 1.0) -> nn.Module:
    """Replace every M3 sparse attention layer in ``sites`` (:func:`m3_attention_sites`) by
    an :class:`MSAM3Attention` (layers that already are one get the new settings). Every
    argument is checked, and every config, before the model is touched."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if compute_kl is not None and not isinstance(compute_kl, bool):
        raise TypeError(f"compute_kl must be None or a bool, got {compute_kl!r}")
    V.check_backend(backend)
    if isinstance(init_blocks, bool) or not isinstance(init_blocks, int) or init_blocks < 0:
        raise ValueError(f"init_blocks must be a non-negative int, got {init_blocks!r}")
    index_softmax_scale = V.check_scale("index_softmax_scale", index_softmax_scale, 1.0)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    for _, attn in sites:
        check_m3_config(attn.config, init_blocks=init_blocks, device=device, backend=backend)
    opts = dict(mode=mode, compute_kl=compute_kl, backend=backend, init_blocks=init_blocks,
                index_softmax_scale=index_softmax_scale)
    for parent, attn in sites:
        if isinstance(attn, MSAM3Attention):
            for name, value in opts.items():
                setattr(attn, name, value)
        else:
            parent.self_attn = MSAM3Attention(attn, **opts)
    return model
