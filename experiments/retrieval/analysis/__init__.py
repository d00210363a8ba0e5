"""CPU diagnostics of a trained checkpoint; each module is a script run with
``python -m experiments.retrieval.analysis.<name> RUN_DIR ...`` (its docstring has the arguments).
"""
