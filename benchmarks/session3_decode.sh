# Session 3, call 2: serving GPU tests (the FP8 test rewritten: selection and attention checked
# apart), the decode knob sweep at 1M / batch 1, then the decode benchmark at the key cases.
set -o pipefail
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
timeout 150 python3 -m pytest -q -m gpu tests/test_serving_decode.py tests/test_serving_prefill.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 150 python3 benchmarks/sweep_decode.py 2>&1 | grep -v Warn | tee "$OUT/sweep_pages_stages.log"
timeout 90 python3 benchmarks/sweep_decode.py --pages 0 --stages 3 --index-splits 128 256 \
    --attention-splits 4 8 16 2>&1 | grep -v Warn | tee "$OUT/sweep_splits.log"
timeout 60 python3 benchmarks/profile_decode.py --cases 1:1048576:1:none 1:1048576:1:index 2>&1 \
    | grep -v Warning | tee "$OUT/profile_decode.log"
