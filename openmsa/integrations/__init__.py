"""Integrations of openmsa with model libraries.

``openmsa.integrations.transformers``: convert a Llama/Qwen-style Hugging Face
``transformers`` causal LM to MSA in place (index projections, dense warmup and sparse
modes, KL collection, generation with an index-key cache).

The submodules import their library on import, so nothing here is imported eagerly:
``import openmsa`` keeps working on machines without ``transformers``.
"""
