"""FWSVD: Fisher-weighted SVD (Hsu et al., 2022), the closed form with one weight per row or column.

Minimizes ‖D (W − AB)‖_F (``fisher_axis="output"``, D = diag √(Σ_j F_ij)) or ‖(W − AB) D‖_F
(``fisher_axis="input"``, D = diag √(Σ_i F_ij)).
"""

from __future__ import annotations

import torch

from .registry import FISHER, LayerProblem, register_solver
from .svd import truncated_svd

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


@register_solver("fwsvd", needs=(FISHER,), description="Fisher-weighted SVD: min ‖D(W − AB)‖_F, D from row-summed Fisher")
def solve_fwsvd(problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
    axis = problem.config.fisher_axis
    d = axis_weights(problem.fisher.to(problem.weight.dtype), axis)
    if axis == "output":
        up, down = truncated_svd(d[:, None] * problem.weight, problem.rank)
        return up / d[:, None], down
    up, down = truncated_svd(problem.weight * d[None, :], problem.rank)
    return up, down / d[None, :]
