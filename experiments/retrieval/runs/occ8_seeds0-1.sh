#!/usr/bin/env bash
# Committed results: experiments/retrieval/results/h100_run4_occ8/ (seed0/, seed1/; lane logs in calls/logs/call1_*.log)
# Fourth run, call 1 (nvidia-h100-x4: one run or lane per GPU): the chain over about
# haystack / 8 of 2048 noise tokens per sequence (run_all.sh --occurrences 8), seeds 0 and 1.
#   GPU 0: dense -> msa_converted (seed 0)    GPU 1: msa_native (seed 0)
#   GPU 2: dense -> msa_converted (seed 1)    GPU 3: msa_native (seed 1)
# Each variant is packed into $OUT/s<seed>/<variant>.tgz as soon as it is evaluated.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHON=python3
R=experiments/retrieval/run_all.sh
W=/tmp/run4; mkdir -p "$W" "$OUT"
A=(--occurrences 8 --call-budget 555)
nvidia-smi --query-gpu=name --format=csv,noheader > "$W/gpus.txt"
lane() { local gpu=$1 name=$2; shift 2
         (export CUDA_VISIBLE_DEVICES=$gpu; bash $R "$@" > "$W/$name.log" 2>&1; echo "rc $?" >> "$W/$name.log") & }
lane 0 s0a "$W/s0" --only dense,msa_converted --pack "$OUT/s0" "${A[@]}"
lane 1 s0b "$W/s0" --only msa_native --pack "$OUT/s0" --time-limit 450 "${A[@]}"
lane 2 s1a "$W/s1" --only dense,msa_converted --pack "$OUT/s1" "${A[@]}" -- --seed 1
lane 3 s1b "$W/s1" --only msa_native --pack "$OUT/s1" --time-limit 450 "${A[@]}" -- --seed 1
wait
tar czf "$OUT/logs.tgz" -C "$W" $(cd "$W" && ls *.log gpus.txt)
grep -h -E "^=== |val acc|accuracy" "$W"/*.log | tail -40
