"""Calibration pipelines: how the target layers are grouped and where their statistics come from.

``whole_model`` is one group whose statistics come from passes over the whole model;
``sequential`` is one group per transformer block, each block's statistics taken on the outputs
of the already compressed blocks before it. Both run the same step (``step.py``: collect →
allocate → solve → swap) and know no method. A pipeline is a function ``run(job) -> ranks``
registered by name.
"""

from __future__ import annotations

from typing import Callable

from .step import Job

PIPELINES: dict[str, Callable[[Job], dict[str, int]]] = {}


def register_pipeline(name: str):
    """Decorator registering ``run(job) -> {layer: rank}`` as the pipeline ``name``."""

    def wrap(run: Callable[[Job], dict[str, int]]):
        if name in PIPELINES:
            raise ValueError(f"pipeline {name!r} is already registered")
        PIPELINES[name] = run
        return run

    return wrap


def get_pipeline(name: str) -> Callable[[Job], dict[str, int]]:
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; available: {sorted(PIPELINES)}")
    return PIPELINES[name]


from . import sequential, whole_model  # noqa: E402,F401  (registration)

__all__ = ["Job", "PIPELINES", "get_pipeline", "register_pipeline"]
