"""CPU smoke test of the retrieval experiment (experiments/retrieval): the task's invariants,
the attention variants against brute force, the dense -> MSA conversion, the recall
metric on hand-checkable cases, and every variant end to end at toy sizes (train ->
evaluate -> plot, in process, then the run_all.sh driver in --smoke mode)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
EXP = ROOT / "experiments" / "retrieval"
from experiments.retrieval import evaluation
from experiments.retrieval.analysis import fp8_index
from experiments.retrieval import model as M
from experiments.retrieval import plot
from experiments.retrieval import task as T
from experiments.retrieval import train
from helpers import rel


TINY_TASK = T.TaskConfig(num_keys=32, num_values=16, num_noise=16, num_pairs=8, num_queries=4)


def tiny_model(attn="dense", **kw):
    kw = dict(dict(hidden=32, layers=2, heads=4, kv_heads=2, head_dim=16, mlp_hidden=32,
                   rotary_dim=8, index_head_dim=16, block_size=8, topk=2), **kw)
    return M.ModelConfig(vocab_size=TINY_TASK.vocab_size, attn=attn, **kw)


# --- task -------------------------------------------------------------------------------

def test_task_layout_and_answers():
    cfg, length = TINY_TASK, 96
    b = T.make_batch(cfg, 5, length, torch.Generator().manual_seed(3))
    tok, lab, ans, pp = b["tokens"], b["labels"], b["answer_pos"], b["pair_pos"]
    assert tok.shape == lab.shape == (5, length)
    sep = 1 + cfg.haystack_len(length)
    assert (tok[:, 0] == T.BOS).all() and (tok[:, sep] == T.SEP).all()
    is_key = (tok >= cfg.key_start) & (tok < cfg.value_start)
    is_val = (tok >= cfg.value_start) & (tok < cfg.noise_start)
    for i in range(5):
        hay = tok[i, 1:sep]
        kpos = torch.nonzero((hay >= cfg.key_start) & (hay < cfg.value_start)).flatten() + 1
        assert len(kpos) == cfg.num_pairs and len(set(tok[i, kpos].tolist())) == cfg.num_pairs
        assert is_val[i, kpos + 1].all()  # every key is followed by its value: pairs never overlap
        assert is_val[i, 1:sep].sum() == cfg.num_pairs
        # labels: exactly the answers, each the value stored after the queried key
        assert (lab[i] != T.IGNORE).sum() == cfg.num_queries
        for q, p in zip(ans[i].tolist(), pp[i].tolist()):
            assert is_key[i, q] and tok[i, q] == tok[i, p]
            assert lab[i, q] == tok[i, p + 1] == tok[i, q + 1]
        assert len(set(tok[i, ans[i]].tolist())) == cfg.num_queries  # distinct queries
    # deterministic from the seed; a different seed differs
    again = T.make_batch(cfg, 5, length, torch.Generator().manual_seed(3))
    assert all(torch.equal(b[k], again[k]) for k in b)
    other = T.make_batch(cfg, 5, length, torch.Generator().manual_seed(4))
    assert not torch.equal(b["tokens"], other["tokens"])
    # the eval set does not depend on how it is batched
    full = T.eval_set(cfg, length, 6, seed=1)
    parts = list(T.split_batches(full, 4, "cpu"))
    assert [p["tokens"].shape[0] for p in parts] == [4, 2]
    assert torch.equal(torch.cat([p["tokens"] for p in parts]), T.eval_set(cfg, length, 6, seed=1)["tokens"])
    with pytest.raises(ValueError):
        T.make_batch(cfg, 1, cfg.min_length() - 1, torch.Generator())


def test_pairs_spread_over_the_whole_haystack():
    """A window at the end must not see most pairs: positions are uniform over the haystack."""
    cfg, length = T.TaskConfig(num_pairs=16, num_queries=16, num_keys=64), 2048
    pp = T.make_batch(cfg, 64, length, torch.Generator().manual_seed(0))["pair_pos"].float()
    frac_last_eighth = (pp > length * 7 / 8).float().mean().item()
    assert 0.05 < frac_last_eighth < 0.2
    assert pp.min() < length / 8


def test_chain_walk_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    batch, length, n = 3, 300, 11
    succ = torch.stack([torch.randperm(n, generator=g) for _ in range(batch)])
    jump = torch.rand(batch, length, generator=g) < 0.15
    start = torch.randint(0, n, (batch, length), generator=g)
    ref = torch.empty(batch, length, dtype=torch.long)
    for b in range(batch):
        for t in range(length):
            ref[b, t] = start[b, t] if t == 0 or jump[b, t] else succ[b, ref[b, t - 1]]
    assert torch.equal(T.chain_walk(succ, jump, start), ref)
    # runs longer than any power of two below the length: no jumps at all
    none = torch.zeros_like(jump)
    x = T.chain_walk(succ, none, start)
    assert torch.equal(x[:, 1:], succ.gather(1, x[:, :-1]))


def test_markov_chain_is_one_cycle_with_the_given_jump_rate():
    n = 32
    x = T.markov_chain(4, 4000, n, 1.0, torch.Generator().manual_seed(1))
    # no jumps: the walk visits every state once per n steps (one cycle through all states)
    assert all(len(set(row[:n].tolist())) == n for row in x)
    assert torch.equal(x[:, n:], x[:, :-n])
    x = T.markov_chain(4, 4000, n, 0.8, torch.Generator().manual_seed(2))
    # the successor of a sequence: the most frequent next state of each state
    hits = 0
    for row in x:
        pairs = torch.stack([row[:-1], row[1:]], 1)
        succ = torch.tensor([torch.bincount(pairs[pairs[:, 0] == s, 1], minlength=n).argmax()
                             for s in range(n)])
        hits += (row[1:] == succ[row[:-1]]).sum().item()
    frac = hits / (4 * 3999)
    assert abs(frac - (0.8 + 0.2 / n)) < 0.02  # chain steps, plus the jumps that land on succ


def test_chain_haystack_labels_every_filler_transition():
    cfg = T.TaskConfig(num_keys=32, num_values=16, num_noise=16, num_pairs=8, num_queries=4,
                       haystack="chain", chain_prob=0.9)
    length = 200
    b = T.make_batch(cfg, 3, length, torch.Generator().manual_seed(3))
    tok, lm = b["tokens"], b["lm_labels"]
    noise = tok >= cfg.noise_start
    sep = 1 + cfg.haystack_len(length)
    for i in range(3):
        for t in range(length - 1):
            want = tok[i, t + 1].item() if noise[i, t] and noise[i, t + 1] else T.IGNORE
            assert lm[i, t].item() == want
        assert (lm[i, sep - 1:] == T.IGNORE).all()  # nothing across SEP or in the queries
    # the answers and pairs are laid out as with the noise haystack (same checks, fewer)
    for i in range(3):
        for q, p in zip(b["answer_pos"][i].tolist(), b["pair_pos"][i].tolist()):
            assert tok[i, q] == tok[i, p] and b["labels"][i, q] == tok[i, p + 1]
    assert "lm_labels" not in T.make_batch(TINY_TASK, 1, 96, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="haystack"):
        T.TaskConfig(haystack="words")
    with pytest.raises(ValueError, match="chain_prob"):
        T.TaskConfig(haystack="chain", chain_prob=1.5)


def test_chain_occurrences_fixes_the_states_per_sequence():
    """chain_occurrences: each sequence walks a random subset of ~haystack / occurrences
    noise tokens (its own subset), still a chain over that subset."""
    cfg = T.TaskConfig(num_keys=32, num_values=16, num_noise=512, num_pairs=4, num_queries=2,
                       haystack="chain", chain_prob=1.0, chain_occurrences=8)
    for length, want in ((200, round(cfg.haystack_len(200) / 8)), (8000, 512), (40, 4)):
        assert cfg.chain_states(length) == max(2, min(512, want))
    length = 1000
    states = cfg.chain_states(length)
    b = T.make_batch(cfg, 4, length, torch.Generator().manual_seed(5))
    tok, lm = b["tokens"], b["lm_labels"]
    used = []
    for i in range(4):
        filler = tok[i][tok[i] >= cfg.noise_start]
        distinct = filler.unique()
        # a chain_prob 1 walk visits its states in cycle order: all of them, in ~length steps
        assert len(distinct) == states
        used.append(set(distinct.tolist()))
        # every transition with both ends in the filler follows one fixed successor
        valid = lm[i] != T.IGNORE
        succ = {}
        for a, nxt in zip(tok[i][valid].tolist(), lm[i][valid].tolist()):
            assert succ.setdefault(a, nxt) == nxt
    assert len(set.union(*used)) > states  # the subsets differ between sequences
    assert T.TaskConfig(haystack="chain", num_noise=64).chain_states(10 ** 6) == 64
    with pytest.raises(ValueError, match="chain_occurrences"):
        T.TaskConfig(haystack="chain", chain_occurrences=-1)


def test_task_loss_adds_the_filler_cross_entropy():
    cfg = T.TaskConfig(num_keys=32, num_values=16, num_noise=16, num_pairs=8, num_queries=4,
                       haystack="chain")
    torch.manual_seed(0)
    model = M.Decoder(M.ModelConfig(**{**tiny_model().to_dict(), "vocab_size": cfg.vocab_size}))
    batch = T.make_batch(cfg, 2, 96, torch.Generator().manual_seed(1))
    plain = train.answer_loss(model, batch)
    obj, ans, correct, count, lm = train.task_loss(model, batch, 0.0)
    assert lm is None and torch.allclose(obj, plain[0]) and count == plain[2]
    obj, ans, correct, count, (lm_loss, lm_correct, lm_count) = train.task_loss(model, batch, 0.5)
    logits = model(batch["tokens"])
    valid = batch["lm_labels"] != T.IGNORE
    ref = F.cross_entropy(logits[valid], batch["lm_labels"][valid])
    torch.testing.assert_close(ans, plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm_loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(obj, plain[0] + 0.5 * ref, rtol=1e-5, atol=1e-6)
    assert lm_count.item() == valid.sum().item()
    assert lm_correct.item() == (logits[valid].argmax(-1) == batch["lm_labels"][valid]).sum().item()
    assert correct.item() == plain[1].item()


# --- model ------------------------------------------------------------------------------

@pytest.mark.parametrize("n, w", [(37, 8), (32, 8), (8, 8), (5, 8), (50, 16)])
def test_sliding_window_matches_brute_force(n, w):
    q, k, v = torch.randn(3, 2, 3, n, 8).unbind(0)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - w))
    torch.testing.assert_close(M.sliding_window_attention(q, k, v, w), ref, atol=1e-5, rtol=1e-5)


def test_conversion_preserves_the_dense_function():
    torch.manual_seed(0)
    dense = M.Decoder(tiny_model())
    tok = torch.randint(0, TINY_TASK.vocab_size, (2, 40))
    ref = dense(tok)
    msa = M.convert_dense_to_msa(dense, tiny_model("msa"), index_init="copy")
    M.set_msa_mode(msa, "dense")  # warmup mode: full attention -> same function
    torch.testing.assert_close(msa(tok), ref, atol=1e-5, rtol=1e-5)
    assert M.kl_loss(msa) is not None and M.kl_loss(msa).item() >= 0
    # only the index projections are new; "copy" starts them from the group-mean q / mean k
    names = {n for n, _ in msa.named_parameters()} - {n for n, _ in dense.named_parameters()}
    assert names and all(".qi_proj." in n or ".ki_proj." in n for n in names)
    lay = M.msa_layers(msa)[0]
    torch.testing.assert_close(lay.ki_proj.weight, lay.k_proj.weight.view(2, 16, -1).mean(0))
    assert set(map(id, M.index_parameters(msa))) == {id(p) for n, p in msa.named_parameters() if n in names}
    # sparse mode differs (it attends to K blocks only) but runs
    M.set_msa_mode(msa, "sparse")
    assert msa(tok).shape == ref.shape
    # a window at least as long as the sequence is dense attention
    win = M.Decoder(tiny_model("window", window=40))
    win.load_state_dict(dense.state_dict())
    torch.testing.assert_close(win(tok), ref, atol=1e-5, rtol=1e-5)
    # logits at chosen positions only
    pos = torch.tensor([[3, 7], [0, 39]])
    torch.testing.assert_close(dense(tok, positions=pos), ref.gather(1, pos[..., None].expand(-1, -1, ref.shape[-1])))


def test_copy_init_into_a_wider_index_head_scores_as_the_plain_copy():
    # Di = 2D: the first D channels hold the copy (query scaled for the Di^-0.5 scale), the
    # spare query rows are zero, so the dense-mode KL and the sparse selection are those of
    # Di = D; the spare key rows are left random, for the warmup to use.
    torch.manual_seed(1)
    dense = M.Decoder(tiny_model())
    with torch.no_grad():  # peaked attention, so that a wrong index scale shows in the KL
        for m in dense.modules():
            if isinstance(m, M.GQAAttention):
                m.q_proj.weight.mul_(4), m.k_proj.weight.mul_(4)
    tok = torch.randint(0, TINY_TASK.vocab_size, (2, 40))
    narrow = M.convert_dense_to_msa(dense, tiny_model("msa"), index_init="copy")
    wide = M.convert_dense_to_msa(dense, tiny_model("msa", index_head_dim=32), index_init="copy")
    for mode in ("dense", "sparse"):
        M.set_msa_mode(narrow, mode), M.set_msa_mode(wide, mode)
        torch.testing.assert_close(wide(tok), narrow(tok), atol=1e-5, rtol=1e-5)
        assert M.kl_loss(narrow) > 1e-3
        torch.testing.assert_close(M.kl_loss(wide), M.kl_loss(narrow), atol=0, rtol=1e-4)
    lay = M.msa_layers(wide)[0]
    assert lay.qi_proj.weight.view(2, 32, -1)[:, 16:].abs().max() == 0
    assert lay.ki_proj.weight[16:].abs().min() > 0
    with pytest.raises(ValueError, match="index_head_dim >= head_dim"):
        M.convert_dense_to_msa(dense, tiny_model("msa", index_head_dim=8), index_init="copy")


# --- recall metric -------------------------------------------------------------------------

def _group_probs(q, k, grp, t):
    """The group-mean attention of query row t over keys 0..t (float64), by a loop over heads."""
    g, d = q.shape[1] // k.shape[1], q.shape[2]
    return sum(torch.softmax((k[: t + 1, grp].double() @ q[t, h].double()) * d ** -0.5, 0)
               for h in range(grp * g, (grp + 1) * g)) / g


def brute_force_recall(q, k, idx, bs):
    """Per (g, t) loops: the definitions of evaluation.py's docstring."""
    n = q.shape[0]
    hkv, _, kk = idx.shape
    rec, mrec = [], []
    for grp in range(hkv):
        for t in range(n):
            if t // bs + 1 <= kk:
                continue
            p = _group_probs(q, k, grp, t)
            mass = torch.zeros(t // bs + 1, dtype=torch.float64).index_add_(0, torch.arange(t + 1) // bs, p)
            top = set(mass.topk(kk).indices.tolist())
            sel = {c for c in idx[grp, t].tolist() if c >= 0}
            rec.append(len(sel & top) / kk)
            mrec.append(float(sum(mass[c] for c in sel) / sum(mass[c] for c in top)))
    return sum(rec) / len(rec), sum(mrec) / len(mrec)


def test_recall_matches_brute_force():
    torch.manual_seed(1)
    n, hq, hkv, d, bs, kk = 40, 4, 2, 8, 4, 3
    q, k = torch.randn(n, hq, d), torch.randn(n, hkv, d)
    qi, ki = torch.randn(n, hkv, d), torch.randn(n, 1, d)
    idx, _ = __import__("openmsa").indexer_topk(qi[None], ki[None], block_size=bs, topk=kk)
    idx = idx[:, 0]
    st = evaluation.block_recall_stats(q, k, idx, bs, max_bytes=4096)  # several row chunks
    br, mr = brute_force_recall(q, k, idx, bs)
    assert st["block_recall"] == pytest.approx(br, abs=1e-5)
    assert st["mass_recall"] == pytest.approx(mr, abs=1e-5)
    rows = evaluation.block_recall_stats(q, k, idx, bs, max_bytes=4096, per_row=True)["rows"]
    assert rows["mass_recall"].shape == (hkv, n)
    assert torch.isnan(rows["mass_recall"][:, : kk * bs]).all()  # rows with <= K blocks
    assert rows["mass_recall"].nanmean().item() == pytest.approx(mr, abs=1e-5)
    # selecting the true top-K blocks gives recall 1
    oracle = torch.full_like(idx, -1)
    for grp in range(hkv):
        for t in range(n):
            p = sum(torch.softmax((k[: t + 1, grp] @ q[t, h]) * d ** -0.5, 0) for h in range(grp * 2, grp * 2 + 2))
            mass = torch.zeros(t // bs + 1).index_add_(0, torch.arange(t + 1) // bs, p)
            top = mass.topk(min(kk, t // bs + 1)).indices
            oracle[grp, t, : len(top)] = top
    st = evaluation.block_recall_stats(q, k, oracle, bs, answer_rows=torch.tensor([30, 39]),
                                       value_pos=torch.tensor([5, 21]))
    assert st["block_recall"] == pytest.approx(1.0) and st["mass_recall"] == pytest.approx(1.0)
    assert 0 <= st["pair_hit"] <= 1 and st["answer_mass_recall"] == pytest.approx(1.0)
    # pair hit: row 30 holds block 1 (value 5) in group 0 only; row 39 holds block 5 (value
    # 21) in no group: 1/4 per (group, answer), 1/2 per answer in any group
    sel = torch.full_like(idx, -1)
    sel[0, 30, 0] = 1
    sel[1, 30, 0] = 2
    sel[:, 39, 0] = 3
    st = evaluation.block_recall_stats(q, k, sel, bs, answer_rows=torch.tensor([30, 39]),
                                       value_pos=torch.tensor([5, 21]))
    assert st["pair_hit"] == pytest.approx(0.25) and st["pair_hit_any_group"] == pytest.approx(0.5)


def _local_block_selection(q, k, bs, kk, block_score):
    """Per (g, t): the local block + the K - 1 other visible blocks ranked first by
    ``block_score(p, block_of_key, mass)``; returns the [Hkv, L, K] selection (-1 padded) and
    the mean mass recall (against the top-K blocks by mass) over the rows with > K blocks."""
    n, hkv = q.shape[0], k.shape[1]
    pick, recall = torch.full((hkv, n, kk), -1), []
    for grp in range(hkv):
        for t in range(n):
            p = _group_probs(q, k, grp, t)
            blk, loc = torch.arange(t + 1) // bs, t // bs
            mass = torch.zeros(loc + 1, dtype=torch.float64).index_add_(0, blk, p)
            score = block_score(p, blk, mass).clone()
            score[loc] = -1
            others = score.topk(min(kk - 1, loc)).indices if loc else torch.empty(0, dtype=torch.long)
            pick[grp, t, : 1 + len(others)] = torch.cat([others, torch.tensor([loc])])
            if loc + 1 > kk:  # the rows the metric counts (more than K visible blocks)
                recall.append(((mass[loc] + mass[others].sum()) / mass.topk(kk).values.sum()).item())
    return pick, sum(recall) / len(recall)


def test_local_oracle_recall_is_the_best_selection_holding_the_local_block():
    torch.manual_seed(2)
    n, hq, hkv, d, bs, kk = 48, 4, 2, 8, 4, 3
    q, k = torch.randn(n, hq, d) * 2, torch.randn(n, hkv, d)
    best, ceiling = _local_block_selection(q, k, bs, kk, lambda p, blk, mass: mass)
    st = evaluation.block_recall_stats(q, k, best, bs, max_bytes=4096)
    assert st["local_oracle_recall"] == pytest.approx(ceiling, abs=1e-5)
    assert st["mass_recall_vs_local_oracle"] == pytest.approx(1.0, abs=1e-6)
    assert st["mass_recall"] == pytest.approx(st["local_oracle_recall"], abs=1e-6)
    assert st["local_oracle_recall"] < 1  # here the local block is often not among the top K


def test_perfect_student_recall_is_block_max_selection_on_the_teacher():
    torch.manual_seed(3)
    n, hq, hkv, d, bs, kk = 44, 4, 2, 8, 4, 3
    q, k = torch.randn(n, hq, d) * 2, torch.randn(n, hkv, d)
    peak = lambda p, blk, mass: torch.full_like(mass, -1.0).scatter_reduce_(0, blk, p, "amax")  # noqa: E731
    pick, want = _local_block_selection(q, k, bs, kk, peak)
    st = evaluation.block_recall_stats(q, k, pick, bs, max_bytes=4096)
    assert st["perfect_student_recall"] == pytest.approx(want, abs=1e-5)
    assert st["mass_recall"] == pytest.approx(st["perfect_student_recall"], abs=1e-5)
    assert st["perfect_student_recall"] <= st["local_oracle_recall"] + 1e-6
    assert st["perfect_student_recall"] < st["local_oracle_recall"] - 1e-3  # not the same rule


# --- end to end -----------------------------------------------------------------------------

TOY = ["--device", "cpu", "--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
       "--head-dim", "16", "--mlp-hidden", "32", "--rotary-dim", "8", "--index-head-dim", "16",
       "--block-size", "16", "--topk", "2", "--num-keys", "32", "--num-values", "16",
       "--num-noise", "16", "--num-pairs", "8", "--num-queries", "4", "--train-len", "128",
       "--tokens-per-step", "512", "--log-every", "2", "--val-every", "3", "--val-seqs", "4",
       "--lr-warmup", "1"]


def test_every_variant_end_to_end(tmp_path):
    runs = tmp_path / "runs"
    train.main(TOY + ["--variant", "dense", "--out", str(runs / "dense"), "--steps", "3",
                      "--curriculum", "64", "--curriculum-steps", "1"])
    train.main(TOY + ["--variant", "window", "--out", str(runs / "window"), "--steps", "3"])
    train.main(TOY + ["--variant", "msa_native", "--out", str(runs / "msa_native"), "--steps", "4",
                      "--warmup-steps", "2", "--curriculum", "64", "--curriculum-steps", "1"])
    train.main(TOY + ["--variant", "msa_converted", "--out", str(runs / "msa_converted"),
                      "--init", str(runs / "dense"), "--steps", "2", "--warmup-steps", "2",
                      "--warmup-wide-steps", "1", "--warmup-wide-topk", "4", "--recall-every", "1",
                      "--recall-contexts", "128", "256"])
    for v in ("dense", "window", "msa_native", "msa_converted"):
        log = json.loads((runs / v / "log.json").read_text())
        assert log["train"] and log["val"] and (runs / v / "model.pt").exists()
        assert all(r["loss"] == r["loss"] for r in log["train"])  # no NaN
    phases = [r["phase"] for r in json.loads((runs / "msa_native" / "log.json").read_text())["train"]]
    assert phases[0] == "dense_warmup" and phases[-1] == "sparse"
    conv = json.loads((runs / "msa_converted" / "log.json").read_text())
    assert [r["phase"] for r in conv["train"]][0] == "index_warmup"
    assert conv["val"][0]["phase"] == "converted_before_warmup"
    assert [r["phase"] for r in conv["train"]][:2] == ["index_warmup", "index_warmup_wide"]
    # recall: before the warmup and after each step at the first context, every context after it
    rec = [(r["step"], r["length"]) for r in conv["recall"] if r["phase"] == "index_warmup"]
    assert rec == [(0, 128), (1, 128), (2, 128), (3, 128), (3, 256)]
    assert all(0 <= r["mass_recall"] <= 1 + 1e-6 and len(r["mass_recall_per_layer"]) == 2
               for r in conv["recall"])
    assert any(r["phase"] == "sparse" for r in conv["recall"])
    assert all(m.topk == 2 for m in M.msa_layers(M.Decoder(M.ModelConfig(**json.loads(
        (runs / "msa_converted" / "config.json").read_text())["model"]))))  # the saved K is K

    # the long warmup stage in dense mode (the KL over every visible token), on half the
    # tokens per step; and a warmup cut by --warmup-time-limit, after which the run goes on
    for name, extra in (("conv_dense_long", ["--warmup-time-limit", "0"]),
                        ("conv_cut", ["--warmup-time-limit", "1e-9"]),
                        ("conv_long_only", ["--warmup-steps", "0"])):
        train.main(TOY + ["--variant", "msa_converted", "--out", str(runs / name),
                          "--init", str(runs / "dense"), "--steps", "2", "--warmup-steps", "1",
                          "--warmup-wide-steps", "2", "--warmup-wide-topk", "0",
                          "--warmup-wide-tokens", "256", "--log-every", "1"] + extra)
    log = json.loads((runs / "conv_dense_long" / "log.json").read_text())
    wide = [r for r in log["train"] if r["phase"] == "index_warmup_wide"]
    assert len(wide) == 2 and all(r["kl"] > 0 and r["length"] == 128 for r in wide)
    assert "warmup_cut_after_steps" not in log
    log = json.loads((runs / "conv_cut" / "log.json").read_text())
    assert log["warmup_cut_after_steps"] == 1 and not log["stopped_early"]
    assert [r["phase"] for r in log["train"]] == ["index_warmup", "sparse", "sparse"]
    # the long stage alone (no short dense stage): still a warmup, then sparse training
    log = json.loads((runs / "conv_long_only" / "log.json").read_text())
    assert [r["phase"] for r in log["train"]] == ["index_warmup_wide"] * 2 + ["sparse"] * 2
    for name in ("conv_dense_long", "conv_cut", "conv_long_only"):
        shutil.rmtree(runs / name)

    evaluation.main(["--runs"] + [str(runs / v) for v in ("dense", "window", "msa_native", "msa_converted")]
                    + ["--contexts", "128", "256", "--eval-seqs", "4", "--recall-seqs", "1", "--device", "cpu",
                       "--ablate-seqs", "2"])
    ev = json.loads((runs / "msa_native" / "eval.json").read_text())
    c = ev["contexts"]["256"]
    assert 0 <= c["acc"] <= 1 and len(c["acc_by_depth"]) == evaluation.DEPTH_BINS
    assert len(c["recall"]) == 2 and 0 <= c["recall_mean"]["mass_recall"] <= 1 + 1e-6
    assert "recall" not in json.loads((runs / "dense" / "eval.json").read_text())["contexts"]["256"]
    assert len(c["ablation_acc"]) == 2 and all(0 <= x <= 1 for x in c["ablation_acc"])
    # FP8 ranking of the trained index against its own (analysis/fp8_index.py)
    fp8_index.main([str(runs / "msa_native"), "--contexts", "256", "--seqs", "1", "--device", "cpu",
                    "--out", str(tmp_path / "fp8")])
    rows = json.loads((tmp_path / "fp8" / "fp8_index.json").read_text())["contexts"]["256"]
    assert len(rows) == 2 and all(0 <= r["agreement"] <= 1 and 0 <= r["fp8_mass_recall"] <= 1 + 1e-6
                                  for r in rows)

    # the chain haystack with the filler loss: logged and evaluated
    train.main(TOY + ["--variant", "msa_native", "--out", str(runs / "chain"), "--steps", "3",
                      "--haystack", "chain", "--lm-weight", "1.0", "--warmup-steps", "1"])
    log = json.loads((runs / "chain" / "log.json").read_text())
    assert all(0 <= r["lm_acc"] <= 1 and r["lm_loss"] > 0 for r in log["train"])
    evaluation.main(["--runs", str(runs / "chain"), "--contexts", "128", "--eval-seqs", "4",
                     "--recall-seqs", "1", "--device", "cpu"])
    f = json.loads((runs / "chain" / "eval.json").read_text())["contexts"]["128"]["filler"]
    assert 0 <= f["acc"] <= 1 and f["targets"] > 0
    shutil.rmtree(runs / "chain")  # the report below wants the four variants only

    report = tmp_path / "report"
    plot.main(["--runs-dir", str(runs), "--out", str(report)])
    summary = json.loads((report / "summary.json").read_text())
    assert summary["contexts"] == [128, 256] and set(summary["accuracy"]) == set(plot.VARIANTS)
    assert set(summary["targets"]["per_context"]["128"]) >= {"window_fails", "msa_native_within_2pt"}
    assert (report / "results.md").exists() and (report / "msa_native" / "eval.json").exists()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (report / "accuracy_vs_context.png").exists() and (report / "recall.png").exists()


def _args(**kw):
    a = dict(curriculum="64,128,256", curriculum_steps=6, curriculum_gate=0.0, train_len=512,
             topk=2, block_size=64)
    a.update(kw)
    return type("A", (), a)


def test_curriculum_equal_shares_and_gate():
    c = train.Curriculum(_args())
    seen = []
    for _ in range(8):
        seen.append(c.length())
        c.step_done()
    assert seen == [64, 64, 128, 128, 256, 256, 512, 512]
    # gate 0.9 on lengths <= K * B = 128: 64 and 128 are held until a log window reaches
    # 0.9 (at most 3 shares); 256 > 128 is never held
    c = train.Curriculum(_args(curriculum_gate=0.9))
    seen = []
    for acc in [None, 0.5, None, 0.95, None, 0.1, 0.92, 0.1, None, None]:
        seen.append(c.length())
        c.step_done(acc)
    assert seen == [64, 64, 64, 64, 128, 128, 128, 256, 256, 512]
    c = train.Curriculum(_args(curriculum_gate=0.9))
    seen = []
    for _ in range(7):
        seen.append(c.length())
        c.step_done(0.2)
    assert seen == [64] * 6 + [128]  # never passed: moves on after 3 shares


def test_attention_ablation_changes_only_while_hooked():
    torch.manual_seed(0)
    model = M.Decoder(tiny_model())
    model.reset_parameters(seed=0)
    data = T.make_batch(TINY_TASK, 4, 96, torch.Generator().manual_seed(1))
    tokens, pos = data["tokens"], data["answer_pos"]
    seen = []
    h = model.blocks[1].register_forward_hook(lambda mod, args, out: seen.append(out))
    ref = model(tokens, positions=pos)
    accs = evaluation.attention_ablation(model, data, 4, torch.device("cpu"), contextlib.nullcontext)
    h.remove()
    assert len(accs) == 2 and all(0 <= x <= 1 for x in accs)
    assert torch.equal(model(tokens, positions=pos), ref)  # the ablation hooks are gone
    # one forward each: plain, layer 0 ablated, layer 1 ablated; each changes the last block
    assert len(seen) == 3
    assert rel(seen[1], seen[0]) > 1e-3 and rel(seen[2], seen[0]) > 1e-3


def test_converted_rejects_another_task(tmp_path):
    train.main(TOY + ["--variant", "dense", "--out", str(tmp_path / "dense"), "--steps", "1", "--no-save"])
    (tmp_path / "dense" / "model.pt").write_bytes(b"")
    with pytest.raises(SystemExit):
        train.main(TOY + ["--num-pairs", "6", "--variant", "msa_converted", "--init",
                               str(tmp_path / "dense"), "--out", str(tmp_path / "conv")])
    with pytest.raises(SystemExit):
        train.main(TOY + ["--variant", "msa_converted", "--out", str(tmp_path / "conv")])


def test_run_all_smoke(tmp_path):
    """The driver the GPU session runs, in its CPU smoke mode (every variant, a few steps)."""
    r = subprocess.run(["bash", str(EXP / "run_all.sh"), str(tmp_path / "out"), "--smoke",
                        "--pack", str(tmp_path / "pack")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for v in ("dense", "window", "msa_native", "msa_converted"):
        assert (tmp_path / "out" / v / "eval.json").exists()
        assert (tmp_path / "pack" / f"{v}.tgz").exists()
    assert (tmp_path / "out" / "report" / "summary.json").exists()
    # the default task is the chain filler with its next-token loss: evaluated and reported
    cfg = json.loads((tmp_path / "out" / "dense" / "config.json").read_text())
    assert cfg["task"]["haystack"] == "chain" and cfg["task"]["chain_occurrences"] == 8
    assert T.TaskConfig(**cfg["task"]).chain_states(256) < cfg["task"]["num_noise"]  # a subset
    assert "filler" in json.loads((tmp_path / "out" / "msa_native" / "eval.json").read_text())["contexts"]["256"]
    md = (tmp_path / "out" / "report" / "results.md").read_text()
    assert "Filler next-token accuracy" in md and "ceiling (local block kept)" in md
    assert "perfect index (block max)" in md
