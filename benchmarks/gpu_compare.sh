#!/usr/bin/env bash
# One device call: the ops' GPU times of two trees in the same run, to show that a change
# made nothing slower. The baseline is a tree under baseline_head/ (untracked), made with
#   mkdir -p baseline_head && git archive REV openmsa benchmarks | tar -x -C baseline_head
# Each tree runs twice, interleaved (baseline, this checkout, baseline, this checkout), so
# a drift of the GPU's clocks shows up as a difference between the two runs of one tree.
# Logs under $OUT (or ./out): training_<tree><run>.log (the sparse ops at CONTEXTS: indexer,
# forward, forward+backward, KL) and decode_<tree><run>.log (DECODE_ARGS).
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
CONTEXTS=${CONTEXTS:-32768 131072}
DECODE_ARGS=${DECODE_ARGS:---batches 1 64 --contexts 131072 1048576 --q 1 --fp8 none --no-dense}
[ -d baseline_head ] || { echo "no baseline_head/ (see the header)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
for run in 1 2; do
  for tree in baseline_head .; do
    name=$([ "$tree" = . ] && echo head || echo base)$run
    (cd "$tree" && PYTHONPATH=$PWD timeout ${STEP_TIMEOUT:-120} python3 benchmarks/bench_training.py \
        --contexts $CONTEXTS --max-flex 0 --max-dense 0 --max-dense-train 0 --max-flex-train 0 \
        --out /tmp/compare_$name 2>&1 | grep -v Warning > "$OUT/training_$name.log")
    (cd "$tree" && PYTHONPATH=$PWD timeout ${STEP_TIMEOUT:-120} python3 benchmarks/bench_decode.py \
        $DECODE_ARGS --out /tmp/compare_decode_$name 2>&1 | grep -v Warning > "$OUT/decode_$name.log")
    echo "== $name"; tail -6 "$OUT/training_$name.log"
  done
done
