#!/usr/bin/env bash
# Committed results: experiments/retrieval/results/h100_run4_occ8/ (seed0/ window, seed0_rerun/, seed2/; lane logs in calls/logs/call2_*.log)
# Fourth run, call 2 (nvidia-h100-x4): the sliding-window baseline (seed 0), seed 0's dense ->
# converted lane again (run-to-run spread; its recall on 4 sequences per context), and a
# third seed (2) of dense -> converted and native, all with --occurrences 8.
#   GPU 0: window (seed 0)                    GPU 1: dense -> msa_converted (seed 0 again)
#   GPU 2: dense -> msa_converted (seed 2)    GPU 3: msa_native (seed 2)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHON=python3
R=experiments/retrieval/run_all.sh
W=/tmp/run4b; mkdir -p "$W" "$OUT"
A=(--occurrences 8 --call-budget 555 --recall-seqs 4)
nvidia-smi --query-gpu=name --format=csv,noheader > "$W/gpus.txt"
lane() { local gpu=$1 name=$2; shift 2
         (export CUDA_VISIBLE_DEVICES=$gpu; bash $R "$@" > "$W/$name.log" 2>&1; echo "rc $?" >> "$W/$name.log") & }
lane 0 s0w "$W/s0" --only window --pack "$OUT/s0" "${A[@]}"
lane 1 s0r "$W/s0r" --only dense,msa_converted --pack "$OUT/s0r" "${A[@]}"
lane 2 s2a "$W/s2" --only dense,msa_converted --pack "$OUT/s2" "${A[@]}" -- --seed 2
lane 3 s2b "$W/s2" --only msa_native --pack "$OUT/s2" --time-limit 450 "${A[@]}" -- --seed 2
wait
tar czf "$OUT/logs.tgz" -C "$W" $(cd "$W" && ls *.log gpus.txt)
grep -h -E "^=== |val acc" "$W"/*.log | tail -40
