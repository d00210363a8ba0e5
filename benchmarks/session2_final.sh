# Session 2 final: GPU tests, then the README benchmark (8K-512K + the varlen pack; 1M
# with PART=1m). Logs and JSON under $OUT.
set -o pipefail
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if [ "${PART:-main}" = main ]; then
  timeout 150 python3 -m pytest -q -m gpu tests/test_attention_triton.py tests/test_kl_triton.py tests/test_indexer_triton.py -x 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
  timeout 420 python3 benchmarks/bench_training.py --contexts 8192 32768 131072 524288 --pack \
      --max-flex 524288 --max-dense 524288 --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/bench.log"
else
  timeout 500 python3 benchmarks/bench_training.py --contexts 1048576 --max-flex 1048576 \
      --max-dense 1048576 --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/bench.log"
fi
