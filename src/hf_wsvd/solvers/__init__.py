"""Factorization methods, one file each; each registers its solver in ``SOLVERS``, which knows the
built-in ones by name and imports a method's file on first use (``registry.py``). Importing this
package imports no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .options import MethodOptions
from .registry import SOLVERS, LayerProblem, Solver, get_solver, register_solver

if TYPE_CHECKING:
    from .refine import solver_for

__all__ = ["SOLVERS", "LayerProblem", "MethodOptions", "Solver", "get_solver", "register_solver", "solver_for"]


def __getattr__(name: str) -> Any:
    # solver_for wraps a solver in the element-wise refinement, which imports torch.
    if name == "solver_for":
        from .refine import solver_for

        return solver_for
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
