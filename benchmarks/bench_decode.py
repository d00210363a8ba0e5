"""Decode latency per layer on a GPU: openmsa's paged MSA decode against dense decode over
the same cache, a request's query tokens folded into the query heads (one pass over the
cache, as FlashInfer / FA3 pack GQA; the code and its description: openmsa/bench/serving.py).

    python benchmarks/bench_decode.py --out benchmarks/results/h100/decode
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from openmsa.bench.serving import decode_main  # noqa: E402

if __name__ == "__main__":
    decode_main()
