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
from ..mlp_pruning import MlpPair, find_pairs, kept_channels
from ..statistics import InputHooks, Statistics
from ..statistics.passes import batches
from ..tasks import CAUSAL_LM, task_of
from . import compensation, register_pipeline
from .step import (Job, candidates, channel_spectra, gradient_pass, greedy_allocation, prune_and_swap, require_data,
                   solve_and_swap, spectra, uniform)


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
    for block, names in zip(tqdm(blocks, desc=desc, disable=not show), groups):
        with placed(block, device) as block_device:
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
                if refresh:
                    _run(block, inputs, block_device)
            else:
                yield names, stats
                if inputs is not None:
                    _run(block, inputs, block_device)


def _compensate(job: Job, groups: list[list[str]], ranks: dict[str, int], pairs: list[MlpPair],
                channels: dict[str, int]) -> None:
    """Factorize (and prune the MLPs of ``pairs``) block by block with compensation
    (``hf_wsvd.pipelines.compensation``): two streams of hidden states advance together, the dense
    model's and the compressed model's, and within a block each stage of layers is fitted to a
    dense copy of the block before the next stage's inputs are taken."""
    processes = job.accelerator.num_processes
    if processes > 1 and len(job.data) < processes:  # each process finds the block's stages on its own batch
        raise ValueError(f"compensate=True in {processes} processes needs at least one calibration batch per "
                         f"process; the data has {len(job.data)}: give more data or a smaller batch_size")
    _, consumers = _members(pairs)
    prefix, blocks = block_list(job.model)
    device = job.accelerator.device
    with outside_blocks_on(job.model, prefix, device):
        current = _capture(job, blocks[0])
    dense = [(hidden.clone(), kwargs, mask) for hidden, kwargs, mask in current]
    show = job.show_progress and job.accelerator.is_local_main_process
    for index, (block, names) in enumerate(zip(tqdm(blocks, desc="blocks (compensated)", disable=not show), groups)):
        with placed(block, device) as block_device:
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
                # An MLP's producers are cut when its consumer's stage comes: they need no statistics.
                fitted = [n for n in stage if n in ranks or n in consumers]
                if not fitted:
                    continue
                stats = job.statistics.merged(compensation.paired_statistics(
                    reference, block, {n: paths[n] for n in fitted}, dense, current, block_device, job.accelerator))
                solve_and_swap(job, {n: ranks[n] for n in fitted if n in ranks}, stats, progress=False)
                prune_and_swap(job, [consumers[n] for n in fitted if n in consumers], channels, stats)
            _run(reference, dense, block_device)
            del reference
            _run(block, current, block_device)


def _pairs(job: Job) -> list[MlpPair]:
    """The MLPs among the targets whose layers are all ``nn.Linear``."""
    return [pair for pair in find_pairs(job.shapes(job.targets))
            if all(type(job.module(n)) is torch.nn.Linear for n in pair.members)]


def _members(pairs: list[MlpPair]) -> tuple[set[str], dict[str, MlpPair]]:
    """The layers of ``pairs``, and each pair by its consumer."""
    return {name for pair in pairs for name in pair.members}, {pair.consumer: pair for pair in pairs}


@register_pipeline("sequential")
def run(job: Job) -> dict[str, int]:
    check_inputs(job)
    require_data(job)
    job.model.eval()
    prefix, blocks = block_list(job.model)
    pairs = _pairs(job) if job.config.mlp_pruning else []
    paired, consumers = _members(pairs)
    shapes = candidates(job, skip=frozenset(paired))  # the layers to factorize
    in_block = [[n for n in sorted(job.targets) if job.targets[n].startswith(f"{prefix}.{i}.")] for i in range(len(blocks))]
    gradient_pass(job, [*shapes, *consumers])  # a consumer's loss weighs its MLP's channels

    with job.timed("allocate"):
        if job.config.allocation == "uniform":
            ranks = uniform(job, shapes) if shapes else {}
            channels = {c: kept_channels(p.channels, job.config.param_ratio, job.config.rank_multiple)
                        for c, p in consumers.items()}
        else:
            values, weights = {}, {}
            planned = [[n for n in names if n in shapes or n in consumers] for names in in_block]
            for names, stats in _stream(job, planned, refresh=False, desc="planning"):
                layers, mlps = [n for n in names if n in shapes], [consumers[n] for n in names if n in consumers]
                for group_values, group_weights in (spectra(job, layers, stats) if layers else ({}, {}),
                                                    channel_spectra(job, mlps, stats)):
                    values.update(group_values)
                    weights.update(group_weights or {})
            ranks, channels = greedy_allocation(job, shapes, values, weights if job.solver.loss_scale else None, pairs)
    pairs = [pair for pair in pairs if channels[pair.consumer] < pair.channels]  # the others stay dense
    paired, consumers = _members(pairs)
    with job.timed("factorize"):
        if job.config.compensate:
            _compensate(job, [[n for n in names if n in ranks or n in paired] for names in in_block], ranks, pairs,
                        channels)
        else:
            for names, stats in _stream(job, [[n for n in names if n in ranks or n in consumers] for names in in_block],
                                        refresh=True, desc="blocks"):
                solve_and_swap(job, {n: ranks[n] for n in names if n in ranks}, stats, progress=False)
                prune_and_swap(job, [consumers[n] for n in names if n in consumers], channels, stats)
    if not ranks and not pairs:
        raise ValueError(f"param_ratio={job.config.param_ratio} saves nothing on any target layer; lower it to compress")
    return ranks
