"""Launch configurations of the Triton kernels: one table per GPU architecture, one entry
per kernel family, read once per (entry, device).

An entry is a frozen dataclass of launch settings (tile shapes, warps, pipeline stages,
scratch budgets). None of them changes what an op computes, only how the work is cut
(the float rounding of sums that are split differently is the only effect, as with any
tiling). ``launch_config(name, device)`` returns the entry for the device's architecture;
architectures without a table of their own use the Hopper table, the only one measured
(H100 and H200; the figures are cited where each default is set).

Benchmarks and tests change entries in-process with ``override(name, **fields)`` (a
context manager). A benchmark that runs each configuration in a fresh process passes them
in the one environment variable of this module, ``OPENMSA_LAUNCH``, read once at import:
``OPENMSA_LAUNCH="attention_fwd.segment_tiles=64,kl_teacher.num_stages=2"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class AttentionForward:
    """Sparse attention forward (ops/attention): a program holds one key block and walks
    tiles of ``tile_rows`` (query tokens x heads of the group) over ``segment_tiles`` tiles.
    One warpgroup on 64-row tiles (164-180 registers, ~107 KB shared) lets two programs
    share an SM; 128-row tiles with 8 warps ran at one program per SM (12.5% occupancy in
    ncu), 66 vs 55 ms at 128K on the H100 (benchmarks/results/h100/attention_fwd_sweep.log)."""

    tile_rows: int = 64
    segment_tiles: int = 16
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class AttentionBackward:
    """Sparse attention backward. 128K fwd+bwd on the H100 (benchmarks/results/h100/):
    ``split`` (dK/dV of each half block and dQ as three roles) with 64-row tiles and one
    warpgroup, 253 ms, against 284 ms for the best fused launch (attention_bwd_sweep.log);
    ``launch="interleaved"`` (the three roles of a segment side by side in one grid, so two
    of the three reads of Q and dO hit L2) 195 against 207 ms for "separate"
    (tuning/run1_bwd.log); 128 tiles (512 entries) per segment, an eighth of the dK/dV
    flushes and K/V loads of 16: 185 (16) -> 167 (64) ms (tuning/run2_bwd.log), 161 (64)
    -> 158 (128) ms (tuning/run3_bwd.log)."""

    tile_rows: int = 64
    segment_tiles: int = 128
    num_warps: int = 4
    num_stages: int = 1
    split: bool = True
    launch: str = "interleaved"  # or "separate"

    def __post_init__(self):
        if self.launch not in ("interleaved", "separate"):
            raise ValueError(f"attention_bwd.launch must be 'interleaved' or 'separate', "
                             f"got {self.launch!r}")


@dataclass(frozen=True)
class KLTeacher:
    """Teacher pass of the KL loss (ops/kl): the attention forward's tile without the output
    accumulator. ``tile_rows=None``: 128 rows for 16-bit inputs (8 tokens at G = 16), 32
    for float32 (ieee dots on CUDA cores), at least one token. bf16, G = 16, B = D = Di =
    128 on the H100 at 128K (benchmarks/results/h100/tuning/run*_kl_*.log): 128 rows / 4
    warps / 3 stages, 41.0 ms in all against 48.4 ms with 64 rows; 128 tiles per segment:
    35.1 (64) against 41.4 ms (16), then 32.6 (128) against 33.6 (64), mostly fewer dki
    flushes in the student."""

    tile_rows: int | None = None
    segment_tiles: int = 128
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class KLStudent:
    """Student pass of the KL loss: z, P_T, P_S [rows, B] float32 and the segment's dki
    [B, Di] float32 accumulator; 32 rows / 4 warps / 2 stages hold 255 registers without
    spills on the H100 (64-row tiles spill: 52.7-67.8 ms against 41.0)."""

    rows: int = 32
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class Indexer:
    """Index Branch Top-k (ops/indexer): (rows per program, warps, stages) per index head
    dim. Each key block a program streams costs 2 x rows x B x Di FLOPs for 2 x B x Di
    bytes of ki: at long context the kernel is bound by ki traffic from L2 unless the tile
    is tall, hence 128 rows. A program's dot and the block max / Top-k update that read its
    result run one after the other, so the MMA idles unless another program shares the SM.

    ``tiles``: one program per SM (8 warps hold the float32 z tile [128, B] and the int64
    Top-k state in ~157 registers; 3 stages of ki blocks). ``two_program_tiles`` with the
    register cap ``maxnreg`` (128: 24-32 B of stack) and 2 stages (32 KB of qi + 2 x 32 KB at
    B = Di = 128) fit two programs per SM; used for packed keys when the LSE pass is not in
    the kernel (``lse_mode`` "kv_outer", the long contexts): H200, bf16, one sequence, 32K
    2.55 -> 2.03 ms, 128K 21.9 -> 17.2 ms, 1M 1248 -> 966 ms (450 -> 583 TFLOP/s;
    benchmarks/results/h200/indexer/). With the union LSE pass compiled in (short contexts)
    the cap cost 8K 0.51 -> 0.60 ms, so there ``tiles``. ``fp8_tiles``, ``fp8_maxnreg``:
    E4M3 qi, ki (``fp8=True``; 16 KB blocks, 3 stages fit twice), capped likewise: 128K
    17.0 -> 16.4 ms, 1M 1011 -> 836 ms. Not capped: the paged variant, float32 inputs
    (exact dots on CUDA cores, a small tile). topk > 33 (64 int64 slots per row) halves the
    tile. Tried and slower everywhere: skipping the Top-k update when no row of the tile
    inserts (a block-wide reduction per key block: +10% at 128K, +45% for FP8 at 1M).

    ``lse_mode``: where the selected index LSE is computed, "union" (inside the Top-k
    kernel: each query tile walks the union of its rows' blocks), "kv_outer"
    (ops/indexer/lse.py: exactly the selected (row, block) pairs) or "auto": KV-outer from
    ``kv_outer_min_mean_keys`` keys per sequence on (it pays a fixed ~1 ms for its
    schedule; H100 bf16, benchmarks/results/h100/indexer_lse_modes.log: 8K 1.66 vs 0.50
    ms, 32K 3.09 vs 3.78, 128K 24.2 vs 51.5, 1M 1295 vs 2251)."""

    tiles: dict = field(default_factory=lambda: {64: (128, 8, 3), 128: (128, 8, 3),
                                                 256: (64, 8, 2)})
    two_program_tiles: dict = field(default_factory=lambda: {128: (128, 8, 2)})
    maxnreg: int = 128
    fp8_tiles: dict = field(default_factory=lambda: {64: (128, 8, 3), 128: (128, 8, 3),
                                                     256: (64, 8, 2)})
    fp8_maxnreg: int = 128
    float32_tile: tuple = (32, 8, 2)
    large_topk_rows: int = 64
    lse_mode: str = "auto"
    kv_outer_min_mean_keys: int = 16384

    def __post_init__(self):
        if self.lse_mode not in ("auto", "kv_outer", "union"):
            raise ValueError(f"indexer.lse_mode must be 'auto', 'kv_outer' or 'union', "
                             f"got {self.lse_mode!r}")


@dataclass(frozen=True)
class IndexLSE:
    """KV-outer selected index LSE (ops/indexer/lse.py): one index head per group, so the
    MMA rows are query tokens. ``max_rows_per_chunk`` bounds the schedule's temporaries."""

    tokens: int = 64
    segment_tiles: int = 8
    num_warps: int = 4
    num_stages: int = 2
    max_rows_per_chunk: int = 1 << 18


@dataclass(frozen=True)
class DecodeIndex:
    """Decode index scan (serving): pages scored per loop step (None: by the number of
    index rows, serving/decode.py), warps and stages of the split scan."""

    pages: int | None = None
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class DenseChunks:
    """Dense warmup through the sparse kernels (ops/attention/dense.py, ops/kl/dense.py):
    local block ids per chunk, at most the kernels' Top-k limit (64)."""

    blocks: int = 64


@dataclass(frozen=True)
class Scratch:
    """Bytes of per-entry partials (forward outputs, dQ, KL terms) a launcher may hold at
    once; query rows are cut into chunks to stay within it, whatever the sequence length.
    4 GiB: fewer, larger chunks reuse each loaded key block for more queries (128K forward
    on the H100: 55.6 ms at 2 GiB, 52.1 at 4, 51.2 at 8; results/h100/attention_sweep3.log)."""

    partial_bytes: int = 4 << 30


_DEFAULTS = {
    "attention_fwd": AttentionForward(),
    "attention_bwd": AttentionBackward(),
    "kl_teacher": KLTeacher(),
    "kl_student": KLStudent(),
    "indexer": Indexer(),
    "index_lse": IndexLSE(),
    "decode_index": DecodeIndex(),
    "dense_chunks": DenseChunks(),
    "scratch": Scratch(),
}

# Tables per architecture (compute capability major * 10 + minor); others use HOPPER.
HOPPER = 90
TABLES: dict[int, dict] = {HOPPER: dict(_DEFAULTS)}

ENV_VAR = "OPENMSA_LAUNCH"
_cache: dict = {}
_overrides: dict[str, dict] = {}


_arch_of: dict = {}  # (device type, index) -> architecture, asked once per device


def _arch(device) -> int:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return HOPPER  # the interpreter runs the Hopper configuration
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    arch = _arch_of.get(key)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(key[1])
        arch = _arch_of[key] = major * 10 + minor
    return arch


def _parse_env(text: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            key, value = item.split("=", 1)
            name, fld = key.strip().split(".", 1)
        except ValueError:
            raise ValueError(f"{ENV_VAR}: expected entry.field=value items, got {item!r}") from None
        entry = _DEFAULTS.get(name)
        if entry is None or fld not in {f.name for f in dataclasses.fields(entry)}:
            raise ValueError(f"{ENV_VAR}: unknown launch setting {key!r}")
        current = getattr(entry, fld)
        if isinstance(current, bool):
            parsed = value.strip() in ("1", "true", "True")
        elif isinstance(current, int) or current is None:
            parsed = None if value.strip() == "None" else int(value)
        else:
            parsed = value.strip()
        out.setdefault(name, {})[fld] = parsed
    return out


_env = _parse_env(os.environ.get(ENV_VAR, ""))


def launch_config(name: str, device=None):
    """The launch settings of kernel family ``name`` on ``device`` (a torch device; None or
    a CPU device: the interpreter)."""
    arch = _arch(device)
    key = (name, arch)
    got = _cache.get(key)
    if got is None:
        table = TABLES.get(arch, TABLES[HOPPER])
        got = table[name]
        changes = {**_env.get(name, {}), **_overrides.get(name, {})}
        if changes:
            got = dataclasses.replace(got, **changes)
        _cache[key] = got
    return got


@contextlib.contextmanager
def override(name: str, **fields):
    """Replace fields of entry ``name`` for every architecture while the block runs
    (benchmark sweeps; tests that force small tiles or several query chunks)."""
    if name not in _DEFAULTS:
        raise ValueError(f"unknown launch setting entry {name!r}; one of {sorted(_DEFAULTS)}")
    dataclasses.replace(_DEFAULTS[name], **fields)  # unknown fields raise here
    saved = _overrides.get(name)
    _overrides[name] = {**(saved or {}), **fields}
    _cache.clear()
    try:
        yield
    finally:
        if saved is None:
            _overrides.pop(name, None)
        else:
            _overrides[name] = saved
        _cache.clear()
