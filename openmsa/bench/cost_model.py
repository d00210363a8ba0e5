"""The FLOP cost model of docs/spec.md section 9 (useful work only, causal average).

Per query token at context N:
    dense attention      2 * Hq * D * N          (N/2 visible keys, QK^T and PV)
    MSA Index Branch     Hkv * Di * N            (N/2 keys, one index head per group)
    MSA Main Branch      4 * Hq * D * K * B      (K blocks of B tokens, QK^T and PV)
With the defaults the ratio dense / MSA is 32 N / (N + 131072).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MSAConfig:
    num_heads: int = 64
    num_kv_heads: int = 4
    head_dim: int = 128
    index_head_dim: int = 128
    block_size: int = 128
    topk: int = 16


def flops_per_token(n: int, cfg: MSAConfig = MSAConfig()) -> dict:
    dense = 2 * cfg.num_heads * cfg.head_dim * n
    index = cfg.num_kv_heads * cfg.index_head_dim * n
    main = 4 * cfg.num_heads * cfg.head_dim * cfg.topk * cfg.block_size
    return {"dense": dense, "index": index, "main": main, "msa": index + main,
            "ratio": dense / (index + main)}


def cost_table(contexts, cfg: MSAConfig = MSAConfig()) -> list[dict]:
    """One row per context: per-token and whole-sequence (N tokens) FLOPs."""
    rows = []
    for n in contexts:
        f = flops_per_token(n, cfg)
        rows.append({"context": n, **{f"{k}_flops_per_token": v for k, v in f.items() if k != "ratio"},
                     "dense_tflop_seq": f["dense"] * n / 1e12, "msa_tflop_seq": f["msa"] * n / 1e12,
                     "ratio": f["ratio"]})
    return rows


def config_dict(cfg: MSAConfig) -> dict:
    return asdict(cfg)


def selected_tokens(n: int, block_size: int = 128, topk: int = 16) -> int:
    """Exact number of (query, key) pairs MSA attends to in one causal sequence of n
    tokens: a query at position p with local block l = p // B sees all p + 1 keys
    when l < K, else K - 1 full earlier blocks plus the p % B + 1 visible local keys."""
    full = min(n, topk * block_size)  # positions whose every visible block is selected
    total = full * (full + 1) // 2
    rest = n - full
    if rest > 0:
        # positions full..n-1: (K-1)*B + (p % B + 1); p % B cycles because full % B == 0
        cycles, tail = divmod(rest, block_size)
        per_cycle = block_size * (topk - 1) * block_size + block_size * (block_size + 1) // 2
        total += cycles * per_cycle + tail * (topk - 1) * block_size + tail * (tail + 1) // 2
    return total
