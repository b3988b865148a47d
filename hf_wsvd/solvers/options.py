"""The options of the built-in methods, importable without torch: ``WSVDConfig`` and the command
line read their fields from here, and each method's solver module imports its class from here.

An options class is a frozen dataclass whose fields are named like the ``WSVDConfig`` fields they
come from (``MethodOptions.from_recipe``); it validates its own values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# fwsvd (and the element-wise solvers' start): the axis the Fisher information is summed over.
FISHER_AXES = ("output", "input")
# The element-wise solvers (tfwsvd, rescue, refine).
SOLVER_NAMES = ("als", "adam", "em", "hybrid")
# quantized_residual: the weightings it fits its correction with.
RESIDUAL_METHODS = ("fisher_whiten", "whiten", "svd")


@dataclass(frozen=True)
class MethodOptions:
    """The options of one method; subclasses add fields named like the recipe's and validate them."""

    @classmethod
    def from_recipe(cls, recipe: Any) -> "MethodOptions":
        """The options of this method read from ``recipe`` (a ``WSVDConfig`` or any object with
        the same attribute names)."""
        return cls(**{f.name: getattr(recipe, f.name) for f in dataclasses.fields(cls)})


def check_number(name: str, value: Any, low: float, high: float = float("inf"), low_open: bool = False) -> None:
    """Raise unless ``value`` is a (non-bool, non-NaN) number in [low, high] (``low_open``: (low, high])."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value != value
    if bad or value > high or (value <= low if low_open else value < low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be a number in {bound}")


@dataclass(frozen=True)
class FwsvdOptions(MethodOptions):
    """``fisher_axis``: ``"output"`` (one weight per output row) or ``"input"`` (per input column)."""

    fisher_axis: str = "output"

    def __post_init__(self) -> None:
        if self.fisher_axis not in FISHER_AXES:
            raise ValueError(f"fisher_axis={self.fisher_axis!r} is not one of {FISHER_AXES}")


@dataclass(frozen=True)
class ElementwiseOptions(FwsvdOptions):
    """Options of the element-wise solvers (``tfwsvd``, ``rescue``, ``refine``; ``fisher_axis``
    is the axis of their FWSVD start): see ``WSVDConfig``."""

    solver: str = "hybrid"
    max_iterations: int = 8
    tolerance: float = 1e-4
    time_budget: float | None = None
    importance_power: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in SOLVER_NAMES:
            raise ValueError(f"solver={self.solver!r} is not one of {SOLVER_NAMES}")
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, int) or self.max_iterations < 0:
            raise ValueError(f"max_iterations={self.max_iterations!r} must be a non-negative integer")
        check_number("tolerance", self.tolerance, 0)
        if self.time_budget is not None:
            check_number("time_budget", self.time_budget, 0, low_open=True)
        check_number("importance_power", self.importance_power, 0, 1, low_open=True)


@dataclass(frozen=True)
class RescueOptions(ElementwiseOptions):
    """The element-wise options and ``risk_threshold`` (nats, ≥ 0)."""

    risk_threshold: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("risk_threshold", self.risk_threshold, 0)


@dataclass(frozen=True)
class AsvdOptions(MethodOptions):
    """``asvd_alpha``: the exponent of the activation scaling, in [0, 2] (0 is plain SVD)."""

    asvd_alpha: float = 0.5

    def __post_init__(self) -> None:
        alpha = self.asvd_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 2:
            raise ValueError(f"asvd_alpha={alpha!r} must be a number in [0, 2]")


@dataclass(frozen=True)
class LpOptions(MethodOptions):
    """``p``: the exponent of Σ_rows dist(row, subspace)^p, in [1, 2]."""

    p: float = 1.0

    def __post_init__(self) -> None:
        p = self.p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 1 <= p <= 2:
            raise ValueError(f"p={p!r} must be a number in [1, 2] (the exponent of the lp method)")


@dataclass(frozen=True)
class QuantizedResidualOptions(MethodOptions):
    """``residual_method``: the weighting of the correction (one of ``RESIDUAL_METHODS``)."""

    residual_method: str = "fisher_whiten"

    def __post_init__(self) -> None:
        if self.residual_method not in RESIDUAL_METHODS:
            raise ValueError(f"residual_method={self.residual_method!r} is not one of {RESIDUAL_METHODS}")
