# Session 3: Top-k merge fused into the decode attention kernel (one launch fewer) against
# the separate merge kernel, 1M tokens, batch 1 and 8; then the decode GPU tests (fused).
set -o pipefail
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
for B in 1 8; do
  timeout 45 python3 benchmarks/sweep_decode.py --batch $B --fp8 none index --pages 0 --stages 3 \
      --fused-merge 0 1 0 1 2>&1 | grep -v Warn | sed "s/^/batch $B /" | tee -a "$OUT/fused_merge.log"
done
timeout 60 python3 -m pytest -q -m gpu tests/test_serving_decode.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
