"""Context parallelism: the load-balanced causal layout of packed sequences over ranks.

``shard`` / ``unshard`` cut every sequence of a packed ``[total, ...]`` tensor into
2 x world_size chunks and give rank r chunks r and 2 x world_size - 1 - r (zigzag): under
a causal mask the early chunk has few keys and the late one many, so every rank gets about
the same attention work.
"""

from .layout import shard, shard_indices, unshard

__all__ = ["shard", "shard_indices", "unshard"]
