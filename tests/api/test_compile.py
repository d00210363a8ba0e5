"""torch.compile over openmsa: the public functions and the MSAttention layer trace into one
graph (zero graph breaks: the ops are the custom ops of openmsa.library, whose reference
reads cu_seqlens inside the op, and the value checks are skipped while tracing) and the
compiled forward and backward give the eager results.

On CPU with backend "aot_eager" (AOT autograd, eager kernels: what Inductor gets, without
its slow C++ codegen) and the reference ops; one case runs the Triton kernels under the
interpreter. The ``gpu`` tests run Inductor with the Triton kernels, and the compiled
functions inside a CUDA graph."""

import copy

import pytest
import torch
import torch._dynamo

import openmsa
from helpers import rel

HQ, HKV, D, DI, BS, TOPK = 4, 2, 16, 16, 16, 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_no_graph_break(fn, *args):
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def inputs(layout, device="cpu", dtype=torch.float32):
    """(q, k, v, qi, ki, cu_seqlens) in the packed (two sequences, 21 and 34 tokens: partial
    blocks) or batched ([2, 24, ...]) layout; leaves that require grad."""
    shape = (55,) if layout == "packed" else (2, 24)
    cu = torch.tensor([0, 21, 55], dtype=torch.int32, device=device) if layout == "packed" else None
    make = lambda *s: torch.randn(*shape, *s, device=device, dtype=dtype).requires_grad_()
    return make(HQ, D), make(HKV, D), make(HKV, D), make(HKV, DI), make(1, DI), cu


def run_msa(fn, q, k, v, qi, ki, cu, backend):
    """Forward and backward of msa_attention through ``fn``: (out, kl, idx, grads)."""
    for x in (q, k, v, qi, ki):
        x.grad = None
    out, kl, idx = fn(q, k, v, qi, ki, cu, backend)
    (out.float().square().sum() + 3 * kl).backward()
    return out, kl, idx, [x.grad.clone() for x in (q, k, v, qi, ki)]


def msa(q, k, v, qi, ki, cu, backend):
    return openmsa.msa_attention(q, k, v, qi, ki, cu, cu, block_size=BS, topk=TOPK, backend=backend)


def assert_same(got, want, tol=1e-6):
    out, kl, idx, grads = got
    ref_out, ref_kl, ref_idx, ref_grads = want
    assert torch.equal(idx, ref_idx)
    assert rel(out, ref_out) <= tol and rel(kl, ref_kl) <= tol
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and rel(g, r) <= tol


@pytest.mark.parametrize("layout", ["packed", "batched"])
def test_msa_attention_compiles_without_graph_break(layout):
    args = inputs(layout)
    assert_no_graph_break(msa, *args, "reference")
    compiled = torch.compile(msa, backend="aot_eager", fullgraph=True)
    assert_same(run_msa(compiled, *args, "reference"), run_msa(msa, *args, "reference"))


def test_dense_forms_compile_without_graph_break():
    """sparse_attention and indexer_kl_loss with topk_indices=None (the dense warmup)."""
    q, k, v, qi, ki, cu = inputs("packed")

    def dense(q, k, v, qi, ki, cu):
        out, lse = openmsa.sparse_attention(q, k, v, None, cu, cu, block_size=BS, backend="reference")
        kl = openmsa.indexer_kl_loss(q.detach(), k.detach(), qi, ki, None, cu, cu, block_size=BS,
                                     lse=lse, backend="reference")
        return out, lse, kl

    assert_no_graph_break(dense, q, k, v, qi, ki, cu)
    compiled = torch.compile(dense, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, dense):
        for x in (q, k, v, qi, ki):
            x.grad = None
        out, lse, kl = fn(q, k, v, qi, ki, cu)
        assert not lse.requires_grad
        (out.square().sum() + kl).backward()
        results.append((out, lse, kl, [x.grad.clone() for x in (q, k, v, qi, ki)]))
    (out, lse, kl, grads), (ref_out, ref_lse, ref_kl, ref_grads) = results
    assert rel(out, ref_out) <= 1e-6 and rel(lse, ref_lse) <= 1e-6 and rel(kl, ref_kl) <= 1e-6
    assert all(rel(g, r) <= 1e-6 for g, r in zip(grads, ref_grads))


