"""One registry of factorization methods: name → solver, its own options, the statistics it needs
and what it can be used for. ``SOLVERS`` is the one list of method names: the built-in ones are
known without importing their modules (so the command line lists them without importing torch),
and a module is imported the first time its method is used.

A method's options are a frozen dataclass whose fields carry the names of the ``WSVDConfig`` fields
they come from (``options.py``), so the recipe stays one flat, user-facing object while a solver
receives only its own options (``MethodOptions.from_recipe``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .options import MethodOptions

if TYPE_CHECKING:
    import torch

# The built-in methods: name → the module of ``hf_wsvd.solvers`` that registers it.
BUILTIN_METHODS = {"asvd": "whiten", "fisher_whiten": "whiten", "fwsvd": "fwsvd", "lp": "lp",
                   "quantized_residual": "quantized_residual", "rescue": "rescue", "svd": "svd",
                   "tfwsvd": "elementwise", "whiten": "whiten"}


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
    embeddable: bool = False
    elementwise: bool = False

    def needs_for(self, options: MethodOptions) -> frozenset[str]:
        """The statistics this method reads with ``options``."""
        return frozenset(self.needs(options) if callable(self.needs) else self.needs)


class Registry(MutableMapping[str, Solver]):
    """Method name → ``Solver``: the built-in methods (loaded on first use) and those registered
    with ``register_solver`` (which a test may delete again)."""

    def __init__(self) -> None:
        self._solvers: dict[str, Solver] = {}

    def __getitem__(self, name: str) -> Solver:
        if name not in self._solvers and name in BUILTIN_METHODS:
            importlib.import_module(f"{__package__}.{BUILTIN_METHODS[name]}")
        return self._solvers[name]

    def __contains__(self, name: object) -> bool:
        return name in BUILTIN_METHODS or name in self._solvers

    def __iter__(self) -> Iterator[str]:
        return iter([*BUILTIN_METHODS, *(name for name in self._solvers if name not in BUILTIN_METHODS)])

    def __len__(self) -> int:
        return len(set(BUILTIN_METHODS) | set(self._solvers))

    def __setitem__(self, name: str, solver: Solver) -> None:
        if name in self._solvers:
            raise ValueError(f"solver {name!r} is already registered")
        self._solvers[name] = solver

    def __delitem__(self, name: str) -> None:
        del self._solvers[name]


SOLVERS = Registry()


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
    embeddable: bool = False,
    elementwise: bool = False,
):
    """Decorator registering ``solve(problem) -> (up, down)`` under ``name`` with its options class
    (see ``Solver`` for the rest)."""

    def wrap(fn: Callable[[LayerProblem], tuple[torch.Tensor, torch.Tensor]]):
        SOLVERS[name] = Solver(
            name, with_defaults(options, fn), options, needs, description or (fn.__doc__ or "").strip(),
            spectrum and with_defaults(options, spectrum), loss_scale and with_defaults(options, loss_scale),
            embeddable, elementwise,
        )
        return fn

    return wrap


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(SOLVERS)}")
    return SOLVERS[name]
