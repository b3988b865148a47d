"""The ``mlp_pruning`` modifier (``WSVDConfig.mlp_pruning``): each MLP keeps its most useful
intermediate channels instead of being factorized (the maths: ``hf_wsvd.methods.mlp_pruning``).
An MLP is priced and cut at its consumer (``down_proj``/``fc2``): its channels weigh the
consumer's loss as if it were factorized, and its producers are cut with it.

The experts of a mixture-of-experts module are MLPs too (``hf_wsvd.methods.expert_pruning``): the
module is one group whose every expert keeps as many channels. It is cut after the rest of its
block (the sequential walk's ``on_block_end``, on the compressed model's inputs; in the
whole-model pipeline with the other layers) on the Gram of each expert's routed channels alone:
the compensated cross moment of a layer pairs each token of the dense stream with the same token
of the compressed one, and the router may send a token to other experts in the two, so no
per-expert pairing exists. Block refinement then trains the cut experts with the block's other
compressed layers."""

from __future__ import annotations

from typing import Sequence

import torch
from accelerate.utils import align_module_device

from ...allocation import Budgeted
from ...blocks import block_list, hooked, run_block
from ...methods.expert_pruning import ExpertsGroup, cut_experts, experts_gains, find_experts, select_experts
from ...methods.mlp_pruning import (MlpPair, as_spectrum, channel_spectrum, element_wise, find_pairs, select_channels,
                                    shrunk)
from ...runtime.factorized_linear import linear_shape
from ...runtime.modeling_wsvd import all_finite, experts_shape
from ...statistics import GRAM, InputHooks, Statistics
from ...statistics.names import CROSS, EXPERT_GRAM
from ...targets import selects
from ..step import Job, broadcast, experts_in, install, layer_spectrum, layer_weight, owners, problem
from . import Block, ChannelModifier, register_modifier


# The experts' grouped_mm kernel (transformers' default experts implementation, on CPU too) needs the
# rows of each 3-D weight 16-byte aligned: k·itemsize a multiple of 16, so 8 channels in 16-bit.
EXPERTS_MULTIPLE = 8
# What prices an experts module's output (``ExpertsGroup.probe``): a layer of its block writing the same
# residual stream, the attention's output projection, else a hybrid block's linear attention's, Mamba's
# or short convolution's (Qwen3-Next, MiniMax, Granite-4 Hybrid, LFM2).
PROBES = (".o_proj", ".out_proj")


@register_modifier
class MlpPruning(ChannelModifier):
    name = "mlp_pruning"
    field = "mlp_pruning"

    def groups(self, job: Job) -> list[MlpPair | ExpertsGroup]:
        pairs = [pair for pair in find_pairs(job.shapes(job.targets)) if element_wise(job.model, job.targets, pair)]
        return pairs + experts_groups(job)

    def budget(self, job: Job, group: MlpPair | ExpertsGroup) -> Budgeted:
        """A channel costs its row of every producer and its column of the consumer (of every expert);
        an experts module keeps a multiple of ``EXPERTS_MULTIPLE`` channels (or all of them)."""
        if isinstance(group, ExpertsGroup):
            unit = group.experts * 3 * group.hidden
            return Budgeted(unit, unit * group.channels, group.channels, step=EXPERTS_MULTIPLE)
        unit = sum(linear_shape(job.module(n))[0] for n in group.producers) + linear_shape(job.module(group.consumer))[1]
        return Budgeted(unit, unit * group.channels, group.channels)

    def spectrum(self, job: Job, group: MlpPair | ExpertsGroup, stats: Statistics) -> tuple[torch.Tensor, float | None]:
        if isinstance(group, ExpertsGroup):
            return experts_spectrum(job, group, stats)
        layer = problem(job, group.consumer, stats)
        values = channel_spectrum(layer.weight, stats.get(group.consumer, GRAM), job.config.compensation_ridge)
        return values, layer_spectrum(job.solver, layer)[1] if job.solver.loss_scale is not None else None

    def observed(self, names: Sequence[str]) -> list[str]:
        return [pair.consumer for pair in self._pairs() if pair.consumer in names]

    def compress(self, job: Job, names: Sequence[str], stats: Statistics, block: Block | None) -> None:
        with job.timed("prune"):
            prune_and_swap(job, [pair for pair in self._pairs() if pair.consumer in names], self.channels, stats)
            if block is None:  # the whole model: its statistics hold the experts' too
                prune_experts(job, [g for g in self.kept if isinstance(g, ExpertsGroup)], self.channels, stats)

    def on_block_end(self, job: Job, block: Block) -> None:
        inside = experts_in(job, block.module, [g.name for g in self.kept if isinstance(g, ExpertsGroup)])
        groups = [g for g in self.kept if isinstance(g, ExpertsGroup) and g.name in inside]
        if not groups:
            return
        with job.timed("statistics"):  # on the compressed model's inputs, the block's other layers compressed
            hooks = InputHooks({g.name: job.module(g.name) for g in groups}, ())
            try:
                run_block(block.module, block.inputs, block.device, hooks, in_place=False)
            finally:
                hooks.remove()
            hooks.reduce(job.accelerator, job.accelerator.device)
            stats = hooks.result()
        with job.timed("prune"):
            prune_experts(job, groups, self.channels, stats)

    def _pairs(self) -> list[MlpPair]:
        return [group for group in self.kept if isinstance(group, MlpPair)]


