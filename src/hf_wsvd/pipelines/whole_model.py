"""``whole_model``: every target layer in one group, statistics from passes over the whole model
(placed on the accelerator unless accelerate dispatched it). Memory: every target layer's
statistics at once (for ``whiten``/``fisher_whiten``, an in × in Gram per layer)."""

from __future__ import annotations

from typing import Iterable

from ..blocks import is_dispatched
from ..statistics import input_statistics
from .registry import register_pipeline
from .step import (Cuts, Job, candidates, check_allocation, compress_group, gradient_pass, greedy_allocation,
                   require_data, spectra, uniform)


@register_pipeline("whole_model")
def run(job: Job) -> dict[str, int]:
    require_data(job)
    if not is_dispatched(job.model):
        job.model.to(job.accelerator.device)
    cuts = Cuts.of(job)
    shapes = candidates(job, skip=frozenset(cuts.members))
    check_allocation(job, shapes, cuts)
    collect(job, [*shapes, *sorted(cuts.observed())])
    with job.timed("allocate"):
        if job.config.allocation == "uniform":
            ranks = uniform(job, shapes)
            channels = cuts.uniform(job)
        else:
            values, weights = spectra(job, [(sorted(shapes), cuts, job.statistics)])
            ranks, channels = greedy_allocation(job, shapes, values, weights, cuts)
    cuts.hand_out(job, channels)
    with job.timed("factorize"):
        compress_group(job, ranks, sorted(job.targets), job.statistics, progress=job.show_progress)
    return ranks


def collect(job: Job, names: Iterable[str]) -> None:
    """The statistics the method needs for the layers ``names``, from passes over the whole model
    (those already in ``job.statistics`` are kept)."""
    names = list(names)
    gradient_pass(job, names)
    if job.input_needs and not job.statistics.has(names, job.input_needs):
        with job.timed("activations"):
            job.statistics = job.statistics.merged(input_statistics(
                job.model, job.read_data(), {n: job.module(n) for n in names}, job.input_needs, job.accelerator,
                job.show_progress))
