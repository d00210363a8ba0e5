"""The sixth run's tables (markdown), pooled with the fourth and fifth runs' seeds of the same
recipes: results/h100_run6_seeds/tables.md, from the repository root:

    python -m experiments.retrieval.runs.pooled_seed_tables > experiments/retrieval/results/h100_run6_seeds/tables.md

Every number is read from the run folders (eval.json: final recall and the perfect-index
ceiling; log.json: recall right after the converted index warmup). One run, seed 3 of the
fourth run's dense-16K-stage recipe, came back as a log only; its figures are parsed from it."""
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "results" / "h100_run6_seeds"
R4, R5 = HERE.parent / "h100_run4_occ8", HERE.parent / "h100_run5_seed2"
CTX = ("4096", "8192", "16384")


def mean(xs):
    return sum(xs) / len(xs)


def from_run(run: Path) -> dict:
    """{"acc", "after", "final", "perfect"}: each a 3-tuple over CTX (after: None if absent)."""
    e = json.loads((run / "eval.json").read_text())["contexts"]
    out = {"acc": tuple(100 * e[c]["acc"] for c in CTX),
           "final": tuple(mean([l["mass_recall"] for l in e[c]["recall"]]) for c in CTX),
           "perfect": tuple(mean([l["perfect_student_recall"] for l in e[c]["recall"]]) for c in CTX),
           "after": None}
    last = {}
    for r in json.loads((run / "log.json").read_text()).get("recall", []):
        if r["phase"].startswith("index_warmup"):
            last[str(r["length"])] = r["mass_recall"]
    if all(c in last for c in CTX):
        out["after"] = tuple(last[c] for c in CTX)
    return out


def from_log(log: Path) -> dict:
    """The same from a lane's log (eval lines and the last index-warmup recall lines)."""
    text = log.read_text()
    acc, final, after = {}, {}, {}
    for m in re.finditer(r"msa_converted +ctx +(\d+): acc ([\d.]+) .*? mass recall ([\d.]+)", text):
        acc[m[1]], final[m[1]] = 100 * float(m[2]), float(m[3])
    for m in re.finditer(r"\[index_warmup\] step +\d+ recall @(\d+): mass ([\d.]+)", text):
        after[m[1]] = float(m[2])
    return {"acc": tuple(acc[c] for c in CTX), "final": tuple(final[c] for c in CTX),
            "after": tuple(after[c] for c in CTX), "perfect": None}


RECIPES = {
    "native": [("4", 0, R4 / "seed0/msa_native"), ("4", 1, R4 / "seed1/msa_native"),
               ("4", 2, R4 / "seed2/msa_native"), ("5", 3, R5 / "native_s3/msa_native")]
              + [("6", s, HERE / f"native/seed{s}/msa_native") for s in (4, 5, 6, 7)],
    "converted, default warmup (4K dense, then 16K sparse with K = 64)":
        [("4", 0, R4 / "seed0/msa_converted"), ("4", 1, R4 / "seed1/msa_converted"),
         ("4", 2, R4 / "seed2/msa_converted")]
        + [("6", s, HERE / f"converted_default/seed{s}/msa_converted") for s in (4, 5, 6, 7)],
    "converted, dense 16K warmup stage (4K dense, then 16K dense)":
        [("4", s, R4 / f"converted_dense16k_warmup/seed{s}/msa_converted") for s in (0, 1, 2)]
        + [("4", 3, R4 / "calls/logs/call3_s3.log")]
        + [("6", s, HERE / f"converted_dense16k/seed{s}/msa_converted") for s in (4, 5, 6, 7)],
}


def fmt(t, pct=False):
    if t is None:
        return "-"
    def one(x):
        if pct:
            return f"{x:.1f}"
        if x >= 0.9:
            return f"{x:.3f}"
        return f"**{x:.4f}**" if f"{x:.3f}" == "0.900" else f"**{x:.3f}**"  # 0.8996 is not 0.900
    return " / ".join(one(x) for x in t)


def block_score(path: Path):
    """Per layer (recall by block max, by block sum) from an analysis/group_mass.py output."""
    text = path.read_text()
    text = text.split("## context 16384")[-1].split("## context")[0]  # the 16K section, if several
    return [(float(m[1]), float(m[2])) for m in re.finditer(r"recall max ([\d.]+) sum ([\d.]+)", text)]


def main():
    summary = []
    for name, runs in RECIPES.items():
        print(f"### {name}\n")
        print("| run | seed | accuracy (%) | recall after warmup | final recall | perfect index |")
        print("|---|---|---|---|---|---|")
        rows = []
        for run_no, seed, path in runs:
            r = from_log(path) if path.suffix == ".log" else from_run(path)
            rows.append(r)
            print(f"| {run_no} | {seed} | {fmt(r['acc'], pct=True)} | {fmt(r['after'])} | "
                  f"{fmt(r['final'])} | {fmt(r['perfect'])} |")
        for key in ("after", "final"):
            vals = [r[key] for r in rows if r[key] is not None]
            if not vals:
                continue
            m = tuple(mean([v[i] for v in vals]) for i in range(3))
            lo = tuple(min(v[i] for v in vals) for i in range(3))
            ok = sum(all(x >= 0.9 for x in v) for v in vals)
            summary.append(f"| {name} | {key} | {len(vals)} | {fmt(m)} | {fmt(lo)} | {ok} of {len(vals)} |")
        print()
    print("### Summary over seeds (4K / 8K / 16K)\n")
    print("| recipe | recall | seeds | mean | lowest | seeds >= 0.9 at every context |")
    print("|---|---|---|---|---|---|")
    print("\n".join(summary))
    print("\n### Block max (the spec) against block sum, converted, 16K\n")
    print("`analysis/group_mass.py` on the converted checkpoint after the sparse phase: one 16K "
          "sequence, every 7th row past K blocks; the same index, its blocks ranked by the max "
          "of their scores (docs/spec.md section 4) or by the sum of its softmax over the block.\n")
    print("| run | seed | block max, layers 0-3 | mean | block sum, layers 0-3 | mean |")
    print("|---|---|---|---|---|---|")
    files = [("5", "2 (3000 sparse steps)", R5 / "group_mass_s2_converted.txt")] + [
        ("6", s, HERE / f"converted_default/seed{s}/group_mass_s{s}.txt") for s in (4, 5, 6, 7)]
    for run_no, seed, path in files:
        layers = block_score(path)
        mx, sm = [a for a, _ in layers], [b for _, b in layers]
        print(f"| {run_no} | {seed} | {' / '.join(f'{x:.3f}' for x in mx)} | {mean(mx):.3f} | "
              f"{' / '.join(f'{x:.3f}' for x in sm)} | {mean(sm):.3f} |")


if __name__ == "__main__":
    main()