def experts_groups(job: Job) -> list[ExpertsGroup]:
    """The experts modules of ``job.model`` whose experts can be cut (recorded in ``job.experts``);
    a notice names the others, left dense. A method with a loss scale prices a module through the
    attention output projection of its block (``ExpertsGroup.probe``): one left out of the targets
    leaves the module dense too."""
    found, refused = find_experts(job.model)
    groups, dense = [], list(refused)
    prefix, _ = block_list(job.model)
    for name, full in found.items():
        if not selects(name, job.config.target_modules, job.config.exclude_modules):
            continue
        module = job.model.get_submodule(full)
        block = f"{prefix}.{full[len(prefix) + 1:].split('.')[0]}."
        probe = next((n for suffix in PROBES for n, path in sorted(job.targets.items())
                      if path.startswith(block) and path.endswith(suffix)), None)
        if hooked(module):
            dense.append(f"{full}: offloaded or dispatched by accelerate, which experts pruning does not handle")
        elif job.solver.loss_scale is not None and probe is None and job.config.allocation == "greedy" and job.targets:
            dense.append(f"{full}: method={job.solver.name!r} prices it through its block's attention output projection "
                         "(o_proj, or a linear attention's, Mamba's or a convolution's out_proj), which is not a "
                         "target layer")
        else:
            experts, channels, hidden = experts_shape(module)
            job.experts[name] = full
            groups.append(ExpertsGroup(name, experts, channels, hidden,
                                       probe if job.solver.loss_scale is not None else None))
    if dense:
        job.notice(f"mlp_pruning leaves the experts of {len(dense)} mixture-of-experts module"
                   f"{'' if len(dense) == 1 else 's'} dense (first: {dense[0]})")
    return groups


def _experts_down(job: Job, name: str) -> torch.Tensor:
    """The experts' down weights (E × H × I) in the compute dtype, on the accelerator."""
    module = job.module(name)
    with align_module_device(module):
        return module.down_proj.detach().to(job.accelerator.device, job.compute_dtype)


def _expert_grams(stats: Statistics, name: str, pop: bool) -> torch.Tensor:
    grams = stats.pop(name, EXPERT_GRAM) if pop else stats.get(name, EXPERT_GRAM)
    if not all_finite(grams):
        raise ValueError(f"the routed Grams of the experts of {name!r} hold NaN or inf values: the model's activations "
                         "overflowed on the calibration data")
    return grams


def experts_spectrum(job: Job, group: ExpertsGroup, stats: Statistics) -> tuple[torch.Tensor, float | None]:
    """An experts module's channel spectrum: each expert's channel gains summed position by
    position, made non-increasing; with a loss-scaled method, the module's loss is its output
    energy (all the gains) times the loss the method predicts per unit of output energy for its
    block's attention output projection (the same residual stream)."""
    gains = experts_gains(_experts_down(job, group.name), _expert_grams(stats, group.name, pop=False),
                          job.config.compensation_ridge)
    if group.probe is None:
        return as_spectrum(gains), None
    layer = problem(job, group.probe, stats)
    weight, gram = layer.weight.double(), stats.get(group.probe, GRAM).double().to(layer.weight.device)
    energy = max(float(((weight @ gram) * weight).sum()), torch.finfo(torch.float64).tiny)
    return as_spectrum(gains), layer_spectrum(job.solver, layer)[1] / energy * float(gains.sum())


def prune_experts(job: Job, groups: list[ExpertsGroup], channels: dict[str, int], stats: Statistics) -> None:
    """Cut each experts module of ``groups`` to ``channels[name]`` channels per expert, chosen on
    its routed Grams, and record it in ``job.cut_experts``. Each module is solved by one process
    and shared, like a factorization."""
    owner = owners(job, [group.name for group in groups])
    for group in groups:
        keep = channels[group.name]
        kept = refit = None
        if owner[group.name] == job.accelerator.process_index:
            kept, refit = select_experts(_experts_down(job, group.name), _expert_grams(stats, group.name, pop=True),
                                         keep, job.config.compensation_ridge, group.name)
        else:
            stats.pop(group.name, EXPERT_GRAM)
        if job.accelerator.num_processes > 1:
            kept = broadcast(job, kept, (group.experts, keep), torch.int64, owner[group.name])
            refit = broadcast(job, refit, (group.experts, group.hidden, keep), torch.float64, owner[group.name])
        cut_experts(job.module(group.name), kept, refit)
        job.cut_experts[group.name] = {"channels": keep, "dense_channels": group.channels}


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
