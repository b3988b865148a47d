"""Calibration pipelines: how the target layers are grouped and where their statistics come from.

``whole_model`` is one group whose statistics come from passes over the whole model;
``sequential`` is one group per transformer block, each block's statistics taken on the outputs
of the already compressed blocks before it. Both run the same step (``step.py``: collect →
allocate → solve → swap) and know no method and no modifier: the method is the recipe's solver,
and what the recipe turns on beside it (MLP and attention pruning, compensation, block refinement,
the embeddings) are modifiers (``modifiers/``, one file each) whose hooks the pipelines call. A
pipeline is a function ``run(job) -> ranks`` registered by name (``registry.py``); importing this
package imports no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import PIPELINES, get_pipeline, register_pipeline

if TYPE_CHECKING:
    from .step import Job

__all__ = ["Job", "PIPELINES", "get_pipeline", "register_pipeline"]


def __getattr__(name: str) -> Any:
    if name == "Job":  # the step imports torch
        from .step import Job

        return Job
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
