"""What an MSA layer takes from transformers: the original attention module's submodules
and attributes (``adopt_attention``), its inputs (``check_layer_inputs``) and the attention
masks that say "causal, no padding" (``check_attention_mask``).

MSA layers compute causal attention with bottom-right alignment and no padding; a mask
that asks for anything else (left/right padding, packed sequences) would be silently
ignored, so it is refused instead. Reading a materialised mask is a host read (a device
sync on GPU), hence it is done once per forward: the mask object last found causal is
remembered, and transformers passes that same object to every layer.
"""

from __future__ import annotations

import sys
import weakref

import torch

from ... import _validation as V
from ...layers.msa_attention import check_input_dtype

__all__ = ["check_attention_mask", "check_layer_inputs"]

_last_good_mask = None  # weakref to the last mask found purely causal (shared by all layers)


def check_layer_inputs(hidden_states, position_embeddings, weight) -> None:
    """hidden_states [batch, seq, hidden] in the dtype the projections (``weight``) take,
    and the (cos, sin) RoPE tables the model computes once per forward."""
    if position_embeddings is None:
        raise ValueError("position_embeddings (cos, sin) are required: the MSA layer uses the "
                         "RoPE the model computes once per forward")
    V.check_tensor("hidden_states", hidden_states, 3, "[batch, seq, hidden]")
    check_input_dtype("hidden_states", hidden_states, weight)


def check_attention_mask(mask, q_len: int, kv_len: int) -> None:
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


def adopt_attention(layer, attn) -> None:
    """Give ``layer`` the submodules of transformers' attention module ``attn`` (the same
    parameters: weights and state-dict keys unchanged) and the attributes transformers
    reads from an attention module, plus ``_apply_rope``: the model's own RoPE function
    (module-level in every transformers model file)."""
    for name, child in attn.named_children():
        setattr(layer, name, child)
    layer.layer_idx = attn.layer_idx
    layer.config = attn.config
    layer.head_dim = attn.head_dim
    layer.scaling = attn.scaling
    layer.num_key_value_groups = attn.num_key_value_groups
    layer.attention_dropout = getattr(attn, "attention_dropout", 0.0)
    layer.is_causal = True
    layer._apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
