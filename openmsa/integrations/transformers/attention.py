"""MSAHFAttention: the MSA replacement of a Llama/Qwen-style transformers attention module.

Each converted layer's attention module becomes an :class:`MSAHFAttention` that takes over
the original submodules under the same names (so the checkpoint keys
``...self_attn.q_proj.weight`` etc. are unchanged) and adds (docs/spec.md sections 6-8)

    qi_proj: hidden -> Hkv * Di,  ki_proj: hidden -> Di   (+ qi_norm / ki_norm)

The index branch reads a *detached* copy of the layer input (stop-gradient, docs/spec.md
section 6), so the language-model loss never reaches the index projections and the KL
reaches nothing else. qi, ki get the model's own RoPE (its ``apply_rotary_pos_emb`` with
the ``cos, sin`` the model computed, so RoPE scaling variants carry over) on their first
``rotary_dim`` channels, and a per-head RMSNorm when the model has ``q_norm``/``k_norm``
(Qwen3) unless ``index_norm`` says otherwise.

Attention itself runs through the openmsa ops (no attention math here):

- ``mode="dense"`` (warmup): :func:`openmsa.layers.msa_attention.dense_warmup_attention`,
  the same choice :class:`openmsa.MSAttention` makes: full causal attention and the KL
  over all visible tokens, through the Triton kernels as sparse mode with K = every block
  where they fit. The layer output equals the original model's up to float rounding.
- ``mode="sparse"``: ``msa_attention`` (Index Branch Top-k, Main Branch, sparse KL), or
  Top-k and Main Branch alone when no KL is wanted.

Each layer stores its unscaled KL of the last forward in ``module.kl_loss``. The KL is
computed when autograd is recording (``compute_kl=None``, the default), always (``True``:
e.g. to monitor it under ``torch.no_grad()``), or never (``False``), so generation
(no_grad) skips it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ...api import indexer_topk, msa_attention, sparse_attention
from ...layers.msa_attention import IndexBranchMixin, dense_warmup_attention
from .cache import append_index_keys, cache_argument, prepare_cache
from .masks import adopt_attention, check_attention_mask, check_layer_inputs

__all__ = ["MSAHFAttention", "check_supported"]

# Submodules of an attention module whose computation MSAHFAttention reproduces; any
# other child would be silently dropped, so its presence makes conversion refuse.
_KNOWN_CHILDREN = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def check_supported(attn: nn.Module) -> None:
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
        check_supported(attn)
        adopt_attention(self, attn)
        self.sliding_window = None
        self.original_class = type(attn).__name__
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
                cache=None, cache_position=None, **kwargs):
        past_key_values = cache_argument(cache, kwargs)
        check_layer_inputs(hidden_states, position_embeddings, self.q_proj.weight)
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
            prepare_cache(past_key_values, self.layer_idx)
            past = past_key_values.get_seq_length(self.layer_idx)
        check_attention_mask(attention_mask, s, past + s)
        if past_key_values is not None:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
            k, v = past_key_values.update(k, v, self.layer_idx, cache_kwargs)
            ki = append_index_keys(past_key_values, self.layer_idx, ki.transpose(1, 2), s).transpose(1, 2)
        # openmsa's batched form [b, seq, heads, dim]: queries are the last s of the keys.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        want_kl = torch.is_grad_enabled() if self.compute_kl is None else self.compute_kl
        if self.mode == "sparse":
            kw = dict(block_size=self.block_size, backend=self.backend)
            if want_kl:
                o, kl, _ = msa_attention(q, k, v, qi, ki, topk=self.topk,
                                         softmax_scale=self.scaling, **kw)
            else:
                idx, _ = indexer_topk(qi, ki, topk=self.topk, **kw)
                o, _ = sparse_attention(q, k, v, idx, softmax_scale=self.scaling, **kw)
                kl = None
        else:
            o, kl = dense_warmup_attention(q, k, v, qi, ki, block_size=self.block_size,
                                           dense_block_size=self.block_size,
                                           softmax_scale=self.scaling, compute_kl=want_kl,
                                           backend=self.backend)
        self.kl_loss = kl
        return self.o_proj(o.reshape(b, s, hq * d)), None

    def extra_repr(self) -> str:
        return (f"original={self.original_class}, mode={self.mode!r}, index_head_dim="
                f"{self.index_head_dim}, block_size={self.block_size}, topk={self.topk}")
