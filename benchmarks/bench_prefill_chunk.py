"""Chunked prefill per layer on a GPU: openmsa's paged prefill against dense attention over
the same tokens (the code and its description: openmsa/bench/serving.py).

    python benchmarks/bench_prefill_chunk.py --out benchmarks/results/h100/prefill_chunk
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from openmsa.bench.serving import prefill_main  # noqa: E402

if __name__ == "__main__":
    prefill_main()
