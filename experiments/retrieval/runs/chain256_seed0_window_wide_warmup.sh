# Committed results: experiments/retrieval/results/h100_run3_chain/ (window; converted_recipes/wide_warmup_600/)
# run 3, call 2: the sliding window; a converted recipe with a longer wide-K index warmup at 16K
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
mkdir -p $OUT/pack; R=/tmp/run3; mkdir -p $R; cp -r out/carry/run3/dense $R/
X=(--haystack chain --num-noise 256 --lm-weight 1.0)
PYTHON=python3 bash experiments/retrieval/run_all.sh $R --only window --pack $OUT/pack --call-budget 560 \
  -- "${X[@]}" > $OUT/laneA.log 2>&1 &
W=$R/converted_wide600; mkdir -p $W
( python3 -m experiments.retrieval.train --variant msa_converted --init $R/dense --out $W \
    --num-keys 128 --num-values 64 --num-pairs 6 --num-queries 6 "${X[@]}" --train-len 16384 \
    --tokens-per-step 65536 --log-every 50 --val-every 250 --val-seqs 64 --steps 600 --lr 3e-4 \
    --lr-warmup 30 --warmup-steps 400 --warmup-len 4096 --index-lr 3e-3 --kl-weight 0.1 \
    --warmup-wide-steps 600 --warmup-wide-topk 64 --recall-every 100 --time-limit 380 > $W/train.log 2>&1
  python3 -m experiments.retrieval.evaluation --runs $W --contexts 4096 8192 16384 --eval-seqs 256 \
    --recall-seqs 2 --ablate-seqs 64 > $W/eval.log 2>&1
  rm -f $W/model.pt; tar czf $OUT/pack/converted_wide600.tgz -C $R converted_wide600 ) > $OUT/laneB.log 2>&1 &
wait
grep -E "val acc|recall @|ctx|done|limit" $OUT/laneA.log | tail -12
grep -E "val acc|recall @|ctx|done|limit" $W/train.log $W/eval.log | tail -30
