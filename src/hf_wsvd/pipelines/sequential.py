"""``sequential``: one group per transformer block, for large causal LMs (the GPTQ-style
calibration pattern).

The inputs of the first block are captured once; then, block after block, the block's input
statistics are taken on inputs produced by the *already compressed* blocks before it, the block
is factorized, and the compressed block is re-run in place to feed the next. Each block runs where
it lives (``hf_wsvd.blocks.placed``): a block in CPU memory visits the accelerator alone, a block
dispatched by accelerate runs on its own GPU. With ``allocation="greedy"`` the ranks are planned
first by streaming the *dense* blocks the same way, keeping only each layer's spectrum.

Memory on the accelerator: one block (when the model sits in CPU memory), the calibration
activations of this process's share of the data (tokens × hidden, in the model's dtype, updated in
place) and one block's statistics (for ``whiten``/``fisher_whiten``: an in × in Gram per distinct
layer input).
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..blocks import block_list, first_output, input_device, outside_blocks_on, placed, split_hidden, without_cache
from ..statistics import InputHooks, Statistics
from ..statistics.passes import batches
from ..tasks import CAUSAL_LM, task_of
from . import compensation
from .registry import register_pipeline
from .refinement import refine_block, refined_layers
from .step import (Cuts, Job, candidates, channel_spectra, cut_attentions_and_swap, gradient_pass, greedy_allocation,
                   prune_and_swap, refit_cut_output, require_data, solve_and_swap, spectra, uniform, uniform_channels,
                   unit_key)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


def check_inputs(job: Job) -> None:
    """Raise unless sequential mode can run: a causal LM and calibration data."""
    if task_of(job.model) != CAUSAL_LM:
        raise ValueError(f"sequential mode is for causal LMs; {type(job.model).__name__} is not one")
    if job.data is None:
        raise ValueError("sequential mode needs calibration data")


def _capture(job: Job, block: torch.nn.Module) -> list[tuple[torch.Tensor, dict, torch.Tensor | None]]:
    """(hidden states, keyword arguments, 2-D attention mask) of the first block for each of this
    process's batches."""
    captured = []

    def hook(module, args, kwargs):
        hidden, kw = split_hidden(module, args, kwargs)
        captured.append((hidden, {**without_cache(kw), "use_cache": False}))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    masks = []
    device = input_device(job.model, job.accelerator.device)
    try:
        with torch.no_grad():
            for batch in batches(job.data, job.accelerator, device, "capture", False):
                masks.append(batch.get("attention_mask"))
                try:
                    job.model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return [(hidden, kwargs, mask) for (hidden, kwargs), mask in zip(captured, masks)]


@torch.no_grad()
def _run(block: torch.nn.Module, inputs: list, device: torch.device, hooks: InputHooks | None = None,
         in_place: bool = True) -> None:
    """Run ``block`` on every captured input (statistics into ``hooks``); ``in_place``: the
    outputs replace the inputs, ready for the next block."""
    for index, (hidden, kwargs, mask) in enumerate(inputs):
        if hooks is not None:
            hooks.new_batch(mask)
        output = first_output(block(hidden.to(device), **kwargs))
        if in_place:
            inputs[index] = (output, kwargs, mask)


def _next(blocks: torch.nn.ModuleList, index: int) -> torch.nn.Module | None:
    """The block a walk visits after block ``index`` (its weights are copied meanwhile)."""
    return blocks[index + 1] if index + 1 < len(blocks) else None


def _stream(job: Job, groups: list[list[str]], refresh: bool, desc: str) -> Iterator[tuple[list[str], Statistics]]:
    """For each block in turn: its layers and their statistics (the gradient statistics plus the
    block's input statistics on the current inputs), with the block placed on its device while
    the consumer works; then the inputs advance through the block (re-run when ``refresh``: the
    consumer changed it)."""
    prefix, blocks = block_list(job.model)
    device = job.accelerator.device
    inputs = None
    if job.input_needs:
        with outside_blocks_on(job.model, prefix, device):
            inputs = _capture(job, blocks[0])
    show = job.show_progress and job.accelerator.is_local_main_process
    for index, (block, names) in enumerate(zip(tqdm(blocks, desc=desc, disable=not show), groups)):
        with placed(block, device, _next(blocks, index)) as block_device:
            stats = job.statistics
            if names and inputs is not None:
                hooks = InputHooks({n: job.module(n) for n in names}, job.input_needs)
                try:
                    _run(block, inputs, block_device, hooks, in_place=not refresh)
                finally:
                    hooks.remove()
                hooks.reduce(job.accelerator, device)
                stats = stats.merged(hooks.result())
                if not stats.has(names, job.input_needs):
                    raise ValueError("the calibration data is empty: no token reached the target layers")
                yield names, stats
                del stats  # the block's Grams: not held while the next block's are collected
                if refresh:
                    _run(block, inputs, block_device)
            else:
                yield names, stats
                if inputs is not None:
                    _run(block, inputs, block_device)


