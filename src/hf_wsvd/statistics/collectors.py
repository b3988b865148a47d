"""Collectors: one statistic of one layer, accumulated batch by batch where the layer lives.

The life cycle (driven by the hooks of ``inputs.py`` and ``gradients.py``): ``add`` a batch's
contribution, reduce ``total`` across processes (a sum), then ``result(count)``: the mean. Input
collectors read the layer's input tokens (rows of x, float64); gradient collectors read S, the
sum over a chunk of examples of the squared per-example weight gradients (out × in, float32),
and keep only what their statistic needs of it (O(out), O(in) or out × in).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .names import FISHER, FISHER_COLS, FISHER_ROWS, GRADIENT_STATISTICS, GRAM, INPUT_STATISTICS, MEAN_ABS


class Collector:
    """Accumulates ``reduce(source)`` over batches; ``result(count)`` is the mean. ``gradient``:
    it reads summed squared per-example gradients (else the layer's input tokens)."""

    name: ClassVar[str]
    gradient: ClassVar[bool] = False

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None

    @staticmethod
    def reduce(source: torch.Tensor) -> torch.Tensor:
        """This statistic's share of a batch's ``source`` (token rows, or summed squared gradients)."""
        raise NotImplementedError

    def add(self, contribution: torch.Tensor) -> None:
        if self.total is None:
            self.total = contribution.clone()
        else:
            self.total += contribution

    def zeros(self, in_features: int, out_features: int, device: torch.device) -> torch.Tensor:
        """The total of a collector that saw nothing (a process without a batch still reduces)."""
        raise NotImplementedError

    def result(self, count: float) -> torch.Tensor:
        return self.total / max(count, 1)


COLLECTORS: dict[str, type[Collector]] = {}


def register_collector(cls: type[Collector]) -> type[Collector]:
    """Class decorator: make ``cls`` the collector of the statistic ``cls.name``, collected by the
    pass of its kind (``cls.gradient``) for every method that names it in its ``needs``."""
    if cls.name in COLLECTORS:
        raise ValueError(f"a collector for {cls.name!r} is already registered")
    COLLECTORS[cls.name] = cls
    (GRADIENT_STATISTICS if cls.gradient else INPUT_STATISTICS).add(cls.name)
    return cls


@register_collector
class GramCollector(Collector):
    """Σ x xᵀ over tokens (in × in, float64)."""

    name = GRAM

    @staticmethod
    def reduce(rows: torch.Tensor) -> torch.Tensor:
        return rows.T @ rows

    def zeros(self, in_features, out_features, device):
        return torch.zeros(in_features, in_features, dtype=torch.float64, device=device)


@register_collector
class MeanAbsCollector(Collector):
    """Σ |x| per input feature over tokens (float64)."""

    name = MEAN_ABS

    @staticmethod
    def reduce(rows: torch.Tensor) -> torch.Tensor:
        return rows.abs().sum(dim=0)

    def zeros(self, in_features, out_features, device):
        return torch.zeros(in_features, dtype=torch.float64, device=device)


@register_collector
class FisherCollector(Collector):
    """Σ_n (∂ℓ_n/∂W)², per entry (out × in): only for the methods that read entries."""

    name = FISHER
    gradient = True

    @staticmethod
    def reduce(squares: torch.Tensor) -> torch.Tensor:
        return squares

    def zeros(self, in_features, out_features, device):
        return torch.zeros(out_features, in_features, device=device)


@register_collector
class FisherRowsCollector(Collector):
    """Σ_n Σ_j (∂ℓ_n/∂W_ij)², one value per output row (O(out))."""

    name = FISHER_ROWS
    gradient = True

    @staticmethod
    def reduce(squares: torch.Tensor) -> torch.Tensor:
        return squares.sum(dim=1)

    def zeros(self, in_features, out_features, device):
        return torch.zeros(out_features, device=device)


@register_collector
class FisherColsCollector(Collector):
    """Σ_n Σ_i (∂ℓ_n/∂W_ij)², one value per input column (O(in))."""

    name = FISHER_COLS
    gradient = True

    @staticmethod
    def reduce(squares: torch.Tensor) -> torch.Tensor:
        return squares.sum(dim=0)

    def zeros(self, in_features, out_features, device):
        return torch.zeros(in_features, device=device)


def collectors_for(needs: frozenset[str] | set[str], gradients: bool) -> list[str]:
    """The registered collector names among ``needs`` of one kind (gradient or input), sorted."""
    kind = {n for n in needs if (n in GRADIENT_STATISTICS) == gradients}
    unknown = sorted(kind - set(COLLECTORS))
    if unknown:
        raise ValueError(f"no collector is registered for {unknown}")
    return sorted(kind)
