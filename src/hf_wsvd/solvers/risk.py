"""The Fisher-predicted loss increase of a low-rank factorization of one matrix: what ``rescue``
thresholds (``risk_threshold``) to choose where the element-wise solver runs.
``benchmarks/svd_risk.py`` compares it with other per-matrix risk metrics."""

from __future__ import annotations

import torch


def predicted_loss(weight: torch.Tensor, fisher: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """½ Σ F (W − up·down)²: the second-order task-loss increase of the factorization (nats), the
    empirical Fisher standing in for the Hessian's diagonal."""
    residual = weight.double() - up.double() @ down.double()
    return float(0.5 * (fisher.double() * residual.square()).sum())
