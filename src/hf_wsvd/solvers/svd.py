"""Plain truncated SVD: minimizes ‖W − AB‖_F, every weight equally important."""

from __future__ import annotations

from .registry import LayerProblem
from .weighting import Weighting, register_weighting


@register_weighting("svd", embeddable=True, description="truncated SVD: min ‖W − AB‖_F")
def svd_weighting(problem: LayerProblem) -> Weighting:
    return Weighting()
