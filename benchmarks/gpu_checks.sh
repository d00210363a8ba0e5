#!/usr/bin/env bash
# One device call of GPU checks; logs under $OUT (or ./out), at most 8 files. Steps:
#   STEPS="tests sanitizer deterministic decode training" bash benchmarks/gpu_checks.sh
#  tests          pytest -m gpu tests                                  -> gpu_tests.log
#  sanitizer      compute-sanitizer memcheck over the bad-input and non-finite tests
#                 (no caching allocator, so an access past a tensor is caught) -> sanitizer.log
#  sanitizer_gpu  compute-sanitizer memcheck over the -m gpu tests in SAN_GPU_TESTS -> sanitizer_gpu.log
#  deterministic  benchmarks/bench_deterministic.py (32K, 128K)  -> deterministic.{json,md}
#  decode         benchmarks/bench_decode.py, the README's rows        -> decode.{json,md}
#  training       benchmarks/bench_training.py at 32K, sparse ops only (log only)
#  m3             benchmarks/bench_m3.py (MiniMax-M3 in transformers: openmsa vs its own path) -> m3/
#  cp             benchmarks/bench_cp.py on one rank (NCCL): the CP step at CP_CONTEXTS against the
#                 single-GPU op on the same tokens -> cp/
# TESTS names the test paths of the tests step (default: tests).
# Python packages the GPU image lacks or has too old (it cannot download) come as wheels
# under .whl/ (e.g. `pip download --no-deps transformers==5.25.0 -d .whl`, passed with the
# device tool's carry): they are unpacked to /tmp/openmsa_wheels, ahead on PYTHONPATH.
# The benchmarks' output goes to bench.log.
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --target /tmp/openmsa_wheels .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/openmsa_wheels:$PYTHONPATH
fi
STEPS=${STEPS:-tests sanitizer}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
for step in $STEPS; do
  start=$(date +%s)
  case $step in
    tests)
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest -v -m gpu ${TESTS:-tests} -p no:cacheprovider -rfE --durations=30 --continue-on-collection-errors 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -15 ;;
    sanitizer)
      # the bad inputs: cu_seqlens values, page ids, non-finite values
      for sel in "tests/api/test_validation.py -k gpu_bad" \
                 "tests/serving/test_serving_decode.py tests/serving/test_serving_prefill.py -k page_ids" \
                 "tests/ops/test_attention.py tests/ops/test_kl.py -k non_finite or neginf or nan"; do
        files=${sel%% -k *}; expr=${sel#* -k }
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SAN_TIMEOUT:-60} compute-sanitizer --tool memcheck \
          --target-processes all --print-limit 20 python3 -m pytest -v -p no:cacheprovider $files -k "$expr" 2>&1 \
          | tee -a "$OUT/sanitizer.log" | grep -E "ERROR SUMMARY|passed|failed|error" | tail -4
      done ;;
    sanitizer_gpu)
      # the -m gpu tests themselves (realistic sizes), files in SAN_GPU_TESTS. Without the
      # caching allocator every tensor is its own allocation, so an access past one is
      # caught; CUDA graph capture needs the caching allocator (no cudaMalloc while
      # capturing), so the capture tests run with it, checked at the pool's bounds.
      capture="graph or capturing or large_pool"
      for caching in 1 0; do
        if [ $caching = 0 ]; then sel="not ($capture)"; else sel="$capture"; fi
        PYTORCH_NO_CUDA_MEMORY_CACHING=$((1 - caching)) timeout ${SAN_GPU_TIMEOUT:-300} \
          compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
          python3 -m pytest -v -m gpu -p no:cacheprovider ${SAN_GPU_TESTS:-tests} -k "$sel" 2>&1 \
          | tee -a "$OUT/sanitizer_gpu.log" | grep -E "ERROR SUMMARY|passed|failed|error" | tail -4
      done ;;
    deterministic)
      timeout ${DET_TIMEOUT:-100} python3 benchmarks/bench_deterministic.py --runs 10 --out "$OUT" 2>&1 \
        | tee -a "$OUT/bench.log" | tail -10 ;;
    decode)
      timeout ${DEC_TIMEOUT:-100} python3 benchmarks/bench_decode.py --out "$OUT" \
        ${DEC_ARGS:---batches 1 8 64 --contexts 131072 1048576 --q 1 8 --fp8 none index} 2>&1 \
        | tee -a "$OUT/bench.log" | tail -30 ;;
    m3)
      timeout ${M3_TIMEOUT:-240} python3 benchmarks/bench_m3.py --out "$OUT/m3" 2>&1 \
        | tee -a "$OUT/bench.log" | tail -20 ;;
    cp)
      NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 timeout ${CP_TIMEOUT:-200} \
        torchrun --nproc-per-node 1 benchmarks/bench_cp.py --contexts ${CP_CONTEXTS:-131072} --out "$OUT/cp" 2>&1 \
        | tee -a "$OUT/bench.log" | tail -8 ;;
    training)
      timeout ${TRAIN_TIMEOUT:-60} python3 benchmarks/bench_training.py --contexts 32768 \
        --max-flex 0 --max-dense 0 --out /tmp/training 2>&1 | tee -a "$OUT/bench.log" | tail -12 ;;
  esac
  echo "== $step: $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
done
