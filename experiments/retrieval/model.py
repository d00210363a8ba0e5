"""A small pre-norm decoder with three interchangeable attention layers.

    tokens -> embedding -> N x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> head

Attention variants (``ModelConfig.attn``), all GQA with the same projections and RoPE:
  "dense"  full causal attention (torch SDPA).
  "window" causal sliding window of ``window`` tokens (default topk * block_size: the same
           per-query token budget as MSA), plain torch, O(L * window).
  "msa"    ``openmsa.MSAttention``: Index Branch picks ``topk`` blocks of ``block_size``
           tokens per query and KV group, the Main Branch attends to them (docs/spec.md section 7).

The dense and window layers name their parameters like MSAttention (q_proj, k_proj,
v_proj, o_proj) and rotate q, k with openmsa's own RoPE functions (NeoX half split, the
first ``rotary_dim`` channels), so a dense checkpoint loads into an MSA model unchanged:
in MSA "dense" mode the converted model computes the same function (tests check it).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openmsa import MSAttention, collect_kl_losses
from openmsa.layers.rope import apply_rope, rope_cos_sin

ATTN_TYPES = ("dense", "window", "msa")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    mlp_hidden: int = 512
    # Partial RoPE: half of each head's channels carry no position, which lets content
    # matching (the retrieval) work at distances never seen in training.
    rotary_dim: int = 32
    rope_theta: float = 10000.0
    attn: str = "dense"
    block_size: int = 64
    topk: int = 8
    index_head_dim: int = 64
    window: int | None = None       # "window": tokens per query (None: topk * block_size)
    msa_dense_layers: int = 0       # "msa": the first N layers stay dense (M3 keeps 3)
    # Token shift before attention (x_t + w * x_{t-1}, per channel): hands each position its
    # predecessor, so the key of a pair is visible at its value's position without a
    # previous-token head. Retrieval still needs long-range attention (the query is at the
    # end, its pair anywhere); the shift only removes the slow induction-head plateau.
    token_shift: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.attn not in ATTN_TYPES:
            raise ValueError(f"attn must be one of {ATTN_TYPES}, got {self.attn!r}")

    @property
    def window_tokens(self) -> int:
        return self.window if self.window is not None else self.topk * self.block_size

    def to_dict(self) -> dict:
        return asdict(self)


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * G, L, D]; query head h reads KV head h // G (MSA's order)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sliding_window_attention(q, k, v, window: int) -> torch.Tensor:
    """Causal attention where query i sees keys i - window < j <= i.

    q, k, v: [B, H, L, D]. The sequence is cut into chunks of ``window`` queries; each chunk
    attends to its own and the previous chunk's keys under a fixed [W, 2W] band mask, so
    the cost is O(L * 2W) with plain SDPA calls (CPU and GPU, no FlexAttention needed).
    """
    b, h, n, d = q.shape
    if n <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    w = window
    c = -(-n // w)
    pad = c * w - n
    if pad:  # padded keys sit after every real query (never visible); padded queries are dropped
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))

    def chunks(t):  # [B, H, C*W, D] -> [B*C, H, W, D]
        return t.view(b, h, c, w, d).transpose(1, 2).reshape(b * c, h, w, d)

    def with_prev(t):  # keys of chunk i: chunk i-1 (zeros before chunk 0) then chunk i
        t = t.view(b, h, c, w, d)
        prev = torch.cat((torch.zeros_like(t[:, :, :1]), t[:, :, :-1]), dim=2)
        return torch.cat((prev, t), dim=3).transpose(1, 2).reshape(b * c, h, 2 * w, d)

    qi = torch.arange(w, device=q.device)[:, None]
    kj = torch.arange(2 * w, device=q.device)[None, :]
    band = (kj > qi) & (kj <= qi + w)                        # key slot kj = position kj - w rel. chunk
    first = band & (kj >= w)                                 # chunk 0 has no previous chunk
    mask = torch.stack((first, band))[torch.arange(c, device=q.device).clamp(max=1)]  # [C, W, 2W]
    mask = mask[None, :, None].expand(b, c, 1, w, 2 * w).reshape(b * c, 1, w, 2 * w)
    o = F.scaled_dot_product_attention(chunks(q), with_prev(k), with_prev(v), attn_mask=mask)
    return o.view(b, c, h, w, d).transpose(1, 2).reshape(b, h, c * w, d)[:, :, :n]


class GQAAttention(nn.Module):
    """Dense or sliding-window causal GQA with the projections and RoPE of MSAttention."""

    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.rotary_dim, self.rope_theta = cfg.rotary_dim, cfg.rope_theta
        self.window = window
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, n, self.heads, d)
        k = self.k_proj(x).view(b, n, self.kv_heads, d)
        v = self.v_proj(x).view(b, n, self.kv_heads, d)
        if self.rotary_dim:
            cos, sin = rope_cos_sin(torch.arange(n, device=x.device), self.rotary_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # broadcasts over batch
        g = self.heads // self.kv_heads
        q, k, v = q.transpose(1, 2), _expand_kv(k.transpose(1, 2), g), _expand_kv(v.transpose(1, 2), g)
        if self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = sliding_window_attention(q, k, v, self.window)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, self.heads * d))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class TokenShift(nn.Module):
    """y_t = x_t + w * x_{t-1} (per channel, x_{-1} = 0); a width-2 causal depthwise conv."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden,), 0.5))

    def forward(self, x):  # [B, L, hidden]
        return x + self.weight * F.pad(x, (0, 0, 1, 0))[:, :-1]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden, cfg.mlp_hidden)
        self.shift = TokenShift(cfg.hidden) if cfg.token_shift else nn.Identity()
        if cfg.attn == "msa" and layer >= cfg.msa_dense_layers:
            # qk_norm off: under bf16 autocast RMSNorm returns float32 q, k next to a bf16 v,
            # which the ops reject (mixed dtypes); the dense layers have no qk norm either.
            self.attn = MSAttention(cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim,
                                    index_head_dim=cfg.index_head_dim, block_size=cfg.block_size,
                                    topk=cfg.topk, qk_norm=False, rotary_dim=cfg.rotary_dim,
                                    rope_theta=cfg.rope_theta, mode="sparse")
        else:
            self.attn = GQAAttention(cfg, window=cfg.window_tokens if cfg.attn == "window" else None)

    def forward(self, x):
        x = x + self.attn(self.shift(self.attn_norm(x)))
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0):
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)
        so that the residual stream does not grow with depth.

        Each matrix draws from its own generator, seeded by ``seed`` and its *name*: the
        variants share every backbone name, so dense, window and MSA models of one seed
        start from the same backbone (the MSA index projections only add parameters) and
        differ only in their attention, not in the luck of the initialisation."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.cfg.layers) if name.endswith(("o_proj.weight", "down.weight")) else 0.02
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] -> logits; only at ``positions`` [B, Q] (-> [B, Q, V]) when given,
        since the task supervises just the answers (saves the head on every other token)."""
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        if positions is not None:
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        return self.head(self.norm(x))


# --- MSA helpers --------------------------------------------------------------------------

def msa_layers(model: nn.Module) -> list[MSAttention]:
    return [m for m in model.modules() if isinstance(m, MSAttention)]


def set_msa_mode(model: nn.Module, mode: str) -> None:
    """"dense" (warmup: full attention, KL over all visible tokens) or "sparse"."""
    for m in msa_layers(model):
        m.mode = mode


def index_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in msa_layers(model) for p in m.index_parameters()]


def kl_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum over the MSA layers of their last forward's KL (unscaled)."""
    return collect_kl_losses(model)


