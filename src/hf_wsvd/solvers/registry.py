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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from ..registry import Registry
from .options import MethodOptions

if TYPE_CHECKING:
    import torch

# The built-in methods: name → the module of ``hf_wsvd.solvers`` that registers it.
BUILTIN_METHODS = {"asvd": "whiten", "fisher_whiten": "whiten", "fwsvd": "fwsvd", "lp": "lp",
                   "quantized_residual": "quantized_residual", "rescue": "rescue", "svd": "svd",
                   "tfwsvd": "elementwise", "whiten": "whiten"}


@dataclass(init=False)
class LayerProblem:
    """One matrix to factorize: ``weight`` (out × in, in the compute dtype) at ``rank``, the
    method's ``options`` (None: its defaults) and the ``statistics`` it asked for, by name
    (``hf_wsvd.statistics.names``: ``fisher``, ``fisher_rows``, ``gram``, ...; a registered
    collector's name), read as attributes too (``problem.gram``; None when not given). Other inputs
    ride along the same way: ``row_weights`` (one non-negative value per row, e.g. an embedding's
    token frequencies), ``quantized`` (the weight as its quantization stores it, for a method that
    corrects the quantization error).

    Statistics may be given as keywords (``LayerProblem(name, w, r, fisher=f)``); a keyword set to
    None removes that statistic (``dataclasses.replace(problem, quantized=None)``)."""

    name: str
    weight: torch.Tensor
    rank: int
    options: MethodOptions | None = None
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)

    def __init__(self, name: str, weight: torch.Tensor, rank: int, options: MethodOptions | None = None,
                 statistics: dict[str, torch.Tensor] | None = None, **named: torch.Tensor | None) -> None:
        self.name, self.weight, self.rank, self.options = name, weight, rank, options
        self.statistics = dict(statistics or {})
        for key, value in named.items():
            if value is None:
                self.statistics.pop(key, None)
            else:
                self.statistics[key] = value

    def __getattr__(self, name: str) -> torch.Tensor | None:
        # Only reached for names that are no attribute: a statistic, or None when it was not given.
        if name.startswith("_") or "statistics" not in self.__dict__:
            raise AttributeError(name)
        return self.statistics.get(name)


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
    options returning them). ``embeddable``: usable on embedding rows, which get no Fisher
    information; ``elementwise``: it already minimizes the per-entry Fisher objective, so
    ``refine`` has nothing to add."""

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

    def finite_solve(self, problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
        """``solve(problem)``; a FloatingPointError naming the layer where a factor is not finite."""
        import torch  # here, not at the top: listing the methods must not import torch (see the module)

        with naming_the_layer(problem.name):
            up, down = self.solve(problem)
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise FloatingPointError(f"{self.name} produced non-finite factors for {problem.name!r}: check the "
                                     "layer's weights and statistics for NaN/inf")
        return up, down


SOLVERS: Registry[Solver] = Registry("method", __package__, BUILTIN_METHODS)


@contextmanager
def naming_the_layer(name: str) -> Iterator[None]:
    """A solver's error about the layer ``name`` (its data: NaN statistics, a rank it cannot take, a
    decomposition that fails on them) says which layer, where the message does not already."""
    import torch  # here, not at the top (see the module)

    try:
        yield
    except (ValueError, FloatingPointError, torch.linalg.LinAlgError) as error:  # LinAlgError: CUDA's on NaN
        if name in str(error):
            raise
        try:
            named = type(error)(f"{name!r}: {error}")
        except TypeError:  # an error type whose constructor takes more than a message: as it is
            named = None
        if named is None:
            raise
        raise named from error


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
    """The registered method ``name``."""
    return SOLVERS.lookup(name)
