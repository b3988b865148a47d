"""Plain truncated SVD: minimizes ‖W − AB‖_F, every weight equally important."""

from __future__ import annotations

import torch

from .registry import LayerProblem, register_solver


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(up, down)`` of ``matrix`` in Frobenius norm, with the singular
    values split evenly (√S on each side) so both factors have similar scale."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@register_solver("svd", description="truncated SVD: min ‖W − AB‖_F")
def solve_svd(problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
    return truncated_svd(problem.weight, problem.rank)
