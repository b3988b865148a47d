"""Per-matrix risk metrics: from the Fisher information, how much a low-rank factorization of one
matrix will hurt the task, and whether the row-wise (FWSVD) weighting is enough.

- ``fisher_variance``: the TFWSVD study's predictor: the variance of the matrix's Fisher entries
  (large variance → plain SVD, which ignores importance, drops much accuracy);
- ``predicted_loss``: the second-order estimate of the task-loss increase of replacing W by AB,
  ½ Σ F_ij (W − AB)²_ij (the empirical Fisher stands in for the Hessian's diagonal); at the SVD
  factors it is ``svd_risk``, a direct alternative to the variance; at the FWSVD factors it is
  what ``rescue`` thresholds (``risk_threshold``) to choose where the element-wise solver runs;
- ``row_mismatch``: Σ F R² / Σ F̄_row R² − 1 for the FWSVD residual R: how much of FWSVD's
  element-wise weighted error its row weights (the row means F̄_row) do not see. 0 when the
  Fisher is constant along rows (then FWSVD is the element-wise optimum).
"""

from __future__ import annotations

import torch

from ..linalg import truncated_svd


def fisher_variance(fisher: torch.Tensor) -> float:
    """Variance of the Fisher entries (the study's metric; in the Fisher's own units)."""
    return float(fisher.double().var())


def fisher_cv2(fisher: torch.Tensor) -> float:
    """Squared coefficient of variation of the Fisher entries: the variance without its scale."""
    f = fisher.double()
    mean = f.mean()
    return float(f.var() / mean.square()) if mean > 0 else 0.0


def predicted_loss(weight: torch.Tensor, fisher: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """½ Σ F (W − up·down)²: the second-order task-loss increase of the factorization (nats)."""
    residual = weight.double() - up.double() @ down.double()
    return float(0.5 * (fisher.double() * residual.square()).sum())


def svd_risk(weight: torch.Tensor, fisher: torch.Tensor, rank: int) -> float:
    """``predicted_loss`` of the rank-``rank`` truncated SVD of ``weight``."""
    return predicted_loss(weight, fisher, *truncated_svd(weight.double(), rank))


def row_mismatch(
    weight: torch.Tensor, fisher: torch.Tensor, up: torch.Tensor, down: torch.Tensor, axis: str = "output",
) -> float:
    """Σ F R² / Σ F̄_row R² − 1 for R = W − up·down (F̄_row: the mean of F over each output row, or
    each input column for ``axis="input"``: the weighting FWSVD uses): how much more the per-entry
    Fisher penalizes the residual than the row weights do. ≈ 0: the element-wise solvers have
    little to gain over FWSVD."""
    f = fisher.double()
    residual = (weight.double() - up.double() @ down.double()).square()
    row = f.mean(dim=1 if axis == "output" else 0, keepdim=True)
    seen = float((row * residual).sum())
    return float((f * residual).sum()) / seen - 1.0 if seen > 0 else 0.0


def relative_risk(weight: torch.Tensor, fisher: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """``predicted_loss`` of the factors over that of dropping the matrix (½ Σ F W²): the share of
    the matrix's Fisher-weighted content the factorization loses, scale-free across tasks."""
    energy = 0.5 * float((fisher.double() * weight.double().square()).sum())
    return predicted_loss(weight, fisher, up, down) / energy if energy > 0 else 0.0
