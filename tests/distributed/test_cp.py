"""Context-parallel MSA (openmsa.distributed.msa_attention_cp, MSAttention with a
process_group) against the single-process run on the same global inputs.

world_size processes (cp_worker.py) over gloo each take their zigzag shard; the test
compares: out, topk_indices and every gradient unsharded, the KL parts summed, on the
reference backend and the Triton interpreter (float32), on varlen packs of short and uneven
sequences; and a two-layer model whose parameter gradients, summed over the ranks, equal
the single-process ones. Index inputs are dyadic (every dot exact in float32; E4M3-exact for
the FP8-ranking case), so the selections are equal exactly; the layer model selects every
block (K = number of blocks).
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

import cp_cases
from helpers import rel
from openmsa.distributed import unshard

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(world_size, jobs, out_dir, device="cpu"):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE),
                                                      os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return [subprocess.Popen([sys.executable, os.path.join(HERE, "cp_worker.py"), str(world_size),
                              str(r), str(port), str(out_dir), device, ",".join(jobs)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for r in range(world_size)]


def wait_ranks(procs, timeout=600):
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        logs.append(out.decode(errors="replace"))
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"


def load(out_dir, job, world_size):
    return [torch.load(os.path.join(out_dir, f"{job.replace(':', '-')}.rank{r}.pt"))
            for r in range(world_size)]


def check_op(parts, want, cu):
    unsh = lambda n: unshard([p[n] for p in parts], cu)  # noqa: E731
    assert rel(unsh("out"), want["out"]) <= TOL
    idx = unshard([p["idx"].transpose(0, 1) for p in parts], cu).transpose(0, 1)
    assert torch.equal(idx, want["idx"])
    assert rel(sum(p["kl"] for p in parts), want["kl"]) <= TOL
    for n in ("dq", "dk", "dv", "dqi", "dki"):
        assert rel(unsh(n), want[n]) <= TOL, n


def check_layer(parts, want, cu):
    assert rel(unshard([p["y"] for p in parts], cu), want["y"]) <= TOL
    assert rel(sum(p["kl"] for p in parts), want["kl"]) <= TOL
    for n in want:
        if n.startswith("grad."):
            assert rel(sum(p[n] for p in parts), want[n]) <= TOL, n


@pytest.mark.parametrize("world_size", [2, 3])
def test_context_parallel_equals_single_process(world_size, tmp_path):
    jobs = ["op:ref", "op:triton", "op:fp8", "layer:sparse", "layer:dense"]
    procs = start_ranks(world_size, jobs, tmp_path)
    try:  # the single-process runs, while the ranks work
        want = {f"op:{c}": cp_cases.run_single(c, "cpu") for c in ("ref", "triton", "fp8")}
        want.update({f"layer:{m}": cp_cases.run_layer(m) for m in ("sparse", "dense")})
    finally:
        wait_ranks(procs)
    for job in jobs:
        parts = load(tmp_path, job, world_size)
        if job.startswith("op:"):
            check_op(parts, want[job], cp_cases.global_inputs(job[3:], "cpu")[1])
        else:
            check_layer(parts, want[job], cp_cases.layer_inputs()[2])


@pytest.mark.gpu
def test_gpu_context_parallel_equals_single_process(tmp_path):
    """Two ranks on one GPU (gloo, through host memory), the compiled Triton kernels,
    float32, B = 128, K = 16, head dims 128, a varlen pack up to 4200 tokens."""
    procs = start_ranks(2, ["op:gpu"], tmp_path, device="cuda")
    try:
        want = cp_cases.run_single("gpu", "cuda")
    finally:
        wait_ranks(procs)
    want = {n: v.cpu() for n, v in want.items()}
    check_op(load(tmp_path, "op:gpu", 2), want, cp_cases.global_inputs("gpu", "cpu")[1])


def test_clear_errors_without_ranks():
    import openmsa
    from openmsa.distributed import msa_attention_cp

    layer = openmsa.MSAttention(32, 4, 2, index_head_dim=8, block_size=16, topk=2,
                                process_group=object())
    with pytest.raises(ValueError, match="packed shard"):
        layer(torch.randn(1, 10, 32))  # batched x
    with pytest.raises(ValueError, match="packed shard"):
        layer(torch.randn(10, 32))  # no cu_seqlens
    x = torch.randn(10, 2, 8)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="initialised torch.distributed"):
            msa_attention_cp(x, x, x, x, x[:, :1], torch.tensor([0, 10], dtype=torch.int32))
