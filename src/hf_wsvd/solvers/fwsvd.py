"""FWSVD: Fisher-weighted SVD (Hsu et al., 2022), the closed form with one weight per row or column.

Minimizes ‖D (W − AB)‖_F (``fisher_axis="output"``, D = diag √(Σ_j F_ij)) or ‖(W − AB) D‖_F
(``fisher_axis="input"``, D = diag √(Σ_i F_ij)). Only the summed Fisher is needed: O(out) or
O(in) per layer, never the out × in per-entry matrix.
"""

from __future__ import annotations

import torch

from ..statistics.names import FISHER_COLS, FISHER_ROWS
from .options import FwsvdOptions
from .registry import LayerProblem
from .weighting import Weighting, register_weighting, weighted_svd

# Rows/columns with (near) zero importance still get this fraction of the mean importance, so the
# unweighting never divides by zero and such rows keep a plain-SVD fit.
IMPORTANCE_FLOOR = 1e-6


def axis_totals(problem: LayerProblem, axis: str) -> torch.Tensor:
    """The Fisher information summed to one value per output row (``axis="output"``) or input
    column: the collected sums, else the sums of the per-entry Fisher."""
    totals = problem.fisher_rows if axis == "output" else problem.fisher_cols
    if totals is None:
        if problem.fisher is None:
            raise ValueError(f"{problem.name}: no Fisher statistics (row/column sums or per-entry) were given")
        totals = problem.fisher.sum(dim=1 if axis == "output" else 0)
    if not torch.isfinite(totals).all():
        raise ValueError(f"{problem.name}: the Fisher information contains NaN or inf values")
    return totals


def axis_weights(problem: LayerProblem, axis: str) -> torch.Tensor:
    """√ of the Fisher information summed per output row or input column, floored (see
    ``IMPORTANCE_FLOOR``); all ones for a layer whose Fisher is zero."""
    totals = axis_totals(problem, axis)
    mean = totals.mean()
    if mean <= 0:
        return torch.ones_like(totals)
    return totals.clamp_min(IMPORTANCE_FLOOR * mean).sqrt()


def has_importance(problem: LayerProblem, axis: str) -> float:
    """1.0 when the layer's summed Fisher is positive, 0.0 when it is zero: a layer the task loss
    does not depend on predicts no loss, so greedy allocation ranks it last (its weights of 1 would
    otherwise make its spectrum, and its share of the budget, large)."""
    return float(axis_totals(problem, axis).sum() > 0)


def _fwsvd_loss_scale(problem: LayerProblem) -> float:
    # ½ Σ F_ij ΔW_ij² ≈ ½ Σ_i (Σ_j F_ij) ‖ΔW_i‖² / in when the error spreads evenly along a row.
    axis = problem.options.fisher_axis
    return has_importance(problem, axis) * 0.5 / problem.weight.shape[1 if axis == "output" else 0]


def _fwsvd_needs(options: FwsvdOptions) -> tuple[str]:
    return (FISHER_ROWS if options.fisher_axis == "output" else FISHER_COLS,)


@register_weighting("fwsvd", needs=_fwsvd_needs, loss_scale=_fwsvd_loss_scale, options=FwsvdOptions,
                    description="Fisher-weighted SVD: min ‖D(W − AB)‖_F, D from row-summed Fisher")
def fwsvd_weighting(problem: LayerProblem) -> Weighting:
    axis = problem.options.fisher_axis
    d = axis_weights(problem, axis).to(problem.weight.dtype)
    return Weighting(rows=d) if axis == "output" else Weighting(right=d)


def solve_fwsvd(problem: LayerProblem, fisher_axis: str = "output") -> tuple[torch.Tensor, torch.Tensor]:
    """The FWSVD factors along ``fisher_axis`` (the start of the element-wise solvers)."""
    return weighted_svd(problem, fwsvd_weighting(
        LayerProblem(problem.name, problem.weight, problem.rank, FwsvdOptions(fisher_axis), problem.statistics)))
