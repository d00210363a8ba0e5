"""Argument validation for the public API (docs/spec.md section 10).

Every public function validates *all* of its arguments here before doing any work,
so that bad input fails fast with a message that names the argument and says what
was expected. Nothing in this module modifies its inputs.

Checks that need the *values* of ``cu_seqlens`` (start at 0, non-decreasing,
Lq <= Lk, last entry = total) read them on the host. For CPU tensors that is free and
always done (outside torch.compile); the reference backend needs the lengths on the host
anyway (under torch.compile its op reads and checks them: ``openmsa.library``). On CUDA
tensors the Triton backend reads each distinct pair of cu_seqlens tensors once (one host read,
remembered on the tensor object with its version counter), so the sixty layers of a
step synchronise at most once and a step that builds new tensors is checked again. It
skips the read while a CUDA graph is being captured, under torch.compile, and where the
user turned value checks off (``value_checks(False)``). Whenever the values were not
read on the host, the kernels get a device-side sanitised copy (``_sanitized_cu``): valid
values pass unchanged, invalid ones are replaced by a layout that is in bounds, so no
value can make a kernel read or write out of bounds.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import weakref
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "reference")
# float64 is accepted so that gradcheck can run on the reference backend.
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_inputs_on_device() -> bool:
    """Whether the serving helpers check device metadata values on every call (a sync)."""
    return os.environ.get("OPENMSA_CHECK_INPUTS", "0") not in ("", "0", "false", "False")


_value_checks = True


def set_value_checks(enabled: bool) -> bool:
    """Turn the host-side checks of cu_seqlens *values* on CUDA tensors on or off for the
    whole process; returns the previous setting. Off, no op reads cu_seqlens on the host
    (no synchronisation at all); invalid values then give unspecified results (computed
    as one sequence), never an out-of-bounds access. CPU tensors and the reference
    backend always check (their lengths are on the host anyway)."""
    global _value_checks
    check_bool("enabled", enabled)
    previous, _value_checks = _value_checks, enabled
    return previous


@contextlib.contextmanager
def value_checks(enabled: bool):
    """``with openmsa.value_checks(False): ...``: ``set_value_checks`` for a block."""
    previous = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}"
        )


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be bfloat16, float16 or float32 (float64 for the reference "
            f"backend), got {t.dtype}"
        )


def check_same(kind: str, names_tensors, attr: str) -> None:
    """All tensors share ``attr`` (dtype or device)."""
    first_name, first = names_tensors[0]
    for name, t in names_tensors[1:]:
        if getattr(t, attr) != getattr(first, attr):
            exc = TypeError if attr == "dtype" else ValueError
            raise exc(
                f"{name} must have the same {kind} as {first_name} "
                f"({getattr(first, attr)}), got {getattr(t, attr)}"
            )


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_scale(name: str, value, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None or a positive float, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be None or a finite positive float, got {value}")
    return value


def check_finite_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_forced_blocks(init_blocks, local_blocks, topk: int) -> tuple[int, int]:
    """The forced blocks of the Index Branch (docs/spec.md section 4): ``init_blocks`` >= 0,
    ``local_blocks`` >= 1, together at most ``topk``."""
    if isinstance(init_blocks, bool) or not isinstance(init_blocks, numbers.Integral):
        raise TypeError(f"init_blocks must be a non-negative int, got {init_blocks!r}")
    if init_blocks < 0:
        raise ValueError(f"init_blocks must be a non-negative int, got {init_blocks}")
    local_blocks = check_positive_int("local_blocks", local_blocks)
    if init_blocks + local_blocks > topk:
        raise ValueError(f"init_blocks + local_blocks ({init_blocks} + {local_blocks}) must be at "
                         f"most topk ({topk}): forced blocks take their slots first")
    return int(init_blocks), local_blocks


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_index_dtype(index_dtype) -> bool:
    """``index_dtype`` of the Index Branch: None (rank the inputs as given) or
    ``torch.float8_e4m3fn`` (rank their E4M3 quantization). Returns whether it is FP8."""
    if index_dtype is None:
        return False
    if index_dtype is torch.float8_e4m3fn:
        return True
    raise ValueError(f"index_dtype must be None or torch.float8_e4m3fn, got {index_dtype!r}")


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@dataclass(frozen=True)
class Varlen:
    """Host-side view of the packed layout (docs/spec.md section 3).

    ``cu_seqlens_q``/``cu_seqlens_k`` are int32 tensors on the inputs' device: the
    caller's, or their sanitised copies where the values were not checked. The host
    lists are ``None`` when the values were not read, so that no synchronisation happens.
    In the fragment form (docs/spec.md section 3) ``cu_seqlens_k`` is None and every query
    sequence names its key range: int32 ``kv_start``, ``kv_len`` [num_seqs] on the device,
    ``kv_ranges`` = (starts, lens) host tuples once read.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor | None
    total_q: int
    total_k: int
    cu_q: tuple | None = None
    cu_k: tuple | None = None
    kv_start: torch.Tensor | None = None
    kv_len: torch.Tensor | None = None
    kv_ranges: tuple | None = None

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    def host(self) -> "Varlen":
        """Return a Varlen whose host lists are filled (may synchronise)."""
        if self.cu_q is not None:
            return self
        if self.kv_start is not None:
            ranges = (tuple(self.kv_start.tolist()), tuple(self.kv_len.tolist()))
            return Varlen(self.cu_seqlens_q, None, self.total_q, self.total_k,
                          tuple(self.cu_seqlens_q.tolist()), None, self.kv_start, self.kv_len, ranges)
        return Varlen(
            self.cu_seqlens_q, self.cu_seqlens_k, self.total_q, self.total_k,
            tuple(self.cu_seqlens_q.tolist()), tuple(self.cu_seqlens_k.tolist()),
        )


