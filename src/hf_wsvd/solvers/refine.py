"""``WSVDConfig.refine``: any method's factors, polished by the element-wise solver.

The method's solution is the start; the element-wise solver (``solver``) then lowers the
per-entry Fisher-weighted loss Σ F_ij (W − AB)²_ij from there and never returns a worse one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..statistics.names import FISHER
from .elementwise import solve_problem
from .options import ElementwiseOptions
from .registry import LayerProblem, MethodOptions, Solver, get_solver


def refined(solver: Solver) -> Solver:
    """``solver`` followed by the element-wise solver started from its factors."""

    @dataclass(frozen=True)
    class RefineOptions(MethodOptions):
        base: MethodOptions = solver.options()
        elementwise: ElementwiseOptions = ElementwiseOptions()

        @classmethod
        def from_recipe(cls, recipe: Any) -> "RefineOptions":
            return cls(solver.options.from_recipe(recipe), ElementwiseOptions.from_recipe(recipe))

    def base_problem(problem: LayerProblem) -> LayerProblem:
        return dataclasses.replace(problem, options=(problem.options or RefineOptions()).base)

    def solve(problem: LayerProblem):
        start = solver.solve(base_problem(problem))
        result = solve_problem(problem, (problem.options or RefineOptions()).elementwise, start=start)
        return result.up, result.down

    def needs(options: RefineOptions) -> frozenset[str]:
        return solver.needs_for(options.base) | {FISHER}

    return Solver(
        f"{solver.name}+refine", solve, RefineOptions, needs, solver.description,
        solver.spectrum and (lambda problem: solver.spectrum(base_problem(problem))),
        solver.loss_scale and (lambda problem: solver.loss_scale(base_problem(problem))),
    )


def solver_for(config: Any) -> Solver:
    """The solver of ``config.method``, refined when ``config.refine`` is set."""
    solver = get_solver(config.method)
    return refined(solver) if config.refine else solver
