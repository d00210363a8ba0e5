# Committed results: experiments/retrieval/results/h100/probe/
# Why did msa_native stall at ~19% (one value of the six, no key binding) where dense learned
# the binding by step 250? (1) sparse attention at these shapes with every block selected
# must equal dense attention on the GPU in bf16; (2) short runs (the curriculum's first 500
# steps at 256 / 512 tokens, where MSA's sparse mode is dense attention) for several seeds,
# dense and msa_native side by side.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
mkdir -p "$OUT"
python3 benchmarks/check_small_heads.py 2>&1 | grep -v Warn | tee "$OUT/check_small_heads.txt"
python3 benchmarks/check_small_heads.py --dtype float32 2>&1 | grep -v Warn | tee -a "$OUT/check_small_heads.txt"
T=(--num-keys 128 --num-values 64 --num-noise 64 --num-pairs 6 --num-queries 6 --train-len 1024
   --tokens-per-step 65536 --log-every 50 --val-every 250 --val-seqs 64 --curriculum 256,512
   --curriculum-steps 500 --steps 500 --lr 1.5e-3 --time-limit 100)
for seed in 1 2; do
  python3 -m experiments.retrieval.train --variant dense --seed $seed --out /tmp/probe/dense_$seed "${T[@]}" 2>&1 \
    | grep -E "step +(100|200|250|300|400|500) " | sed "s/^/dense seed $seed /" | tee -a "$OUT/probe.txt"
done
for ws in 0; do for seed in 0 1 2; do
  python3 -m experiments.retrieval.train --variant msa_native --seed $seed --warmup-steps $ws --warmup-len 1024 \
    --kl-weight 0.1 --out /tmp/probe/native_${seed}_$ws "${T[@]}" 2>&1 \
    | grep -E "step +(100|200|250|300|400|500) " | sed "s/^/native seed $seed warmup $ws /" | tee -a "$OUT/probe.txt"
done; done
