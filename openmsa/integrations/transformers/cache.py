"""The MSA index keys in the model's transformers ``DynamicCache``.

k, v go to the model's ``DynamicCache`` exactly as in transformers. The index keys ki (one
``[batch, 1, seq, Di]`` tensor per layer) live in the same cache: the first MSA forward on
a cache replaces that layer's ``DynamicLayer`` by an :class:`MSACacheLayer` (a
``DynamicLayer`` subclass that also holds the index keys and applies crop / beam reorder /
batch repeat / select / offload to them). So ``model.generate`` needs nothing special
(greedy, sampling, beam search, chunked prefill), and the decode queries attend to the
cached prefix with bottom-right causal alignment (openmsa's ``Lq < Lk`` form).

This is the one module of the package that imports ``transformers`` itself, so its import
check stands here.
"""

from __future__ import annotations

import torch

try:
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "openmsa.integrations.transformers needs the `transformers` package with per-layer "
        "caches (tested with 5.23-5.25): pip install 'transformers>=5.23,<5.26'") from exc

__all__ = ["MSACacheLayer", "prepare_cache", "append_index_keys", "cache_argument"]


def cache_argument(cache, kwargs: dict):
    """The cache an attention module was called with: ``cache`` (transformers 5), else the
    keyword transformers 4 used (``past_key_values``, before 4.56 ``past_key_value``)."""
    for name in ("past_key_values", "past_key_value"):
        if cache is None:
            cache = kwargs.get(name)
    return cache


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

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
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


def prepare_cache(cache, layer_idx: int) -> None:
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


def append_index_keys(cache, layer_idx: int, ki: torch.Tensor, new_tokens: int) -> torch.Tensor:
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
