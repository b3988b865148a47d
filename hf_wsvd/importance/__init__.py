"""Importance statistics that weight the factorization problems."""

from .activations import ActivationStats, collect_activation_stats
from .fisher import FisherResult, compute_fisher
from .passes import default_accelerator

__all__ = ["ActivationStats", "FisherResult", "collect_activation_stats", "compute_fisher", "default_accelerator"]
