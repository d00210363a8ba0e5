"""openmsa: MiniMax Sparse Attention (MSA) for the GPUs people have.

Public API (``docs/spec.md`` section 10): :func:`indexer_topk`, :func:`sparse_attention`,
:func:`indexer_kl_loss`, :func:`msa_attention`, and the :class:`MSAttention` layer, with
:func:`collect_kl_losses` (the KL of every MSA layer of a model, converted transformers
layers included: ``loss = lm_loss + lam * openmsa.collect_kl_losses(model)``).
"""

from ._validation import set_value_checks, value_checks
from .api import indexer_kl_loss, indexer_topk, msa_attention, sparse_attention
from .layers import MSAttention, collect_kl_losses

__version__ = "0.1.0"

__all__ = [
    "indexer_topk", "sparse_attention", "indexer_kl_loss", "msa_attention",
    "MSAttention", "collect_kl_losses", "value_checks", "set_value_checks", "__version__",
]
