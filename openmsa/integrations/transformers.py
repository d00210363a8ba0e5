"""Hugging Face ``transformers`` integration: convert a dense GQA model to MSA in place.

Works with Llama/Qwen-style decoder-only models (Llama, Mistral without sliding window,
Qwen2, Qwen3, ...): decoder layers with a ``self_attn`` module made of ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj`` (optional per-head ``q_norm``/``k_norm``) that
receives the model's RoPE as ``position_embeddings``. Tested with transformers 4.57.

Usage::

    from openmsa.integrations.transformers import (
        convert_to_msa, set_msa_mode, index_parameters, collect_kl_losses)

    convert_to_msa(model, first_dense_layers=3, block_size=128, topk=16)  # mode="dense"
    # warmup: dense attention, KL over all visible tokens, only the index projections learn
    opt = torch.optim.AdamW(index_parameters(model), lr=1e-3)
    model(input_ids); collect_kl_losses(model).backward(); opt.step()
    set_msa_mode(model, "sparse")           # then train with lm_loss + lam * KL
    out = model(input_ids, labels=input_ids)
    loss = out.loss + lam * collect_kl_losses(model)
    model.generate(input_ids, max_new_tokens=32)   # index keys are cached per layer

What conversion does (docs/spec.md sections 6-8). Each chosen layer's attention module is replaced
by an :class:`MSAHFAttention` that takes over the original submodules under the same
names (so the checkpoint keys ``...self_attn.q_proj.weight`` etc. are unchanged) and adds

    qi_proj: hidden -> Hkv * Di,  ki_proj: hidden -> Di   (+ qi_norm / ki_norm)

The index branch reads a *detached* copy of the layer input (stop-gradient, docs/spec.md section 6),
so the language-model loss never reaches the index projections and the KL reaches nothing
else. qi, ki get the model's own RoPE (its ``apply_rotary_pos_emb`` with the ``cos, sin`` the
model computed, so RoPE scaling variants carry over) on their first ``rotary_dim`` channels,
and a per-head RMSNorm when the model has ``q_norm``/``k_norm`` (Qwen3) unless
``index_norm`` says otherwise.

Attention itself runs through the openmsa ops (no attention math here):

- ``mode="dense"`` (warmup): full causal attention (torch SDPA without a cached prefix,
  else ``sparse_attention(q, k, v, None, ...)``) and ``indexer_kl_loss(..., None, ...)`` (KL
  over all visible tokens); when the KL is wanted and the keys fit the Triton kernels' K,
  ``msa_attention`` with K = every block instead (exactly the same, at kernel speed). The
  layer output equals the original model's up to float rounding.
- ``mode="sparse"``: ``msa_attention`` (Index Branch Top-k, Main Branch, sparse KL).

Each layer stores its unscaled KL of the last forward in ``module.kl_loss``;
:func:`collect_kl_losses` sums them (``loss = lm_loss + lam * kl``); it is the very function
``openmsa.collect_kl_losses`` (re-exported here), which finds every MSA layer, converted or
:class:`openmsa.MSAttention`. The KL is computed when autograd is recording
(``compute_kl=None``, the default), always (``True``: e.g. to monitor it under
``torch.no_grad()``), or never (``False``); generation (no_grad) skips it. A layer without a
KL contributes nothing to the sum; when no layer holds one, :func:`collect_kl_losses` raises
``RuntimeError`` (rather than returning None).

Generation / KV cache. k, v go to the model's ``DynamicCache`` exactly as in transformers.
The index keys ki (one ``[batch, 1, seq, Di]`` tensor per layer) live in the same cache:
the first MSA forward on a cache replaces that layer's ``DynamicLayer`` by an
:class:`MSACacheLayer` (a ``DynamicLayer`` subclass that also holds the index keys and
applies crop / beam reorder / batch repeat / select / offload to them). So
``model.generate`` needs nothing special (greedy, sampling, beam search, chunked prefill),
and the decode queries attend to the cached prefix with bottom-right causal alignment
(openmsa's ``Lq < Lk`` form).

Limitations (checked, with clear errors rather than wrong results):

- Only causal attention without padding: batch size 1, or several sequences of the same
  length. A padding mask (left or right padding) or a packed-sequence mask raises
  ``ValueError``; a ``BlockMask`` (flex attention) raises ``TypeError``. Use
  ``attn_implementation="sdpa"`` (default) or ``"eager"``.
- Caches: ``DynamicCache`` (optionally offloaded) only; static, quantized, sliding-window
  or encoder-decoder caches raise ``TypeError``. A cache filled before conversion (no index
  keys) raises ``ValueError``. ``to_legacy_cache`` drops the index keys.
- No attention dropout (openmsa has none): conversion refuses ``attention_dropout > 0``.
  Sliding-window layers cannot be converted. ``output_attentions`` returns ``None`` for
  MSA layers.
- Checking a materialised attention mask reads it once per forward on the host (a device
  sync on GPU); with ``attn_implementation="sdpa"`` and no padding transformers passes
  ``None`` and nothing is read.
- Positions: the new tokens are taken to be the last ones of the cached sequence (as
  ``DynamicCache`` appends them); custom ``position_ids`` change only the RoPE angles.
- Gradient checkpointing: use ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=
  {"use_reentrant": False})``. The reentrant variant runs the first forward under no_grad,
  so the KL (a side output on the module) would carry no graph; with the default
  ``compute_kl=None`` it is then not computed and :func:`collect_kl_losses` raises
  ``RuntimeError``.
"""

