"""Rank allocation: turn the kept-parameter ratio into one rank per target layer."""

from __future__ import annotations

from .runtime.factorized_linear import saves_parameters


def rank_for_ratio(in_features: int, out_features: int, param_ratio: float) -> int:
    """Largest rank whose factors keep at most ``param_ratio`` of the layer's weights (≥ 1)."""
    return max(1, int(param_ratio * in_features * out_features / (in_features + out_features)))


def uniform_ranks(shapes: dict[str, tuple[int, int]], param_ratio: float) -> dict[str, int]:
    """The same kept ratio for every layer (``shapes``: name → (in, out)). Layers whose rank
    would not save parameters are left out: they stay dense."""
    ranks = {}
    for name, (in_features, out_features) in shapes.items():
        rank = rank_for_ratio(in_features, out_features, param_ratio)
        if saves_parameters(in_features, out_features, rank):
            ranks[name] = rank
    return ranks