def _check_cu_values(name: str, values: tuple, total: int, total_name: str) -> None:
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {values[0]}")
    for i in range(len(values) - 1):
        if values[i + 1] < values[i]:
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{i}] = {values[i]} > "
                f"{name}[{i + 1}] = {values[i + 1]}"
            )
    if values[-1] != total:
        raise ValueError(
            f"{name}[-1] must equal {total_name} = {total}, got {values[-1]}"
        )


def check_varlen(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int,
                 device: torch.device, read_values: bool, kv_start=None, kv_len=None) -> Varlen:
    """Check the cu_seqlens pair; ``read_values``: the caller needs the host lists.
    ``kv_start``/``kv_len``: the fragment form (``cu_seqlens_k`` None), see check_fragments."""
    if kv_start is not None or kv_len is not None:
        return check_fragments(cu_seqlens_q, kv_start, kv_len, total_q, total_k, device,
                               read_values)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, 1, "[num_seqs + 1] int32")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.numel() < 1:
            raise ValueError(f"{name} must have at least one entry (the leading 0)")
        if cu.device != device:
            raise ValueError(f"{name} must be on {device} like the inputs, got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (num_seqs + 1), got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    if cu_seqlens_q.numel() == 1 and (total_q or total_k):
        raise ValueError(f"cu_seqlens_q/cu_seqlens_k describe no sequence, but there are "
                         f"{total_q} query and {total_k} key rows")
    if total_q > total_k:  # a host fact: some sequence must have Lq > Lk
        raise ValueError(
            f"cu_seqlens_q/cu_seqlens_k: total_q = {total_q} query rows but only total_k = "
            f"{total_k} key rows; every sequence needs Lq <= Lk"
        )
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, total_q, total_k)
    return _checked_or_repaired(
        varlen, read_values, _check_values,
        lambda: Varlen(*_sanitized_cu(cu_seqlens_q, cu_seqlens_k, total_q, total_k), total_q, total_k))


def _checked_or_repaired(varlen: Varlen, read_values: bool, check, repair) -> Varlen:
    """The value rule of every layout: ``check(varlen)`` reads the values on the host and
    raises on bad ones; ``repair()`` gives a sanitised device-side copy (no host read).
    In a traced graph nothing is read: the reference op reads and checks the values
    itself (opaque to the compiler), the kernels get the repair. Otherwise the values are
    read where the caller needs them or they are on the CPU anyway, repaired where no host
    read is allowed (capture, value_checks(False)), and else read once per tensor (keyed by
    the tensors and their versions)."""
    if torch.compiler.is_compiling():
        return varlen if read_values else repair()
    if read_values or varlen.cu_seqlens_q.device.type == "cpu":
        return check(varlen)
    if not _may_read_device_values():
        return repair()
    if not _already_checked(varlen):
        check(varlen)
        _remember_checked(varlen)
    return varlen


