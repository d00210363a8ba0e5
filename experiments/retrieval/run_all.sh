#!/usr/bin/env bash
# The whole retrieval experiment: train + evaluate every variant, then the plots.
#
#   bash experiments/retrieval/run_all.sh OUT_DIR [options] [-- extra train.py args]
#
#   --smoke          tiny CPU sizes (context 256, block 16, K 2, a few steps per variant)
#   --only LIST      comma-separated subset of dense,window,msa_native,msa_converted,plot
#                    (default: all; msa_converted needs OUT_DIR/dense from this or an earlier call)
#   --lanes N        1: one after the other (default); 2: two lanes at once, lane A = dense then
#                    msa_converted on GPU 0, lane B = window then msa_native on GPU 1
#   --one-gpu        with --lanes 2: both lanes on GPU 0 (the small models leave room; the
#                    third run ran this way, each run then about 1.3-2x slower than alone)
#   --iid-filler     the first two runs' task: i.i.d. noise filler (vocabulary 64), answers
#                    only supervised (default: the "chain" filler with its next-token loss;
#                    README.md says why)
#   --occurrences N  the chain walks a random subset of about haystack / N of 2048 noise tokens
#                    per sequence, so a token recurs ~N times at any length (default 8: the
#                    fourth run); 0: the third run's chain over all of 256 noise tokens
#   --scale F        multiply every step count by F (0.5 about halves the GPU time)
#   --time-limit S   cap of each training run in seconds (it then stops and saves; default 300)
#   --call-budget S  the whole call's wall-clock budget (default 570, for a 600-s device call): a
#                    training run gets at most what is left minus 90 s for its evaluation;
#                    0 = no budget
#   --contexts "..." evaluation contexts (default "4096 8192 16384")
#   --recall-seqs N  sequences per context for the indexer's recall (default 2)
#   --pack DIR       DIR/<variant>.tgz as soon as a run is evaluated (its JSON + logs; model.pt
#                    too with --pack-ckpt), DIR/report.tgz after the plots: few files, for a
#                    machine that returns at most 8 files per call, and what is done is packed
#                    even if the call is cut short. A tarball over 15 MiB (a checkpoint of the
#                    2048-token filler vocabulary is ~17 MB) is split into VARIANT.tgz.partNN
#                    (the device returns files of <= 16 MiB): cat VARIANT.tgz.part* > VARIANT.tgz
#
# GPU-time estimate (the fourth run, one H100 per run: nvidia-h100-x4, one lane per GPU, as in
# runs/occ8_*.sh): dense 130 s + 25 s evaluation, converted 130-150 s + 40 s,
# native 240-275 s + 40 s, window 115 s; a dense -> converted lane ~6 min. Older estimates:
# (one H100; the second run, alone on the GPU): dense ~2.3 min, window
# ~2 min, msa_native ~4 min, msa_converted ~2.3 min (each with its evaluation), plots
# seconds: ~11 minutes (two device calls). The third run (chain filler, two lanes on one
# GPU): dense 240 s, converted 137-241 s, window 210 s of training; native reached ~3100
# of its 4000 steps in its 300-s --time-limit. Each run stops itself after --time-limit s.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
    PY="$ROOT/.venv/bin/python"
else PY=python3; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

[[ $# -ge 1 && "$1" != -* ]] || { sed -n '2,40p' "$0"; exit 2; }
OUT="$1"; shift
SMOKE=0; ONLY="dense,window,msa_native,msa_converted,plot"; LANES=1; SCALE=1; TIME_LIMIT=300
ONE_GPU=0; IID=0; OCC=8
CALL_BUDGET=570
CONTEXTS="4096 8192 16384"; PACK=""; PACK_CKPT=0; EXTRA=(); RECALL_SEQS=2
while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --only) ONLY="$2"; shift ;;
        --lanes) LANES="$2"; shift ;;
        --one-gpu) ONE_GPU=1 ;;
        --iid-filler) IID=1 ;;
        --occurrences) OCC="$2"; shift ;;
        --scale) SCALE="$2"; shift ;;
        --time-limit) TIME_LIMIT="$2"; shift ;;
        --call-budget) CALL_BUDGET="$2"; shift ;;
        --contexts) CONTEXTS="$2"; shift ;;
        --recall-seqs) RECALL_SEQS="$2"; shift ;;
        --pack) PACK="$2"; shift ;;
        --pack-ckpt) PACK_CKPT=1 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT"
