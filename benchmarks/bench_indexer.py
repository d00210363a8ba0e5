# Index Branch (Triton) on one GPU: bf16, Hkv=4, Di=128, B=128, K=16.
# Useful FLOPs = 2 * Hkv * Di * (visible keys summed over queries)  (docs/spec.md section 9).
import itertools, torch, triton, openmsa
from openmsa.ops.indexer import triton_impl

HKV, DI, B, K = 4, 128, 128, 16

def inputs(lens, corr):
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    n = sum(lens)
    qi = torch.randn(n, HKV, DI, device="cuda")
    if corr:  # neighbouring queries alike (as with a trained indexer): small LSE-pass union
        base = torch.randn(n // 64 + 1, HKV, DI, device="cuda").repeat_interleave(64, 0)[:n]
        qi = base + 0.25 * qi
    ki = torch.randn(n, 1, DI, device="cuda")
    return qi.bfloat16(), ki.bfloat16(), cu

def bench(lens, topk=K, det=True, cfg=None, corr=False):
    qi, ki, cu = inputs(lens, corr)
    old = triton_impl.config
    if cfg is not None:
        triton_impl.config = lambda di, dtype, nsel, device=None: cfg
    try:
        fn = lambda: openmsa.indexer_topk(qi, ki, cu, cu, block_size=B, topk=topk,
                                          deterministic=det, backend="triton")
        fn(); torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=50, rep=300)
    finally:
        triton_impl.config = old
    visible = sum(L * (L + 1) // 2 for L in lens)
    return ms, 2 * HKV * DI * visible / (ms * 1e-3) / 1e12

print(torch.cuda.get_device_name(), "triton", triton.__version__,
      "default (BLOCK_M, warps, stages):", triton_impl.config(DI, torch.bfloat16, K - 1))
for n in (8192, 32768, 131072, 1 << 20):
    for det, corr in ((True, False), (False, False), (True, True)):
        ms, tf = bench([n], det=det, corr=corr)
        print(f"N={n:>8} det={det!s:5} corr={corr!s:5}: {ms:9.3f} ms  {tf:6.1f} TFLOP/s")
for n in (8192, 131072):  # K=1: long pass skipped, LSE over the local block only
    ms, tf = bench([n], topk=1)
    print(f"N={n:>8} topk=1 (no long pass)   : {ms:9.3f} ms")
ms, tf = bench([32768] * 8)
print(f"varlen pack 8 x 32K               : {ms:9.3f} ms  {tf:6.1f} TFLOP/s")
for n in (32768, 131072):  # tuning sweep
    for cfg in [(128, 8, 2), (128, 8, 3), (128, 8, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3)]:
        try:
            ms, tf = bench([n], cfg=cfg)
            print(f"N={n:>7} cfg={cfg}: {ms:8.3f} ms {tf:6.1f} TFLOP/s")
        except Exception as e:  # e.g. out of shared memory
            print(f"N={n:>7} cfg={cfg}: failed: {type(e).__name__}: {str(e)[:120]}")
