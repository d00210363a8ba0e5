"""One folder per op family: ``indexer`` (Index Branch), ``attention`` (Main Branch),
``kl`` (indexer training loss), ``append`` (the serving cache's append), each with its PyTorch reference beside its kernels, over
``utils`` (the machinery they share; no op imports another op's private names). ``kl``
composes the other two through their launchers (the teacher's LSE, the selected index LSE)."""
