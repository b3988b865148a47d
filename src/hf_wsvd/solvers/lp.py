"""Robust ℓp subspace approximation (1 ≤ p ≤ 2) by iteratively reweighted least squares.

Finds the rank-k subspace ``span(V)`` (V: d × k, orthonormal) of the row space minimizing

    Σ_i w_i · dist(row_i, span V)^p,    dist(a, span V) = ‖a − V Vᵀ a‖,

and returns the factors of the projection ``W V Vᵀ``. Plain SVD is the case p = 2 (every row
counts with its *squared* distance, so a few far-away rows pull the subspace toward themselves);
p < 2 lets outlying rows — typical of embedding matrices — lie farther from the subspace.

Each IRLS step is a majorize–minimize step: ``t ↦ t^{p/2}`` is concave, so with
``c_i = w_i · dist_i^{p−2}`` from the current subspace, ``Σ c_i dist(row_i, ·)²`` majorizes the
objective up to constants and is minimized exactly by the top-k eigenvectors of ``Wᵀ C W``. Rows at
(near) zero distance would get infinite weight; their weight is capped, which can break the
majorization, so every step is accepted only if the true objective does not increase: the reported
objective history is monotone non-increasing by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..linalg import truncated_svd
from .options import LpOptions, check_number
from .registry import LayerProblem, register_solver

# A row's IRLS weight uses max(dist, DIST_FLOOR · mean dist): no division by zero for rows inside
# the subspace (zero rows, duplicates of spanning rows), while such rows still weigh the most.
DIST_FLOOR = 1e-6


@dataclass
class LpResult:
    """An ℓp subspace: ``basis`` (d × k, orthonormal columns) and the objective after
    initialisation (the weighted-SVD subspace) and after each accepted IRLS step."""

    basis: torch.Tensor
    objectives: list[float] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return len(self.objectives) - 1


def row_distances(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each row of ``matrix`` (n × d) to ``span(basis)`` (d × k orthonormal).

    Computed from the explicit residual, not ``‖a‖² − ‖Vᵀa‖²``: the difference cancels to noise
    (even negative values) for rows that lie in the subspace."""
    return (matrix - (matrix @ basis) @ basis.T).norm(dim=1)


def lp_objective(
    matrix: torch.Tensor, basis: torch.Tensor, p: float, row_weights: torch.Tensor | None = None
) -> float:
    """``Σ_i w_i · dist(row_i, span basis)^p`` (w = 1 without ``row_weights``), in float64."""
    return _objective(row_distances(matrix, basis), p, row_weights)


