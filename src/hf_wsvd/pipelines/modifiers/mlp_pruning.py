"""The ``mlp_pruning`` modifier (``WSVDConfig.mlp_pruning``): each MLP keeps its most useful
intermediate channels instead of being factorized (the maths: ``hf_wsvd.methods.mlp_pruning``).
An MLP is priced and cut at its consumer (``down_proj``/``fc2``): its channels weigh the
consumer's loss as if it were factorized, and its producers are cut with it."""

from __future__ import annotations

from typing import Sequence

import torch

from ...allocation import Budgeted
from ...methods.mlp_pruning import MlpPair, channel_spectrum, element_wise, find_pairs, select_channels, shrunk
from ...runtime.factorized_linear import linear_shape
from ...statistics import GRAM, Statistics
from ...statistics.names import CROSS
from ..step import Job, broadcast, install, layer_spectrum, layer_weight, owners, problem
from . import Block, ChannelModifier, register_modifier


@register_modifier
class MlpPruning(ChannelModifier):
    name = "mlp_pruning"
    field = "mlp_pruning"

    def groups(self, job: Job) -> list[MlpPair]:
        return [pair for pair in find_pairs(job.shapes(job.targets)) if element_wise(job.model, job.targets, pair)]

    def budget(self, job: Job, group: MlpPair) -> Budgeted:
        """A channel costs its row of every producer and its column of the consumer."""
        unit = sum(linear_shape(job.module(n))[0] for n in group.producers) + linear_shape(job.module(group.consumer))[1]
        return Budgeted(unit, unit * group.channels, group.channels)

    def spectrum(self, job: Job, group: MlpPair, stats: Statistics) -> tuple[torch.Tensor, float | None]:
        layer = problem(job, group.consumer, stats)
        values = channel_spectrum(layer.weight, stats.get(group.consumer, GRAM), job.config.compensation_ridge)
        return values, layer_spectrum(job.solver, layer)[1] if job.solver.loss_scale is not None else None

    def observed(self, names: Sequence[str]) -> list[str]:
        return [pair.consumer for pair in self.kept if pair.consumer in names]

    def compress(self, job: Job, names: Sequence[str], stats: Statistics, block: Block | None) -> None:
        with job.timed("prune"):
            prune_and_swap(job, [pair for pair in self.kept if pair.consumer in names], self.channels, stats)


def prune_and_swap(job: Job, pairs: list[MlpPair], channels: dict[str, int], stats: Statistics) -> None:
    """Cut each MLP of ``pairs`` to ``channels[consumer]`` channels chosen on the consumer's input
    statistics, swap in the smaller layers and record their shapes in ``job.pruned``. Each MLP is
    solved by one process and shared, like a factorization."""
    owner = owners(job, [pair.consumer for pair in pairs])
    for pair in pairs:
        consumer, keep = job.module(pair.consumer), channels[pair.consumer]
        kept = refit = None
        # Popped, never held here: select_channels frees the consumer's n × n Gram and cross moment
        # once it has their kept parts (nothing after the cut reads them), lowering the step's peak.
        if owner[pair.consumer] == job.accelerator.process_index:
            kept, refit = select_channels(layer_weight(job, pair.consumer), stats.pop(pair.consumer, GRAM),
                                          stats.pop(pair.consumer, CROSS), keep, job.config.compensation_ridge,
                                          pair.consumer)
        else:
            for statistic in (GRAM, CROSS):
                stats.pop(pair.consumer, statistic)
        if job.accelerator.num_processes > 1:
            kept = broadcast(job, kept, (keep,), torch.int64, owner[pair.consumer])
            refit = broadcast(job, refit, (linear_shape(consumer)[1], keep), torch.float64, owner[pair.consumer])
        for name in pair.members:
            dense_shape = linear_shape(job.module(name))
            install(job, name, lambda module, name=name: shrunk(module, kept, refit if name == pair.consumer else None))
            job.pruned[name] = {"shape": list(linear_shape(job.module(name))), "dense_shape": list(dense_shape)}
