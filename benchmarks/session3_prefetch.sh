# Session 3: the index scan with the next step's keys prefetched into registers
# (OPENMSA_DECODE_INDEX_PREFETCH=1) against the default, 1M tokens, batch 1 and 8, bf16 and
# FP8 index keys; settings that ptxas compiles without spills (sm_90a, probed on the CPU).
set -o pipefail
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
S=benchmarks/sweep_decode.py
for B in 1 8; do
  timeout 60 python3 $S --batch $B --fp8 none --pages 1 2 --warps 4 8 --prefetch 0 1 --stages 3 2>&1 | grep -v Warn | sed "s/^/batch $B /" | tee -a "$OUT/prefetch.log"
  timeout 60 python3 $S --batch $B --fp8 index --pages 1 2 4 --warps 4 8 --prefetch 0 1 --stages 3 2>&1 | grep -v Warn | sed "s/^/batch $B /" | tee -a "$OUT/prefetch.log"
done
OPENMSA_DECODE_INDEX_PREFETCH=1 timeout 100 python3 -m pytest -q -m gpu tests/test_serving_decode.py 2>&1 | tail -3 | tee "$OUT/gpu_tests_prefetch.txt"
