# Committed results: experiments/retrieval/results/h100_run3_chain/converted_recipes/index_width/
# run 3, index width on the chain filler: converted index warmups (400 dense-mode steps at 4K + 150 wide-K at 16K,
# no sparse fine-tuning) from the seed-0 dense checkpoint, index Di 64 / 128, random init; side by side
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
R=/tmp/run3w; mkdir -p $R $OUT; cp -r out/carry/run3/dense $R/
A=(--num-keys 128 --num-values 64 --num-pairs 6 --num-queries 6 --haystack chain --num-noise 256 --lm-weight 1.0
   --train-len 16384 --tokens-per-step 65536 --log-every 50 --val-every 250 --val-seqs 64 --steps 0
   --warmup-steps 400 --warmup-len 4096 --warmup-wide-steps 150 --warmup-wide-topk 64 --index-lr 3e-3
   --recall-every 100 --recall-seqs 2 --index-init random --time-limit 200)
for di in 64 128; do
  python3 -m experiments.retrieval.train --variant msa_converted --init $R/dense --out $R/di$di --index-head-dim $di \
    "${A[@]}" --no-save > $OUT/di$di.log 2>&1 &
done
wait
for di in 64 128; do cp $R/di$di/log.json $OUT/di${di}_log.json; echo "== Di $di"; grep -E "recall @|limit|done" $OUT/di$di.log; done