T0=$SECONDS

steps() { awk -v n="$1" -v f="$SCALE" 'BEGIN { s = int(n * f + 0.5); print (s < 1 ? 1 : s) }'; }
want() { [[ ",$ONLY," == *",$1,"* ]]; }

if [[ $IID == 1 ]]; then FILLER=(--haystack noise)
else FILLER=(--haystack chain --lm-weight 1.0 --chain-occurrences "$OCC"); fi

if [[ $SMOKE == 1 ]]; then
    # Every code path at toy sizes: a few steps, CPU, seconds per variant.
    COMMON=(--device cpu --threads 1 --hidden 64 --layers 2 --heads 4 --kv-heads 2 --head-dim 16
            --mlp-hidden 64 --rotary-dim 8 --index-head-dim 16 --block-size 16 --topk 2
            --num-keys 32 --num-values 16 --num-noise 64 --num-pairs 8 --num-queries 4
            "${FILLER[@]}"
            --train-len 256 --tokens-per-step 1024 --log-every 2 --val-every 4 --val-seqs 4
            --lr-warmup 2)
    CURRICULUM=(--curriculum 128 --curriculum-steps 2)
    SCRATCH=(--steps 4 --lr 1e-3)
    NATIVE=(--steps 4 --lr 1e-3 --warmup-steps 2)
    CONVERTED=(--steps 3 --lr 3e-4 --warmup-steps 2 --warmup-len 256 --index-lr 3e-3)
    [[ "$CONTEXTS" == "4096 8192 16384" ]] && CONTEXTS="256 512"
    TIME_LIMIT=0; CALL_BUDGET=0
    EVAL=(--device cpu --threads 1 --eval-seqs 8 --tokens-per-batch 2048 --recall-seqs 1 --ablate-seqs 4)
else
    # The H100 configuration (README.md): 3.2M-parameter decoder, 4 layers, 8 q / 2 kv heads,
    # head dim 64, B = 64, K = 8 (512 tokens per query: 1/32 of the 16K training context);
    # 6 pairs, all asked (README.md says why not more: a model may gather every pair at once,
    # which fits K blocks only for pairs < K); 64K tokens per step; lengths 256 -> 8192 over
    # the first 1250 steps (a length <= K * B = 512 is held, up to 3 shares, until the
    # training accuracy reaches 0.9: the early plateau), then 16K (at 256, 512 tokens MSA's
    # sparse mode selects every visible block).
    # Filler: the chain with its next-token loss, over ~haystack / 8 of 2048 noise tokens per
    # sequence (--occurrences 0: the third run's chain over all of 256; --iid-filler: the first
    # two runs' i.i.d. noise over 64 tokens, answers only).
    if [[ $IID == 1 ]]; then FILLER+=(--num-noise 64)
    elif [[ $OCC != 0 ]]; then FILLER+=(--num-noise 2048)
    else FILLER+=(--num-noise 256); fi
    COMMON=(--num-keys 128 --num-values 64 --num-pairs 6 --num-queries 6 "${FILLER[@]}"
            --train-len 16384 --tokens-per-step 65536 --log-every 50 --val-every 250 --val-seqs 64)
    CURRICULUM=(--curriculum 256,512,1024,2048,4096,8192 --curriculum-steps "$(steps 1250)"
                --curriculum-gate 0.9)
    SCRATCH=(--steps "$(steps 2500)" --lr 1.5e-3)
    # Native: sparse mode from the first step; its warmup is the curriculum's 256 / 512-token
    # phase, where every visible block is selected (dense attention, KL over all visible
    # tokens) at kernel speed. 4000 steps: in the second H100 run, 2500 left it at 94%
    # (the gate had held it at 256 tokens until step ~600). (--warmup-steps N would add N
    # dense-mode steps; README.md, "Seeds", says why the H100 runs have none.)
    NATIVE=(--steps "$(steps 4000)" --lr 1.5e-3 --warmup-steps 0 --kl-weight 0.1 --recall-every 250)
    # Converted: 400 index-warmup steps at 4K (dense mode, backbone frozen; 64 blocks, so
    # dense mode runs through the kernels as sparse mode with K = 64: every block), then 150
    # at 16K in sparse mode with K = 64 (the KL over the 64 blocks the index ranks first: the
    # dense KL at 16K has no kernel), the indexer's recall measured every 100 steps and at
    # the end of the warmup; then 600 sparse fine-tuning steps at 16K with a lower LR (the
    # sparse KL keeps training the index).
    CONVERTED=(--steps "$(steps 600)" --lr 3e-4 --lr-warmup 30 --warmup-steps "$(steps 400)"
               --warmup-len 4096 --warmup-wide-steps "$(steps 150)" --warmup-wide-topk 64
               --index-lr 3e-3 --kl-weight 0.1 --recall-every 100)
    EVAL=(--eval-seqs 256 --recall-seqs "$RECALL_SEQS" --ablate-seqs 64)
