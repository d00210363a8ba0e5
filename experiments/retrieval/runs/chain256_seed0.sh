# Committed results: experiments/retrieval/results/h100_run3_chain/ (dense, msa_converted, msa_native)
# run 3, call 1: dense (the chain_n256 probe checkpoint) evaluated, msa_converted from it, msa_native; side by side
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
mkdir -p $OUT/pack; R=/tmp/run3; mkdir -p $R; cp -r out/carry/run3/dense $R/
X=(--haystack chain --num-noise 256 --lm-weight 1.0)
( python3 -m experiments.retrieval.evaluation --runs $R/dense --contexts 4096 8192 16384 --eval-seqs 256 \
    --recall-seqs 2 --ablate-seqs 64 > $R/dense/eval.log 2>&1
  tar czf $OUT/pack/dense.tgz -C $R --exclude dense/model.pt dense
  PYTHON=python3 bash experiments/retrieval/run_all.sh $R --only msa_converted --pack $OUT/pack --call-budget 560 \
    -- "${X[@]}" --warmup-wide-steps 150 --warmup-wide-topk 64 ) > $OUT/laneA.log 2>&1 &
PYTHON=python3 bash experiments/retrieval/run_all.sh $R --only msa_native --pack $OUT/pack --call-budget 560 \
  -- "${X[@]}" > $OUT/laneB.log 2>&1 &
wait
grep -E "val acc|recall @|ctx|done|limit" $OUT/laneA.log | tail -30
grep -E "step +(500|1000|1500|2000|2500|3000|3500|4000) |recall @|ctx|done|limit" $OUT/laneB.log | tail -30
