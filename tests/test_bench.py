"""The cost model of spec section 9 and the CPU path of `openmsa bench`."""

import json

import pytest

from openmsa.bench import cli
from openmsa.bench.cost_model import MSAConfig, flops_per_token, selected_tokens


@pytest.mark.parametrize("n,ratio", [(32768, 6.4), (131072, 16.0), (524288, 25.6), (1048576, 28.44)])
def test_cost_model_ratios_of_the_spec(n, ratio):
    f = flops_per_token(n, MSAConfig())
    assert f["ratio"] == pytest.approx(32 * n / (n + 131072))
    assert f["ratio"] == pytest.approx(ratio, rel=1e-3)


@pytest.mark.parametrize("n,b,k", [(1, 4, 2), (5, 4, 2), (8, 4, 2), (9, 4, 2), (100, 16, 3), (2049, 128, 16)])
def test_selected_tokens_counts_visible_pairs(n, b, k):
    brute = sum(p + 1 if p // b < k else (k - 1) * b + p % b + 1 for p in range(n))
    assert selected_tokens(n, b, k) == brute


def test_bench_cli_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--device", "cpu", "--seqlen", "96", "--heads", "2", "--kv-heads", "1",
                     "--runs", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Cost model" in text and "| 1M |" in text and "sparse_attention fwd" in text
    data = json.loads(out.read_text())
    assert data["seqlen"] == 96 and len(data["timings"]) == 5
    assert all(t["median_ms"] > 0 for t in data["timings"])


def test_bench_serving_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--serving", "--device", "cpu"])
    assert "--serving needs a CUDA device" in capsys.readouterr().err


def test_decode_suite_lengths_follow_the_published_rule():
    """Every case of the official decode suite: batch_size lengths with the exact nominal
    mean, within the published min/max, fitting max_pages_upper_bound pages."""
    import os

    from openmsa.bench.workloads import WORKLOADS, decode_lengths

    suite = json.load(open(os.path.join(WORKLOADS, "decode_suite.json")))
    for case in suite["cases_full"] + suite["cases_low_latency"]:
        lens = decode_lengths(case)
        assert len(lens) == case["batch_size"]
        assert sum(lens) == case["batch_size"] * case["nominal_seq_len"]
        assert case["per_request_len_min_possible"] <= min(lens)
        assert max(lens) <= case["per_request_len_max_possible"]
        assert -(-max(lens) // 128) <= case["max_pages_upper_bound"]
        assert min(lens) >= case["q_len_per_req"]
