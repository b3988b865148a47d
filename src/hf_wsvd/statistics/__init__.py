"""Statistics that weight the factorization problems, gathered by registered collectors.

A method declares the statistic names it reads (``names.py``); a pass attaches the matching
collectors (``collectors.py``) to the target layers, accumulates them where each layer lives,
reduces them once across processes and returns their means (``Statistics``). Gradient statistics
need the task loss (``gradient_statistics``); input statistics need only forward passes
(``input_statistics``, or ``InputHooks`` on one block in sequential mode); an input embedding's
token counts need only the data (``token_counts``; a sequence-to-sequence model's config says what
its decoder reads).
"""

from .collectors import COLLECTORS, Collector, register_collector
from .gradients import gradient_statistics
from .inputs import InputHooks, input_statistics
from .names import (FISHER, FISHER_COLS, FISHER_ROWS, GRADIENT_STATISTICS, GRAM, INPUT_STATISTICS, MEAN_ABS,
                    TOKEN_COUNTS)
from .passes import default_accelerator
from .result import Statistics
from .tokens import token_counts

__all__ = [
    "COLLECTORS", "FISHER", "FISHER_COLS", "FISHER_ROWS", "GRADIENT_STATISTICS", "GRAM", "INPUT_STATISTICS",
    "MEAN_ABS", "TOKEN_COUNTS", "Collector", "InputHooks", "Statistics", "default_accelerator", "gradient_statistics",
    "input_statistics", "register_collector", "token_counts",
]
