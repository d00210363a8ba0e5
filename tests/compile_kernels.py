"""Compile every Triton kernel the ops launch for a Hopper GPU (sm_90), on a machine without
one: ``python tests/compile_kernels.py [--arch 90] [--ptxas]`` prints one line per distinct
kernel specialisation and ends with ``compiled N kernels: name, ...`` (exit 1 on a failure);
``--ptxas`` adds each binary's registers and stack bytes per thread (cuobjdump: the
register pressure of a launch setting, read without a GPU).

Triton's interpreter runs any Python inside a kernel body: a module global that is not a
``tl.constexpr``, a call it happens to support on numpy arrays. The GPU compiler rejects
those; the interpreter tests cannot see it. Here the kernels are imported compiled
(TRITON_INTERPRET=0), every launch is replaced by a compilation for the target (no GPU
needed: the NVIDIA backend and ptxas ship with Triton) and the ops run their host code on
CPU tensors, so each launch is compiled with the arguments, dtypes and launch settings of
the real call. Nothing executes on a device: results are garbage and are not looked at.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_DTYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
    torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
    torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5",
}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class Compiler:
    def __init__(self, arch: int, ptxas: bool = False):
        self.target = GPUTarget("cuda", arch, 32)
        self.ptxas = ptxas
        self.done: dict = {}  # key -> seconds
        self.names: set = set()

    def signature(self, fn: JITFunction, args, kwargs):
        kwargs = dict(kwargs)
        options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        values = dict(zip(fn.arg_names, args))
        for p in fn.params:
            if p.name not in values:
                values[p.name] = kwargs[p.name] if p.name in kwargs else p.default
        sig, constexprs = {}, {}
        for p in fn.params:
            v = values[p.name]
            if p.is_constexpr or v is None:
                sig[p.name] = "constexpr"
                constexprs[p.name] = v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + _DTYPES[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
        return sig, constexprs, options

    def compile(self, fn: JITFunction, args, kwargs):
        sig, constexprs, options = self.signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sig.items()), tuple(sorted(constexprs.items(), key=str)),
               tuple(sorted(options.items())))
        if key in self.done:
            return
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                  target=self.target, options=options)
        self.done[key] = time.perf_counter() - start
        self.names.add(fn.__name__)
        consts = ", ".join(f"{k}={v}" for k, v in constexprs.items() if v is not None)
        regs = f"  [{self.registers(compiled.asm['cubin'])}]" if self.ptxas else ""
        print(f"  {fn.__name__:34s} {self.done[key]:5.1f} s  {consts} {options}{regs}", flush=True)

    def registers(self, cubin: bytes) -> str:
        """The kernel binary's registers and stack bytes per thread (cuobjdump -res-usage;
        a stack means spills or arrays in local memory)."""
        import subprocess
        import tempfile

        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
        return f"{regs.group(1) if regs else '?'} registers, {stack.group(1) if stack else '?'} B stack"


def run_ops(compiler: Compiler) -> None:
    """The ops, each with the shapes and options that select different specialisations."""
    import openmsa
    from openmsa import _backend
    from openmsa.serving import MSADecodeWrapper, MSAPrefillWrapper, append_paged_kv, quantize_fp8_per_token

    def load(path, device):  # the kernels compiled (not interpreted) for CPU tensors
        module, name = path.split(":")
        import importlib
        return getattr(importlib.import_module(module), name)

    from openmsa import library
    from openmsa.ops.utils.configs import override

    _backend._load = library._load = load
    library._upcast_bf16 = lambda x: x  # bfloat16 reaches the kernels, as on a GPU

    gen = torch.Generator().manual_seed(0)
    realistic, small = (64, 4, 128, 128, 16, [700, 1500]), (8, 2, 64, 64, 4, [90, 300])
    # bfloat16 is what runs on GPUs; float32 takes the exact ("ieee") dots
    for dtype, (hq, hkv, d, bs, topk, lens), modes in (
            (torch.bfloat16, realistic, (False, True)), (torch.bfloat16, small, (False,)),
            (torch.float32, small, (False,))):
        def rnd(*s):
            return torch.randn(*s, generator=gen).to(dtype).requires_grad_()
        total = sum(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        q, k, v = rnd(total, hq, d), rnd(total, hkv, d), rnd(total, hkv, d)
        qi, ki = rnd(total, hkv, d), rnd(total, 1, d)
        for det in modes:
            out, kl, _ = openmsa.msa_attention(q, k, v, qi, ki, cu, cu, block_size=bs, topk=topk,
                                               deterministic=det, backend="triton")
            (out.float().sum() + kl).backward()
        # forced blocks; the fragment form (two query fragments of the first sequence)
        openmsa.indexer_topk(qi, ki, cu, cu, block_size=bs, topk=topk, init_blocks=1, local_blocks=2,
                             backend="triton")
        # FP8 ranking; and both rankings as long contexts launch them (the LSE after the
        # Top-k, two programs per SM)
        openmsa.indexer_topk(qi, ki, cu, cu, block_size=bs, topk=topk, index_dtype=torch.float8_e4m3fn,
                             backend="triton")
        with override("indexer", lse_mode="kv_outer"):
            for index_dtype in (None, torch.float8_e4m3fn):
                openmsa.indexer_topk(qi, ki, cu, cu, block_size=bs, topk=topk, index_dtype=index_dtype,
                                     backend="triton")
        n = lens[0]
        cu_f = torch.tensor([0, n // 2, n], dtype=torch.int32)
        kv_start, kv_len = torch.tensor([0, 0], dtype=torch.int32), torch.tensor([n // 2, n], dtype=torch.int32)
        out, kl, _ = openmsa.msa_attention(q[:n], k, v, qi[:n], ki, cu_f, None, block_size=bs, topk=topk,
                                           kv_start=kv_start, kv_len=kv_len, backend="triton")
        (out.float().sum() + kl).backward()
        out, _ = openmsa.sparse_attention(q, k, v, None, cu, cu, block_size=bs, backend="triton")
        out.float().sum().backward()
        kl = openmsa.indexer_kl_loss(q, k, qi, ki, None, cu, cu, block_size=bs, backend="triton")
        kl.backward()

    # serving: append, decode (bf16 and FP8 pools and index keys), chunked prefill
    hq, hkv, d, bs, topk = 64, 4, 128, 128, 16
    kv_lens, qlens = [3000, 700], [1, 4]
    batch, max_pages = len(kv_lens), 30
    num_pages = batch * max_pages
    pt = torch.arange(num_pages, dtype=torch.int32).view(batch, max_pages)
    cu_q = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    kv = torch.tensor(kv_lens, dtype=torch.int32)
    bf = torch.bfloat16
    kc, vc = torch.randn(num_pages, bs, hkv, d).to(bf), torch.randn(num_pages, bs, hkv, d).to(bf)
    kic = torch.randn(num_pages, bs, d).to(bf)
    q, qi = torch.randn(sum(qlens), hq, d).to(bf), torch.randn(sum(qlens), hkv, d).to(bf)
    slots = torch.arange(sum(qlens), dtype=torch.int64)
    append_paged_kv(q[:, :hkv], q[:, :hkv], qi[:, :1], kc, vc, kic, slots, backend="triton")
    w = MSADecodeWrapper(hq, hkv, d, d, block_size=bs, topk=topk)
    w.plan(cu_q, kv, pt)
    w.run(q, qi, kc, vc, kic)
    ki8, ksc = quantize_fp8_per_token(kic)
    k8, v8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    qi8, _ = quantize_fp8_per_token(qi)
    w.run(q, qi, k8, v8, ki8, ki_scale=ksc, k_scale=0.5, v_scale=0.5)
    w.run(q, qi8, k8, v8, ki8, ki_scale=ksc, k_scale=0.5, v_scale=0.5)
    # more index splits than one merge group, several attention splits: the two-level merges
    w.plan(cu_q, kv, pt, index_splits=max_pages, attention_splits=4)
    w.run(q, qi, kc, vc, kic)
    w = MSADecodeWrapper(hq, hkv, d, d, block_size=bs, topk=topk, init_blocks=1, local_blocks=2)
    w.plan(cu_q, kv, pt)
    w.run(q, qi, kc, vc, kic)
    p = MSAPrefillWrapper(hq, hkv, d, d, block_size=bs, topk=topk)
    p.plan(cu_q, kv, pt, dtype=bf)
    p.run(q, qi, kc, vc, kic)


def launched_kernels() -> set:
    """Names of openmsa's kernels: its JITFunctions that no other JITFunction calls (the
    rest are device functions, compiled inside the kernels that call them)."""
    fns = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("openmsa") and module is not None:
            for value in vars(module).values():
                if isinstance(value, JITFunction) and value.fn.__module__.startswith("openmsa"):
                    fns[value.__name__] = value
    called = {n for f in fns.values() for n in fns
              if n != f.__name__ and re.search(rf"\b{n}\b", f.src)}
    return set(fns) - called


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper)")
    parser.add_argument("--ptxas", action="store_true",
                        help="report each binary's registers and stack (cuobjdump -res-usage)")
    args = parser.parse_args()
    compiler = Compiler(args.arch, args.ptxas)

    def run(self, *a, grid, warmup, **kw):
        compiler.compile(self, a, kw)

    JITFunction.run = run
    start = time.perf_counter()
    run_ops(compiler)
    print(f"compiled {len(compiler.done)} kernels for sm_{args.arch} in "
          f"{time.perf_counter() - start:.0f} s: {', '.join(sorted(compiler.names))}")
    missed = launched_kernels() - compiler.names
    if missed:
        print(f"never launched here, so not compiled: {', '.join(sorted(missed))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
