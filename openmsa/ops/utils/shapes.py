"""Shapes the Triton kernels support, one table for every op (anything else: the PyTorch
reference, ``backend="reference"``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kernel_shapes(op: str, what: str, *, block_size: int, q=None, qi=None, topk=None,
                        check_dtypes: bool = True) -> None:
    """Raise a ValueError/TypeError naming the argument when the Triton kernels of ``op``
    (``what``: their name in the message) do not take these shapes: block_size, q's head
    dim, qi's index head dim, their dtypes, the Top-k count."""
    s = SUPPORTED[op]
    hint = "(use backend='reference')"
    if block_size not in s.block_sizes:
        raise ValueError(f"block_size: the Triton {what} supports {s.block_sizes}, got "
                         f"{block_size} {hint}")
    for name, x, field, dims in (("q", q, "head_dim", s.head_dims),
                                 ("qi", qi, "index_head_dim", s.index_head_dims)):
        if x is None:
            continue
        if x.shape[2] not in dims:
            raise ValueError(f"{name}: the Triton {what} supports {field} in {dims}, got "
                             f"{x.shape[2]} {hint}")
        if check_dtypes and x.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{name}: the Triton {what} supports bfloat16, float16 and float32, "
                            f"got {x.dtype} {hint}")
    if topk is not None and not 1 <= topk <= s.max_topk:
        raise ValueError(f"topk: the Triton {what} supports topk in [1, {s.max_topk}], got "
                         f"{topk} {hint}")
