"""nn.Modules built on the openmsa ops."""

from .msa_attention import MSAttention, collect_kl_losses
from .rope import apply_rope, rope_cos_sin

__all__ = ["MSAttention", "collect_kl_losses", "apply_rope", "rope_cos_sin"]
