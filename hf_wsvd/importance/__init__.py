"""Importance statistics that weight the factorization problems."""

from .fisher import FisherResult, compute_fisher, default_accelerator

__all__ = ["FisherResult", "compute_fisher", "default_accelerator"]
