"""Factorizing the input embeddings (``WSVDConfig(embeddings=True)``): a vocab × hidden
``nn.Embedding`` becomes a vocab × r lookup and an r → hidden projection (``FactorizedEmbedding``),
solved with ``svd`` or the robust ``lp`` subspace, optionally weighting each token's row by its
frequency in the importance data. Run by the ``embeddings`` modifier
(``hf_wsvd.pipelines.modifiers.embeddings``) after the pipeline."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..allocation import rank_for_ratio, round_rank
from ..config import WSVDConfig
from ..runtime.factorized_linear import saves_parameters


def input_embedding_name(model: nn.Module) -> str:
    """Full module name of ``model.get_input_embeddings()``, which must be an ``nn.Embedding``."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(
            f"{type(model).__name__}'s input embeddings are a {type(embedding).__name__}, not an nn.Embedding; "
            "only nn.Embedding can be factorized"
        )
    return next(name for name, module in model.named_modules() if module is embedding)


def token_frequencies(data: Iterable[dict], vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in ``data``'s ``input_ids`` (padding excluded by the
    ``attention_mask`` when there is one)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in data:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        ids = ids[mask.bool()] if mask is not None else ids.reshape(-1)
        counts += torch.bincount(ids.cpu().reshape(-1), minlength=vocab_size)[:vocab_size].double()
    return counts


def embedding_row_weights(config: WSVDConfig, data: Iterable[dict] | None, vocab_size: int) -> torch.Tensor | None:
    """Per-token weights of the ℓp objective: None (uniform), or 1 + the token's count in the
    importance data — tokens never seen keep weight 1 rather than 0, so their rows are still fit."""
    if config.embedding_weighting == "uniform":
        return None
    if data is None:
        raise ValueError(f"embedding_weighting={config.embedding_weighting!r} needs importance data (token counts)")
    return 1 + token_frequencies(data, vocab_size)


def embedding_rank(config: WSVDConfig, vocab_size: int, hidden: int) -> int:
    """The rank of a ``vocab_size`` × ``hidden`` table at ``config.embedding_ratio``, rounded to
    ``rank_multiple``; a ValueError when it is 0 or saves nothing."""
    rank = round_rank(rank_for_ratio(vocab_size, hidden, config.embedding_ratio), config.rank_multiple)
    if rank == 0:
        raise ValueError(f"embedding_ratio={config.embedding_ratio} gives the {vocab_size}x{hidden} embeddings a rank "
                         f"below rank_multiple={config.rank_multiple}: raise embedding_ratio or lower rank_multiple")
    if not saves_parameters(vocab_size, hidden, rank):
        raise ValueError(f"embedding_ratio={config.embedding_ratio} saves nothing on the {vocab_size}x{hidden} embeddings")
    return rank
