# Session 2, run 3: GPU tests after the Triton schedule-key kernel, longer segments, profile.
export SKIP_BASELINE=1 PROFILE_OPS=fwd,bwd,indexer,kl
export KL_TEACHER_KNOBS="OPENMSA_KL_SEGMENT_TILES=64,128"
export KL_STUDENT_KNOBS="OPENMSA_KL_STUDENT_ROWS=32"
export BWD_KNOBS="OPENMSA_BWD_SEGMENT_TILES=64,128"
export FWD_KNOBS="OPENMSA_FWD_SEGMENT_TILES=16,64"
bash benchmarks/gpu_sweeps.sh
