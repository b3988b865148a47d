"""The robust ℓp subspace solver: monotone objective, p = 2 is SVD, robustness to outlying rows,
and the degenerate inputs (zero-distance rows, duplicates, rank ≥ row length)."""

from __future__ import annotations

import pytest
import torch

from hf_wsvd import WSVDConfig
from hf_wsvd.solvers import SOLVERS, LayerProblem, get_solver
from hf_wsvd.solvers.lp import lp_objective, lp_subspace, row_distances, subspace_factors
from hf_wsvd.linalg import truncated_svd

N, D, K = 120, 16, 4


def _planted(outliers: int = 3, noise: float = 0.01, seed: int = 0, dtype=torch.float64):
    """N rows near a K-dim subspace of R^D (about unit variance per direction), the first
    ``outliers`` replaced by rows of norm 15 along distinct directions orthogonal to it: each
    outlier holds more energy than a planted direction, so SVD spends its rank on them, while their
    total distance is small next to what the inliers lose when the subspace leaves them.
    Returns (matrix, orthonormal basis of the planted subspace)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=dtype))
    inside, outside = basis[:, :K], basis[:, K:]
    rows = torch.randn(N, K, generator=g, dtype=dtype) @ inside.T
    rows += noise * torch.randn(N, D, generator=g, dtype=dtype)
    rows[:outliers] = 15 * outside[:, :outliers].T
    return rows, inside


def _svd_basis(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(matrix, full_matrices=False).Vh[:K].T


def _subspace_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖P_a − P_b‖ (spectral): 0 for the same subspace, 1 for orthogonal directions."""
    return float(torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2))


