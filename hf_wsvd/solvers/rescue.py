"""``rescue``: FWSVD where it is safe, the element-wise solver where the risk metric says the row
weighting loses too much (``risk.relative_risk`` of the FWSVD factors > ``config.risk_threshold``).

Only the risky matrices pay for the iterative solver, which starts from the FWSVD factors computed
here anyway.
"""

from __future__ import annotations

import logging

import torch

from .elementwise import single_threaded_lapack, solve_problem
from .fwsvd import solve_fwsvd
from .registry import FISHER, LayerProblem, register_solver
from .risk import relative_risk

logger = logging.getLogger(__name__)


@register_solver(
    "rescue", needs=(FISHER,),
    description="fwsvd, refined by the element-wise solver on matrices whose Fisher-predicted risk exceeds risk_threshold",
)
def solve_rescue(problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
    with single_threaded_lapack(problem.weight.device):
        up, down = solve_fwsvd(problem)
    risk = relative_risk(problem.weight, problem.fisher, up, down)
    if risk <= problem.config.risk_threshold:
        logger.debug("%s: risk %.3g ≤ %.3g, fwsvd kept", problem.name, risk, problem.config.risk_threshold)
        return up, down
    logger.debug("%s: risk %.3g > %.3g, element-wise refinement", problem.name, risk, problem.config.risk_threshold)
    result = solve_problem(problem, start=(up, down))
    return result.up, result.down
