"""TFWSVD: element-wise Fisher-weighted low-rank factorization (Hua et al., 2022).

Minimizes the weighted loss  Σ_ij w_ij (W_ij − (AB)_ij)² / Σ_ij w_ij  with one importance w_ij per
weight, where FWSVD (``fwsvd.py``) replaces w_ij by its row sum so that an SVD solves it. The
element-wise problem is non-convex with no closed form; every solver here starts from the FWSVD
factors and returns the best iterate it saw, so it is never worse than FWSVD on this objective:

- ``als``: alternating least squares: closed-form weighted updates of the rows of A, then of the
  columns of B, the per-row normal equations batched over chunks of rows;
- ``adam``: Adam on A and B with the analytic gradient (three matrix products per step);
- ``em``: Srebro & Jaakkola (2003): fill each entry with w·W + (1 − w)·AB (w scaled to [0, 1]),
  then a truncated SVD of the filled matrix;
- ``hybrid``: Adam while the loss is not below the FWSVD start, then ALS to converge.

The raw Fisher has a huge dynamic range and many tiny entries; ``prepare_importance`` tempers it
(w = F^α, α = ``config.importance_power``), normalizes it to mean 1 and floors it, which keeps the
normal equations well conditioned and every entry at least slightly anchored to its weight.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..linalg import truncated_svd
from ..statistics.names import FISHER
from .fwsvd import solve_fwsvd
from .options import SOLVER_NAMES, ElementwiseOptions
from .registry import LayerProblem, register_solver

logger = logging.getLogger(__name__)

# Prepared importance never falls below this fraction of its mean: zero-importance entries still
# pull (weakly) toward their weight, so no row/column normal equation is singular.
ENTRY_IMPORTANCE_FLOOR = 1e-4
# Ridge added to each ALS normal equation, relative to its mean diagonal: bounds the condition
# number (about 1/RIDGE) so float32 Cholesky never fails, at a small bias (a row's coefficients
# move by up to ~4e-4 of its largest under heavy-tailed importance; tests/test_elementwise.py).
RIDGE = 1e-6
# Elements of the largest temporary of one ALS chunk (chunk rows × rank × columns): 64M floats
# (256 MB in float32) whatever the matrix size, so memory stays linear in the matrix.
ALS_CHUNK_ELEMENTS = 1 << 26
# Adam: the step size relative to the RMS of each factor's entries (the factors are balanced, so
# one relative step suits both), and steps per reported iteration.
ADAM_LR = 2e-3
ADAM_STEPS_PER_ITERATION = 20
# hybrid: the Adam phase uses at most this share of the iteration budget.
HYBRID_FIRST_ORDER_SHARE = 0.25


@dataclass
class ElementwiseResult:
    """Factors (``up @ down ≈ weight``, in the weight's dtype) and how the solver got there:
    ``history[k]`` is the weighted loss after iteration k (``history[0]``: the FWSVD start),
    ``phases[k]`` the solver that ran iteration k."""

    up: torch.Tensor
    down: torch.Tensor
    history: list[float] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # seconds since the start, per history entry
    stopped: str = ""  # "tolerance", "iterations" or "time"

    @property
    def start_loss(self) -> float:
        return self.history[0]

    @property
    def best_loss(self) -> float:
        return min(self.history)


def prepare_importance(fisher: torch.Tensor, power: float = 1.0, floor: float = ENTRY_IMPORTANCE_FLOOR) -> torch.Tensor:
    """Per-entry weights from the Fisher information: ``F^power``, scaled to mean 1, floored at
    ``floor`` (float32, or float64 for float64 input). An all-zero Fisher gives uniform weights."""
    if not torch.isfinite(fisher).all():
        raise ValueError("the Fisher information contains NaN or inf values")
    if (fisher < 0).any():
        raise ValueError(f"the Fisher information has negative entries (min {float(fisher.min()):.3g})")
    dtype = torch.float64 if fisher.dtype == torch.float64 else torch.float32
    w = fisher.to(dtype)
    if power != 1.0:
        w = w.pow(power)
    mean = w.mean()
    if not mean > 0:
        return torch.ones_like(w)
    return (w / mean).clamp_min(floor)


def weighted_loss(weight: torch.Tensor, importance: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """Σ w (W − up·down)² / Σ w."""
    return float((importance * (weight - up @ down).square()).sum() / importance.sum())


def balance(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product with orthogonal directions and the singular values split √S / √S, as
    ``truncated_svd`` returns them (well-scaled factors for the float16/bfloat16 checkpoint)."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    root = s.sqrt()
    return (q_up @ u) * root, root[:, None] * (vh @ q_down.T)


# --------------------------------------------------------------------------- ALS


def weighted_row_update(target: torch.Tensor, importance: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """For every row n, ``x_n = argmin_x Σ_j w_nj (t_nj − x·basis_:j)²`` (``basis``: r × m), with the
    normal equations ridged by ``RIDGE``.

    The r × r normal equations are formed and Cholesky-solved for a chunk of rows at a time, the
    chunk sized so its largest temporary has ``ALS_CHUNK_ELEMENTS`` elements: never n × r × r.
    """
    n, m = target.shape
    r = basis.shape[0]
    chunk = max(1, ALS_CHUNK_ELEMENTS // (r * max(m, r)))
    eye = torch.eye(r, dtype=basis.dtype, device=basis.device)
    out = torch.empty(n, r, dtype=basis.dtype, device=basis.device)
    for s in range(0, n, chunk):
        w = importance[s:s + chunk]
        weighted_basis = basis[None] * w[:, None, :]  # c × r × m
        gram = weighted_basis @ basis.T  # c × r × r
        rhs = (w * target[s:s + chunk]) @ basis.T  # c × r
        diag_mean = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(gram.dtype).tiny)
        gram = gram + (RIDGE * diag_mean)[:, None, None] * eye
        with single_threaded_lapack(gram.device):
            factor, info = torch.linalg.cholesky_ex(gram)
            if bool((info > 0).any()):  # only under extreme importance; a stronger ridge fixes it
                gram = gram + (1e3 * RIDGE * diag_mean)[:, None, None] * eye
                factor = torch.linalg.cholesky(gram)
        out[s:s + chunk] = torch.cholesky_solve(rhs[:, :, None], factor)[:, :, 0]
    return out


@contextmanager
def single_threaded_lapack(device: torch.device):
    """Run CPU LAPACK calls (QR, SVD, batched Cholesky) on one thread. On a loaded machine MKL's
    threads spin against each other: measured on 2 busy cores, 1 thread vs 2: batched Cholesky of
    1142 153×153 matrices 0.14 s vs 10 s, QR of 1536×153 0.006 s vs 2.2 s. GEMMs keep all threads."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Problem:
    """The weighted problem in float32/float64 with both orientations cached (ALS updates columns
    as rows of the transpose)."""

    def __init__(self, weight: torch.Tensor, importance: torch.Tensor) -> None:
        self.weight = weight
        self.importance = importance
        self.total = importance.sum()
        self._transposed: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._transposed is None:
            self._transposed = (self.weight.T.contiguous(), self.importance.T.contiguous())
        return self._transposed

    def loss(self, up: torch.Tensor, down: torch.Tensor) -> float:
        return weighted_loss(self.weight, self.importance, up, down)


def _als_step(p: _Problem, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Orthonormalize the fixed factor first: the normal equations then have the conditioning of
    # the importance alone, not of the factor's scale.
    with single_threaded_lapack(up.device):
        q, _ = torch.linalg.qr(down.T)  # in × r
    up = weighted_row_update(p.weight, p.importance, q.T)
    with single_threaded_lapack(up.device):
        q_up, _ = torch.linalg.qr(up)
    weight_t, importance_t = p.transposed
    down = weighted_row_update(weight_t, importance_t, q_up.T).T
    return q_up, down.contiguous()


# --------------------------------------------------------------------------- first order


class _Adam:
    """Full-batch Adam on (up, down) with the analytic gradient of the weighted loss; the step is
    relative to each factor's RMS so it needs no tuning across layers."""

    def __init__(self, p: _Problem, up: torch.Tensor, down: torch.Tensor, lr: float = ADAM_LR) -> None:
        self.p = p
        self.params = [up.clone(), down.clone()]
        self.optimizer = torch.optim.Adam(
            [{"params": [t], "lr": lr * float(t.square().mean().sqrt().clamp_min(1e-12))} for t in self.params]
        )

    def run(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = self.params
        for _ in range(steps):
            residual = self.p.importance * (up @ down - self.p.weight) * (2 / self.p.total)
            up.grad = residual @ down.T
            down.grad = up.T @ residual
            self.optimizer.step()
        return up.detach(), down.detach()


# --------------------------------------------------------------------------- EM


def _em_step(p: _Problem, up: torch.Tensor, down: torch.Tensor, scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # E-step: entries known with confidence `scaled` ∈ (0, 1], the rest taken from the estimate.
    # M-step: the unweighted optimum of the filled matrix. Monotone in the weighted loss.
    filled = torch.lerp(up @ down, p.weight, scaled)
    with single_threaded_lapack(filled.device):
        return truncated_svd(filled, up.shape[1])


# --------------------------------------------------------------------------- driver


def _fwsvd_start(weight: torch.Tensor, fisher: torch.Tensor, rank: int, axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    return solve_fwsvd(LayerProblem("start", weight, rank, fisher=fisher), axis)


def solve_elementwise(
    weight: torch.Tensor,
    fisher: torch.Tensor,
    rank: int,
    solver: str = "hybrid",
    max_iterations: int = 8,
    tolerance: float = 1e-4,
    time_budget: float | None = None,
    importance_power: float = 1.0,
    fisher_axis: str = "output",
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ElementwiseResult:
    """Minimize Σ w (W − AB)² from the FWSVD factors (or ``start``) with ``solver``.

    Stops after ``max_iterations`` iterations (Adam: ``ADAM_STEPS_PER_ITERATION`` steps each),
    when the loss changes by less than ``tolerance`` (relative) in one iteration, or once
    ``time_budget`` seconds have passed. Returns the best iterate, in the weight's dtype.
    """
    if solver not in SOLVER_NAMES:
        raise ValueError(f"solver={solver!r} is not one of {SOLVER_NAMES}")
    if fisher.shape != weight.shape:
        raise ValueError(f"Fisher shape {tuple(fisher.shape)} does not match the weight {tuple(weight.shape)}")
    begin = time.perf_counter()
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32  # float16 in: float32 math
    importance = prepare_importance(fisher.to(weight.device), importance_power).to(dtype)
    p = _Problem(weight.to(dtype), importance)
    if start is None:
        with single_threaded_lapack(weight.device):
            start = _fwsvd_start(p.weight, fisher.to(weight.device, dtype), rank, fisher_axis)
    up, down = (t.to(weight.device, dtype) for t in start)
    if rank >= min(weight.shape):  # full rank: the start reproduces the weight, nothing to solve
        max_iterations = 0

    result = ElementwiseResult(up, down, [p.loss(up, down)], ["start"], [time.perf_counter() - begin])
    best = (result.history[0], up, down)
    adam: _Adam | None = None
    scaled = importance / importance.max()
    first_order_budget = max(1, int(HYBRID_FIRST_ORDER_SHARE * max_iterations))
    phase = "adam" if solver in ("adam", "hybrid") else solver
    result.stopped = "iterations"
    for iteration in range(1, max_iterations + 1):
        if phase == "adam":
            adam = adam or _Adam(p, up, down)
            up, down = adam.run(ADAM_STEPS_PER_ITERATION)
        elif phase == "als":
            up, down = _als_step(p, up, down)
        else:
            up, down = _em_step(p, up, down, scaled)
        loss = p.loss(up, down)
        previous = result.history[-1]
        result.history.append(loss)
        result.phases.append(phase)
        result.times.append(time.perf_counter() - begin)
        if not loss < float("inf"):  # diverged (non-finite): keep the best iterate
            result.stopped = "non-finite"
            break
        if loss < best[0]:
            best = (loss, up.clone(), down.clone())
        if solver == "hybrid" and phase == "adam":
            # The switch: Adam while it has not beaten the FWSVD loss (its start), then ALS from
            # the best point, which converges fast near a minimum.
            if loss < result.history[0] or iteration >= first_order_budget:
                phase, (up, down) = "als", best[1:]
        elif abs(previous - loss) <= tolerance * max(abs(previous), 1e-30):
            result.stopped = "tolerance"
            break
        if time_budget is not None and result.times[-1] >= time_budget:
            result.stopped = "time"
            break
    loss, up, down = best
    logger.debug("%s: weighted loss %s (%s)", solver, [f"{v:.4g}" for v in result.history], result.stopped)
    if max_iterations > 0:
        with single_threaded_lapack(up.device):
            up, down = balance(up, down)
    result.up, result.down = up.to(weight.dtype), down.to(weight.dtype)
    return result


def solve_problem(
    problem: LayerProblem, options: ElementwiseOptions | None = None,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ElementwiseResult:
    """``solve_elementwise`` with ``options`` (default: the problem's own, or the defaults)."""
    c = options or problem.options or ElementwiseOptions()
    return solve_elementwise(
        problem.weight, problem.fisher, problem.rank, solver=c.solver,
        max_iterations=c.max_iterations, tolerance=c.tolerance, time_budget=c.time_budget,
        importance_power=c.importance_power, fisher_axis=c.fisher_axis, start=start,
    )


@register_solver(
    "tfwsvd", needs=(FISHER,), options=ElementwiseOptions, elementwise=True,
    description="element-wise Fisher-weighted low rank min Σ F_ij (W − AB)²_ij from FWSVD (solver: als/adam/em/hybrid)",
)
def solve_tfwsvd(problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
    result = solve_problem(problem)
    return result.up, result.down