def _check_values(varlen: Varlen) -> Varlen:
    varlen = varlen.host()
    _check_cu_values("cu_seqlens_q", varlen.cu_q, varlen.total_q, "total_q (q.shape[0])")
    _check_cu_values("cu_seqlens_k", varlen.cu_k, varlen.total_k, "total_k (k.shape[0])")
    for b in range(varlen.num_seqs):
        lq = varlen.cu_q[b + 1] - varlen.cu_q[b]
        lk = varlen.cu_k[b + 1] - varlen.cu_k[b]
        if lq > lk:
            raise ValueError(
                f"cu_seqlens_q/cu_seqlens_k: sequence {b} has Lq = {lq} > Lk = {lk}; "
                f"queries must be the last Lq positions of their keys (Lq <= Lk)"
            )
    return varlen


def _may_read_device_values() -> bool:
    """A host read of device values is allowed: checks on, not capturing, not compiling."""
    if not _value_checks or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# Attribute on cu_seqlens_q naming the pair of tensors (and versions, totals) last checked.
_CHECKED_ATTR = "_openmsa_checked_cu_seqlens"


def _partners(varlen: Varlen) -> tuple:
    """The tensors checked together with cu_seqlens_q."""
    if varlen.kv_start is not None:
        return (varlen.kv_start, varlen.kv_len)
    return (varlen.cu_seqlens_k,)


def _check_key(varlen: Varlen) -> tuple:
    versions = tuple(t._version for t in (varlen.cu_seqlens_q, *_partners(varlen)))
    return (*versions, varlen.total_q, varlen.total_k)


def _already_checked(varlen: Varlen) -> bool:
    mark = getattr(varlen.cu_seqlens_q, _CHECKED_ATTR, None)
    return (mark is not None and len(mark[0]) == len(_partners(varlen))
            and all(r() is t for r, t in zip(mark[0], _partners(varlen)))
            and mark[1] == _check_key(varlen))


def _remember_checked(varlen: Varlen) -> None:
    try:
        setattr(varlen.cu_seqlens_q, _CHECKED_ATTR,
                (tuple(weakref.ref(t) for t in _partners(varlen)), _check_key(varlen)))
    except (AttributeError, TypeError):  # tensor subclasses without a __dict__: check again
        pass


def _sanitized_cu(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int):
    """Device-side copies of (cu_q, cu_k) that are a valid layout for (total_q, total_k):
    the tensors' own values when they are valid, else one sequence holding every row
    (``[0, total, ..., total]``; valid since total_q <= total_k). Torch ops only: no host
    sync, capturable in a CUDA graph, traceable by torch.compile."""
    lq, lk = cu_q.diff(), cu_k.diff()
    ok = ((cu_q[0] == 0) & (cu_k[0] == 0) & (cu_q[-1] == total_q) & (cu_k[-1] == total_k)
          & (lq >= 0).all() & (lq <= lk).all())
    # [0, 1, ..., 1] built on the device: an indexed store of a Python scalar would be a
    # host-to-device copy, which graph capture forbids.
    ends = torch.arange(cu_q.numel(), device=cu_q.device, dtype=cu_q.dtype).clamp_max(1)
    return torch.where(ok, cu_q, ends * total_q), torch.where(ok, cu_k, ends * total_k)


def check_qkv(q, k, v) -> None:
    check_tensor("q", q, 3, "[total_q, num_heads_q, head_dim]")
    check_tensor("k", k, 3, "[total_k, num_heads_kv, head_dim]")
    check_tensor("v", v, 3, "[total_k, num_heads_kv, head_dim]")
    check_float("q", q)
    check_same("dtype", [("q", q), ("k", k), ("v", v)], "dtype")
    check_same("device", [("q", q), ("k", k), ("v", v)], "device")
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"k must have the head_dim of q ({q.shape[2]}), got {k.shape[2]}"
        )
    check_heads(q.shape[1], k.shape[1], "q", "k")


def check_heads(hq: int, hkv: int, qname: str, kname: str) -> None:
    if hkv < 1 or hq < 1:
        raise ValueError(f"{qname} and {kname} must have at least one head, got {hq} and {hkv}")
    if hq % hkv != 0:
        raise ValueError(
            f"{qname} heads ({hq}) must be a multiple of {kname} heads ({hkv}) (GQA groups)"
        )


