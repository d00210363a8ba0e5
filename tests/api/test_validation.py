"""Argument validation of the four public functions (docs/spec.md section 10).

Every bad input must raise ValueError (or TypeError) whose message names the offending
argument, before any work is done and without modifying any input. Each case below is
run against every function that takes the argument(s) it corrupts, on the packed varlen
layout of docs/spec.md section 3 (the batched form has its own checks in test_batched.py).

"Nothing is computed" is checked two ways: the reference implementations called by
openmsa.api are wrapped by spies that must stay silent, and with backend="triton"
(whose kernels are not registered) a bad input must still give ValueError/TypeError,
i.e. validation runs before the backend is even chosen.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import openmsa
from openmsa import library

# Tiny, valid packed problem: 2 sequences, Lq = (4, 8), Lk = (6, 10).
HQ, HKV, D, DI = 4, 2, 8, 8
CU_Q, CU_K = [0, 4, 12], [0, 6, 16]
TQ, TK = CU_Q[-1], CU_K[-1]
BS, TOPK = 4, 2

FNS = {
    "indexer_topk": openmsa.indexer_topk,
    "sparse_attention": openmsa.sparse_attention,
    "indexer_kl_loss": openmsa.indexer_kl_loss,
    "msa_attention": openmsa.msa_attention,
}
PARAMS = {name: set(inspect.signature(fn).parameters) for name, fn in FNS.items()}

# Tensor arguments each function gets by default (optional ones like lse are left out
# and only injected by the cases that corrupt them).
BASE_TENSORS = {
    "indexer_topk": ("qi", "ki", "cu_seqlens_q", "cu_seqlens_k"),
    "sparse_attention": ("q", "k", "v", "topk_indices", "cu_seqlens_q", "cu_seqlens_k"),
    "indexer_kl_loss": ("q", "k", "qi", "ki", "topk_indices", "cu_seqlens_q", "cu_seqlens_k"),
    "msa_attention": ("q", "k", "v", "qi", "ki", "cu_seqlens_q", "cu_seqlens_k"),
}
# The ops (keys of openmsa.library.TRITON_KERNELS) each function dispatches to.
TRITON_OP_NAMES = {
    "indexer_topk": ("indexer_topk",),
    "sparse_attention": ("sparse_attention",),
    "indexer_kl_loss": ("indexer_kl_loss",),
    "msa_attention": ("indexer_topk", "sparse_attention", "indexer_kl_loss"),
}


def good_inputs() -> dict:
    return dict(
        q=torch.randn(TQ, HQ, D),
        k=torch.randn(TK, HKV, D),
        v=torch.randn(TK, HKV, D),
        qi=torch.randn(TQ, HKV, DI),
        ki=torch.randn(TK, 1, DI),
        # Block 0 is a valid (visible) block for every query.
        topk_indices=torch.zeros(HKV, TQ, TOPK, dtype=torch.int32),
        lse=torch.zeros(TQ, HQ),
        index_lse=torch.zeros(HKV, TQ),
        cu_seqlens_q=torch.tensor(CU_Q, dtype=torch.int32),
        cu_seqlens_k=torch.tensor(CU_K, dtype=torch.int32),
    )


def call_args(fn_name: str, g: dict, overrides: dict) -> dict:
    args = {n: g[n] for n in BASE_TENSORS[fn_name]}
    args["block_size"] = BS
    if "topk" in PARAMS[fn_name]:
        args["topk"] = TOPK
    args.update(overrides)
    return args


def named(name: str) -> str:
    """Regex: ``name`` as a whole identifier (so that "q" does not match "qi" or
    "cu_seqlens_q")."""
    return rf"(?<!\w){re.escape(name)}(?!\w)"


def check_says(case, info) -> None:
    if case.says is not None:
        assert re.search(case.says, str(info.value)), (case.says, str(info.value))


def snapshot(args: dict) -> dict:
    return {n: (t.clone(), t._version) for n, t in args.items()
            if isinstance(t, torch.Tensor) and t.device.type != "meta"}


def assert_unchanged(args: dict, snap: dict) -> None:
    for n, (copy, version) in snap.items():
        t = args[n]
        assert t._version == version, f"{n} was modified in place"
        assert t.dtype == copy.dtype and t.shape == copy.shape
        assert torch.equal(t, copy), f"{n} was modified"


META = torch.device("meta")


@dataclass
class Case:
    id: str
    build: Callable[[dict], dict]  # good inputs -> overriding arguments
    exc: type
    name: str  # the argument the message must name
    fns: tuple | None = None  # None: every function taking all the overridden arguments
    varlen: bool = False  # detected by the cu_seqlens (varlen) checks
    xfail: dict = field(default_factory=dict)  # fn name -> reason (known openmsa bugs)
    says: str | None = None  # regex the message must also contain (which check fired)


CASES: list[Case] = []


def case(*a, **kw):
    CASES.append(Case(*a, **kw))


# --- wrong rank / not a tensor -----------------------------------------------------------
for _n in ("q", "k", "v", "qi", "ki"):
    case(f"{_n}_4d", lambda g, n=_n: {n: g[n][..., None]}, ValueError, _n)
    case(f"{_n}_2d", lambda g, n=_n: {n: g[n][:, 0]}, ValueError, _n)
    case(f"{_n}_list", lambda g, n=_n: {n: g[n].tolist()}, TypeError, _n)
    case(f"{_n}_none", lambda g, n=_n: {n: None}, TypeError, _n)

# --- head counts and head dims -----------------------------------------------------------
case("hq_not_multiple_of_hkv", lambda g: {"q": g["q"][:, :3]}, ValueError, "q")
case("hkv_does_not_divide_hq", lambda g: {"k": torch.randn(TK, 3, D), "v": torch.randn(TK, 3, D)},
     ValueError, "k", fns=("sparse_attention", "msa_attention"))
case("hkv_does_not_divide_hq", lambda g: {"k": torch.randn(TK, 3, D)}, ValueError, "k",
     fns=("indexer_kl_loss",))
case("head_dim_k_ne_q", lambda g: {"k": g["k"][..., :4], "v": g["v"][..., :4]}, ValueError, "k",
     fns=("sparse_attention", "msa_attention"))
case("head_dim_k_ne_q", lambda g: {"k": g["k"][..., :4]}, ValueError, "k", fns=("indexer_kl_loss",))
case("v_head_dim_ne_k", lambda g: {"v": g["v"][..., :4]}, ValueError, "v")
case("v_rows_ne_k", lambda g: {"v": g["v"][:-1]}, ValueError, "v")
case("v_heads_ne_k", lambda g: {"v": torch.randn(TK, 1, D)}, ValueError, "v")
case("ki_two_heads", lambda g: {"ki": g["ki"].expand(TK, 2, DI).contiguous()}, ValueError, "ki")
case("ki_head_dim_ne_qi", lambda g: {"ki": g["ki"][..., :4]}, ValueError, "ki")
case("qi_heads_lt_hkv", lambda g: {"qi": g["qi"][:, :1]}, ValueError, "qi",
     fns=("indexer_kl_loss", "msa_attention"))
case("qi_heads_gt_hkv", lambda g: {"qi": torch.randn(TQ, HKV + 1, DI)}, ValueError, "qi",
     fns=("indexer_kl_loss", "msa_attention"))
case("qi_rows_ne_q", lambda g: {"qi": g["qi"][:-1]}, ValueError, "qi",
     fns=("indexer_kl_loss", "msa_attention"))
case("ki_rows_ne_k", lambda g: {"ki": g["ki"][:-1]}, ValueError, "ki",
     fns=("indexer_kl_loss", "msa_attention"))

# --- dtypes ------------------------------------------------------------------------------
case("k_dtype_ne_q", lambda g: {"k": g["k"].double()}, TypeError, "k", fns=("indexer_kl_loss",))
case("k_dtype_ne_q", lambda g: {"k": g["k"].double(), "v": g["v"].double()}, TypeError, "k",
     fns=("sparse_attention", "msa_attention"))
case("v_dtype_ne_q", lambda g: {"v": g["v"].half()}, TypeError, "v")
case("ki_dtype_ne_qi", lambda g: {"ki": g["ki"].double()}, TypeError, "ki")
case("q_int", lambda g: {"q": g["q"].int()}, TypeError, "q")
case("q_k_v_int", lambda g: {"q": g["q"].int(), "k": g["k"].int(), "v": g["v"].int()},
     TypeError, "q")
case("qi_int", lambda g: {"qi": g["qi"].int()}, TypeError, "qi")
case("qi_ki_int64", lambda g: {"qi": g["qi"].long(), "ki": g["ki"].long()}, TypeError, "qi")

# --- devices (the meta device gives a mismatch on a CPU-only machine) ---------------------
case("k_device_ne_q", lambda g: {"k": g["k"].to(META)}, ValueError, "k", fns=("indexer_kl_loss",))
case("k_device_ne_q", lambda g: {"k": g["k"].to(META), "v": g["v"].to(META)}, ValueError, "k",
     fns=("sparse_attention", "msa_attention"))
case("v_device_ne_q", lambda g: {"v": g["v"].to(META)}, ValueError, "v")
case("ki_device_ne_qi", lambda g: {"ki": g["ki"].to(META)}, ValueError, "ki")
case("qi_device_ne_q", lambda g: {"qi": g["qi"].to(META), "ki": g["ki"].to(META)}, ValueError, "qi",
     fns=("indexer_kl_loss", "msa_attention"))
case("topk_indices_device", lambda g: {"topk_indices": g["topk_indices"].to(META)}, ValueError,
     "topk_indices")
case("lse_device", lambda g: {"lse": g["lse"].to(META)}, ValueError, "lse")
case("index_lse_device", lambda g: {"index_lse": g["index_lse"].to(META)}, ValueError, "index_lse")

# --- cu_seqlens ----------------------------------------------------------------------------
for _s, _cu in (("q", CU_Q), ("k", CU_K)):
    _n = f"cu_seqlens_{_s}"
    case(f"{_n}_int64", lambda g, n=_n: {n: g[n].long()}, TypeError, _n, varlen=True, says="int32")
    case(f"{_n}_float", lambda g, n=_n: {n: g[n].float()}, TypeError, _n, varlen=True, says="int32")
    case(f"{_n}_2d", lambda g, n=_n: {n: g[n][None]}, ValueError, _n, varlen=True, says="1-D")
    case(f"{_n}_list", lambda g, n=_n: {n: g[n].tolist()}, TypeError, _n, varlen=True,
         says="torch.Tensor")
    case(f"{_n}_empty", lambda g, n=_n: {n: torch.zeros(0, dtype=torch.int32)}, ValueError, _n,
         varlen=True, says="at least one")
    case(f"{_n}_device", lambda g, n=_n: {n: g[n].to(META)}, ValueError, _n, varlen=True,
         says="meta")
    case(f"{_n}_not_from_0", lambda g, n=_n, c=_cu: {n: torch.tensor([1] + c[1:], dtype=torch.int32)},
         ValueError, _n, varlen=True, says="start at 0")
    case(f"{_n}_decreasing", lambda g, n=_n, c=_cu: {n: torch.tensor([0, c[-1] + 1, c[-1]],
                                                                      dtype=torch.int32)},
         ValueError, _n, varlen=True, says="non-decreasing")
    case(f"{_n}_last_lt_total", lambda g, n=_n, c=_cu: {n: torch.tensor(c[:-1] + [c[-1] - 1],
                                                                        dtype=torch.int32)},
         ValueError, _n, varlen=True, says="must equal")
    case(f"{_n}_last_gt_total", lambda g, n=_n, c=_cu: {n: torch.tensor(c[:-1] + [c[-1] + 1],
                                                                        dtype=torch.int32)},
         ValueError, _n, varlen=True, says="must equal")
    _other = "cu_seqlens_k" if _s == "q" else "cu_seqlens_q"
    case(f"only_{_other}_given", lambda g, n=_n: {n: None}, ValueError, _n, says="together")
case("cu_seqlens_lengths_differ",
     lambda g: {"cu_seqlens_q": torch.tensor([0, TQ], dtype=torch.int32)}, ValueError,
     "cu_seqlens_q", varlen=True, says="same length")
case("lq_gt_lk_first_seq",  # Lq = (8, 4) vs Lk = (6, 10)
     lambda g: {"cu_seqlens_q": torch.tensor([0, 8, TQ], dtype=torch.int32)}, ValueError,
     "cu_seqlens_q", varlen=True, says="sequence 0 has Lq = 8 > Lk = 6")
case("lq_gt_lk_last_seq",  # Lq = (1, 11) vs Lk = (6, 10)
     lambda g: {"cu_seqlens_q": torch.tensor([0, 1, TQ], dtype=torch.int32)}, ValueError,
     "cu_seqlens_q", varlen=True, says="sequence 1 has Lq = 11 > Lk = 10")

# --- topk_indices ---------------------------------------------------------------------------
case("topk_indices_int64", lambda g: {"topk_indices": g["topk_indices"].long()}, TypeError,
     "topk_indices")
case("topk_indices_float", lambda g: {"topk_indices": g["topk_indices"].float()}, TypeError,
     "topk_indices")
case("topk_indices_2d", lambda g: {"topk_indices": g["topk_indices"][0]}, ValueError, "topk_indices")
case("topk_indices_4d", lambda g: {"topk_indices": g["topk_indices"][None]}, ValueError,
     "topk_indices")
case("topk_indices_heads", lambda g: {"topk_indices": torch.zeros(HKV + 1, TQ, TOPK, dtype=torch.int32)},
     ValueError, "topk_indices")
case("topk_indices_rows", lambda g: {"topk_indices": g["topk_indices"][:, :-1]}, ValueError,
     "topk_indices")
case("topk_indices_row_major", lambda g: {"topk_indices": torch.zeros(TQ, HKV, TOPK, dtype=torch.int32)},
     ValueError, "topk_indices")
case("topk_indices_zero_k", lambda g: {"topk_indices": g["topk_indices"][..., :0]}, ValueError,
     "topk_indices")
case("topk_indices_list", lambda g: {"topk_indices": g["topk_indices"].tolist()}, TypeError,
     "topk_indices")

# --- lse / index_lse --------------------------------------------------------------------------
case("lse_heads", lambda g: {"lse": g["lse"][:, :-1]}, ValueError, "lse")
case("lse_transposed", lambda g: {"lse": g["lse"].t().contiguous()}, ValueError, "lse")
case("lse_1d", lambda g: {"lse": g["lse"][:, 0]}, ValueError, "lse")
case("lse_float64", lambda g: {"lse": g["lse"].double()}, TypeError, "lse")
case("lse_bfloat16", lambda g: {"lse": g["lse"].bfloat16()}, TypeError, "lse")
case("lse_list", lambda g: {"lse": g["lse"].tolist()}, TypeError, "lse")
case("index_lse_transposed", lambda g: {"index_lse": g["index_lse"].t().contiguous()}, ValueError,
     "index_lse")
case("index_lse_rows", lambda g: {"index_lse": g["index_lse"][:, :-1]}, ValueError, "index_lse")
case("index_lse_3d", lambda g: {"index_lse": g["index_lse"][..., None]}, ValueError, "index_lse")
case("index_lse_float16", lambda g: {"index_lse": g["index_lse"].half()}, TypeError, "index_lse")

# --- scalar arguments ---------------------------------------------------------------------------
for _n in ("block_size", "topk"):
    for _i, _v in enumerate((0, -4)):
        case(f"{_n}_value{_i}", lambda g, n=_n, v=_v: {n: v}, ValueError, _n)
    for _i, _v in enumerate((4.0, True, False, "4", None)):
        case(f"{_n}_type{_i}", lambda g, n=_n, v=_v: {n: v}, TypeError, _n)

for _n in ("softmax_scale", "index_softmax_scale"):
    for _i, _v in enumerate((-1.0, 0.0, -0.0, math.nan, math.inf, -math.inf, -2)):
        case(f"{_n}_value{_i}", lambda g, n=_n, v=_v: {n: v}, ValueError, _n)
    for _i, _v in enumerate(("0.5", True, [0.5], 1j)):
        case(f"{_n}_type{_i}", lambda g, n=_n, v=_v: {n: v}, TypeError, _n)

for _i, _v in enumerate((math.inf, -math.inf, math.nan)):
    case(f"coeff_value{_i}", lambda g, v=_v: {"coeff": v}, ValueError, "coeff")
for _i, _v in enumerate(("1.0", None, True, [1.0])):
    case(f"coeff_type{_i}", lambda g, v=_v: {"coeff": v}, TypeError, "coeff")

for _i, _v in enumerate(("cuda", "Triton", "torch", "", None, 0)):
    case(f"backend{_i}", lambda g, v=_v: {"backend": v}, ValueError, "backend")

for _i, _v in enumerate((1, 0, "yes", None, 1.0)):
    case(f"deterministic{_i}", lambda g, v=_v: {"deterministic": v}, TypeError, "deterministic")


def _applies(c: Case, fn_name: str) -> bool:
    if c.fns is not None:
        return fn_name in c.fns
    keys = c.build(good_inputs()).keys()
    return all(k in PARAMS[fn_name] for k in keys)


def _params(filter_case=lambda c: True, extra_marks=lambda c, fn: ()):
    out = []
    for c in CASES:
        if not filter_case(c):
            continue
        for fn_name in FNS:
            if not _applies(c, fn_name):
                continue
            marks = list(extra_marks(c, fn_name))
            if fn_name in c.xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=c.xfail[fn_name],
                                               raises=AssertionError))
            out.append(pytest.param(fn_name, c, id=f"{fn_name}-{c.id}", marks=marks))
    return out


class RefSpy:
    """Records calls of the reference implementations that the ops of openmsa.library
    (which openmsa.api calls) dispatch to."""

    def __init__(self, monkeypatch):
        self.calls = []
        for attr in ("indexer_topk_reference", "attention_forward", "kl_forward"):
            real = getattr(library, attr)

            def spy(*a, _real=real, _attr=attr, **kw):
                self.calls.append(_attr)
                return _real(*a, **kw)

            monkeypatch.setattr(library, attr, spy)


@pytest.fixture
def ref_spy(monkeypatch):
    return RefSpy(monkeypatch)


def test_every_function_has_cases():
    """Guard against the case table silently not applying to a function."""
    for fn_name in FNS:
        assert sum(1 for c in CASES if _applies(c, fn_name)) >= 50, fn_name


@pytest.mark.parametrize("fn_name", list(FNS))
@pytest.mark.parametrize("topk_none", [False, True])
def test_good_input_runs_the_reference(fn_name, topk_none, ref_spy):
    """Positive control for the spies and the good inputs used by every case."""
    g = good_inputs()
    args = call_args(fn_name, g, {})
    if topk_none:
        if "topk_indices" not in args:
            pytest.skip("no topk_indices argument")
        args["topk_indices"] = None
    snap = snapshot(args)
    FNS[fn_name](**args)
    assert ref_spy.calls, "the reference spies saw no call"
    assert_unchanged(args, snap)


@pytest.mark.parametrize("fn_name,case", _params())
def test_bad_input_raises_naming_the_argument(fn_name, case, ref_spy):
    g = good_inputs()
    args = call_args(fn_name, g, case.build(g))
    snap = snapshot(args)
    with pytest.raises(case.exc, match=named(case.name)) as info:
        FNS[fn_name](**args)
    check_says(case, info)
    assert_unchanged(args, snap)
    assert ref_spy.calls == [], f"computation ran before the error: {ref_spy.calls}"


@pytest.mark.parametrize(
    "fn_name,case",
    _params(filter_case=lambda c: "backend" not in c.build(good_inputs())))
def test_bad_input_fails_validation_before_backend_dispatch(fn_name, case, monkeypatch, ref_spy):
    """backend='triton' without registered kernels: validation must still win over the
    NotImplementedError of the missing backend (no Triton op is registered here)."""
    monkeypatch.setattr(library, "TRITON_KERNELS", {})
    g = good_inputs()
    args = call_args(fn_name, g, case.build(g))
    args["backend"] = "triton"
    snap = snapshot(args)
    with pytest.raises(case.exc, match=named(case.name)) as info:
        FNS[fn_name](**args)
    check_says(case, info)
    assert_unchanged(args, snap)
    assert ref_spy.calls == []


@pytest.mark.parametrize("fn_name,case",
                         _params(filter_case=lambda c: "backend" not in c.build(good_inputs())))
def test_bad_input_never_reaches_a_kernel(fn_name, case, monkeypatch, ref_spy):
    """With (fake) Triton kernels registered for every op, a bad input with
    backend='triton' raises the validation error and no kernel is called."""
    kernel_calls = []

    def fake_kernel(name):
        def run(*a, **kw):
            kernel_calls.append(name)
            raise AssertionError(f"kernel {name} called on bad input")
        return run

    ops = {n: fake_kernel(n) for n in ("indexer_topk", "sparse_attention", "dense_attention",
                                       "indexer_kl_loss")}
    monkeypatch.setattr(library, "TRITON_KERNELS", ops)
    g = good_inputs()
    args = call_args(fn_name, g, case.build(g))
    args["backend"] = "triton"
    snap = snapshot(args)
    with pytest.raises(case.exc, match=named(case.name)) as info:
        FNS[fn_name](**args)
    check_says(case, info)
    assert kernel_calls == [] and ref_spy.calls == []
    assert_unchanged(args, snap)


@pytest.mark.parametrize("fn_name,dense", [
    ("indexer_topk", False), ("sparse_attention", False), ("sparse_attention", True),
    ("indexer_kl_loss", False), ("indexer_kl_loss", True), ("msa_attention", False)])
def test_triton_backend_on_cpu_not_implemented_yet(fn_name, dense, ref_spy):
    """Good input with backend='triton' while the kernels are missing: NotImplementedError
    that mentions Triton (and nothing computed). Skipped once the kernels are registered."""
    ops = TRITON_OP_NAMES[fn_name]
    if dense:
        ops = tuple("dense_attention" if o == "sparse_attention" else o for o in ops)
    if all(op in library.TRITON_KERNELS for op in ops):
        pytest.skip(f"Triton kernels registered for {ops}")
    g = good_inputs()
    args = call_args(fn_name, g, {"backend": "triton"})
    if dense:
        args["topk_indices"] = None
    snap = snapshot(args)
    with pytest.raises(NotImplementedError, match="Triton"):
        FNS[fn_name](**args)
    assert_unchanged(args, snap)
    if ops[0] not in library.TRITON_KERNELS:
        assert ref_spy.calls == []


# ------------------------------------------------------- cu_seqlens values on a device
from openmsa import _validation as V

INVALID_CU = [  # (cu_q, cu_k, total_q, total_k)
    ([1, 4, 12], [0, 6, 16], 12, 16),  # does not start at 0
    ([0, 8, 4], [0, 6, 16], 4, 16),  # decreasing
    ([0, 8, 12], [0, 6, 16], 12, 16),  # Lq > Lk in sequence 0
    ([0, 4, 10], [0, 6, 16], 12, 16),  # last entry != total_q
    ([0, 4, 12], [0, 6, 99], 12, 16),  # beyond total_k
    ([0, -5, 12], [0, -5, 16], 12, 16),  # negative
    ([0, 2**31 - 1, 12], [0, 2**31 - 1, 16], 12, 16),  # huge
]


def _is_valid(cu_q, cu_k, total_q, total_k):
    try:
        V._check_values(V.Varlen(cu_q, cu_k, total_q, total_k))
        return True
    except ValueError:
        return False


def test_sanitized_cu_keeps_valid_layouts():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        nseq = int(torch.randint(1, 6, (1,), generator=gen))
        lk = torch.randint(0, 50, (nseq,), generator=gen)
        lq = (torch.rand(nseq, generator=gen) * (lk + 1)).long().clamp(max=lk)
        cu_q = torch.cat([lq.new_zeros(1), lq.cumsum(0)]).int()
        cu_k = torch.cat([lk.new_zeros(1), lk.cumsum(0)]).int()
        sq, sk = V._sanitized_cu(cu_q, cu_k, int(cu_q[-1]), int(cu_k[-1]))
        assert torch.equal(sq, cu_q) and torch.equal(sk, cu_k)


@pytest.mark.parametrize("cu_q,cu_k,total_q,total_k", INVALID_CU)
def test_sanitized_cu_repairs_invalid_layouts(cu_q, cu_k, total_q, total_k):
    """Unchecked invalid values become a valid layout of the same totals (one sequence),
    which is what keeps every kernel in bounds."""
    cu_q, cu_k = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    assert not _is_valid(cu_q, cu_k, total_q, total_k)
    snap = (cu_q.clone(), cu_k.clone())
    sq, sk = V._sanitized_cu(cu_q, cu_k, total_q, total_k)
    assert _is_valid(sq, sk, total_q, total_k)
    assert sq.tolist() == [0] + [total_q] * (len(cu_q) - 1)
    assert torch.equal(cu_q, snap[0]) and torch.equal(cu_k, snap[1])


def test_layouts_that_are_invalid_by_their_totals_raise_without_reading_values():
    cu = torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="no sequence"):
        V.check_varlen(cu, cu, 3, 3, cu.device, read_values=False)
    cu_q, cu_k = torch.tensor([0, 9], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="Lq <= Lk"):
        V.check_varlen(cu_q, cu_k, 9, 5, cu_q.device, read_values=False)


def test_value_checks_switch():
    assert V._value_checks
    with openmsa.value_checks(False):
        assert not V._value_checks
        with openmsa.value_checks(True):
            assert V._value_checks
        assert not V._value_checks
    assert V._value_checks
    with pytest.raises(TypeError, match="enabled"):
        openmsa.set_value_checks("no")
    assert openmsa.set_value_checks(True) is True


def test_checked_mark_follows_tensor_and_version():
    cu_q = torch.tensor(CU_Q, dtype=torch.int32)
    cu_k = torch.tensor(CU_K, dtype=torch.int32)
    vl = V.Varlen(cu_q, cu_k, TQ, TK)
    assert not V._already_checked(vl)
    V._remember_checked(vl)
    assert V._already_checked(vl)
    assert not V._already_checked(V.Varlen(cu_q, cu_k.clone(), TQ, TK))  # another tensor
    assert not V._already_checked(V.Varlen(cu_q, cu_k, TQ, TK + 1))
    cu_k.add_(0)  # an in-place write bumps the version: checked again
    assert not V._already_checked(vl)


def _cuda_problem(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    tq, tk = 300, 700
    q = torch.randn(tq, 8, 64, generator=g).to("cuda", dtype)
    k, v = (torch.randn(tk, 2, 64, generator=g).to("cuda", dtype) for _ in range(2))
    qi = torch.randn(tq, 2, 64, generator=g).to("cuda", dtype)
    ki = torch.randn(tk, 1, 64, generator=g).to("cuda", dtype)
    cu_q = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 300, 700], dtype=torch.int32, device="cuda")
    return q, k, v, qi, ki, cu_q, cu_k


@pytest.mark.gpu
@pytest.mark.parametrize("cu_q,cu_k,total_q,total_k", INVALID_CU)
def test_gpu_bad_cu_seqlens_raise(cu_q, cu_k, total_q, total_k):
    q, k, v, qi, ki, _, _ = _cuda_problem()
    q, qi, k, v, ki = q[:total_q], qi[:total_q], k[:total_k], v[:total_k], ki[:total_k]
    cu_q = torch.tensor(cu_q, dtype=torch.int32, device="cuda")
    cu_k = torch.tensor(cu_k, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="cu_seqlens"):
        openmsa.msa_attention(q, k, v, qi, ki, cu_q, cu_k, block_size=64, topk=4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        openmsa.indexer_topk(qi, ki, cu_q, cu_k, block_size=64, topk=4)
    # Unchecked on request: no error, no out-of-bounds access (compute-sanitizer runs this
    # test), results of the documented fallback layout.
    with openmsa.value_checks(False):
        out, kl, idx = openmsa.msa_attention(q, k, v, qi, ki, cu_q, cu_k, block_size=64, topk=4)
        torch.cuda.synchronize()
    one = (torch.tensor([0, total_q], dtype=torch.int32, device="cuda"),
           torch.tensor([0, total_k], dtype=torch.int32, device="cuda"))
    ref_out, _, ref_idx = openmsa.msa_attention(q, k, v, qi, ki, *one, block_size=64, topk=4)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)


@pytest.mark.gpu
def test_gpu_cu_seqlens_read_once_per_tensor(monkeypatch):
    q, k, v, qi, ki, cu_q, cu_k = _cuda_problem()
    reads = []
    plain = V._check_values
    monkeypatch.setattr(V, "_check_values", lambda vl: reads.append(1) or plain(vl))
    for _ in range(3):  # one step's layers: one host read
        openmsa.msa_attention(q, k, v, qi, ki, cu_q, cu_k, block_size=64, topk=4)
    assert len(reads) == 1
    cu_k[-1] = 700  # written in place (same value): read again
    openmsa.sparse_attention(q, k, v, None, cu_q, cu_k, block_size=64)
    assert len(reads) == 2
    openmsa.sparse_attention(q, k, v, None, cu_q.clone(), cu_k, block_size=64)
    assert len(reads) == 3
    with openmsa.value_checks(False):
        openmsa.sparse_attention(q, k, v, None, cu_q.clone(), cu_k, block_size=64)
    assert len(reads) == 3


@pytest.mark.gpu
def test_gpu_no_host_read_while_capturing(monkeypatch):
    """A CUDA graph captures the ops (no sync) and replays the sanitised layout."""
    q, k, v, qi, ki, cu_q, cu_k = _cuda_problem()
    kw = dict(block_size=64, topk=4)
    expected = openmsa.msa_attention(q, k, v, qi, ki, cu_q, cu_k, **kw)
    monkeypatch.setattr(V, "_check_values", lambda vl: pytest.fail("host read while capturing"))
    cu_q2, cu_k2 = cu_q.clone(), cu_k.clone()  # never checked before
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), openmsa.value_checks(False):
        openmsa.msa_attention(q, k, v, qi, ki, cu_q2, cu_k2, **kw)  # warm up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, kl, idx = openmsa.msa_attention(q, k, v, qi, ki, cu_q2, cu_k2, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(idx.sort(-1).values, expected[2].sort(-1).values)
    assert (out.float() - expected[0].float()).norm() <= 1e-2 * expected[0].float().norm()
