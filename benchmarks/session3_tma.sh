# Session 3: the batch-1 index scan through a TMA descriptor (one page per step, optional
# prefetch of the next page) against the pointer-load scan, 1M tokens, bf16 and FP8 keys;
# then the GPU tests with the TMA scan.
set -o pipefail
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
S=benchmarks/sweep_decode.py
timeout 40 python3 $S --fp8 none index --pages 0 --stages 3 --tma 0 2>&1 | grep -v Warn | tee -a "$OUT/tma.log"
timeout 120 python3 $S --fp8 none index --pages 0 --stages 3 --tma 1 --prefetch 0 1 \
    --index-splits 264 528 792 2>&1 | grep -v Warn | tee -a "$OUT/tma.log"
timeout 40 python3 $S --batch 8 --fp8 none index --pages 0 --stages 3 --tma 0 1 2>&1 | grep -v Warn | sed "s/^/batch 8 /" | tee -a "$OUT/tma.log"
OPENMSA_DECODE_INDEX_TMA=1 timeout 100 python3 -m pytest -q -m gpu tests/test_serving_decode.py 2>&1 | tail -3 | tee "$OUT/gpu_tests_tma.txt"
timeout 100 python3 -m pytest -q -m gpu tests/test_serving_decode.py 2>&1 | tail -3 | tee "$OUT/gpu_tests_default.txt"
