# Session 2: GPU tests of the paged decode, then the decode benchmark. Logs under $OUT.
set -o pipefail
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
timeout 200 python3 -m pytest -q -m gpu tests/test_serving_decode.py -x 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 360 python3 benchmarks/bench_decode.py --out "$OUT" ${DECODE_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/bench_decode.log"
