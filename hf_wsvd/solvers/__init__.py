"""Factorization methods, one file each; each registers its solver and its options class in
``SOLVERS`` on import."""

from . import elementwise, fwsvd, lp, quantized_residual, rescue, svd, whiten  # noqa: F401  (registration)
from .refine import solver_for
from .registry import SOLVERS, LayerProblem, MethodOptions, Solver, get_solver, register_solver

__all__ = ["SOLVERS", "LayerProblem", "MethodOptions", "Solver", "get_solver", "register_solver", "solver_for"]
