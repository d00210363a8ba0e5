#!/usr/bin/env bash
# Committed results: experiments/retrieval/results/h100_run6_seeds/converted_dense16k/ (logs in calls/logs/)
# Sixth run, call 1 (nvidia-h100-x4): how often does conversion reach recall 0.9? Four more
# seeds (4-7), one dense -> converted lane per GPU, the converted recipe with both warmup
# stages in dense mode (the paper's warmup: dense attention, the KL over every visible token):
# 400 steps at 4K, then 150 steps of one 16K sequence, now through the dense-KL kernels
# (openmsa/ops/kl/dense.py) instead of the PyTorch reference, so no time cap is needed.
# The fourth run's call 3 (occ8_converted_dense16k_warmup.sh) is the same recipe for seeds 0-3
# (its 16K stage capped at ~105 steps).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHON=python3
R=experiments/retrieval/run_all.sh
W=/tmp/run6a; mkdir -p "$W" "$OUT"
A=(--occurrences 8 --call-budget 560 --recall-seqs 4)
D16=(--warmup-wide-topk 0 --warmup-wide-tokens 16384)
nvidia-smi --query-gpu=name --format=csv,noheader > "$W/gpus.txt"
for i in 0 1 2 3; do s=$((i + ${SEED0:-4}))
    (export CUDA_VISIBLE_DEVICES=$i
     bash $R "$W/s$s" --only dense,msa_converted --pack "$W/pack$s" "${A[@]}" -- --seed $s "${D16[@]}" \
         > "$W/s$s.log" 2>&1; echo "rc $?" >> "$W/s$s.log"
     tar czf "$OUT/seed$s.tgz" -C "$W/pack$s" .) &
done
wait
tar czf "$OUT/logs.tgz" -C "$W" $(cd "$W" && ls *.log gpus.txt)
grep -h -E "^=== |index warmup ended|recall @|msa_converted +ctx" "$W"/*.log | grep -v "\[sparse\]" | tail -60