fi
read -r -a CTX <<< "$CONTEXTS"

time_limit() {  # this run's training cap: --time-limit, within what the call has left
    local lim=$TIME_LIMIT
    if [[ $CALL_BUDGET -gt 0 ]]; then
        local left=$((CALL_BUDGET - (SECONDS - T0) - 90))
        [[ $left -lt 30 ]] && left=30
        [[ $lim -eq 0 || $left -lt $lim ]] && lim=$left
    fi
    echo "$lim"
}

pack() {  # pack VARIANT: its small files (and model.pt with --pack-ckpt) into $PACK/VARIANT.tgz
    [[ -n "$PACK" ]] || return 0
    mkdir -p "$PACK"
    local ex=(); [[ $PACK_CKPT == 1 ]] || ex=(--exclude "$1/model.pt")
    tar czf "$PACK/$1.tgz" -C "$OUT" "${ex[@]}" "$1"
    if [[ $(stat -c %s "$PACK/$1.tgz") -gt $((15 * 1024 * 1024)) ]]; then
        split -b 15m -d "$PACK/$1.tgz" "$PACK/$1.tgz.part" && rm "$PACK/$1.tgz"
    fi
}

run() {  # run VARIANT [train.py args...]: train, evaluate, pack; logs next to the run
    local v="$1"; shift
    mkdir -p "$OUT/$v"
    local t0=$SECONDS lim
    lim=$(time_limit)
    echo "=== $v: $(date -u +%H:%M:%S), training time limit ${lim} s (0 = none)"
    "$PY" -m experiments.retrieval.train --variant "$v" --out "$OUT/$v" "${COMMON[@]}" --time-limit "$lim" "$@" \
        "${EXTRA[@]}" 2>&1 | tee "$OUT/$v/train.log"
    "$PY" -m experiments.retrieval.evaluation --runs "$OUT/$v" --contexts "${CTX[@]}" "${EVAL[@]}" \
        2>&1 | tee "$OUT/$v/eval.log"
    pack "$v"
    echo "=== $v done in $((SECONDS - t0)) s"
}

lane_a() {
    if want dense; then run dense "${CURRICULUM[@]}" "${SCRATCH[@]}"; fi
    if want msa_converted; then
        [[ -f "$OUT/dense/model.pt" ]] || { echo "msa_converted needs $OUT/dense/model.pt" >&2; return 1; }
        run msa_converted --init "$OUT/dense" "${CONVERTED[@]}"
    fi
}
lane_b() {
    if want window; then run window "${CURRICULUM[@]}" "${SCRATCH[@]}"; fi
    if want msa_native; then run msa_native "${CURRICULUM[@]}" "${NATIVE[@]}"; fi
}

if [[ $LANES == 2 ]]; then
    (export CUDA_VISIBLE_DEVICES=0; lane_a) > "$OUT/lane_a.log" 2>&1 & PA=$!
    (export CUDA_VISIBLE_DEVICES=$((1 - ONE_GPU)); lane_b) > "$OUT/lane_b.log" 2>&1 & PB=$!
    RC=0; wait $PA || RC=1; wait $PB || RC=1
    cat "$OUT/lane_a.log" "$OUT/lane_b.log"
    [[ $RC == 0 ]] || { echo "a lane failed" >&2; exit 1; }
else
    lane_a
    lane_b
fi

if want plot; then
    "$PY" -m experiments.retrieval.plot --runs-dir "$OUT" --out "$OUT/report"
fi
echo "=== all done in $((SECONDS - T0)) s"

if [[ -n "$PACK" ]]; then
    if [[ -d "$OUT/report" ]]; then tar czf "$PACK/report.tgz" -C "$OUT" report; fi
    ls -la "$PACK"
fi
