"""Factorizing the input embeddings (``WSVDConfig(embeddings=True)``): a vocab × hidden
``nn.Embedding`` becomes a vocab × r lookup and an r → hidden projection (``FactorizedEmbedding``),
solved with ``svd`` or the robust ``lp`` subspace, optionally weighting each token's row by its
frequency in the importance data."""

from __future__ import annotations

import time
from typing import Iterable

import torch
from torch import nn

from ..allocation import rank_for_ratio, round_rank
from ..config import WSVDConfig
from ..runtime.factorized_linear import saves_parameters
from ..runtime.modeling_wsvd import relative_module_name
from ..solvers import LayerProblem, get_solver
from ..swap import replace_embedding_with_factors


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


def compress_embeddings(
    model: nn.Module, config: WSVDConfig, data: Iterable[dict] | None = None,
    seconds: dict[str, float] | None = None,
) -> dict[str, int]:
    """Factorize ``model``'s input embeddings in place at ``config.embedding_ratio`` with
    ``config.resolved_embedding_method``; return ``{base-model-relative name: rank}``."""
    start = time.perf_counter()
    full_name = input_embedding_name(model)
    weight = model.get_submodule(full_name).weight.detach()
    vocab_size, hidden = weight.shape
    rank = round_rank(rank_for_ratio(vocab_size, hidden, config.embedding_ratio), config.rank_multiple)
    if rank == 0:
        raise ValueError(f"embedding_ratio={config.embedding_ratio} gives the {vocab_size}x{hidden} embeddings a rank "
                         f"below rank_multiple={config.rank_multiple}: raise embedding_ratio or lower rank_multiple")
    if not saves_parameters(vocab_size, hidden, rank):
        raise ValueError(f"embedding_ratio={config.embedding_ratio} saves nothing on the {vocab_size}x{hidden} embeddings")
    solver = get_solver(config.resolved_embedding_method)
    name = relative_module_name(model, full_name)
    problem = LayerProblem(name, weight.to(getattr(torch, config.compute_dtype)), rank, solver.options.from_recipe(config),
                           row_weights=embedding_row_weights(config, data, vocab_size))
    table, down = solver.solve(problem)
    if not (torch.isfinite(table).all() and torch.isfinite(down).all()):
        raise FloatingPointError(f"{solver.name} produced non-finite factors for the embeddings {name!r}")
    replace_embedding_with_factors(model, full_name, table, down.T)
    if seconds is not None:
        seconds["embeddings"] = time.perf_counter() - start
    return {name: rank}
