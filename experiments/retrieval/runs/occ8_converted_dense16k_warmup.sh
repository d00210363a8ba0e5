#!/usr/bin/env bash
# Committed results: experiments/retrieval/results/h100_run4_occ8/converted_dense16k_warmup/ (lane logs in calls/logs/call3_*.log)
# Fourth run, call 3 (nvidia-h100-x4): the converted recipe with the 16K warmup stage in dense
# mode (the KL over every visible token, the PyTorch reference; --warmup-wide-topk 0, one
# 16K sequence per step, the whole index warmup capped at 150 s) instead of sparse mode with
# K = 64; seeds 0-3, each lane training its dense model first (the checkpoints do not come back).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHON=python3
R=experiments/retrieval/run_all.sh
W=/tmp/run4c; mkdir -p "$W" "$OUT"
A=(--occurrences 8 --call-budget 555 --recall-seqs 4)
L=(--warmup-wide-topk 0 --warmup-wide-tokens 16384 --warmup-time-limit 150)
nvidia-smi --query-gpu=name --format=csv,noheader > "$W/gpus.txt"
lane() { local gpu=$1 name=$2; shift 2
         (export CUDA_VISIBLE_DEVICES=$gpu; bash $R "$@" > "$W/$name.log" 2>&1; echo "rc $?" >> "$W/$name.log") & }
for s in 0 1 2 3; do
    lane $s s$s "$W/s$s" --only dense,msa_converted --pack "$OUT/s$s" "${A[@]}" -- --seed $s "${L[@]}"
done
wait
tar czf "$OUT/logs.tgz" -C "$W" $(cd "$W" && ls *.log gpus.txt)
grep -h -E "^=== |val acc|index warmup ended|index_warmup_wide" "$W"/*.log | tail -60
