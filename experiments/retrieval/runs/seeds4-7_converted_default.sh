#!/usr/bin/env bash
# Committed results: experiments/retrieval/results/h100_run6_seeds/converted_default/ (logs in calls/logs/)
# Sixth run, call 3 (nvidia-h100-x4): seeds 4-7 again, dense -> converted with the default
# recipe of run_all.sh (400 dense-mode steps at 4K, then 150 sparse steps at 16K with K = 64),
# then, on the device's CPUs, analysis/group_mass.py on each converted checkpoint at 16K
# (mass recall of the spec's block-max selection against a block-sum ranking of the same index).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHON=python3
R=experiments/retrieval/run_all.sh
W=/tmp/run6c; mkdir -p "$W" "$OUT"
A=(--occurrences 8 --call-budget 430 --recall-seqs 4)
nvidia-smi --query-gpu=name --format=csv,noheader > "$W/gpus.txt"
for i in 0 1 2 3; do s=$((i + 4))
    (export CUDA_VISIBLE_DEVICES=$i
     bash $R "$W/s$s" --only dense,msa_converted --pack "$W/pack$s" "${A[@]}" -- --seed $s \
         > "$W/c$s.log" 2>&1; echo "rc $?" >> "$W/c$s.log"
     CUDA_VISIBLE_DEVICES= timeout 150 python3 -m experiments.retrieval.analysis.group_mass \
         "$W/s$s/msa_converted" 16384 > "$W/group_mass_s$s.txt" 2>&1
     cp "$W/group_mass_s$s.txt" "$W/pack$s/"
     tar czf "$OUT/seed$s.tgz" -C "$W/pack$s" .) &
done
wait
tar czf "$OUT/logs.tgz" -C "$W" $(cd "$W" && ls *.log *.txt)
grep -h -E "^=== |recall @16384|msa_converted +ctx" "$W"/*.log | grep -v "\[sparse\]" | tail -40
tail -n 12 "$W"/group_mass_s*.txt
