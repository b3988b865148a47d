"""One registry of factorization methods: name → solver, its own options and the statistics it needs.

A method's options are a frozen dataclass whose fields carry the names of the ``WSVDConfig`` fields
they come from, so the recipe stays one flat, user-facing object while a solver receives only its
own options (``MethodOptions.from_recipe``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch


@dataclass(frozen=True)
class MethodOptions:
    """The options of one method; subclasses add fields named like the recipe's and validate them."""

    @classmethod
    def from_recipe(cls, recipe: Any) -> "MethodOptions":
        """The options of this method read from ``recipe`` (a ``WSVDConfig`` or any object with
        the same attribute names)."""
        return cls(**{f.name: getattr(recipe, f.name) for f in dataclasses.fields(cls)})


@dataclass
class LayerProblem:
    """One matrix to factorize: ``weight`` (out × in, in the compute dtype) at ``rank``, the
    method's ``options`` (None: its defaults) and the statistics it asked for: ``fisher``
    (per-entry importance, out × in), ``fisher_rows`` / ``fisher_cols`` (its sums per output row /
    input column), ``gram`` (input E[x xᵀ], in × in), ``mean_abs`` (input E|x|, in) and
    ``row_weights`` (one non-negative value per row, e.g. an embedding's token frequencies);
    ``quantized``: the weight as its quantization stores it (dequantized), for a method that corrects
    the quantization error."""

    name: str
    weight: torch.Tensor
    rank: int
    options: MethodOptions | None = None
    fisher: torch.Tensor | None = None
    fisher_rows: torch.Tensor | None = None
    fisher_cols: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    mean_abs: torch.Tensor | None = None
    row_weights: torch.Tensor | None = None
    quantized: torch.Tensor | None = None


Needs = Iterable[str] | Callable[[Any], Iterable[str]]


@dataclass(frozen=True)
class Solver:
    """A registered method: ``solve(problem) -> (up, down)`` with ``up @ down ≈ weight``;
    ``spectrum(problem)``, where the method has one, gives the singular values of the matrix it
    truncates, so that rank allocation can read the loss of every rank before solving.
    ``loss_scale(problem)``, where the method weights by the Fisher information, turns a squared
    singular value into the Fisher-predicted increase of the task loss, so that losses of
    different layers compare (allocation then needs no per-layer normalization). ``options`` is
    the method's options class; ``needs`` the statistic names it reads (or a function of its
    options returning them)."""

    name: str
    solve: Callable[[LayerProblem], tuple[torch.Tensor, torch.Tensor]]
    options: type[MethodOptions]
    needs: Needs
    description: str
    spectrum: Callable[[LayerProblem], torch.Tensor] | None = None
    loss_scale: Callable[[LayerProblem], float] | None = None

    def needs_for(self, options: MethodOptions) -> frozenset[str]:
        """The statistics this method reads with ``options``."""
        return frozenset(self.needs(options) if callable(self.needs) else self.needs)


SOLVERS: dict[str, Solver] = {}


def with_defaults(options: type[MethodOptions], fn: Callable[[LayerProblem], Any]) -> Callable[[LayerProblem], Any]:
    """``fn`` applied to the problem with ``options()`` filled in where it has none."""

    def call(problem: LayerProblem):
        if problem.options is None:
            problem = dataclasses.replace(problem, options=options())
        return fn(problem)

    return call


def register_solver(
    name: str,
    needs: Needs = (),
    description: str = "",
    options: type[MethodOptions] = MethodOptions,
    spectrum: Callable[[LayerProblem], torch.Tensor] | None = None,
    loss_scale: Callable[[LayerProblem], float] | None = None,
):
    """Decorator registering ``solve(problem) -> (up, down)`` under ``name`` with its options class."""

    def wrap(fn: Callable[[LayerProblem], tuple[torch.Tensor, torch.Tensor]]):
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        SOLVERS[name] = Solver(
            name, with_defaults(options, fn), options, needs, description or (fn.__doc__ or "").strip(),
            spectrum and with_defaults(options, spectrum), loss_scale and with_defaults(options, loss_scale),
        )
        return fn

    return wrap


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(SOLVERS)}")
    return SOLVERS[name]
