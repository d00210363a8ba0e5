"""The cost model of docs/spec.md section 9 and the CPU path of `openmsa bench`."""

import json

import pytest
import torch

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


def test_workload_table_writers(tmp_path, monkeypatch):
    """The decode-suite and prefill-selection writers: JSON + markdown, rows and errors."""
    import json
    import types

    from openmsa.bench import workloads
    monkeypatch.setattr(workloads.torch.cuda, "get_device_name", lambda *a: "FakeGPU")
    args = types.SimpleNamespace(out=str(tmp_path), heads=[64, 4])
    rows = [dict(suite="full", name="a", weight=2, lens_min=1, lens_max=9, slots=4, median_us=10.0, cv=0.01),
            dict(suite="full", name="b", weight=1, lens_min=1, lens_max=9, slots=4, median_us=40.0, cv=0.02),
            dict(suite="full", name="c", weight=1, error="OOM")]
    assert workloads._save_decode_suite(args, rows) == 20.0
    d = json.loads((tmp_path / "decode_suite.json").read_text())
    assert d["device"] == "FakeGPU" and d["weighted_mean_us_full"] == 20.0 and len(d["rows"]) == 3
    md = (tmp_path / "decode_suite.md").read_text()
    assert "Weighted mean over cases_full: 20.0 us" in md and "| full | c | 1 | - | - | OOM | - |" in md
    rows = [dict(case_id=1, batch_size=2, total_q=8, max_final_kv=64, median_ms=1.0, cv=0.0,
                 useful_tflops=5.0, representative_weight=3),
            dict(case_id=2, error="OOM")]
    workloads._save_prefill_selection(args, rows)
    p = json.loads((tmp_path / "prefill_selection.json").read_text())
    assert p["weighted_mean_ms_representative"] == 1.0 and len(p["rows"]) == 2
    md = (tmp_path / "prefill_selection.md").read_text()
    assert "1 of 2 cases ran" in md and "| 2 | - | - | - | OOM | - | - |" in md


def test_bench_m3_smoke_on_cpu(tmp_path, monkeypatch):
    """benchmarks/bench_m3.py end to end on tiny shapes (--tiny): both paths run, agree, and
    the JSON / markdown are written."""
    import importlib.util
    import pathlib
    import sys

    pytest.importorskip("transformers.models.minimax_m3_vl")
    path = pathlib.Path(__file__).parents[2] / "benchmarks" / "bench_m3.py"
    spec = importlib.util.spec_from_file_location("bench_m3", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(sys, "argv", ["bench_m3.py", "--tiny", "--out", str(tmp_path), "--prefill", "64",
                                      "--decode", "80", "--check", "48", "--runs", "1", "--warmup", "0"])
    bench.main()
    data = json.loads((tmp_path / "m3.json").read_text())
    assert data["meta"]["logits_rel_error"] < 1e-5
    assert {(r["phase"], r["path"]) for r in data["results"]} == {
        ("prefill", "openmsa"), ("prefill", "hf"), ("decode", "openmsa"), ("decode", "hf")}
    assert "| decode | 80 |" in (tmp_path / "m3.md").read_text()


@pytest.mark.parametrize("selection", ["uniform", "skewed"])
def test_benchmark_selections_are_valid(selection):
    """The benchmarks' synthetic Top-k lists follow the layout of the ops (min(K-1, l)
    distinct earlier blocks, the local block, -1 padding); the skewed one keeps the sink
    and the two nearest blocks in every row that has them and shares its content blocks
    between neighbouring queries far more than the uniform one."""
    from openmsa.bench.cost_model import MSAConfig
    from openmsa.bench.gpu import random_topk

    cfg = MSAConfig(num_heads=8, num_kv_heads=2, head_dim=16, index_head_dim=16, block_size=16, topk=6)
    n = 1000
    idx = random_topk(n, cfg, torch.Generator().manual_seed(0), "cpu", selection).long()
    local = torch.arange(n) // 16
    nsel = local.clamp(max=5)
    slot = torch.arange(6)
    earlier = idx.masked_fill(slot >= nsel[:, None], -1)
    assert ((earlier < local[:, None]) | (earlier == -1)).all()
    assert (earlier.sort(-1).values.diff(dim=-1)[(earlier.sort(-1).values[..., 1:] >= 0)] > 0).all()
    assert torch.equal(idx.gather(-1, nsel.expand(2, n)[..., None])[..., 0], local.expand(2, n))
    assert (idx.masked_select((slot > nsel[:, None]).expand_as(idx)) == -1).all()
    has = lambda c: (idx == c[..., None]).any(-1)  # noqa: E731
    if selection == "skewed":
        rows = local >= 3
        assert has(torch.zeros(2, n, dtype=torch.long))[:, rows].all()
        for back in (1, 2):
            assert has((local - back).expand(2, n))[:, rows].all()
    # neighbours' overlap: blocks of row t also selected by row t + 1 (rows with l >= 8)
    both = (earlier[:, :-1, :, None] == earlier[:, 1:, None, :]) & (earlier[:, :-1, :, None] >= 0)
    overlap = both.any(-1).sum(-1).float()[:, local[:-1] >= 8].mean()
    assert overlap > (4.0 if selection == "skewed" else 0.0)  # the sink and nearest: 3
    if selection == "uniform":
        assert overlap < 3.0