def test_triton_interpreter_under_compile():
    """The kernels' ops (here under Triton's interpreter) are opaque nodes too."""
    q, k, v, qi, ki, cu = inputs("packed")
    idx, _ = openmsa.indexer_topk(qi.detach(), ki.detach(), cu, cu, block_size=BS, topk=TOPK,
                                  backend="reference")

    def attend(q, k, v, idx, cu):
        out, lse = openmsa.sparse_attention(q, k, v, idx, cu, cu, block_size=BS, backend="triton")
        return out, lse

    assert_no_graph_break(attend, q, k, v, idx, cu)
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, attend):
        for x in (q, k, v):
            x.grad = None
        out, lse = fn(q, k, v, idx, cu)
        out.square().sum().backward()
        results.append((out, lse, [x.grad.clone() for x in (q, k, v)]))
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = results
    assert rel(out, ref_out) <= 1e-6 and rel(lse, ref_lse) <= 1e-6
    assert all(rel(g, r) <= 1e-6 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("layout,mode", [("batched", "sparse"), ("packed", "sparse"),
                                         ("packed", "dense")])
def test_msattention_layer_compiles_without_graph_break(layout, mode):
    """An MSAttention forward + backward (the language-model loss plus the KL) compiled in
    one graph gives the eager layer's output, KL and parameter gradients."""
    torch.manual_seed(1)
    layer = openmsa.MSAttention(32, HQ, HKV, D, index_head_dim=DI, block_size=BS, topk=TOPK,
                                qk_norm=True, mode=mode, backend="reference")
    eager = copy.deepcopy(layer)
    x = torch.randn(2, 24, 32) if layout == "batched" else torch.randn(55, 32)
    cu = None if layout == "batched" else torch.tensor([0, 21, 55], dtype=torch.int32)
    extra = () if cu is None else (cu,)
    assert_no_graph_break(lambda x, *c: layer(x, *c), x, *extra)

    def step(module, x):
        y = module(x, *extra)
        (y.square().mean() + 0.5 * module.kl_loss).backward()
        return y, module.kl_loss

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y, kl = step(compiled, x)
    ref_y, ref_kl = step(eager, x)
    assert rel(y, ref_y) <= 1e-6 and rel(kl, ref_kl) <= 1e-6
    for (name, p), r in zip(layer.named_parameters(), eager.parameters()):
        assert rel(p.grad, r.grad) <= 1e-6, name


def test_invalid_cu_seqlens_raise_under_compile():
    """Value checks are skipped while tracing; the reference op checks them when it runs."""
    q, k, v, qi, ki, _ = inputs("packed")
    bad = torch.tensor([0, 40, 55], dtype=torch.int32)
    bad_k = torch.tensor([0, 30, 55], dtype=torch.int32)  # sequence 0: Lq 40 > Lk 30

    def attend(q, k, v, cu_q, cu_k):
        return openmsa.sparse_attention(q, k, v, None, cu_q, cu_k, block_size=BS, backend="reference")

    with pytest.raises(ValueError, match="cu_seqlens"):
        torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v, bad, bad_k)


# ------------------------------------------------------------------------------- GPU

def _gpu_inputs(layout):
    torch.manual_seed(2)
    shape = (1500,) if layout == "packed" else (2, 1024)
    cu = (torch.tensor([0, 700, 1500], dtype=torch.int32, device="cuda")
          if layout == "packed" else None)
    make = lambda *s: torch.randn(*shape, *s, device="cuda", dtype=torch.bfloat16).requires_grad_()
    return make(8, 64), make(2, 64), make(2, 64), make(2, 64), make(1, 64), cu


def _gpu_msa(q, k, v, qi, ki, cu, backend):
    # deterministic: no float atomics, so that compiled and eager gradients compare closely
    return openmsa.msa_attention(q, k, v, qi, ki, cu, cu, block_size=64, topk=8,
                                 deterministic=True, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["packed", "batched"])
def test_gpu_inductor_with_triton_kernels(layout):
    """Inductor around the Triton kernels' ops: no graph break, the eager results (the same
    kernels run; Inductor only fuses the torch ops around them)."""
    args = _gpu_inputs(layout)
    assert_no_graph_break(_gpu_msa, *args, "triton")
    compiled = torch.compile(_gpu_msa, fullgraph=True)
    assert_same(run_msa(compiled, *args, "triton"), run_msa(_gpu_msa, *args, "triton"), tol=2e-3)


@pytest.mark.gpu
def test_gpu_inductor_msattention_layer():
    torch.manual_seed(3)
    # topk = every block of the 1024 tokens: bf16 Inductor fuses RMSNorm / RoPE and rounds
    # otherwise than eager, which could flip a near-tied selection; with every block kept
    # the two differ by rounding only (the selection under compile: the op tests above)
    layer = openmsa.MSAttention(512, 8, 2, 64, index_head_dim=64, block_size=64, topk=16,
                                qk_norm=True).cuda().to(torch.bfloat16)
    eager = copy.deepcopy(layer)
    x = torch.randn(2, 1024, 512, device="cuda", dtype=torch.bfloat16)
    assert_no_graph_break(layer, x)

    def step(module):
        y = module(x)
        (y.float().square().mean() + 0.5 * module.kl_loss).backward()
        return y, module.kl_loss

    compiled = torch.compile(layer, fullgraph=True)
    y, kl = step(compiled)
    ref_y, ref_kl = step(eager)
    # bf16 projections: Inductor's fused RMSNorm / RoPE round differently from eager
    assert rel(y, ref_y) <= 2e-2 and rel(kl, ref_kl) <= 2e-2
    for (name, p), r in zip(layer.named_parameters(), eager.parameters()):
        assert rel(p.grad, r.grad) <= 5e-2, name


@pytest.mark.gpu
def test_gpu_compiled_ops_in_a_cuda_graph():
    """The compiled function (Inductor, Triton kernels) captured in a CUDA graph by hand and
    by mode="reduce-overhead" (CUDA-graph trees): the replays give the eager results."""
    q, k, v, qi, ki, cu = _gpu_inputs("packed")
    q, k, v, qi, ki = (x.detach() for x in (q, k, v, qi, ki))
    want = _gpu_msa(q, k, v, qi, ki, cu, "triton")
    compiled = torch.compile(_gpu_msa, fullgraph=True)
    with openmsa.value_checks(False):
        compiled(q, k, v, qi, ki, cu, "triton")  # compile and warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = compiled(q, k, v, qi, ki, cu, "triton")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[2], want[2])
    assert rel(got[0], want[0]) <= 2e-3 and rel(got[1], want[1]) <= 2e-3
    overhead = torch.compile(_gpu_msa, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # record, then replay
        got = overhead(q, k, v, qi, ki, cu, "triton")
    torch.cuda.synchronize()
    assert torch.equal(got[2], want[2])
    assert rel(got[0], want[0]) <= 2e-3 and rel(got[1], want[1]) <= 2e-3
