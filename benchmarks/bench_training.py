"""The GPU benchmark behind README's table (same as `openmsa bench` on a GPU):

    python benchmarks/bench_training.py --contexts 8192 32768 131072 524288 1048576 --pack \
        --max-flex 1048576 --max-dense 1048576 --out benchmarks/results/h100
    python benchmarks/summarize.py benchmarks/results/h100
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from openmsa.bench.training import main  # noqa: E402

if __name__ == "__main__":
    main()
