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
    g = (g + g.T) / 2
    scale = g.diagonal().abs().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    jitter = 0.0
    for attempt in range(JITTER_TRIES):
        factor, info = torch.linalg.cholesky_ex(g + jitter * eye)
        if info.item() == 0 and torch.isfinite(factor).all():
            return factor, True
        jitter = scale * JITTER_START * 10**attempt
    values, vectors = torch.linalg.eigh(g)
    floor = values.max().clamp_min(scale) * EIGEN_FLOOR
    return vectors * values.clamp_min(floor).sqrt(), False