def _eigen_split(
    matrix: torch.Tensor, weights: torch.Tensor | None, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, V⊥)``: the top-``rank`` eigenvectors of ``Wᵀ diag(weights) W`` (the minimizer of
    Σ c_i dist_i²) and the remaining ones, an orthonormal basis of the complement."""
    gram = matrix.T @ (matrix if weights is None else weights[:, None] * matrix)
    # eigh of a d × d matrix (d = row length) is cheap next to forming the Gram matrix.
    _, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    vectors = vectors.flip(1)
    return vectors[:, :rank], vectors[:, rank:]


def _distances(matrix: torch.Tensor, complement: torch.Tensor) -> torch.Tensor:
    """Row distances to the subspace as the norm of the complement coordinates: exact (no
    cancellation) and cheaper than the residual when the subspace is more than half the space."""
    return (matrix @ complement).norm(dim=1)


def _objective(dist: torch.Tensor, p: float, weights: torch.Tensor | None) -> float:
    terms = dist.double().pow(p)
    return float((terms if weights is None else terms * weights.double()).sum())


def _irls_weights(dist: torch.Tensor, p: float) -> torch.Tensor:
    """``dist^{p−2}``, with distances floored at ``DIST_FLOOR`` × their mean and scaled to a
    maximum of 1 (scale-free weights keep the Gram matrix well within float range)."""
    weights = dist.clamp_min(DIST_FLOOR * dist.mean()).pow(p - 2)
    return weights / weights.max()


def _check(matrix: torch.Tensor, rank: int, p: float, row_weights: torch.Tensor | None) -> None:
    if matrix.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    n, d = matrix.shape
    if not 1 <= rank < d or rank > n:
        raise ValueError(
            f"rank={rank} is invalid for a {n}x{d} matrix: the subspace of its rows must have a "
            f"dimension between 1 and {min(d - 1, n)} (rank ≥ the row length {d} compresses nothing)"
        )
    check_number("p", p, 1, 2)
    if not torch.isfinite(matrix).all():
        raise ValueError("the matrix contains NaN or inf values")
    if row_weights is not None and (
        row_weights.shape != (n,) or not torch.isfinite(row_weights).all() or (row_weights < 0).any()
        or not (row_weights > 0).any()
    ):
        raise ValueError(f"row_weights must be {n} finite non-negative values, not all zero")


@torch.no_grad()
def lp_subspace(
    matrix: torch.Tensor,
    rank: int,
    p: float,
    row_weights: torch.Tensor | None = None,
    max_iter: int = 50,
    tol: float = 1e-4,
) -> LpResult:
    """The rank-``rank`` subspace of ``matrix``'s rows minimizing ``Σ w_i dist_i^p``: IRLS from the
    better of the weighted-SVD subspace (the exact answer for p = 2) and the row-norm-reweighted
    one. ``objectives[0]`` is the objective of that start.

    Stops after ``max_iter`` steps, when a step lowers the objective by less than ``tol``
    (relative), or when a step would raise it (that step is discarded)."""
    _check(matrix, rank, p, row_weights)
    weights = None if row_weights is None else row_weights.to(matrix.dtype)
    basis, complement = _eigen_split(matrix, weights, rank)
    dist = _distances(matrix, complement)
    result = LpResult(basis, [_objective(dist, p, weights)])
    if p == 2:
        return result
    # IRLS is a local method and the SVD start can be a trap: a few large rows captured by the SVD
    # subspace sit at distance 0, get the largest weights and stay captured. The other start is
    # one IRLS step from the zero subspace (weights ‖row‖^{p−2}, for p = 1 the SVD of the
    # normalized rows), where large rows weigh less; the better of the two starts is kept.
    norms = matrix.norm(dim=1)
    if norms.max() > 0:
        start_weights = _irls_weights(norms, p)
        other, other_complement = _eigen_split(matrix, start_weights if weights is None else start_weights * weights, rank)
        other_dist = _distances(matrix, other_complement)
        objective = _objective(other_dist, p, weights)
        if objective < result.objectives[0]:
            result, dist = LpResult(other, [objective]), other_dist
    for _ in range(max_iter):
        if dist.max() == 0:  # every row lies in the subspace: nothing left to improve
            break
        irls = _irls_weights(dist, p)
        candidate, complement = _eigen_split(matrix, irls if weights is None else irls * weights, rank)
        candidate_dist = _distances(matrix, complement)
        objective = _objective(candidate_dist, p, weights)
        previous = result.objectives[-1]
        if objective > previous:
            break
        result.basis, dist = candidate, candidate_dist
        result.objectives.append(objective)
        if previous - objective <= tol * previous:
            break
    return result


def subspace_factors(matrix: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(up, down)`` of the projection ``matrix · V Vᵀ`` (n × k, k × d), balanced like
    ``truncated_svd`` (√S on each side): with the SVD subspace they equal the SVD factors."""
    rank = basis.shape[1]
    up, inner = truncated_svd(matrix @ basis, rank)
    return up, inner @ basis.T


def problem_row_weights(problem: LayerProblem) -> torch.Tensor | None:
    """Per-row weights of a problem: its ``row_weights`` (e.g. token frequencies of an embedding),
    else the Fisher information summed per row when the compressor computed one, else None."""
    if problem.row_weights is not None:
        return problem.row_weights.to(problem.weight)
    if problem.fisher_rows is not None:
        return problem.fisher_rows.to(problem.weight)
    if problem.fisher is not None:
        return problem.fisher.sum(dim=1).to(problem.weight)
    return None


@register_solver("lp", options=LpOptions, embeddable=True,
                 description="robust ℓp subspace (IRLS): min Σ_rows w·dist(row, span)^p, 1 ≤ p ≤ 2")
def solve_lp(problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
    result = lp_subspace(problem.weight, problem.rank, problem.options.p, problem_row_weights(problem))
    return subspace_factors(problem.weight, result.basis)
