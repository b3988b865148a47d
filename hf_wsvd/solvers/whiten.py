"""Activation-aware weightings: whitening (SVD-LLM), ASVD scaling, and Fisher × whitening.

- ``whiten``: min ‖(W − AB)·Xᵀ‖_F over the calibration inputs X, i.e. R = chol(E[x xᵀ]); the
  truncation is exact in that norm (truncation-aware whitening).
- ``asvd``: min ‖(W − AB)·diag(E|x|)^α‖_F, a diagonal activation scaling (α = ``asvd_alpha``).
- ``fisher_whiten``: min ‖D·(W − AB)·Xᵀ‖_F with D = diag √(row-summed Fisher): the output rows
  the task loss is sensitive to, times the input directions that actually occur.

With a cross Gram (sequential refit), whiten and fisher_whiten fit the dense model's outputs
instead: min ‖D·(W·X_denseᵀ − AB·Xᵀ)‖_F, the SVD of D·W·G_dc·S⁻ᵀ (G_dc = E[x_dense xᵀ], S Sᵀ = E[x xᵀ]).
"""

from __future__ import annotations

import torch

from ..linalg import gram_square_root
from .fwsvd import axis_weights
from .registry import ACTIVATIONS, FISHER, LayerProblem
from .weighting import Weighting, register_weighting

# Input features that never fire are scaled by this fraction of the mean activation instead of 0.
ACTIVATION_FLOOR = 1e-6


def _whitening(problem: LayerProblem) -> Weighting:
    root, lower = gram_square_root(problem.gram)
    weighting = Weighting(right=root, lower=lower)
    if problem.cross_gram is not None:
        # W·(S + (G_dc − G)·S⁻ᵀ), which is W·G_dc·S⁻ᵀ when S·Sᵀ = G exactly. Written against W·S so
        # that the jitter S·Sᵀ = G + εI keeps acting as ε‖W − AB‖², as without refit: directions
        # the calibration never excites keep W's response instead of being shrunk to zero.
        shift = (problem.cross_gram - problem.gram).double()
        if lower:
            solved = torch.linalg.solve_triangular(root.T, shift, upper=True, left=False)
        else:
            solved = torch.linalg.solve(root, shift.T).T
        weighting.target = problem.weight.double() @ (root + solved)
    return weighting


@register_weighting("whiten", needs=(ACTIVATIONS,), description="whitening: min ‖(W − AB)·Xᵀ‖_F")
def whiten_weighting(problem: LayerProblem) -> Weighting:
    return _whitening(problem)


@register_weighting("asvd", needs=(ACTIVATIONS,), description="ASVD: min ‖(W − AB)·diag(E|x|)^α‖_F")
def asvd_weighting(problem: LayerProblem) -> Weighting:
    scale = problem.mean_abs.double()
    scale = scale.clamp_min(ACTIVATION_FLOOR * scale.mean().clamp_min(1e-30))
    return Weighting(right=scale.pow(problem.config.asvd_alpha))


def _fisher_whiten_loss_scale(problem: LayerProblem) -> float:
    # Row-summed Fisher Σ_j E[(Σ_t g_ti x_tj)²] ≈ E[g_i²]·E‖x‖², so dividing ‖D·ΔW·S‖² by
    # tr(G) = E‖x‖² leaves Σ_i E[g_i²]·E[(ΔW x)_i²], twice the predicted loss increase.
    return 0.5 / max(float(problem.gram.double().trace()), torch.finfo(torch.float64).tiny)


@register_weighting("fisher_whiten", needs=(FISHER, ACTIVATIONS), loss_scale=_fisher_whiten_loss_scale,
                    description="Fisher × whitening: min ‖D·(W − AB)·Xᵀ‖_F, D = diag √(row-summed Fisher)")
def fisher_whiten_weighting(problem: LayerProblem) -> Weighting:
    whitening = _whitening(problem)
    whitening.rows = axis_weights(problem.fisher, "output").double()
    return whitening
