"""results/h100_run6_seeds/recall_by_seed.png: final attention-mass recall against context, one
line per seed, for the three recipes of pooled_seed_tables.py (native, converted with the default
warmup, converted with a dense 16K warmup stage); dotted: the same seed's perfect-index ceiling.
From the repository root: python -m experiments.retrieval.runs.plot_recall_by_seed"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.retrieval.runs.pooled_seed_tables import CTX, HERE, RECIPES, from_log, from_run  # noqa: E402


def main():
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    x = [int(c) // 1024 for c in CTX]
    for ax, (name, runs) in zip(axes, RECIPES.items()):
        for run_no, seed, path in runs:
            r = from_log(path) if path.suffix == ".log" else from_run(path)
            ax.plot(x, r["final"], marker="o", color=f"C{seed}", label=f"seed {seed}")
            if r["perfect"] is not None:
                ax.plot(x, r["perfect"], ls=":", color=f"C{seed}")
        ax.axhline(0.9, color="k", lw=1, ls="--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("context (K tokens)")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attention-mass recall (final); dotted: perfect index")
    axes[0].set_ylim(0.83, 0.98)
    fig.suptitle("Indexer recall by seed, H100 runs 4-6 (B = 64, K = 8; dashed: the issue's 0.9)")
    handles, labels = axes[0].get_legend_handles_labels()  # native has every seed
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.savefig(HERE / "recall_by_seed.png", dpi=110)


if __name__ == "__main__":
    main()
