"""The paged-cache append op: reference.py (PyTorch), kernels.py + triton_impl.py (Triton)."""
