"""Hugging Face ``transformers`` integration: MiniMax-M3 on the openmsa kernels, and dense
GQA models converted to MSA in place.

:func:`enable_msa_kernels` is the entry point. On transformers' MiniMax-M3 (text or VL
model) it runs every ``minimax_m3_sparse`` layer's indexer and attention through openmsa
(``minimax_m3``: :class:`MSAM3Attention`; same selection and outputs as transformers, no
O(S^2) tensor, the index keys in the model's own cache, the spec's KL for training the
indexer). On any other model it is :func:`convert_to_msa`.

The conversion works with Llama/Qwen-style decoder-only models (Llama, Mistral without sliding window,
Qwen2, Qwen3, ...): decoder layers with a ``self_attn`` module made of ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj`` (optional per-head ``q_norm``/``k_norm``) that
receives the model's RoPE as ``position_embeddings``. Tested with transformers 5.23-5.25.

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

The package, one concern per module:

- ``convert``: :func:`convert_to_msa`, :func:`set_msa_mode`, :func:`msa_layers`,
  :func:`index_parameters`;
- ``attention``: :class:`MSAHFAttention`, the module that replaces each converted layer's
  attention (its index branch, dense warmup and sparse modes, the KL);
- ``cache``: :class:`MSACacheLayer`, the index keys inside the model's ``DynamicCache``;
- ``masks``: which attention masks an MSA layer accepts.

:func:`collect_kl_losses` sums the per-layer KLs (``loss = lm_loss + lam * kl``); it is the
very function ``openmsa.collect_kl_losses`` (re-exported here), which finds every MSA layer,
converted or :class:`openmsa.MSAttention`. A layer without a KL contributes nothing to the
sum; when no layer holds one, :func:`collect_kl_losses` raises ``RuntimeError`` (rather
than returning None).

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

from ...layers.msa_attention import collect_kl_losses
from .attention import MSAHFAttention
from .cache import MSACacheLayer
from .convert import (INDEX_INITS, MODES, convert_to_msa, enable_msa_kernels, index_parameters,
                      msa_layers, set_msa_mode)
from .minimax_m3 import MSAM3Attention

__all__ = [
    "enable_msa_kernels", "convert_to_msa", "set_msa_mode", "msa_layers", "index_parameters",
    "collect_kl_losses", "MSAHFAttention", "MSAM3Attention", "MSACacheLayer", "MODES", "INDEX_INITS",
]
