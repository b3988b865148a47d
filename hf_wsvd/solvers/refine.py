"""``WSVDConfig.refine``: any method's factors, polished by the element-wise solver.

The method's solution is the start; the element-wise solver (``config.solver``) then lowers the
per-entry Fisher-weighted loss Σ F_ij (W − AB)²_ij from there and never returns a worse one.
"""

from __future__ import annotations

from dataclasses import replace

from .elementwise import solve_problem
from .registry import FISHER, LayerProblem, Solver, get_solver


def refined(solver: Solver) -> Solver:
    """``solver`` followed by the element-wise solver started from its factors."""

    def solve(problem: LayerProblem):
        result = solve_problem(problem, start=solver.solve(problem))
        return result.up, result.down

    return replace(solver, name=f"{solver.name}+refine", solve=solve, needs=solver.needs | {FISHER})


def solver_for(config) -> Solver:
    """The solver of ``config.method``, refined when ``config.refine`` is set."""
    solver = get_solver(config.method)
    return refined(solver) if config.refine else solver
