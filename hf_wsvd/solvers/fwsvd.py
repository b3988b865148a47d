"""FWSVD: Fisher-weighted SVD (Hsu et al., 2022), the closed form with one weight per row or column.

Minimizes ‖D (W − AB)‖_F (``fisher_axis="output"``, D = diag √(Σ_j F_ij)) or ‖(W − AB) D‖_F
(``fisher_axis="input"``, D = diag √(Σ_i F_ij)).
"""

from __future__ import annotations

import torch

from .registry import FISHER, LayerProblem
from .weighting import Weighting, register_weighting, weighted_svd

# Rows/columns with (near) zero importance still get this fraction of the mean importance, so the
# unweighting never divides by zero and such rows keep a plain-SVD fit.
IMPORTANCE_FLOOR = 1e-6


def axis_weights(fisher: torch.Tensor, axis: str) -> torch.Tensor:
    """√ of the Fisher information summed to one value per output row or input column."""
    if not torch.isfinite(fisher).all():
        raise ValueError("the Fisher information contains NaN or inf values")
    totals = fisher.sum(dim=1 if axis == "output" else 0)
    mean = totals.mean()
    if mean <= 0:
        return torch.ones_like(totals)
    return totals.clamp_min(IMPORTANCE_FLOOR * mean).sqrt()


def _fwsvd_loss_scale(problem: LayerProblem) -> float:
    # ½ Σ F_ij ΔW_ij² ≈ ½ Σ_i (Σ_j F_ij) ‖ΔW_i‖² / in when the error spreads evenly along a row.
    return 0.5 / problem.weight.shape[1 if problem.config.fisher_axis == "output" else 0]


@register_weighting("fwsvd", needs=(FISHER,), loss_scale=_fwsvd_loss_scale,
                    description="Fisher-weighted SVD: min ‖D(W − AB)‖_F, D from row-summed Fisher")
def fwsvd_weighting(problem: LayerProblem) -> Weighting:
    d = axis_weights(problem.fisher.to(problem.weight.dtype), problem.config.fisher_axis)
    return Weighting(rows=d) if problem.config.fisher_axis == "output" else Weighting(right=d)


def solve_fwsvd(problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """The FWSVD factors (the start of the element-wise solvers)."""
    return weighted_svd(problem, fwsvd_weighting(problem))
