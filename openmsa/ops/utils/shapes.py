"""Shapes the Triton kernels support, one table for every op (anything else: the PyTorch
reference, ``backend="reference"``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Supported:
    block_sizes: tuple
    head_dims: tuple = ()  # of q, k, v (the Main Branch)
    index_head_dims: tuple = ()  # of qi, ki (the Index Branch)
    max_topk: int = 64  # Top-k slots per row a kernel holds


SUPPORTED = {
    "sparse_attention": Supported(block_sizes=(16, 32, 64, 128), head_dims=(16, 32, 64, 128, 256)),
    "indexer_topk": Supported(block_sizes=(64, 128), index_head_dims=(64, 128, 256)),
    "indexer_kl_loss": Supported(block_sizes=(16, 32, 64, 128), head_dims=(32, 64, 128),
                                 index_head_dims=(32, 64, 128)),
    # serving (block size = page size): the decode kernels, and the paged prefill, which
    # runs the indexer and the attention forward on the pools
    "paged_decode": Supported(block_sizes=(16, 32, 64, 128), head_dims=(16, 32, 64, 128, 256),
                              index_head_dims=(16, 32, 64, 128, 256)),
    "paged_prefill": Supported(block_sizes=(64, 128), head_dims=(16, 32, 64, 128, 256),
                               index_head_dims=(64, 128, 256)),
}


def all_stages_support(block_size: int, head_dim: int, index_head_dim: int,
                       topk: int) -> bool:
    """The three MSA stages (indexer, attention, KL) all run these shapes on Triton."""
    index, attn, kl = (SUPPORTED[op] for op in ("indexer_topk", "sparse_attention",
                                                "indexer_kl_loss"))
    return (topk <= min(index.max_topk, kl.max_topk)
            and all(block_size in s.block_sizes for s in (attn, index, kl))
            and all(head_dim in s.head_dims for s in (attn, kl))
            and all(index_head_dim in s.index_head_dims for s in (index, kl)))
