"""Numerically guarded linear algebra shared by the solvers."""

from __future__ import annotations

import torch

# Jitter starts at this fraction of the mean diagonal and grows tenfold per failed attempt.
JITTER_START = 1e-10
JITTER_TRIES = 8
# Eigenvalues below this fraction of the largest are raised to it in the fallback square root.
EIGEN_FLOOR = 1e-8


def gram_square_root(gram: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A square root ``S`` of a symmetric PSD ``gram`` (``S Sᵀ ≈ gram``), in float64.

    Cholesky with adaptive jitter first (lower-triangular ``S``, returns ``(S, True)``); if the
    matrix is singular or indefinite beyond ``JITTER_TRIES`` attempts, ``S = Q √max(Λ, floor)``
    from an eigendecomposition (``(S, False)``). Never returns NaN for finite input.
    """
    if not torch.isfinite(gram).all():
        raise ValueError("the activation Gram matrix contains NaN or inf values")
    g = gram.double()
    g = (g + g.T).div_(2)
    scale = g.diagonal().abs().mean().clamp_min(torch.finfo(torch.float64).tiny)
    jitter = 0.0
    for attempt in range(JITTER_TRIES):
        factor, info = torch.linalg.cholesky_ex(plus_diagonal(g, jitter) if jitter else g)
        if info.item() == 0 and torch.isfinite(factor).all():
            return factor, True
        jitter = scale * JITTER_START * 10**attempt
    values, vectors = torch.linalg.eigh(g)
    floor = values.max().clamp_min(scale) * EIGEN_FLOOR
    return vectors * values.clamp_min(floor).sqrt(), False


def ridged(gram: torch.Tensor, ridge: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """``gram`` symmetrized in float64 on ``device``, and λ = ``ridge`` × its mean diagonal (×1 for
    an all-zero Gram: the ridge then holds the solution at the unweighted weight)."""
    gram = gram.double().to(device)
    gram = (gram + gram.T).div_(2)  # one n × n temporary, not two
    scale = float(gram.diagonal().mean())
    return gram, ridge * (scale if scale > 0 else 1.0)


def refitted(reference: torch.Tensor, start: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
             lam: float) -> torch.Tensor:
    """argmin over W' of ‖R·x_d − W'·x‖² + λ‖W' − W₀‖² = (R·M + λ·W₀)·(C + λI)⁻¹ in float64: the
    weight W' (out × in) whose outputs on the inputs x (Gram C = E[x xᵀ]) best match those of
    ``reference`` R on the inputs x_d (cross moment M = E[x_d xᵀ]), pulled toward ``start`` W₀."""
    target = reference.double() @ cross.double() + lam * start.double()
    return torch.linalg.solve(plus_diagonal(gram.double(), lam), target.T).T


def plus_diagonal(matrix: torch.Tensor, value: float) -> torch.Tensor:
    """``matrix + value·I`` as a new tensor, without an n × n identity beside it."""
    result = matrix.clone()
    result.diagonal().add_(value)
    return result


def _gram(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The float64 Gram matrix of ``matrix``'s smaller side, and whether that side is the rows
    (M·Mᵀ) or the columns (Mᵀ·M)."""
    m = matrix.double()
    rows = m.shape[0] <= m.shape[1]
    return (m @ m.T if rows else m.T @ m), rows


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """The singular values of ``matrix``, descending, in float64 (see ``truncated_svd``)."""
    return torch.linalg.eigvalsh(_gram(matrix)[0]).flip(0).clamp_min(0).sqrt()


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(up, down)`` of ``matrix`` in Frobenius norm, in its dtype, with
    each singular value split evenly (√σ on each side) so both factors have similar scale.

    Why an eigendecomposition of the float64 Gram matrix instead of an SVD: it is faster than a
    float32 SVD, 1.4–3.7× on CPU (``benchmarks/factorization.py``) and 8× on an H100 (4096 × 4096:
    0.13 s against 1.1 s, ``benchmarks/speed_svd.py``), and float64 keeps ~8 digits even
    for singular values at 1e-4 of the largest, although the Gram matrix squares them. The factors
    are projections (U_rᵀ·M or M·V_r), so the product is exactly the projection of ``matrix``
    onto the kept subspace, also where σ ≈ 0.
    """
    m = matrix.double()
    gram, rows = _gram(m)
    basis = torch.linalg.eigh(gram)[1].flip(1)[:, :rank]
    inner = basis.T @ m if rows else m @ basis  # r × in, or out × r
    sigma = inner.norm(dim=1 if rows else 0)
    # σ ≈ 0 directions: a floor on √σ keeps both factors bounded (their product is unchanged)
    root = sigma.sqrt().clamp_min(max(float(sigma.max()) ** 0.5 * 1e-6, torch.finfo(torch.float64).tiny))
    if rows:
        up, down = basis * root, inner / root[:, None]
    else:
        up, down = inner / root, root[:, None] * basis.T
    return up.to(matrix.dtype), down.to(matrix.dtype)
