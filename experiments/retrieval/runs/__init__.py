"""The device commands behind ``experiments/retrieval/results/`` (shell scripts, README.md has
the table) and the scripts that pool the tables of the fifth and sixth runs
(``python -m experiments.retrieval.runs.seed2_tables``, ``...pooled_seed_tables``,
``...plot_recall_by_seed``).
"""