def check_index_qk(qi, ki, total_q: int | None = None, hkv: int | None = None) -> None:
    check_tensor("qi", qi, 3, "[total_q, num_heads_kv, index_head_dim]")
    check_tensor("ki", ki, 3, "[total_k, 1, index_head_dim]")
    check_float("qi", qi)
    check_same("dtype", [("qi", qi), ("ki", ki)], "dtype")
    check_same("device", [("qi", qi), ("ki", ki)], "device")
    if ki.shape[1] != 1:
        raise ValueError(f"ki must have exactly one (shared) index head, got {ki.shape[1]}")
    if qi.shape[2] != ki.shape[2]:
        raise ValueError(
            f"ki must have the index_head_dim of qi ({qi.shape[2]}), got {ki.shape[2]}"
        )
    if qi.shape[1] < 1:
        raise ValueError("qi must have at least one index head (one per KV group)")
    if total_q is not None and qi.shape[0] != total_q:
        raise ValueError(f"qi must have total_q = {total_q} rows like q, got {qi.shape[0]}")
    if hkv is not None and qi.shape[1] != hkv:
        raise ValueError(
            f"qi must have one index head per KV head ({hkv}), got {qi.shape[1]}"
        )


def check_topk_indices(topk_indices, hkv: int, total_q: int, device) -> int:
    name = "topk_indices"
    check_tensor(name, topk_indices, 3, "[num_heads_kv, total_q, topk] int32")
    if topk_indices.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {topk_indices.dtype}")
    if topk_indices.shape[0] != hkv or topk_indices.shape[1] != total_q:
        raise ValueError(
            f"{name} must have shape [num_heads_kv={hkv}, total_q={total_q}, topk], "
            f"got {tuple(topk_indices.shape)}"
        )
    if topk_indices.shape[2] < 1:
        raise ValueError(f"{name} must have topk >= 1 columns, got {topk_indices.shape[2]}")
    if topk_indices.device != device:
        raise ValueError(f"{name} must be on {device} like the inputs, got {topk_indices.device}")
    return topk_indices.shape[2]


def check_lse(name: str, lse, shape: tuple, device) -> None:
    if lse is None:
        return
    layout = "[total_q, num_heads_q]" if name == "lse" else "[num_heads_kv, total_q]"
    check_tensor(name, lse, 2, f"{layout} float32")
    if lse.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {lse.dtype}")
    if tuple(lse.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} {layout}, got {tuple(lse.shape)}")
    if lse.device != device:
        raise ValueError(f"{name} must be on {device} like the inputs, got {lse.device}")


def check_fragments(cu_seqlens_q, kv_start, kv_len, total_q: int, total_k: int,
                    device: torch.device, read_values: bool) -> Varlen:
    """The fragment form of docs/spec.md section 3: query sequence b has the query rows
    [cu_seqlens_q[b], cu_seqlens_q[b + 1]) and the key rows [kv_start[b], kv_start[b] +
    kv_len[b]) of the packed keys, its queries the last Lq positions of that range. Two
    non-empty key ranges are disjoint or start at the same row (prefixes of one key
    sequence, e.g. fragments of one sequence). Values are read on the host like those of
    cu_seqlens (check_varlen), else sanitised on the device."""
    if kv_start is None or kv_len is None:
        raise ValueError("kv_start and kv_len must be given together (the fragment form)")
    check_tensor("cu_seqlens_q", cu_seqlens_q, 1, "[num_seqs + 1] int32")
    if cu_seqlens_q.dtype != torch.int32:
        raise TypeError(f"cu_seqlens_q must be int32, got {cu_seqlens_q.dtype}")
    if cu_seqlens_q.numel() < 1:
        raise ValueError("cu_seqlens_q must have at least one entry (the leading 0)")
    if cu_seqlens_q.device != device:
        raise ValueError(f"cu_seqlens_q must be on {device} like the inputs, got {cu_seqlens_q.device}")
    nseq = cu_seqlens_q.numel() - 1
    for name, t in (("kv_start", kv_start), ("kv_len", kv_len)):
        check_tensor(name, t, 1, "[num_seqs] int32 (one key range per query sequence)")
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.numel() != nseq:
            raise ValueError(f"{name} must have num_seqs = {nseq} entries (cu_seqlens_q has "
                             f"{nseq + 1}), got {t.numel()}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device} like the inputs, got {t.device}")
    if nseq == 0 and total_q:
        raise ValueError(f"cu_seqlens_q describes no sequence, but there are {total_q} query rows")
    if total_q > total_k:  # a host fact: the fallback layout below needs it
        raise ValueError(f"kv_start/kv_len: total_q = {total_q} query rows but only total_k = "
                         f"{total_k} key rows; the fragment form needs total_q <= total_k")
    varlen = Varlen(cu_seqlens_q, None, total_q, total_k, kv_start=kv_start, kv_len=kv_len)

    def repair():
        cu_q, starts, lens = _sanitized_fragments(cu_seqlens_q, kv_start, kv_len, total_q, total_k)
        return Varlen(cu_q, None, total_q, total_k, kv_start=starts, kv_len=lens)
    return _checked_or_repaired(varlen, read_values, _check_fragment_values, repair)


