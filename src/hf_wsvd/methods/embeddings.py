"""Factorizing the input embeddings (``WSVDConfig(embeddings=True)``): a vocab × hidden
``nn.Embedding`` becomes a vocab × r lookup and an r → hidden projection (``FactorizedEmbedding``),
solved with ``svd`` or the robust ``lp`` subspace, optionally weighting each token's row by its
frequency in the importance data. Run by the ``embeddings`` modifier
(``hf_wsvd.pipelines.modifiers.embeddings``) after the pipeline."""

from __future__ import annotations

import torch
from torch import nn

from ..allocation import rank_for_ratio, round_rank
from ..blocks import input_embeddings
from ..config import WSVDConfig
from ..runtime.factorized_embedding import FactorizedEmbedding
from ..runtime.factorized_linear import saves_parameters


def input_embedding_name(model: nn.Module) -> str:
    """``embedding_table_name`` of a model whose input embeddings are an ``nn.Embedding`` (what can be
    factorized)."""
    embedding = input_embeddings(model)
    if not isinstance(embedding, nn.Embedding):
        found = "are not named by get_input_embeddings" if embedding is None else f"are a {type(embedding).__name__}"
        raise ValueError(f"{type(model).__name__}'s input embeddings {found}, not an nn.Embedding; only nn.Embedding "
                         "can be factorized")
    return embedding_table_name(model)


def embedding_table_name(model: nn.Module) -> str:
    """Full module name of the input embeddings' table: ``model.get_input_embeddings()``, or the
    embedding its weight is declared tied to (Marian's encoder copy of ``model.shared``), factorized
    or not: factorizing the source of the tie rebuilds every copy on the factors."""
    embedding = model.get_input_embeddings()
    name = next(name for name, module in model.named_modules() if module is embedding)
    source = tied_weights(model).get(f"{name}.weight", "").removesuffix(".weight")
    tables = (nn.Embedding, FactorizedEmbedding)
    return source if source and isinstance(model.get_submodule(source), tables) else name


def tied_weights(model: nn.Module) -> dict[str, str]:
    """The weights ``model`` declares tied: target parameter name → source parameter name."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    return expand(all_submodels=True) if expand is not None else {}


def embedding_row_weights(config: WSVDConfig, counts: torch.Tensor | None) -> torch.Tensor | None:
    """Per-token weights of the ℓp objective: None (uniform), or 1 + the token's count in the
    importance data (``counts``, the ``token_counts`` statistic) — tokens never seen keep weight 1
    rather than 0, so their rows are still fit."""
    if config.embedding_weighting == "uniform":
        return None
    if counts is None:
        raise ValueError(f"embedding_weighting={config.embedding_weighting!r} needs importance data (token counts)")
    return 1 + counts


def embedding_rank(config: WSVDConfig, vocab_size: int, hidden: int) -> int:
    """The rank of a ``vocab_size`` × ``hidden`` table at ``config.embedding_ratio``, rounded to
    ``rank_multiple``; a ValueError when it is 0 or saves nothing."""
    rank = round_rank(rank_for_ratio(vocab_size, hidden, config.embedding_ratio), config.rank_multiple)
    if rank == 0:
        raise ValueError(f"embedding_ratio={config.embedding_ratio} gives the {vocab_size}x{hidden} embeddings a rank "
                         f"below rank_multiple={config.rank_multiple}: raise embedding_ratio or "
                         f"{config.rank_multiple_remedy()}")
    if not saves_parameters(vocab_size, hidden, rank):
        raise ValueError(f"embedding_ratio={config.embedding_ratio} saves nothing on the {vocab_size}x{hidden} embeddings")
    return rank