def _compensate(job: Job, groups: list[list[str]], ranks: dict[str, int], cuts: Cuts, channels: dict[str, int]) -> None:
    """Factorize (and cut the MLPs and attentions of ``cuts``) block by block with compensation
    (``hf_wsvd.pipelines.compensation``): two streams of hidden states advance together, the dense
    model's and the compressed model's, and within a block each stage of layers is fitted to a
    dense copy of the block before the next stage's inputs are taken. An attention is cut at the
    stage of its q/k/v projections (its output projection's statistics taken in the same pass),
    and its output projection refitted at its own stage. Then, with ``block_refine_steps``, the
    compressed block is trained toward the dense block's outputs (``hf_wsvd.pipelines.refinement``)."""
    processes = job.accelerator.num_processes
    if processes > 1 and len(job.data) < processes:  # each process finds the block's stages on its own batch
        raise ValueError(f"compensate=True in {processes} processes needs at least one calibration batch per "
                         f"process; the data has {len(job.data)}: give more data or a smaller batch_size")
    prefix, blocks = block_list(job.model)
    device = job.accelerator.device
    with outside_blocks_on(job.model, prefix, device):
        current = _capture(job, blocks[0])
    dense = [(hidden.clone(), kwargs, mask) for hidden, kwargs, mask in current]
    show = job.show_progress and job.accelerator.is_local_main_process
    by_query = {group.q: group for group in cuts.attentions}
    outputs = {group.o for group in cuts.attentions}
    for index, (block, names) in enumerate(zip(tqdm(blocks, desc="blocks (compensated)", disable=not show), groups)):
        with placed(block, device, _next(blocks, index)) as block_device:
            if not names:
                _run(block, current, block_device)
                _run(block, dense, block_device)
                continue
            # The dense block, what every stage is fitted to (an offloaded block's copy keeps its
            # own copy of the offloaded weights).
            reference = copy.deepcopy(block)
            paths = {n: job.targets[n][len(f"{prefix}.{index}."):] for n in names}
            hidden, kwargs, _ = current[0]
            for stage in compensation.stages(reference, paths, hidden.to(block_device), kwargs):
                # An MLP's producers are cut when its consumer's stage comes, an attention's o with
                # its q/k/v: they need no statistics of their own then.
                fitted = [n for n in stage if n in ranks or n in cuts.consumers]
                attentions = [by_query[n] for n in stage if n in by_query]
                refit = [n for n in stage if n in outputs and n not in (g.o for g in attentions)]
                observed = fitted + [n for g in attentions for n in g.members] + refit
                if not observed:
                    continue
                stats = job.statistics.merged(compensation.paired_statistics(
                    reference, block, {n: paths[n] for n in observed}, dense, current, block_device, job.accelerator))
                solve_and_swap(job, {n: ranks[n] for n in fitted if n in ranks}, stats, progress=False)
                prune_and_swap(job, [cuts.consumers[n] for n in fitted if n in cuts.consumers], channels, stats)
                cut_attentions_and_swap(job, attentions, channels, stats)
                for name in refit:
                    refit_cut_output(job, name, reference.get_submodule(paths[name]), stats)
                del stats  # this stage's Grams and cross moments: not held through the next stage's
            _run(reference, dense, block_device)  # the dense stream advances: the block's targets
            del reference
            layers = refined_layers(job, paths) if job.config.block_refine_steps else {}
            if layers:
                with job.timed("refine"):
                    job.refined[str(index)] = refine_block(job, block, index, layers, current, dense, block_device)
            _run(block, current, block_device)


@register_pipeline("sequential")
def run(job: Job) -> dict[str, int]:
    check_inputs(job)
    require_data(job)
    job.model.eval()
    prefix, blocks = block_list(job.model)
    cuts = Cuts.of(job)
    shapes = candidates(job, skip=frozenset(cuts.members))  # the layers to factorize
    in_block = [[n for n in sorted(job.targets) if job.targets[n].startswith(f"{prefix}.{i}.")] for i in range(len(blocks))]
    gradient_pass(job, [*shapes, *sorted(cuts.observed())])  # a consumer's loss weighs its MLP's channels

    with job.timed("allocate"):
        if job.config.allocation == "uniform":
            ranks = uniform(job, shapes) if shapes else {}
            channels = {unit_key(group): uniform_channels(job, group) for group in cuts.groups}
        else:
            values, weights = {}, {}
            observed = cuts.observed()
            planned = [[n for n in names if n in shapes or n in observed] for names in in_block]
            for names, stats in _stream(job, planned, refresh=False, desc="planning"):
                layers = [n for n in names if n in shapes]
                for group_values, group_weights in (spectra(job, layers, stats) if layers else ({}, {}),
                                                    channel_spectra(job, cuts.in_block(names), stats)):
                    values.update(group_values)
                    weights.update(group_weights or {})
                del stats  # the block's Grams (the loop variable would hold the last block's to the end)
            ranks, channels = greedy_allocation(job, shapes, values, weights if job.solver.loss_scale else None,
                                                cuts.groups)
    cuts = cuts.kept(channels)
    members = cuts.members
    with job.timed("factorize"):
        if job.config.compensate:
            _compensate(job, [[n for n in names if n in ranks or n in members] for names in in_block], ranks, cuts,
                        channels)
        else:
            observed = cuts.observed()
            for names, stats in _stream(job, [[n for n in names if n in ranks or n in observed] for names in in_block],
                                        refresh=True, desc="blocks"):
                solve_and_swap(job, {n: ranks[n] for n in names if n in ranks}, stats, progress=False)
                prune_and_swap(job, [cuts.consumers[n] for n in names if n in cuts.consumers], channels, stats)
                cut_attentions_and_swap(job, [g for g in cuts.attentions if g.q in names], channels, stats)
                del stats
    return ranks
