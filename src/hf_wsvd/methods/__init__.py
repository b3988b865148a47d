"""Compression methods beside the factorization solvers (``hf_wsvd.solvers``): MLP channel pruning
(``mlp_pruning``), attention head-dimension pruning (``attention_pruning``) and factorized input
embeddings (``embeddings``)."""
