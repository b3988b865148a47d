"""Factorization methods. Each module registers its solver in ``SOLVERS`` on import."""

from . import fwsvd, svd  # noqa: F401  (registration)
from .registry import FISHER, SOLVERS, LayerProblem, Solver, get_solver, register_solver

__all__ = ["FISHER", "SOLVERS", "LayerProblem", "Solver", "get_solver", "register_solver"]
