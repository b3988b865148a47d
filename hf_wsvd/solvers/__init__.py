"""Factorization methods. Each module registers its solver in ``SOLVERS`` on import."""

from . import elementwise, fwsvd, lp, rescue, svd, whiten  # noqa: F401  (registration)
from .refine import solver_for
from .registry import ACTIVATIONS, FISHER, SOLVERS, LayerProblem, Solver, get_solver, register_solver

__all__ = ["ACTIVATIONS", "FISHER", "SOLVERS", "LayerProblem", "Solver", "get_solver", "register_solver", "solver_for"]