@pytest.mark.parametrize("p", [1.0, 1.25, 1.5])
def test_objective_is_monotone_and_far_below_svd(p):
    matrix, planted = _planted()
    result = lp_subspace(matrix, K, p, max_iter=100, tol=0)
    history = result.objectives
    assert result.iterations >= 1
    assert all(b <= a for a, b in zip(history, history[1:])), history
    assert history[-1] < history[0]
    # The outliers make the SVD subspace far from ℓp-optimal.
    assert history[-1] < 0.8 * lp_objective(matrix, _svd_basis(matrix), p)
    # The reported objective is the objective of the returned basis.
    assert lp_objective(matrix, result.basis, p) == pytest.approx(history[-1], rel=1e-9)
    assert torch.allclose(result.basis.T @ result.basis, torch.eye(K, dtype=matrix.dtype), atol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_lp_ignores_outliers_that_capture_the_svd_subspace(seed):
    matrix, planted = _planted(seed=seed)
    assert _subspace_gap(_svd_basis(matrix), planted) > 0.9  # SVD spends its rank on the outliers
    assert _subspace_gap(lp_subspace(matrix, K, 1.0, max_iter=200).basis, planted) < 0.05


def test_irls_steps_improve_on_the_start():
    """On data without a trap for the SVD start, the IRLS steps improve on the better start."""
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(N, D, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, D, dtype=torch.float64)
    matrix[:10] *= 4  # heavier rows, not orthogonal outliers
    result = lp_subspace(matrix, K, 1.0, max_iter=100, tol=0)
    assert result.objectives[0] <= lp_objective(matrix, _svd_basis(matrix), 1.0) * (1 + 1e-12)
    assert result.iterations >= 2
    assert all(b <= a for a, b in zip(result.objectives, result.objectives[1:]))
    assert result.objectives[-1] < 0.999 * result.objectives[0]


def test_p2_is_the_svd_subspace_and_the_svd_factors():
    matrix, _ = _planted(seed=3)
    result = lp_subspace(matrix, K, 2.0)
    assert result.iterations == 0
    up, down = subspace_factors(matrix, result.basis)
    svd_up, svd_down = truncated_svd(matrix, K)
    assert torch.allclose(up @ down, svd_up @ svd_down, atol=1e-10)
    solver_up, solver_down = get_solver("lp").solve(LayerProblem("w", matrix, K, WSVDConfig(method="lp", p=2).method_options()))
    assert torch.allclose(solver_up @ solver_down, svd_up @ svd_down, atol=1e-10)
    # Balanced like truncated_svd: equal column norms of up and row norms of down.
    assert torch.allclose(solver_up.norm(dim=0), solver_down.norm(dim=1), atol=1e-10)


def test_rows_at_zero_distance_and_zero_rows():
    """Rows exactly inside the optimal subspace (distance 0) and zero rows: finite factors, a
    monotone objective, and the exact rows are reproduced exactly."""
    matrix, planted = _planted(noise=0.0)
    matrix[10:14] = 0
    result = lp_subspace(matrix, K, 1.0, max_iter=200, tol=0)
    assert all(torch.isfinite(torch.tensor(result.objectives)))
    assert all(b <= a for a, b in zip(result.objectives, result.objectives[1:]))
    up, down = subspace_factors(matrix, result.basis)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    exact = slice(14, N)  # noise-free rows inside the planted subspace
    assert (up @ down - matrix)[exact].abs().max() < 1e-9
    assert row_distances(matrix, result.basis)[10:14].abs().max() == 0
    # The objective left is the outliers' distance: the optimum, 3 × 15.
    assert result.objectives[-1] == pytest.approx(45.0, rel=1e-9)


def test_duplicate_rows_equal_integer_row_weights():
    matrix, _ = _planted(seed=5)
    doubled = torch.cat([matrix, matrix[20:40], matrix[20:40]])
    weights = torch.ones(N, dtype=matrix.dtype)
    weights[20:40] = 3
    a = lp_subspace(doubled, K, 1.25, max_iter=30, tol=0)
    b = lp_subspace(matrix, K, 1.25, row_weights=weights, max_iter=30, tol=0)
    # With tol=0 each run stops at its first non-decreasing step, which rounding (thread count,
    # summation order) can move by an iteration or two near convergence: compare the steps both
    # took and where both ended, not the number of steps.
    common = min(len(a.objectives), len(b.objectives))
    assert a.objectives[:common] == pytest.approx(b.objectives[:common], rel=1e-8)
    assert a.objectives[-1] == pytest.approx(b.objectives[-1], rel=1e-6)
    assert _subspace_gap(a.basis, b.basis) < 1e-6


def test_row_weights_change_the_answer():
    matrix, _ = _planted(seed=6)
    weights = torch.ones(N, dtype=matrix.dtype)
    weights[:3] = 1e4  # make the outliers the rows that matter
    plain = lp_subspace(matrix, K, 1.0).basis
    weighted = lp_subspace(matrix, K, 1.0, row_weights=weights).basis
    assert row_distances(matrix[:3], plain).sum() > 40
    assert row_distances(matrix[:3], weighted).sum() < 0.1


@pytest.mark.parametrize("rank", [D, D + 3, 0])
def test_rank_that_compresses_nothing_is_a_clear_error(rank):
    matrix, _ = _planted()
    with pytest.raises(ValueError, match=rf"rank={rank} is invalid for a {N}x{D} matrix"):
        lp_subspace(matrix, rank, 1.0)


@pytest.mark.parametrize("p", [0.5, 2.5, float("nan"), True])
def test_p_outside_1_2_is_refused(p):
    matrix, _ = _planted()
    with pytest.raises(ValueError, match="p="):
        lp_subspace(matrix, K, p)
    with pytest.raises(ValueError, match="p="):
        WSVDConfig(method="lp", p=p)


def test_bad_row_weights_are_refused():
    matrix, _ = _planted()
    for weights in (torch.ones(N - 1), -torch.ones(N), torch.zeros(N)):
        with pytest.raises(ValueError, match="row_weights"):
            lp_subspace(matrix, K, 1.0, row_weights=weights.double())


def test_registered_solver_reads_p_and_row_weights_from_the_problem():
    assert "lp" in SOLVERS and not SOLVERS["lp"].needs
    matrix, planted = _planted()
    up, down = get_solver("lp").solve(LayerProblem("w", matrix.float(), K, WSVDConfig(method="lp", p=1.0).method_options()))
    assert up.shape == (N, K) and down.shape == (K, D) and up.dtype == torch.float32
    basis = torch.linalg.qr(down.T.double()).Q
    assert _subspace_gap(basis, planted) < 0.05
    weights = torch.ones(N)
    weights[:3] = 1e4
    up_w, down_w = get_solver("lp").solve(
        LayerProblem("w", matrix.float(), K, WSVDConfig(method="lp", p=1.0).method_options(), row_weights=weights))
    assert _subspace_gap(torch.linalg.qr(down_w.T.double()).Q, planted) > 0.5
