"""The closed form shared by every weighted-SVD method: minimize ‖diag(d)·(W − AB)·R‖_F by an SVD
of diag(d)·W·R, truncation, and unweighting (A = diag(d)⁻¹·U_r·√Σ_r, B = √Σ_r·V_rᵀ·R⁻¹).

A method is a *weighting*: a function from the layer problem to ``(d, R)``. Registering it gives
both its solver and its spectrum (the singular values of diag(d)·W·R, whose tail is the weighted
loss of each rank: rank allocation reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..linalg import singular_values, truncated_svd
from .registry import LayerProblem, MethodOptions, Needs, register_solver


@dataclass
class Weighting:
    """``rows``: d, one positive weight per output row (or None); ``right``: R, a vector (a
    diagonal) or an in × in matrix (or None); ``lower``: R is lower-triangular; ``unread``: no
    input ever reached the layer, so no rank loses anything on the data (a zero spectrum) and the
    factors are W's own (a weighting by ~0 could not be undone)."""

    rows: torch.Tensor | None = None
    right: torch.Tensor | None = None
    lower: bool = False
    unread: bool = False

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """diag(d)·W·R in the dtype of R (float64 for activation factors)."""
        matrix = weight
        if self.right is not None:
            matrix = matrix.to(self.right.dtype)
            matrix = matrix * self.right[None, :] if self.right.dim() == 1 else matrix @ self.right
        if self.rows is not None:
            matrix = self.rows.to(matrix.dtype)[:, None] * matrix
        return matrix

    def unapply(self, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of diag(d)·W·R → factors of W."""
        if self.rows is not None:
            up = up / self.rows.to(up.dtype)[:, None]
        if self.right is not None:
            if self.right.dim() == 1:
                down = down / self.right.to(down.dtype)[None, :]
            elif self.lower:
                down = torch.linalg.solve_triangular(self.right, down.to(self.right.dtype), upper=False, left=False)
            else:
                down = torch.linalg.solve(self.right.T, down.to(self.right.dtype).T).T
        return up, down


def weighted_spectrum(problem: LayerProblem, weighting: Weighting) -> torch.Tensor:
    """The singular values of diag(d)·W·R (float64): what each rank's truncation loses."""
    if weighting.unread:
        return torch.zeros(min(problem.weight.shape), dtype=torch.float64, device=problem.weight.device)
    return singular_values(weighting.apply(problem.weight))


def weighted_svd(problem: LayerProblem, weighting: Weighting) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``problem.rank`` factors of W minimizing the weighted loss, in the weight's dtype.

    The weighting is applied and undone in its own precision (float64 for activation factors),
    the decomposition runs in float64 (``truncated_svd``)."""
    dtype = problem.weight.dtype
    up, down = truncated_svd(weighting.apply(problem.weight), problem.rank)
    up, down = weighting.unapply(up, down)
    return up.to(dtype), down.to(dtype)


def register_weighting(name: str, needs: Needs = (), description: str = "",
                       loss_scale: Callable[[LayerProblem], float] | None = None,
                       options: type[MethodOptions] = MethodOptions, embeddable: bool = False):
    """Decorator registering ``weighting(problem) -> Weighting`` as the method ``name`` (see
    ``Solver`` for ``loss_scale``, ``options`` and ``needs``)."""

    def wrap(weighting: Callable[[LayerProblem], Weighting]):
        register_solver(
            name, needs, description or (weighting.__doc__ or "").strip(), options,
            spectrum=lambda problem: weighted_spectrum(problem, weighting(problem)),
            loss_scale=loss_scale, embeddable=embeddable,
        )(lambda problem: weighted_svd(problem, weighting(problem)))
        return weighting

    return wrap
