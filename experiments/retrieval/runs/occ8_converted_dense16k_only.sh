#!/usr/bin/env bash
# Committed results: experiments/retrieval/results/h100_run4_occ8/converted_dense16k_only/ (lane logs in calls/logs/call4_*.log)
# Fourth run, call 4 (nvidia-h100-x4): the converted recipe with its whole index warmup at 16K
# in dense mode (no 4K stage: --warmup-steps 0; 150 steps of one 16K sequence, the KL over every
# visible token through the PyTorch reference, capped at 140 s), seeds 0-3, one
# dense -> converted lane per GPU. One tarball per seed (the device returns 8 files per call).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHON=python3
R=experiments/retrieval/run_all.sh
W=/tmp/run4d; mkdir -p "$W" "$OUT"
A=(--occurrences 8 --call-budget 470 --recall-seqs 4)
L=(--warmup-steps 0 --warmup-wide-steps 150 --warmup-wide-topk 0 --warmup-wide-tokens 16384
   --warmup-time-limit 140)
nvidia-smi --query-gpu=name --format=csv,noheader > "$W/gpus.txt"
for s in 0 1 2 3; do
    (export CUDA_VISIBLE_DEVICES=$s
     bash $R "$W/s$s" --only dense,msa_converted --pack "$W/pack$s" "${A[@]}" -- --seed $s "${L[@]}" \
         > "$W/s$s.log" 2>&1; echo "rc $?" >> "$W/s$s.log"
     tar czf "$OUT/seed$s.tgz" -C "$W/pack$s" .) &
done
wait
tar czf "$OUT/logs.tgz" -C "$W" $(cd "$W" && ls *.log gpus.txt)
grep -h -E "^=== |val acc|index warmup ended|recall @" "$W"/*.log | tail -60
