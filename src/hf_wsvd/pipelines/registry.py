"""The calibration pipelines by name: a pipeline is a function ``run(job) -> ranks`` registered
with ``register_pipeline``; the recipe names one (``WSVDConfig.pipeline``, resolved by
``hf_wsvd.recipes``)."""

from __future__ import annotations

from typing import Any, Callable

from ..registry import Registry

# run(job) -> {layer: rank}, job a ``step.Job`` (not imported: the recipe reads this registry, and
# the step imports the recipe).
Pipeline = Callable[[Any], dict[str, int]]

# The built-in pipelines: name → the module of ``hf_wsvd.pipelines`` that registers it.
BUILTIN_PIPELINES = {"sequential": "sequential", "whole_model": "whole_model"}
PIPELINES: Registry[Pipeline] = Registry("pipeline", __package__, BUILTIN_PIPELINES)


def register_pipeline(name: str) -> Callable[[Pipeline], Pipeline]:
    """Decorator registering ``run(job) -> {layer: rank}`` as the pipeline ``name``."""

    def wrap(run: Pipeline) -> Pipeline:
        PIPELINES[name] = run
        return run

    return wrap


def get_pipeline(name: str) -> Pipeline:
    """The registered pipeline ``name``."""
    return PIPELINES.lookup(name)