def convert_dense_to_msa(dense: Decoder, cfg: ModelConfig, index_init: str = "copy") -> Decoder:
    """An MSA model (``cfg.attn == "msa"``) with the dense model's weights: every parameter
    but the index projections is copied; these start either as a copy of the group-mean
    query / mean key projections ("copy": the index then scores like the averaged main
    attention, a warm start for the warmup) or at random ("random").

    "copy" with an index head wider than the main heads (index_head_dim = Di > D) fills the
    first D channels of each index head (the RoPE channels are the first rotary_dim in both,
    so positions line up) and leaves Di - D spare channels: their query rows start at zero,
    so the index scores start exactly as with Di = D, and the warmup may use them. The query
    copy is scaled by (Di / D)^0.5 because the index scale is Di^-0.5, the main one D^-0.5."""
    if cfg.attn != "msa":
        raise ValueError("convert_dense_to_msa needs an MSA config")
    msa = Decoder(cfg).to(next(dense.parameters()).device)
    missing, unexpected = msa.load_state_dict(dense.state_dict(), strict=False)
    index_names = {n for n, _ in msa.named_parameters() if ".attn.qi_" in n or ".attn.ki_" in n}
    if unexpected or set(missing) - index_names:
        raise ValueError(f"checkpoint does not match: missing {missing}, unexpected {unexpected}")
    if index_init == "copy":
        if cfg.index_head_dim < cfg.head_dim:
            raise ValueError("index_init='copy' needs index_head_dim >= head_dim, got "
                             f"{cfg.index_head_dim} < {cfg.head_dim}")
        g, hkv, d, di = cfg.heads // cfg.kv_heads, cfg.kv_heads, cfg.head_dim, cfg.index_head_dim
        with torch.no_grad():
            for m in msa_layers(msa):
                qi = m.qi_proj.weight.view(hkv, di, -1)
                qi.zero_()
                qi[:, :d].copy_(m.q_proj.weight.view(hkv, g, d, -1).mean(1) * (di / d) ** 0.5)
                m.ki_proj.weight[:d].copy_(m.k_proj.weight.view(hkv, d, -1).mean(0))
    elif index_init != "random":
        raise ValueError(f"index_init must be 'copy' or 'random', got {index_init!r}")
    return msa


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
