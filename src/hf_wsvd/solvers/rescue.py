"""``rescue``: FWSVD where it is safe, the element-wise solver where the risk metric says it is not:
where the Fisher-predicted loss increase of the FWSVD factors, ``risk.predicted_loss`` =
½ Σ F (W − AB)² (nats), exceeds ``risk_threshold``. Of the metrics validated in
``benchmarks/svd_risk.py`` this absolute one ranks the per-matrix accuracy drops best; the
scale-free ratio to ½ Σ F W² does not predict them.

Only the risky matrices pay for the iterative solver, which starts from the FWSVD factors computed
here anyway.
"""

from __future__ import annotations

import logging
import torch

from ..statistics.names import FISHER
from .elementwise import single_threaded_lapack, solve_problem
from .fwsvd import solve_fwsvd
from .options import RescueOptions
from .registry import LayerProblem, register_solver
from .risk import predicted_loss

logger = logging.getLogger(__name__)


@register_solver(
    "rescue", needs=(FISHER,), options=RescueOptions, elementwise=True,
    description="fwsvd, refined by the element-wise solver where its Fisher-predicted loss ½ΣF(W−AB)² exceeds risk_threshold",
)
def solve_rescue(problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
    threshold = problem.options.risk_threshold
    with single_threaded_lapack(problem.weight.device):
        up, down = solve_fwsvd(problem, problem.options.fisher_axis)
    risk = predicted_loss(problem.weight, problem.fisher, up, down)
    if risk <= threshold:
        logger.debug("%s: risk %.3g ≤ %.3g, fwsvd kept", problem.name, risk, threshold)
        return up, down
    logger.debug("%s: risk %.3g > %.3g, element-wise refinement", problem.name, risk, threshold)
    result = solve_problem(problem, start=(up, down))
    return result.up, result.down
