#!/usr/bin/env bash
# One device call: GPU tests of the attention and KL kernels, launch sweeps at 128K
# against the previous commit's kernels (baseline_head/, made with
#   git archive HEAD openmsa benchmarks/sweep_kl.py benchmarks/sweep_attention.py | tar -x -C baseline_head
# when present; knobs are entry.field=values of openmsa.ops.utils.configs, which the
# baseline tree must understand), and a per-kernel profile. Logs under $OUT (or ./out).
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
N=${N:-131072}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 python3 -m pytest -q -m gpu ${TESTS:-tests/ops} -x 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
run() { local name=$1; shift; echo "== $name"; timeout ${STEP_TIMEOUT:-150} "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | grep -E "ms|Error|error" ; }
run kl_teacher python3 benchmarks/sweep_kl.py --contexts $N --knobs "${KL_TEACHER_KNOBS:-kl_teacher.tile_rows=64,128;kl_teacher.num_stages=2,3}"
run kl_student python3 benchmarks/sweep_kl.py --contexts $N --knobs "${KL_STUDENT_KNOBS:-kl_student.rows=32,64;kl_student.num_warps=4,8}"
run bwd python3 benchmarks/sweep_attention.py --bwd --contexts $N --knobs "${BWD_KNOBS:-attention_bwd.launch=interleaved,separate;attention_bwd.num_stages=1,2}"
[ -n "${FWD_KNOBS:-}" ] && run fwd python3 benchmarks/sweep_attention.py --contexts $N --knobs "$FWD_KNOBS"
if [ -d baseline_head ] && [ "${SKIP_BASELINE:-0}" != 1 ]; then
  (cd baseline_head && run kl_baseline python3 benchmarks/sweep_kl.py --contexts $N --knobs "kl_teacher.num_warps=4")
  (cd baseline_head && run bwd_baseline python3 benchmarks/sweep_attention.py --bwd --contexts $N --knobs "attention_bwd.num_stages=1")
fi
run profile python3 benchmarks/profile_ops.py --context $N --ops ${PROFILE_OPS:-fwd,bwd,kl}
