"""The retrieval quality experiment: dense GQA vs MSA vs a sliding window on multi-query
associative recall (README.md). Modules: ``task`` (the data), ``model`` (the decoder and the
dense -> MSA conversion), ``train``, ``evaluation``, ``plot``; ``analysis`` holds checkpoint
diagnostics and ``runs`` the device commands behind ``results/``.
"""
