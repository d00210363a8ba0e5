#!/usr/bin/env bash
# Committed results: experiments/retrieval/results/h100_run5_seed2/ (s2_sparse3000_lr3e-4/, s2_sparse3000_lr1e-3/, native_s3/, window_s1/, window_s2/; logs in calls/logs/)
# Fifth run, call 2 (nvidia-h100-x4): does a long sparse fine-tuning let the converted model's
# attention co-adapt to the index (what native has), and the runs the fourth run left out.
#   GPU 0: seed 2 dense -> converted, default warmup, then 3000 sparse steps (not 600) at LR
#          3e-4; both checkpoints come back (in parts) for CPU diagnostics
#   GPU 1: window, seeds 1 and 2 (one after the other)
#   GPU 2: seed 2 dense -> converted, default warmup, then 3000 sparse steps at LR 1e-3
#   GPU 3: native, seed 3
# The dense run and the converted run are two run_all.sh calls on one folder, so that the
# converted run alone gets --steps / --lr (extra arguments reach every variant of a call).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHON=python3
R=experiments/retrieval/run_all.sh
W=/tmp/run5b; mkdir -p "$W" "$OUT"
A=(--occurrences 8 --recall-seqs 4)
nvidia-smi --query-gpu=name --format=csv,noheader > "$W/gpus.txt"
long_sparse() { local gpu=$1 name=$2 ckpt=$3; shift 3
    (export CUDA_VISIBLE_DEVICES=$gpu
     { bash $R "$W/$name" --only dense --pack "$W/pack_$name" $ckpt "${A[@]}" --call-budget 555 -- --seed 2
       bash $R "$W/$name" --only msa_converted --pack "$W/pack_$name" $ckpt "${A[@]}" \
           --call-budget $((555 - SECONDS)) --time-limit 400 -- --seed 2 "$@"
     } > "$W/$name.log" 2>&1; echo "rc $?" >> "$W/$name.log"
     if [[ -n "$ckpt" ]]; then cp "$W/pack_$name"/* "$OUT/"
     else tar czf "$OUT/$name.tgz" -C "$W/pack_$name" .; fi) & }
long_sparse 0 s2_sparse3000_lr3e-4 --pack-ckpt --steps 3000 --lr 3e-4
long_sparse 2 s2_sparse3000_lr1e-3 ""          --steps 3000 --lr 1e-3
(export CUDA_VISIBLE_DEVICES=1
 for s in 1 2; do bash $R "$W/w$s" --only window --pack "$W/pack_w$s" "${A[@]}" --call-budget 555 -- --seed $s \
     > "$W/window_s$s.log" 2>&1; echo "rc $?" >> "$W/window_s$s.log"; done
 tar czf "$OUT/window_s1_s2.tgz" -C "$W" pack_w1 pack_w2) &
(export CUDA_VISIBLE_DEVICES=3
 bash $R "$W/n3" --only msa_native --pack "$W/pack_n3" "${A[@]}" --call-budget 555 --time-limit 450 -- --seed 3 \
     > "$W/native_s3.log" 2>&1; echo "rc $?" >> "$W/native_s3.log"
 tar czf "$OUT/native_s3.tgz" -C "$W/pack_n3" .) &
wait
tar czf "$OUT/logs.tgz" -C "$W" $(cd "$W" && ls *.log gpus.txt)
ls -la "$OUT"
grep -H -E "^=== |index warmup ended|recall @|(msa_converted|msa_native|window) +ctx" "$W"/*.log | tail -70
