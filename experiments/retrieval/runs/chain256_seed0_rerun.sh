# Committed results: experiments/retrieval/results/h100_run3_chain_rerun/
# run 3, seed 0 again (same recipe as chain256_seed0.sh), checkpoints packed: msa_converted from the same dense checkpoint, msa_native
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
mkdir -p $OUT/pack; R=/tmp/run3r; mkdir -p $R; cp -r out/carry/run3/dense $R/
X=(--haystack chain --num-noise 256 --lm-weight 1.0)
PYTHON=python3 bash experiments/retrieval/run_all.sh $R --only msa_converted --pack $OUT/pack --pack-ckpt \
  --call-budget 560 -- "${X[@]}" --warmup-wide-steps 150 --warmup-wide-topk 64 > $OUT/laneA.log 2>&1 &
PYTHON=python3 bash experiments/retrieval/run_all.sh $R --only msa_native --pack $OUT/pack --pack-ckpt \
  --call-budget 560 -- "${X[@]}" > $OUT/laneB.log 2>&1 &
wait
grep -E "ctx|done|limit" $OUT/laneA.log $OUT/laneB.log | tail -12
