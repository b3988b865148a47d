"""One registry of factorization methods: name → solver, with the statistics each one needs."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from ..config import WSVDConfig

# Statistics a solver can ask the compressor for.
FISHER = "fisher"


def _default_config() -> "WSVDConfig":
    from ..config import WSVDConfig

    return WSVDConfig()


@dataclass
class LayerProblem:
    """One matrix to factorize: ``weight`` (out × in, in the compute dtype) at ``rank``, the
    statistics its solver asked for (``fisher``: per-entry importance, out × in), and the recipe
    (``config``), from which a solver reads its own options."""

    name: str
    weight: torch.Tensor
    rank: int
    fisher: torch.Tensor | None = None
    config: "WSVDConfig" = field(default_factory=_default_config)


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
