"""One folder per op family: ``indexer`` (Index Branch), ``attention`` (Main Branch),
``kl`` (indexer training loss). Each holds its PyTorch reference beside its kernels."""
