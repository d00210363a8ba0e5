"""Converting a transformers model to MSA in place, and handling its MSA layers afterwards.

:func:`enable_msa_kernels` is the one entry point: transformers' MiniMax-M3 sparse layers
run on openmsa (:mod:`.minimax_m3`), a dense Llama/Qwen-style model is converted by
:func:`convert_to_msa`, which swaps the chosen layers' attention modules for
:class:`MSAHFAttention`. :func:`set_msa_mode` switches the MSA layers between the dense
warmup and sparse mode; :func:`msa_layers` and :func:`index_parameters` find them and
what the warmup optimizer trains.
"""

from __future__ import annotations

import numbers

from torch import nn

from ... import _validation as V
from ...layers.msa_attention import MODES
from .attention import MSAHFAttention, check_supported
from .minimax_m3 import MSAM3Attention, enable_minimax_m3, m3_attention_sites

__all__ = ["enable_msa_kernels", "convert_to_msa", "set_msa_mode", "msa_layers", "index_parameters",
           "MODES", "INDEX_INITS"]

INDEX_INITS = ("auto", "copy", "random")
_UNSET = object()  # set_msa_mode: compute_kl not given (None is a value it may be set to)


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
        check_supported(attn)
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


def msa_layers(model: nn.Module) -> list:
    """The MSA attention modules of ``model`` (:class:`MSAHFAttention`,
    :class:`MSAM3Attention`) in layer order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sorted((m for m in model.modules() if isinstance(m, (MSAHFAttention, MSAM3Attention))),
                  key=lambda m: m.layer_idx)


def enable_msa_kernels(model: nn.Module, **options) -> nn.Module:
    """Run ``model``'s sparse attention on openmsa in place; returns ``model``.

    - transformers' MiniMax-M3 (text ``MiniMaxM3VLForCausalLM`` or the VL model): every
      ``minimax_m3_sparse`` layer's indexer and attention run through the openmsa ops
      (:class:`MSAM3Attention`; no O(S^2) tensor, index keys in the model's own cache),
      with the model's selection and outputs; full-attention layers stay as they are.
      Options: ``mode="sparse"`` (or "dense", the warmup), ``compute_kl=None``,
      ``backend="auto"``, ``init_blocks=0``, ``index_softmax_scale=1.0`` (see
      :class:`MSAM3Attention`). On the Triton backend (``"auto"`` with the model on a GPU)
      a config whose block size or head dims its kernels do not take raises ``ValueError``
      naming the config field. Calling it again changes the options of enabled layers.
    - any other model: :func:`convert_to_msa` with ``options`` (a dense Llama/Qwen-style
      model becomes MSA; ``mode="dense"`` by default). A model that already has converted
      layers and no options is returned as it is.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    sites = m3_attention_sites(model)
    if sites:
        return enable_minimax_m3(model, sites, **options)
    if not options and any(isinstance(m, MSAHFAttention) for m in model.modules()):
        return model
    return convert_to_msa(model, **options)


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
