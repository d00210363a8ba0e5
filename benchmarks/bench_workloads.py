"""The official serving workloads (benchmarks/workloads/, a copy of shared/workloads/) on a
GPU: the decode suite and the prefill selection (code and protocol: openmsa/bench/workloads.py).

    python benchmarks/bench_workloads.py --suite decode --out benchmarks/results/h100/workloads
    python benchmarks/bench_workloads.py --suite prefill --out benchmarks/results/h100/workloads
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from openmsa.bench.workloads import main  # noqa: E402

if __name__ == "__main__":
    main()
