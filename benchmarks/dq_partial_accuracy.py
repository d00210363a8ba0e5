"""dQ accuracy of the Triton backward with float32 vs bfloat16 dQ partials (bf16 inputs),
against the PyTorch reference (float32 math), on a GPU.  python benchmarks/dq_partial_accuracy.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import openmsa  # noqa: E402
from openmsa.bench.cost_model import MSAConfig  # noqa: E402
from openmsa.bench.gpu import random_topk  # noqa: E402
from openmsa.ops.attention import launch  # noqa: E402

n, dev = 8192, "cuda"
gen = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(n, h, 128, device=dev, generator=gen).bfloat16() for h in (64, 4, 4))
idx = random_topk(n, MSAConfig(), gen, dev)
cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
do = torch.randn(n, 64, 128, device=dev, generator=gen).bfloat16()


def grads(backend):
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out, _ = openmsa.sparse_attention(qq, kk, vv, idx, cu, cu, backend=backend)
    out.backward(do)
    return qq.grad.float(), kk.grad.float(), vv.grad.float()


ref = grads("reference")
for mode, dtypes in (("fp32", {}), ("bf16", {torch.bfloat16: torch.bfloat16})):
    launch.DQ_PARTIAL_DTYPE = dtypes  # a numerics choice: a module constant, not a setting
    got = grads("triton")
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
    print(f"dQ partials {mode}: rel err dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e}")
# the floor: the reference's own gradients rounded to bf16
print("bf16 rounding of the reference dq: %.2e" % ((ref[0].bfloat16().float() - ref[0]).norm() / ref[0].norm()).item())
