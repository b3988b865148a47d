"""One registry of factorization methods: name → solver, with the statistics each one needs."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from ..config import WSVDConfig

# Statistics a solver can ask the compressor for.
FISHER = "fisher"  # per-entry empirical Fisher of the task loss
ACTIVATIONS = "activations"  # calibration input Gram matrix and mean |x| of each layer


def _default_config() -> "WSVDConfig":
    from ..config import WSVDConfig

    return WSVDConfig()


@dataclass
class LayerProblem:
    """One matrix to factorize: ``weight`` (out × in, in the compute dtype) at ``rank``, the
    statistics its solver asked for (``fisher``: per-entry importance, out × in; ``gram``: input
    E[x xᵀ], in × in; ``mean_abs``: input E|x|, in), and the recipe (``config``), from which a
    solver reads its own options."""

    name: str
    weight: torch.Tensor
    rank: int
    fisher: torch.Tensor | None = None
    config: "WSVDConfig" = field(default_factory=_default_config)
    gram: torch.Tensor | None = None
    mean_abs: torch.Tensor | None = None
    # Optional per-row importance (one non-negative value per row of ``weight``, e.g. the token
    # frequencies of an embedding's vocab × hidden matrix); read by the ``lp`` solver.
    row_weights: torch.Tensor | None = None


@dataclass(frozen=True)
class Solver:
    """A registered method: ``solve(problem) -> (up, down)`` with ``up @ down ≈ weight``;
    ``spectrum(problem)``, where the method has one, gives the singular values of the matrix it
    truncates, so that rank allocation can read the loss of every rank before solving.
    ``loss_scale(problem)``, where the method weights by the Fisher information, turns a squared
    singular value into the Fisher-predicted increase of the task loss, so that losses of
    different layers compare (allocation then needs no per-layer normalization)."""

    name: str
    solve: Callable[[LayerProblem], tuple[torch.Tensor, torch.Tensor]]
    needs: frozenset[str]
    description: str
    spectrum: Callable[[LayerProblem], torch.Tensor] | None = None
    loss_scale: Callable[[LayerProblem], float] | None = None


SOLVERS: dict[str, Solver] = {}


def register_solver(
    name: str,
    needs: tuple[str, ...] = (),
    description: str = "",
    spectrum: Callable[[LayerProblem], torch.Tensor] | None = None,
    loss_scale: Callable[[LayerProblem], float] | None = None,
):
    """Decorator registering ``solve(problem) -> (up, down)`` under ``name``."""

    def wrap(fn: Callable[[LayerProblem], tuple[torch.Tensor, torch.Tensor]]):
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        SOLVERS[name] = Solver(name, fn, frozenset(needs), description or (fn.__doc__ or "").strip(), spectrum,
                               loss_scale)
        return fn

    return wrap


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(SOLVERS)}")
    return SOLVERS[name]
