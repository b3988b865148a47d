"""The options of the built-in methods, importable without torch: ``WSVDConfig`` and the command
line read their fields from here, and each method's solver module imports its class from here.

An options class is a frozen dataclass whose fields are named like the ``WSVDConfig`` fields they
come from (``MethodOptions.from_recipe``); each field carries its help text and command-line
options, which ``WSVDConfig`` takes from here (``fields.field_of``), and the class validates its
own values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..argtypes import non_negative_int
from ..fields import is_integer, is_number, recipe_field

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
    bad = not is_number(value) or value != value
    if bad or value > high or (value <= low if low_open else value < low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be a number in {bound}")


@dataclass(frozen=True)
class FwsvdOptions(MethodOptions):
    """fwsvd's options."""

    fisher_axis: str = recipe_field(
        "output", "how fwsvd (and the element-wise solvers' start) collapses the Fisher information: 'output' "
        "gives one weight per output row, 'input' one per input column", choices=FISHER_AXES)

    def __post_init__(self) -> None:
        if self.fisher_axis not in FISHER_AXES:
            raise ValueError(f"fisher_axis={self.fisher_axis!r} is not one of {FISHER_AXES}")


@dataclass(frozen=True)
class ElementwiseOptions(FwsvdOptions):
    """Options of the element-wise solvers (``tfwsvd``, ``rescue``, ``refine``; ``fisher_axis``
    is the axis of their FWSVD start)."""

    solver: str = recipe_field(
        "hybrid", "element-wise solver of tfwsvd, rescue and refine, started from fwsvd: 'als' (alternating "
        "weighted least squares), 'adam', 'em' (Srebro & Jaakkola) or 'hybrid' (adam until it beats the "
        "fwsvd loss, then als)", choices=SOLVER_NAMES)
    max_iterations: int = recipe_field(
        8, "element-wise solvers: iteration budget per matrix (an adam iteration is 20 steps); 0 returns the "
        "fwsvd factors", type=non_negative_int)
    tolerance: float = recipe_field(
        1e-4, "element-wise solvers: stop once an iteration changes the weighted loss by less than this "
        "fraction, >= 0", type=float)
    time_budget: float | None = recipe_field(
        None, "element-wise solvers: seconds per matrix after which they stop (unset, None: no limit)", type=float)
    importance_power: float = recipe_field(
        1.0, "element-wise solvers: weight entry (i, j) by F_ij ** importance_power, in (0, 1]; smaller values "
        "temper the Fisher's dynamic range", type=float)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.solver not in SOLVER_NAMES:
            raise ValueError(f"solver={self.solver!r} is not one of {SOLVER_NAMES}")
        if not is_integer(self.max_iterations) or self.max_iterations < 0:
            raise ValueError(f"max_iterations={self.max_iterations!r} must be a non-negative integer")
        check_number("tolerance", self.tolerance, 0)
        if self.time_budget is not None:
            check_number("time_budget", self.time_budget, 0, low_open=True)
        check_number("importance_power", self.importance_power, 0, 1, low_open=True)


@dataclass(frozen=True)
class RescueOptions(ElementwiseOptions):
    """rescue's options: the element-wise ones and ``risk_threshold``."""

    risk_threshold: float = recipe_field(
        1e-3, "rescue: refine with the element-wise solver only the matrices whose risk, the Fisher-predicted "
        "loss increase 1/2 sum F (W - AB)^2 of the fwsvd factors (in nats), exceeds this, >= 0", type=float)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("risk_threshold", self.risk_threshold, 0)


@dataclass(frozen=True)
class AsvdOptions(MethodOptions):
    """asvd's options."""

    asvd_alpha: float = recipe_field(0.5, "asvd: exponent of the activation scaling (0 is plain SVD)", type=float)

    def __post_init__(self) -> None:
        alpha = self.asvd_alpha
        if not is_number(alpha) or not 0 <= alpha <= 2:
            raise ValueError(f"asvd_alpha={alpha!r} must be a number in [0, 2]")


@dataclass(frozen=True)
class LpOptions(MethodOptions):
    """lp's options."""

    p: float = recipe_field(
        1.0, "lp: the exponent p in [1, 2] of sum over rows of dist(row, subspace)^p, robust to outlying rows "
        "for p < 2; 2 is the SVD subspace", type=float)

    def __post_init__(self) -> None:
        p = self.p
        if not is_number(p) or not 1 <= p <= 2:
            raise ValueError(f"p={p!r} must be a number in [1, 2] (the exponent of the lp method)")


@dataclass(frozen=True)
class QuantizedResidualOptions(MethodOptions):
    """quantized_residual's options."""

    residual_method: str = recipe_field(
        "fisher_whiten", "quantized_residual: the weighting of its low-rank correction of the quantization error",
        choices=RESIDUAL_METHODS)

    def __post_init__(self) -> None:
        if self.residual_method not in RESIDUAL_METHODS:
            raise ValueError(f"residual_method={self.residual_method!r} is not one of {RESIDUAL_METHODS}")
