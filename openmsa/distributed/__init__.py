"""Context parallelism: the load-balanced causal layout of packed sequences over ranks and
MSA attention over it.

``shard`` / ``unshard`` cut every sequence of a packed ``[total, ...]`` tensor into
2 x world_size chunks and give rank r chunks r and 2 x world_size - 1 - r (zigzag): under
a causal mask the early chunk has few keys and the late one many, so every rank gets about
the same attention work. ``msa_attention_cp`` (and ``dense_attention_cp``, the warmup) run
one layer's attention on such shards over torch.distributed (cp.py).
"""

from .cp import CPPlan, cp_plan, dense_attention_cp, msa_attention_cp
from .layout import shard, shard_indices, unshard

__all__ = ["shard", "shard_indices", "unshard", "msa_attention_cp", "dense_attention_cp",
           "cp_plan", "CPPlan"]
