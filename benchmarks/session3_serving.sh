# Session 3, call 1: every GPU test (FP8 decode, prefill CUDA graph included), the decode
# kernel breakdown at batch 1, the decode benchmark with FP8 pools (bf16 in the same run).
set -o pipefail
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -m gpu tests/ 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
timeout 90 python3 benchmarks/profile_decode.py --cases 1:1048576:1:none 1:1048576:1:index \
    1:1048576:1:index_kv 1:32768:1:none 8:1048576:1:index 2>&1 | grep -v Warning | tee "$OUT/profile_decode.log"
timeout 240 python3 benchmarks/bench_decode.py --fp8 none index index_kv --batches 1 8 \
    --contexts 32768 131072 1048576 --q 1 8 --out "$OUT/decode_fp8" 2>&1 | grep -v Warning | tee "$OUT/bench_decode_fp8.log"
