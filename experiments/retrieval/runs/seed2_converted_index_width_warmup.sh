#!/usr/bin/env bash
# Committed results: experiments/retrieval/results/h100_run5_seed2/ (di128_default/, di128_d16_150/, di64_d16_300/, di128_d16_300/; logs in calls/logs/)
# Fifth run, call 1 (nvidia-h100-x4): converted seed 2 (the seed that missed 0.9 at 16K in all
# three recipes of the fourth run) with a wider index head and / or a longer warmup at 16K.
# Each lane trains its own dense seed-2 model first (checkpoints do not come back).
#   GPU 0: Di = 128, the default recipe (4K warmup through the kernels, 150 steps at 16K, K = 64)
#   GPU 1: Di = 128, the whole warmup at 16K in dense mode, 150 steps (call 4's recipe)
#   GPU 2: Di =  64, the whole warmup at 16K in dense mode, 300 steps (a longer warmup alone)
#   GPU 3: Di = 128, the whole warmup at 16K in dense mode, 300 steps
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHON=python3
R=experiments/retrieval/run_all.sh
W=/tmp/run5a; mkdir -p "$W" "$OUT"
A=(--occurrences 8 --call-budget 555 --recall-seqs 4)
D16=(--warmup-steps 0 --warmup-wide-topk 0 --warmup-wide-tokens 16384)
nvidia-smi --query-gpu=name --format=csv,noheader > "$W/gpus.txt"
lane() { local gpu=$1 name=$2; shift 2
         (export CUDA_VISIBLE_DEVICES=$gpu
          bash $R "$W/$name" --only dense,msa_converted --pack "$W/pack_$name" "${A[@]}" -- --seed 2 "$@" \
              > "$W/$name.log" 2>&1; echo "rc $?" >> "$W/$name.log"
          tar czf "$OUT/$name.tgz" -C "$W/pack_$name" .) & }
lane 0 di128_default --index-head-dim 128
lane 1 di128_d16_150 --index-head-dim 128 "${D16[@]}" --warmup-wide-steps 150 --warmup-time-limit 140
lane 2 di64_d16_300  --index-head-dim 64  "${D16[@]}" --warmup-wide-steps 300 --warmup-time-limit 240
lane 3 di128_d16_300 --index-head-dim 128 "${D16[@]}" --warmup-wide-steps 300 --warmup-time-limit 240
wait
tar czf "$OUT/logs.tgz" -C "$W" $(cd "$W" && ls *.log gpus.txt)
grep -H -E "^=== |index warmup ended|recall @|msa_converted +ctx" "$W"/*.log | grep -v "\[sparse\]" | tail -60
