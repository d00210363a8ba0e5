# Committed results: experiments/retrieval/results/h100_run3_chain_seed1/
# run 3, seed 1: dense then msa_converted (lane A), msa_native (lane B), side by side on one GPU
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
mkdir -p $OUT/pack; R=/tmp/run3s1; mkdir -p $R
X=(--haystack chain --num-noise 256 --lm-weight 1.0 --seed 1)
PYTHON=python3 bash experiments/retrieval/run_all.sh $R --only dense,msa_converted --pack $OUT/pack \
  --call-budget 575 -- "${X[@]}" --warmup-wide-steps 150 --warmup-wide-topk 64 > $OUT/laneA.log 2>&1 &
PYTHON=python3 bash experiments/retrieval/run_all.sh $R --only msa_native --pack $OUT/pack \
  --call-budget 575 -- "${X[@]}" > $OUT/laneB.log 2>&1 &
wait
grep -E "val acc|recall @|ctx|done|limit" $OUT/laneA.log | tail -25
grep -E "step +(1000|2000|3000|4000) |recall @|ctx|done|limit" $OUT/laneB.log | tail -20
