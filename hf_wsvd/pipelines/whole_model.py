"""``whole_model``: every target layer in one group, statistics from passes over the whole model
(placed on the accelerator unless accelerate dispatched it). Memory: every target layer's
statistics at once (for ``whiten``/``fisher_whiten``, an in × in Gram per layer)."""

from __future__ import annotations

from typing import Iterable

from ..blocks import is_dispatched
from ..statistics import input_statistics
from . import register_pipeline
from .step import Job, candidates, gradient_pass, greedy_allocation, require_data, solve_and_swap, spectra, uniform


@register_pipeline("whole_model")
def run(job: Job) -> dict[str, int]:
    require_data(job)
    if not is_dispatched(job.model):
        job.model.to(job.accelerator.device)
    shapes = candidates(job)
    collect(job, shapes)
    with job.timed("allocate"):
        if job.config.allocation == "uniform":
            ranks = uniform(job, shapes)
        else:
            ranks, _ = greedy_allocation(job, shapes, *spectra(job, sorted(shapes), job.statistics))
    with job.timed("factorize"):
        solve_and_swap(job, ranks, job.statistics, job.show_progress)
    return ranks


def collect(job: Job, names: Iterable[str]) -> None:
    """The statistics the method needs for the layers ``names``, from passes over the whole model
    (those already in ``job.statistics`` are kept)."""
    names = list(names)
    gradient_pass(job, names)
    if job.input_needs and not job.statistics.has(names, job.input_needs):
        with job.timed("activations"):
            job.statistics = job.statistics.merged(input_statistics(
                job.model, job.data, {n: job.module(n) for n in names}, job.input_needs, job.accelerator,
                job.show_progress))
