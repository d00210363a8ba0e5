# Session 3, final H100 call: serving GPU tests, then the decode benchmark (bf16 and FP8
# index keys, the full grid); PART=workloads: the official decode suite and prefill selection.
set -o pipefail
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${PART:-decode}" = decode ]; then
  timeout 120 python3 -m pytest -q -m gpu tests/test_serving_decode.py tests/test_serving_prefill.py tests/test_serving_cache.py 2>&1 | tail -8 | tee "$OUT/gpu_tests.txt"
  timeout 400 python3 benchmarks/bench_decode.py --fp8 none index --out "$OUT/decode" 2>&1 | grep -v Warning | tee "$OUT/bench_decode.log"
else
  timeout 200 python3 benchmarks/bench_workloads.py --suite decode --out "$OUT/workloads" 2>&1 | grep -v Warning | tee "$OUT/workloads_decode.log"
  timeout 300 python3 benchmarks/bench_workloads.py --suite prefill --out "$OUT/workloads" 2>&1 | grep -v Warning | tee "$OUT/workloads_prefill.log"
fi
