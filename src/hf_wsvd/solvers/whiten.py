"""Activation-aware weightings: whitening (SVD-LLM), ASVD scaling, and Fisher × whitening.

- ``whiten``: min ‖(W − AB)·Xᵀ‖_F over the calibration inputs X, i.e. R = chol(E[x xᵀ]); the
  truncation is exact in that norm (truncation-aware whitening).
- ``asvd``: min ‖(W − AB)·diag(E|x|)^α‖_F, a diagonal activation scaling (α = ``asvd_alpha``).
- ``fisher_whiten``: min ‖D·(W − AB)·Xᵀ‖_F with D = diag √(row-summed Fisher): the output rows
  the task loss is sensitive to, times the input directions that actually occur.
"""

from __future__ import annotations

import torch

from ..linalg import gram_square_root
from ..statistics.names import FISHER_ROWS, GRAM, MEAN_ABS
from .fwsvd import axis_weights, has_importance
from .options import AsvdOptions
from .registry import LayerProblem
from .weighting import Weighting, register_weighting

# Input features that never fire are scaled by this fraction of the mean activation instead of 0.
ACTIVATION_FLOOR = 1e-6


def _whitening(problem: LayerProblem) -> Weighting:
    if not problem.gram.diagonal().any():  # no input ever reached the layer (its square root is ~0)
        return Weighting(unread=True)
    root, lower = gram_square_root(problem.gram)
    return Weighting(right=root, lower=lower)


@register_weighting("whiten", needs=(GRAM,), description="whitening: min ‖(W − AB)·Xᵀ‖_F")
def whiten_weighting(problem: LayerProblem) -> Weighting:
    return _whitening(problem)


@register_weighting("asvd", needs=(MEAN_ABS,), options=AsvdOptions,
                    description="ASVD: min ‖(W − AB)·diag(E|x|)^α‖_F")
def asvd_weighting(problem: LayerProblem) -> Weighting:
    scale = problem.mean_abs.double()
    if not scale.any():  # no input ever reached the layer: the floor alone would split the factors 1e-10 / 1e8
        return Weighting(unread=True)
    scale = scale.clamp_min(ACTIVATION_FLOOR * scale.mean())
    return Weighting(right=scale.pow(problem.options.asvd_alpha))


def _fisher_whiten_loss_scale(problem: LayerProblem) -> float:
    # Row-summed Fisher Σ_j E[(Σ_t g_ti x_tj)²] ≈ E[g_i²]·E‖x‖², so dividing ‖D·ΔW·S‖² by
    # tr(G) = E‖x‖² leaves Σ_i E[g_i²]·E[(ΔW x)_i²], twice the predicted loss increase.
    trace = max(float(problem.gram.double().trace()), torch.finfo(torch.float64).tiny)
    return has_importance(problem, "output") * 0.5 / trace


@register_weighting("fisher_whiten", needs=(FISHER_ROWS, GRAM), loss_scale=_fisher_whiten_loss_scale,
                    description="Fisher × whitening: min ‖D·(W − AB)·Xᵀ‖_F, D = diag √(row-summed Fisher)")
def fisher_whiten_weighting(problem: LayerProblem) -> Weighting:
    whitening = _whitening(problem)
    whitening.rows = axis_weights(problem, "output").double()
    return whitening