def _check_fragment_values(varlen: Varlen) -> Varlen:
    varlen = varlen.host()
    cu_q, (starts, lens) = varlen.cu_q, varlen.kv_ranges
    _check_cu_values("cu_seqlens_q", cu_q, varlen.total_q, "total_q (q.shape[0])")
    for b, (s, n) in enumerate(zip(starts, lens)):
        lq = cu_q[b + 1] - cu_q[b]
        if s < 0 or n < 0 or s + n > varlen.total_k:
            raise ValueError(f"kv_start/kv_len: sequence {b} has the key range [{s}, {s + n}), "
                             f"which must lie in [0, total_k = {varlen.total_k})")
        if lq > n:
            raise ValueError(f"kv_len: sequence {b} has Lq = {lq} > kv_len = {n}; queries must "
                             f"be the last Lq positions of their key range (Lq <= kv_len)")
    ends = {}  # start -> end of the longest non-empty range starting there
    for s, n in zip(starts, lens):
        if n > 0:
            ends[s] = max(ends.get(s, s), s + n)
    prev = None
    for s in sorted(ends):
        if prev is not None and s < ends[prev]:
            raise ValueError(f"kv_start/kv_len: the key ranges [{prev}, {ends[prev]}) and "
                             f"[{s}, ...) overlap without starting at the same row; ranges must "
                             f"be disjoint or prefixes of one key sequence (the same kv_start)")
        prev = s
    return varlen


def _sanitized_fragments(cu_q, kv_start, kv_len, total_q: int, total_k: int):
    """Device-side (cu_q, kv_start, kv_len) that are a valid fragment layout: the
    tensors' own values when they are valid, else one sequence holding every query row
    over all keys (valid since total_q <= total_k). Torch ops only, like _sanitized_cu."""
    lq = cu_q.diff()
    s, n = kv_start.long(), kv_len.long()
    ok = ((cu_q[0] == 0) & (cu_q[-1] == total_q) & (lq >= 0).all() & (s >= 0).all()
          & (n >= lq).all() & (n >= 0).all() & (s + n <= total_k).all())
    # A non-empty range must start at or after the end of every range with a smaller start.
    ss, order = torch.sort(s, stable=True)
    ns = n[order]
    es = torch.where(ns > 0, ss + ns, ss)
    idx = torch.arange(ss.numel(), device=ss.device)
    new = torch.cat([idx[:1] == 0, ss[1:] != ss[:-1]])
    first = torch.cummax(torch.where(new, idx, 0), 0).values if ss.numel() else idx
    prev_end = torch.cummax(es, 0).values if ss.numel() else es
    prev_end = torch.where(first > 0, prev_end[(first - 1).clamp_min(0)], ss)
    ok = ok & ((ns == 0) | (ss >= prev_end)).all()
    ends = torch.arange(cu_q.numel(), device=cu_q.device, dtype=cu_q.dtype).clamp_max(1)
    first_only = 1 - ends[:-1] if kv_len.numel() else kv_len
    return (torch.where(ok, cu_q, ends * total_q),
            torch.where(ok, kv_start, torch.zeros_like(kv_start)),
            torch.where(ok, kv_len, first_only.to(kv_len.dtype) * total_k))
