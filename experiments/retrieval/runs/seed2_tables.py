"""Print the fifth run's tables (markdown) from its run folders, results/h100_run5_seed2/ (its
tables.md), from the repository root:

    python -m experiments.retrieval.runs.seed2_tables > experiments/retrieval/results/h100_run5_seed2/tables.md
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "results" / "h100_run5_seed2"
CTX = ("4096", "8192", "16384")


def mean(xs):
    return sum(xs) / len(xs)


def after_warmup(run):
    rec = json.loads((run / "log.json").read_text())["recall"]
    last = {}
    for r in rec:
        if r["phase"].startswith("index_warmup"):
            last[str(r["length"])] = r["mass_recall"]
    return " / ".join(f"{last[c]:.3f}" if c in last else "-" for c in CTX)


def final(run, key):
    e = json.loads((run / "eval.json").read_text())["contexts"]
    return " / ".join(f"{mean([l[key] for l in e[c]['recall']]):.3f}" for c in CTX)


def acc(run):
    e = json.loads((run / "eval.json").read_text())["contexts"]
    return " / ".join(f"{100 * e[c]['acc']:.1f}" for c in CTX)


rows = [("di128_default", "Di 128; default warmup (4K through the kernels, then 150 steps at 16K, K = 64); 600 sparse"),
        ("di128_d16_150", "Di 128; whole warmup at 16K in dense mode, 150 steps; 600 sparse"),
        ("di64_d16_300", "Di 64; whole warmup at 16K in dense mode, 300 steps (298 ran); 600 sparse"),
        ("di128_d16_300", "Di 128; whole warmup at 16K in dense mode, 300 steps (269 ran); 600 sparse"),
        ("s2_sparse3000_lr3e-4", "Di 64; default warmup; 3000 sparse steps at 3e-4"),
        ("s2_sparse3000_lr1e-3", "Di 64; default warmup; 3000 sparse steps at 1e-3")]
print("| lane | converted recipe (seed 2) | dense acc | converted acc | recall after warmup | final recall | perfect index |")
print("|---|---|---|---|---|---|---|")
for name, what in rows:
    run = HERE / name
    print(f"| `{name}` | {what} | {acc(run / 'dense')} | {acc(run / 'msa_converted')} | "
          f"{after_warmup(run / 'msa_converted')} | {final(run / 'msa_converted', 'mass_recall')} | "
          f"{final(run / 'msa_converted', 'perfect_student_recall')} |")
print()
n3 = HERE / "native_s3" / "msa_native"
print(f"native seed 3: acc {acc(n3)}; recall {final(n3, 'mass_recall')}; perfect index {final(n3, 'perfect_student_recall')}")
for s in (1, 2):
    w = HERE / f"window_s{s}" / "window"
    e = json.loads((w / "eval.json").read_text())["contexts"]
    print(f"window seed {s}: acc {acc(w)}; filler acc " + " / ".join(f"{100 * e[c]['filler']['acc']:.1f}" for c in CTX))
