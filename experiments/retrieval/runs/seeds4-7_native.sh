#!/usr/bin/env bash
# Committed results: experiments/retrieval/results/h100_run6_seeds/native/ (logs in calls/logs/)
# Sixth run, call 2 (nvidia-h100-x4): MSA native for seeds 4-7, one run per GPU (the run_all.sh
# schedule: 4000 sparse-mode steps, the curriculum's 256 / 512-token phase being its warmup).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHON=python3
R=experiments/retrieval/run_all.sh
W=/tmp/run6b; mkdir -p "$W" "$OUT"
A=(--occurrences 8 --call-budget 560 --recall-seqs 4 --time-limit 450)
nvidia-smi --query-gpu=name --format=csv,noheader > "$W/gpus.txt"
for i in 0 1 2 3; do s=$((i + 4))
    (export CUDA_VISIBLE_DEVICES=$i
     bash $R "$W/s$s" --only msa_native --pack "$W/pack$s" "${A[@]}" -- --seed $s \
         > "$W/n$s.log" 2>&1; echo "rc $?" >> "$W/n$s.log"
     tar czf "$OUT/native_seed$s.tgz" -C "$W/pack$s" .) &
done
wait
tar czf "$OUT/logs.tgz" -C "$W" $(cd "$W" && ls *.log gpus.txt)
grep -h -E "^=== |msa_native +ctx" "$W"/*.log | tail -40