from __future__ import annotations

import numbers
import sys
import weakref

import torch
from torch import nn

try:
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "openmsa.integrations.transformers needs the `transformers` package with per-layer "
        "caches (>= 4.56; tested with 4.57.1): pip install 'transformers==4.57.1'") from exc

from .. import _validation as V
from ..api import indexer_kl_loss, indexer_topk, msa_attention, sparse_attention
from ..layers.msa_attention import (MODES as LAYER_MODES, IndexBranchMixin, all_blocks_topk,
                                    check_input_dtype, collect_kl_losses, dense_causal_gqa)

__all__ = [
    "convert_to_msa", "set_msa_mode", "msa_layers", "index_parameters", "collect_kl_losses",
    "MSAHFAttention", "MSACacheLayer", "MODES", "INDEX_INITS",
]

MODES = LAYER_MODES  # one definition: openmsa.layers.msa_attention
INDEX_INITS = ("auto", "copy", "random")
# Submodules of an attention module whose computation MSAHFAttention reproduces; any
# other child would be silently dropped, so its presence makes conversion refuse.
_KNOWN_CHILDREN = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
_UNSET = object()


# --------------------------------------------------------------------------- cache


class MSACacheLayer(DynamicLayer):
    """A ``DynamicLayer`` that also holds the layer's MSA index keys ``[batch, 1, seq, Di]``.

    Every cache operation transformers applies per layer (crop for assisted decoding,
    beam-search reorder, batch repeat/select, reset, offload/prefetch) is applied to the
    index keys too, so they stay aligned with the cached k, v.
    """

    def __init__(self):
        super().__init__()
        self.index_keys: torch.Tensor | None = None

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> "MSACacheLayer":
        """An MSACacheLayer sharing the state of an empty plain DynamicLayer."""
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        new.index_keys = None
        return new

    def index_length(self) -> int:
        return 0 if self.index_keys is None else self.index_keys.shape[-2]

    def append_index_keys(self, ki: torch.Tensor) -> torch.Tensor:
        self.index_keys = ki if self.index_keys is None else torch.cat([self.index_keys, ki], dim=-2)
        return self.index_keys

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        n = self.get_seq_length()
        if self.index_keys is not None and self.index_length() > n:
            self.index_keys = self.index_keys[..., :n, :]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.index_length() > 0:
            self.index_keys = self.index_keys.index_select(0, beam_idx.to(self.index_keys.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.index_length() > 0:
            self.index_keys = self.index_keys.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.index_length() > 0:
            self.index_keys = self.index_keys[indices, ...]

    def reset(self) -> None:
        super().reset()
        if self.index_keys is not None:
            self.index_keys.zero_()

    def offload(self):
        super().offload()
        if self.index_keys is not None:
            self.index_keys = self.index_keys.to("cpu", non_blocking=True)

    def prefetch(self):
        super().prefetch()
        if self.index_keys is not None and self.index_keys.device != self.device:
            self.index_keys = self.index_keys.to(self.device, non_blocking=True)


def _prepare_cache(cache, layer_idx: int) -> None:
    """Before ``cache.update``: refuse caches that cannot hold index keys, and turn this
    layer's empty plain DynamicLayer into an MSACacheLayer."""
    if not isinstance(cache, DynamicCache):
        raise TypeError(
            f"past_key_values must be a transformers DynamicCache (the default of generate()) "
            f"for MSA layers, got {type(cache).__name__}")
    if layer_idx < len(cache.layers):
        layer = cache.layers[layer_idx]
        if type(layer) is DynamicLayer:
            if layer.get_seq_length() > 0:
                raise ValueError(
                    f"past_key_values: layer {layer_idx} already caches {layer.get_seq_length()} "
                    f"tokens without MSA index keys (filled before conversion or rebuilt from a "
                    f"legacy tuple); start generation from an empty cache")
            cache.layers[layer_idx] = MSACacheLayer.adopt(layer)
        elif not isinstance(layer, MSACacheLayer):
            raise TypeError(
                f"past_key_values: layer {layer_idx} is a {type(layer).__name__}; MSA layers "
                f"need a plain DynamicLayer (no sliding window, static or quantized layers)")
    elif cache.layer_class_to_replicate not in (DynamicLayer, MSACacheLayer):
        raise TypeError(
            f"past_key_values: layers of kind {getattr(cache.layer_class_to_replicate, '__name__', None)}"
            f" cannot hold MSA index keys; use a plain DynamicCache")


def _append_index_keys(cache, layer_idx: int, ki: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """After ``cache.update``: append ki ``[batch, 1, new_tokens, Di]``; return all index keys."""
    layer = cache.layers[layer_idx]
    if type(layer) is DynamicLayer:  # created lazily by update() just now
        layer = cache.layers[layer_idx] = MSACacheLayer.adopt(layer)
    past = layer.get_seq_length() - new_tokens
    if layer.index_length() != past or (past and layer.index_keys.shape[0] != ki.shape[0]):
        raise RuntimeError(
            f"MSA index-key cache of layer {layer_idx} is out of sync with its KV cache "
            f"({layer.index_length()} index keys for {past} cached tokens): the cache was "
            f"changed by something that bypasses the per-layer cache methods")
    return layer.append_index_keys(ki)


# --------------------------------------------------------------------------- masks

_last_good_mask = None  # weakref to the last mask found purely causal (shared by all layers)


def _check_attention_mask(mask, q_len: int, kv_len: int) -> None:
    """Accept only masks that say "causal, no padding", in any form transformers builds.

    None (sdpa / flash without padding), a 2-D padding mask [batch, kv] with no zeros
    (flash_attention_2), or a 4-D mask [batch, 1|heads, q, kv] (bool: True = attend; eager
    float: 0 = attend) equal to the bottom-right causal pattern.
    """
    global _last_good_mask
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"attention_mask: MSA layers accept the masks of attn_implementation 'sdpa', "
            f"'eager' or 'flash_attention_2' (a tensor or None), got {type(mask).__name__}")
    if _last_good_mask is not None and _last_good_mask() is mask:
        return  # the same mask object is passed to every layer of one forward
    ok = False
    if mask.dim() == 2:
        ok = mask.shape[-1] >= kv_len and bool(mask[:, -kv_len:].bool().all())
    elif mask.dim() == 4 and mask.shape[-2] == q_len and mask.shape[-1] >= kv_len:
        m = mask[..., :kv_len]
        allowed = m if m.dtype == torch.bool else m == 0
        i = torch.arange(q_len, device=mask.device)[:, None]
        j = torch.arange(kv_len, device=mask.device)[None, :]
        ok = bool((allowed == (j <= i + (kv_len - q_len))).all())
    if not ok:
        raise ValueError(
            f"attention_mask: MSA layers support causal attention without padding only "
            f"(batch 1, or equal-length sequences with an all-ones attention_mask); got a mask "
            f"of shape {tuple(mask.shape)} that is not the causal pattern for {q_len} queries on "
            f"{kv_len} keys (left/right padding or packed sequences are not supported)")
    _last_good_mask = weakref.ref(mask)


# --------------------------------------------------------------------------- module


class MSAHFAttention(IndexBranchMixin, nn.Module):
    """MSA replacement of a Llama/Qwen-style transformers attention module (docs/spec.md section 7).

    Built by :func:`convert_to_msa` from the original module ``attn``: it takes over
    ``q_proj, k_proj, v_proj, o_proj`` (and ``q_norm, k_norm``) under the same names and
    the attributes transformers reads (``layer_idx``, ``config``, ``head_dim``,
    ``scaling``, ...), and adds ``qi_proj`` (hidden -> Hkv*Di), ``ki_proj`` (hidden -> Di)
    and ``qi_norm``/``ki_norm`` (RMSNorm or Identity).

    Index init: ``"copy"`` (needs Di == head_dim) is a heuristic warm start from the
    teacher's own projections: group g's index query projection is the mean of the group's
    query projections, the index key projection the mean of all key projections (biases and
    q/k norm weights likewise). On the tiny copy-task model of
    ``examples/convert_dense_to_msa.py`` it gave a much better sparse model before the
    warmup and a slightly lower KL after it than random init (two seeds; not a study).
    ``"random"`` draws N(0, config.initializer_range) like transformers' own init.

    ``forward`` has the signature of the original module and returns ``(output, None)``;
    the KL goes to ``self.kl_loss`` (None when not computed).
    """

    def __init__(self, attn: nn.Module, *, index_head_dim: int, block_size: int, topk: int,
                 mode: str = "dense", index_norm: bool | None = None, index_init: str = "auto",
                 compute_kl: bool | None = None, backend: str = "auto"):
        super().__init__()
        _check_supported(attn)
        for name, child in attn.named_children():
            setattr(self, name, child)
        self.layer_idx = attn.layer_idx
        self.config = attn.config
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.num_key_value_groups = attn.num_key_value_groups
        self.attention_dropout = getattr(attn, "attention_dropout", 0.0)
        self.is_causal = True
        self.sliding_window = None
        self.original_class = type(attn).__name__
        # The model's own RoPE function (module-level in every transformers model file).
        self._apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.num_heads = self.q_proj.out_features // self.head_dim
        self.num_kv_heads = self.k_proj.out_features // self.head_dim
        self.index_head_dim = index_head_dim
        self.block_size, self.topk = block_size, topk
        self.mode = mode
        self.compute_kl = compute_kl
        self.backend = backend
        self.kl_loss: torch.Tensor | None = None

        w = self.q_proj.weight
        kw = dict(device=w.device, dtype=w.dtype)
        hidden, di = self.q_proj.in_features, index_head_dim
        bias = self.q_proj.bias is not None
        self.qi_proj = nn.Linear(hidden, self.num_kv_heads * di, bias=bias, **kw)
        self.ki_proj = nn.Linear(hidden, di, bias=bias, **kw)
        has_qk_norm = hasattr(attn, "q_norm")
        use_norm = has_qk_norm if index_norm is None else index_norm
        if use_norm:
            self.qi_norm = _make_norm(getattr(attn, "q_norm", None), di, self.config, kw)
            self.ki_norm = _make_norm(getattr(attn, "k_norm", None), di, self.config, kw)
        else:
            self.qi_norm, self.ki_norm = nn.Identity(), nn.Identity()
        if index_init == "auto":
            index_init = "copy" if di == self.head_dim else "random"
        self._init_index(index_init)

    @torch.no_grad()
    def _init_index(self, how: str) -> None:
        if how == "copy":
            g, hkv, d = self.num_key_value_groups, self.num_kv_heads, self.head_dim
            wq = self.q_proj.weight.view(hkv, g, d, -1).mean(1).reshape(hkv * d, -1)
            wk = self.k_proj.weight.view(hkv, d, -1).mean(0)
            self.qi_proj.weight.copy_(wq)
            self.ki_proj.weight.copy_(wk)
            if self.qi_proj.bias is not None:
                self.qi_proj.bias.copy_(self.q_proj.bias.view(hkv, g, d).mean(1).reshape(-1))
                self.ki_proj.bias.copy_(self.k_proj.bias.view(hkv, d).mean(0))
            for src, dst in (("q_norm", self.qi_norm), ("k_norm", self.ki_norm)):
                ws, wd = getattr(getattr(self, src, None), "weight", None), getattr(dst, "weight", None)
                if ws is not None and wd is not None and ws.shape == wd.shape:
                    wd.copy_(ws)
        else:
            std = float(getattr(self.config, "initializer_range", 0.02))
            for lin in (self.qi_proj, self.ki_proj):
                lin.weight.normal_(0.0, std)
                if lin.bias is not None:
                    lin.bias.zero_()

    def _rope_index(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The model's RoPE on the first rotary_dim channels of x ``[b, s, h, Di]``."""
        r = cos.shape[-1]
        if r > x.shape[-1]:
            raise ValueError(f"index_head_dim ({x.shape[-1]}) must be >= the model's rotary dim ({r})")
        xh = x.transpose(1, 2)  # transformers' layout [b, h, s, d]
        rot, _ = self._apply_rope(xh[..., :r], xh[..., :r], cos, sin)
        if r < x.shape[-1]:
            rot = torch.cat((rot, xh[..., r:]), dim=-1)
        return rot.transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache_position=None, **kwargs):
        if past_key_values is None:  # the pre-4.56 keyword
            past_key_values = kwargs.get("past_key_value")
        if position_embeddings is None:
            raise ValueError("position_embeddings (cos, sin) are required: the MSA layer uses the "
                             "RoPE the model computes once per forward")
        V.check_tensor("hidden_states", hidden_states, 3, "[batch, seq, hidden]")
        check_input_dtype("hidden_states", hidden_states, self.q_proj.weight)
        b, s, _ = hidden_states.shape
        hq, hkv, d, di = self.num_heads, self.num_kv_heads, self.head_dim, self.index_head_dim
        # Main branch projections exactly as the original module computes them.
        q = self.q_proj(hidden_states).view(b, s, hq, d)
        k = self.k_proj(hidden_states).view(b, s, hkv, d)
        v = self.v_proj(hidden_states).view(b, s, hkv, d)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = self._apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [b, h, s, d]
        v = v.transpose(1, 2)
        # Index branch on a detached input: the KL trains only qi_proj/ki_proj (+ norms).
        xd = hidden_states.detach()
        qi = self._rope_index(self.qi_norm(self.qi_proj(xd).view(b, s, hkv, di)), cos, sin)
        ki = self._rope_index(self.ki_norm(self.ki_proj(xd).view(b, s, 1, di)), cos, sin)

        past = 0
        if past_key_values is not None:  # refuse unsupported caches before reading the mask
            _prepare_cache(past_key_values, self.layer_idx)
            past = past_key_values.get_seq_length(self.layer_idx)
        _check_attention_mask(attention_mask, s, past + s)
        if past_key_values is not None:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
            k, v = past_key_values.update(k, v, self.layer_idx, cache_kwargs)
            ki = _append_index_keys(past_key_values, self.layer_idx, ki.transpose(1, 2), s).transpose(1, 2)
        # openmsa's batched form [b, seq, heads, dim]: queries are the last s of the keys.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        want_kl = torch.is_grad_enabled() if self.compute_kl is None else self.compute_kl
        kw = dict(block_size=self.block_size, backend=self.backend)
        if self.mode == "sparse":
            if want_kl:
                o, kl, _ = msa_attention(q, k, v, qi, ki, topk=self.topk,
                                         softmax_scale=self.scaling, **kw)
            else:
                idx, _ = indexer_topk(qi, ki, topk=self.topk, **kw)
                o, _ = sparse_attention(q, k, v, idx, softmax_scale=self.scaling, **kw)
                kl = None
        elif want_kl and (kall := all_blocks_topk(k.shape[1], self.block_size, d, di,
                                                   self.backend, q.device)):
            # dense mode as sparse mode with K = every block: exact, at kernel speed
            o, kl, _ = msa_attention(q, k, v, qi, ki, topk=kall, softmax_scale=self.scaling, **kw)
        elif k.shape[1] == s and self.backend != "reference":
            # dense mode without a cached prefix (the dense KL, reference, then computes the
            # teacher's LSE itself)
            o = dense_causal_gqa(q, k, v, scale=self.scaling)
            kl = indexer_kl_loss(q.detach(), k.detach(), qi, ki, None, softmax_scale=self.scaling,
                                 **kw) if want_kl else None
        else:
            o, lse = sparse_attention(q, k, v, None, softmax_scale=self.scaling, **kw)
            kl = indexer_kl_loss(q.detach(), k.detach(), qi, ki, None, lse=lse,
                                 softmax_scale=self.scaling, **kw) if want_kl else None
        self.kl_loss = kl
        return self.o_proj(o.reshape(b, s, hq * d)), None

    def extra_repr(self) -> str:
        return (f"original={self.original_class}, mode={self.mode!r}, index_head_dim="
                f"{self.index_head_dim}, block_size={self.block_size}, topk={self.topk}")


def _make_norm(template, dim: int, config, kw) -> nn.Module:
    """Per-head RMSNorm of width dim: the model's own norm class when it has one (same
    float32 math and eps), else torch's."""
    eps = None
    if template is not None:
        eps = getattr(template, "variance_epsilon", getattr(template, "eps", None))
    eps = float(eps if eps is not None else getattr(config, "rms_norm_eps", 1e-6))
    if template is not None:
        try:
            norm = type(template)(dim, eps=eps)
            if getattr(norm, "weight", None) is not None and tuple(norm.weight.shape) == (dim,):
                return norm.to(**kw)
        except TypeError:
            pass
    return nn.RMSNorm(dim, eps=eps, **kw)


def _check_supported(attn: nn.Module) -> None:
    """Refuse attention modules whose computation MSAHFAttention would not reproduce."""
    where = f"{type(attn).__name__} (layer {getattr(attn, 'layer_idx', '?')})"
    children = dict(attn.named_children())
    unknown = sorted(set(children) - set(_KNOWN_CHILDREN))
    missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj")
               if not isinstance(children.get(n), nn.Linear)]
    if unknown or missing:
        raise TypeError(
            f"model: {where} is not a Llama/Qwen-style attention module (needs nn.Linear "
            f"q_proj/k_proj/v_proj/o_proj and optional per-head q_norm/k_norm; missing "
            f"{missing}, unsupported submodules {unknown})")
    for name in ("layer_idx", "config", "head_dim", "scaling", "num_key_value_groups"):
        if not hasattr(attn, name):
            raise TypeError(f"model: {where} has no attribute {name!r}; not a supported attention module")
    if not hasattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb"):
        raise TypeError(f"model: {where} comes from a module without apply_rotary_pos_emb; "
                        f"only RoPE models are supported")
    if ("q_norm" in children) != ("k_norm" in children):
        raise TypeError(f"model: {where} has only one of q_norm/k_norm")
    for n in ("q_norm", "k_norm"):
        wt = getattr(children.get(n), "weight", None)
        if n in children and (wt is None or tuple(wt.shape) != (attn.head_dim,)):
            raise TypeError(f"model: {where}.{n} is not a per-head norm of width head_dim = "
                            f"{attn.head_dim}")
    if attn.q_proj.out_features % attn.head_dim or attn.k_proj.out_features % attn.head_dim:
        raise TypeError(f"model: {where} projection widths are not multiples of head_dim")
    if getattr(attn, "sliding_window", None) is not None:
        raise ValueError(f"layers: {where} uses sliding-window attention, which MSA does not "
                         f"reproduce; keep it dense (leave it out of `layers`)")
    if getattr(attn, "attention_dropout", 0.0):
        raise ValueError(f"model: {where} has attention_dropout = {attn.attention_dropout}; the "
                         f"openmsa ops have no dropout, set config.attention_dropout = 0.0 first")


# --------------------------------------------------------------------------- public API


def _attention_sites(model: nn.Module):
    """[(layer_idx, parent, attn)] for every decoder layer with a ``self_attn`` child."""
    sites = []
    for parent in model.modules():
        attn = parent._modules.get("self_attn")
        if isinstance(attn, nn.Module):
            idx = getattr(attn, "layer_idx", None)
            if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
                raise TypeError(f"model: {type(attn).__name__} has no integer layer_idx; not a "
                                f"supported transformers attention module")
            sites.append((int(idx), parent, attn))
    if not sites:
        raise TypeError(f"model: found no decoder layer with a `self_attn` module in "
                        f"{type(model).__name__}; convert_to_msa supports Llama/Qwen-style "
                        f"transformers models")
    sites.sort(key=lambda t: t[0])
    if [t[0] for t in sites] != list(range(len(sites))):
        raise TypeError(f"model: attention layer_idx values {[t[0] for t in sites]} are not "
                        f"0..{len(sites) - 1}")
    return sites


def _check_opt_bool(name: str, value) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None or a bool, got {value!r}")


def convert_to_msa(model: nn.Module, *, layers=None, first_dense_layers: int | None = None,
                   index_head_dim: int | None = None, block_size: int = 128, topk: int = 16,
                   mode: str = "dense", index_norm: bool | None = None, index_init: str = "auto",
                   compute_kl: bool | None = None, backend: str = "auto") -> nn.Module:
    """Convert a Llama/Qwen-style transformers model to MSA in place; returns ``model``.

    Args:
        model: a transformers model (``*ForCausalLM`` or its base model).
        layers: indices (``layer_idx``) of the layers to convert; default: all but the first
            ``first_dense_layers``. Give at most one of ``layers`` / ``first_dense_layers``.
        first_dense_layers: how many leading layers stay dense (MiniMax-M3 keeps 3); default 0.
        index_head_dim: Di, default head_dim; at least the model's rotary dim.
        block_size, topk: B and K of the Index Branch (spec defaults 128 and 16).
        mode: "dense" (warmup: full attention, KL over all visible tokens; outputs equal the
            original model's) or "sparse" (MSA). Change later with :func:`set_msa_mode`.
        index_norm: per-head RMSNorm on qi, ki; None follows the model (q_norm present).
        index_init: "copy" (from the group-mean q/k projections; needs Di == head_dim),
            "random", or "auto" (copy when possible).
        compute_kl: None = compute the KL when autograd records, True = always, False = never.
        backend: openmsa backend, "auto" | "triton" | "reference".

    The original q/k/v/o weights (and norms) are kept as they are, under their names; the new
    parameters are ``...self_attn.qi_proj``, ``ki_proj`` (``qi_norm``, ``ki_norm``). The
    conversion arguments are recorded in ``model.config.openmsa`` (when the model has a
    config), so that a saved converted checkpoint can be rebuilt with
    ``convert_to_msa(model, **model.config.openmsa)`` before loading its state dict.
    Nothing is modified when an argument is bad.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if index_init not in INDEX_INITS:
        raise ValueError(f"index_init must be one of {INDEX_INITS}, got {index_init!r}")
    V.check_backend(backend)
    block_size = V.check_positive_int("block_size", block_size)
    topk = V.check_positive_int("topk", topk)
    _check_opt_bool("index_norm", index_norm)
    _check_opt_bool("compute_kl", compute_kl)
    sites = _attention_sites(model)
    n = len(sites)

    if layers is not None and first_dense_layers is not None:
        raise ValueError("give at most one of layers and first_dense_layers")
    if layers is None:
        fd = 0 if first_dense_layers is None else first_dense_layers
        if isinstance(fd, bool) or not isinstance(fd, numbers.Integral):
            raise TypeError(f"first_dense_layers must be an int, got {fd!r}")
        if not 0 <= fd < n:
            raise ValueError(f"first_dense_layers must be in [0, {n - 1}] for a model with {n} "
                             f"layers (at least one layer must become MSA), got {fd}")
        chosen = list(range(int(fd), n))
    else:
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be an iterable of layer indices, got {layers!r}")
        chosen = list(layers)
        for i in chosen:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"layers must hold int layer indices, got {i!r}")
            if not 0 <= i < n:
                raise ValueError(f"layers: index {i} out of range for a model with {n} layers")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layers must not repeat an index, got {chosen}")
        if not chosen:
            raise ValueError("layers must select at least one layer")
        chosen = sorted(int(i) for i in chosen)

    head_dim = sites[chosen[0]][2].head_dim
    di = head_dim if index_head_dim is None else V.check_positive_int("index_head_dim", index_head_dim)
    # Build every replacement before touching the model, so that a refusal leaves it intact.
    new = []
    for i in chosen:
        _, parent, attn = sites[i]
        if isinstance(attn, MSAHFAttention):
            raise ValueError(f"layers: layer {i} is already MSA (use set_msa_mode to change its mode)")
        _check_supported(attn)
        cfg = attn.config
        rotary = int(attn.head_dim * getattr(cfg, "partial_rotary_factor", 1.0))
        if di < rotary or di % 2:
            raise ValueError(f"index_head_dim must be even and >= the rotary dim {rotary} of "
                             f"layer {i} (RoPE is applied to qi, ki as to q, k), got {di}")
        if index_init == "copy" and di != attn.head_dim:
            raise ValueError(f"index_init='copy' needs index_head_dim == head_dim "
                             f"({attn.head_dim}), got {di}")
        new.append((parent, MSAHFAttention(attn, index_head_dim=di, block_size=block_size, topk=topk,
                                           mode=mode, index_norm=index_norm, index_init=index_init,
                                           compute_kl=compute_kl, backend=backend)))
    for parent, module in new:
        parent.self_attn = module
    config = getattr(model, "config", None)
    if config is not None:
        config.openmsa = dict(layers=chosen, index_head_dim=di, block_size=block_size, topk=topk,
                              index_norm=index_norm)
    return model


def msa_layers(model: nn.Module) -> list[MSAHFAttention]:
    """The MSA attention modules of ``model`` in layer order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sorted((m for m in model.modules() if isinstance(m, MSAHFAttention)),
                  key=lambda m: m.layer_idx)


def set_msa_mode(model: nn.Module, mode: str, *, compute_kl=_UNSET) -> nn.Module:
    """Switch every MSA layer to ``mode`` ("dense" warmup or "sparse"); optionally set
    ``compute_kl`` (None / True / False, see :func:`convert_to_msa`). Returns ``model``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if compute_kl is not _UNSET:
        _check_opt_bool("compute_kl", compute_kl)
    mods = msa_layers(model)
    if not mods:
        raise ValueError("model has no MSA layers; call convert_to_msa first")
    for m in mods:
        m.mode = mode
        if compute_kl is not _UNSET:
            m.compute_kl = compute_kl
    return model


def index_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The index-branch parameters of every MSA layer (qi_proj, ki_proj and their norms):
    what the warmup optimizer trains."""
    params = [p for m in msa_layers(model) for p in m.index_parameters()]
    if not params:
        raise ValueError("model has no MSA layers; call convert_to_msa first")
    return params
