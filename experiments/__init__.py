"""Experiments that use openmsa, one subpackage each (not part of the installed package).

Run their modules from the repository root, e.g. ``python -m experiments.retrieval.train``;
each subpackage's README.md has its command lines.
"""
