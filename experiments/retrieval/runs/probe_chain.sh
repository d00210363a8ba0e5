# Committed results: experiments/retrieval/results/h100_run3_chain/probes/
# Probes of the "chain" haystack (task.py) on one GPU, several runs side by side: does a
# dense model learn the task (answers, and the in-context chain through the filler's
# next-token loss), and what attention-mass recall does the converted index warmup reach
# on it? Each probe = a dense run, then a converted index warmup (--steps 0: no sparse
# fine-tuning) whose recall is logged ("after warmup").
#
#   OUT=... bash experiments/retrieval/runs/probe_chain.sh short   # 4 dense runs, 1000 steps to 4K
#   OUT=... bash experiments/retrieval/runs/probe_chain.sh long    # the full schedule (to 16K),
#                                                             # chain vs i.i.d. filler
# Results: $OUT/probe_<mode>.tgz (logs, log.json), and with "long" $OUT/<probe>_dense.pt.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
MODE=${1:-short}
mkdir -p "$OUT" /tmp/probe
T=(--num-keys 128 --num-values 64 --num-pairs 6 --num-queries 6 --tokens-per-step 65536
   --log-every 50 --val-every 250 --val-seqs 64 --curriculum-gate 0.9 --lr 1.5e-3)
if [[ $MODE == short ]]; then
  T+=(--train-len 4096 --curriculum 256,512,1024,2048 --curriculum-steps 500)
  STEPS=1000; DLIM=200; WARM=(--warmup-steps 300); CLIM=100
else
  T+=(--train-len 16384 --curriculum 256,512,1024,2048,4096,8192 --curriculum-steps 1250)
  STEPS=2500; DLIM=330; WARM=(--warmup-steps 300 --warmup-wide-steps 100 --warmup-wide-topk 64); CLIM=150
fi
probe() {  # name haystack noise lm_weight
  local d=/tmp/probe/$1
  python3 -m experiments.retrieval.train --variant dense --out $d/dense "${T[@]}" --haystack $2 \
    --num-noise $3 --lm-weight $4 --steps $STEPS --time-limit $DLIM > $d.dense.log 2>&1
  python3 -m experiments.retrieval.train --variant msa_converted --init $d/dense --out $d/conv \
    "${T[@]}" --haystack $2 --num-noise $3 --lm-weight $4 --steps 0 "${WARM[@]}" --warmup-len 4096 \
    --index-lr 3e-3 --recall-every 100 --time-limit $CLIM > $d.conv.log 2>&1
  mv $d.dense.log $d.conv.log $d/
}
if [[ $MODE == short ]]; then
  probe n256_lm1 chain 256 1.0 & probe n64_lm1 chain 64 1.0 & probe n1024_lm1 chain 1024 1.0 &
  probe n256_lm03 chain 256 0.3 &
else
  probe chain_n256 chain 256 1.0 & probe chain_n1024 chain 1024 1.0 & probe iid_n64 noise 64 0 &
  probe iid_n256 noise 256 0 &
fi
wait
for d in /tmp/probe/*/; do
  echo "== $d"; grep -E "step +(500|1000|1500|2000|2500) |val acc" $d/*.dense.log | tail -6
  grep -E "recall|val" $d/*.conv.log
done
rm -f /tmp/probe/*/conv/model.pt
if [[ $MODE == long ]]; then  # the dense checkpoints, one file each (< 16 MiB)
  for d in /tmp/probe/*/; do n=$(basename $d); mv $d/dense/model.pt "$OUT/${n}_dense.pt"; done
fi
tar czf "$OUT/probe_$MODE.tgz" -C /tmp/probe .
