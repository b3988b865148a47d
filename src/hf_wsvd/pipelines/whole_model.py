"""``whole_model``: every target layer in one group, statistics from passes over the whole model
(placed on the accelerator unless accelerate dispatched it). Memory: every target layer's
statistics at once (for ``whiten``/``fisher_whiten``, an in × in Gram per layer)."""

from __future__ import annotations

from typing import Iterable

from ..blocks import is_dispatched
from ..statistics import input_statistics
from .registry import register_pipeline
from .step import (Cuts, Job, candidates, channel_spectra, cut_attentions_and_swap, gradient_pass, greedy_allocation,
                   prune_and_swap, require_data, solve_and_swap, spectra, uniform, uniform_channels, unit_key)


@register_pipeline("whole_model")
def run(job: Job) -> dict[str, int]:
    require_data(job)
    if not is_dispatched(job.model):
        job.model.to(job.accelerator.device)
    cuts = Cuts.of(job)
    shapes = candidates(job, skip=frozenset(cuts.members))
    collect(job, [*shapes, *sorted(cuts.observed())])
    with job.timed("allocate"):
        if job.config.allocation == "uniform":
            ranks = uniform(job, shapes)
            channels = {unit_key(group): uniform_channels(job, group) for group in cuts.groups}
        else:
            values, weights = spectra(job, sorted(shapes), job.statistics) if shapes else ({}, {})
            group_values, group_weights = channel_spectra(job, cuts.groups, job.statistics)
            values, weights = {**values, **group_values}, ({**weights, **group_weights} if weights is not None else None)
            ranks, channels = greedy_allocation(job, shapes, values, weights, cuts.groups)
    cuts = cuts.kept(channels)
    with job.timed("factorize"):
        solve_and_swap(job, ranks, job.statistics, job.show_progress)
        prune_and_swap(job, cuts.pairs, channels, job.statistics)
        cut_attentions_and_swap(job, cuts.attentions, channels, job.statistics)
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
