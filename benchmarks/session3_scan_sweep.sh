# Session 3: the batch-1 index scan on the H100: pages per step x warps x splits, bf16 and
# FP8 index keys (1M tokens, 1 query token). The compiled kernel holds one 64 KB buffer of
# keys whatever num_stages says (ptxas: 70 KB shared memory at 2-4 stages), so the knobs
# that add bytes in flight are more programs (splits) and more warps.
set -o pipefail
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 250 python3 benchmarks/sweep_decode.py --fp8 none index --pages 1 2 4 --stages 3 --warps 4 8 \
    --index-splits 256 512 1024 2>&1 | grep -v Warn | tee "$OUT/scan_sweep.log"
timeout 60 python3 benchmarks/sweep_decode.py --fp8 none index --pages 0 --stages 1 --warps 4 \
    --index-splits 256 2>&1 | grep -v Warn | tee -a "$OUT/scan_sweep.log"
