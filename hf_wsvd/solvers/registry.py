"""One registry of factorization methods: name → solver, with the statistics each one needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Statistics a solver can ask the compressor for.
FISHER = "fisher"


@dataclass
class LayerProblem:
    """One matrix to factorize: ``weight`` (out × in, in the compute dtype) at ``rank``, with the
    statistics its solver asked for (``fisher``: per-entry importance, out × in)."""

    name: str
    weight: torch.Tensor
    rank: int
    fisher: torch.Tensor | None = None
    fisher_axis: str = "output"


@dataclass(frozen=True)
class Solver:
    """A registered method: ``solve(problem) -> (up, down)`` with ``up @ down ≈ weight``."""

    name: str
    solve: Callable[[LayerProblem], tuple[torch.Tensor, torch.Tensor]]
    needs: frozenset[str]
    description: str


SOLVERS: dict[str, Solver] = {}


def register_solver(name: str, needs: tuple[str, ...] = (), description: str = ""):
    """Decorator registering ``solve(problem) -> (up, down)`` under ``name``."""

    def wrap(fn: Callable[[LayerProblem], tuple[torch.Tensor, torch.Tensor]]):
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        SOLVERS[name] = Solver(name, fn, frozenset(needs), description or (fn.__doc__ or "").strip())
        return fn

    return wrap


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(SOLVERS)}")
    return SOLVERS[name]
