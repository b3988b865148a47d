"""``sequential``: one group per transformer block, for large causal LMs (the GPTQ-style
calibration pattern).

The inputs of the first block are captured once; then, block after block, the block's input
statistics are taken on inputs produced by the *already compressed* blocks before it, the block
is compressed (factorized, and what the recipe's modifiers do: ``hf_wsvd.pipelines.modifiers``),
and the compressed block is re-run in place to feed the next. A modifier may split a block into
stages compressed one after another and take their statistics itself (compensation). Each block
runs where it lives (``hf_wsvd.blocks.placed``): a block in CPU memory visits the accelerator alone,
a block dispatched by accelerate runs on its own GPU. With ``allocation="greedy"`` the ranks are
planned first by streaming the *dense* blocks the same way, keeping only each layer's spectrum.

Memory on the accelerator: one block (when the model sits in CPU memory), the calibration
activations of this process's share of the data (tokens × hidden, in the model's dtype, updated in
place; two streams with compensation) and one block's statistics (for ``whiten``/``fisher_whiten``:
an in × in Gram per distinct layer input). ``offload_activations`` keeps the activations in pinned
CPU memory instead, each batch copied to the accelerator when it is used and its outputs copied
back.
"""

from __future__ import annotations

from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..blocks import (block_list, input_device, on_host, outside_blocks_on, placed, release_host_cache, run_block,
                      split_hidden, without_cache)
from ..statistics import InputHooks, Statistics
from ..statistics.inputs import EMPTY_DATA_MESSAGE
from ..statistics.passes import batches, failing_together
from ..targets import unreached_advice
from ..tasks import CAUSAL_LM, task_of
from .modifiers import Block, first
from .registry import register_pipeline
from .step import (Cuts, Job, candidates, check_allocation, compress_group, gradient_pass, greedy_allocation,
                   observed, require_data, spectra, uniform)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


def check_inputs(job: Job) -> None:
    """Raise unless sequential mode can run: a causal LM and calibration data."""
    try:
        causal = task_of(job.model) == CAUSAL_LM
    except ValueError:  # no task loss it knows (a loss_fn may be given): still no causal LM
        causal = False
    if not causal:
        raise ValueError(f"sequential mode is for causal LMs; {type(job.model).__name__} is not one")
    if job.data is None:
        raise ValueError("sequential mode needs calibration data")


class _Recorder(torch.nn.Module):
    """Stands in for block ``index`` while the inputs are captured: records the arguments the model
    hands that block, then passes the hidden states on untouched (no block computes), or ends the
    forward pass at the last block. Attributes the model's loop reads (a layer's attention type) are
    the block's own."""

    def __init__(self, block: torch.nn.Module, index: int, last: bool, record) -> None:
        super().__init__()
        self.block, self.index, self.last, self.record = block, index, last, record

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args, **kwargs):
        self.record(self.index, self.block, args, kwargs)
        if self.last:
            raise _Captured
        return args[0] if args else next(iter(kwargs.values()))


_ABSENT = object()  # an argument the first block takes and this one does not


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


class BlockArguments:
    """What each block is handed besides its hidden states, where blocks differ (Gemma 2/3 and GPT-OSS
    give sliding-window and full-attention layers their own masks and rotary tables, a hybrid its
    attention and convolution layers): per block, per batch, the arguments unlike the first block's.
    ``use(inputs, index)`` puts block ``index``'s in place in the captured inputs' argument dicts (in
    place: every stream holding them, the dense one too, follows)."""

    def __init__(self, first: list[dict], others: list[list[dict]]) -> None:
        self.first = [dict(kwargs) for kwargs in first]
        # [block][batch] → the arguments that differ from the first block's (none for the first)
        self.others = [[{} for _ in first], *others]
        self.differ = any(any(batch) for block in others for batch in block)

    def use(self, inputs: list | None, index: int) -> None:
        if not self.differ or inputs is None:
            return
        for (_, kwargs, _), first, own in zip(inputs, self.first, self.others[index]):
            kwargs.clear()
            kwargs.update(first)
            kwargs.update(own)
            for key in [key for key, value in own.items() if value is _ABSENT]:
                del kwargs[key]


def capture(job: Job, blocks: torch.nn.ModuleList) -> tuple[list[tuple[torch.Tensor, dict, torch.Tensor | None]],
                                                             BlockArguments]:
    """(hidden states, keyword arguments, 2-D attention mask) of the first block for each of this
    process's batches, and what the other blocks are handed unlike it."""
    hidden_states, arguments = [], [[] for _ in blocks]
    compared: dict[tuple[int, str], tuple[object, bool]] = {}  # this batch's: a layer type's mask, compared once

    def differs(key: str, value, first) -> bool:
        if (id(value), key) not in compared:  # the value is held with the answer, so its id is not reused
            compared[id(value), key] = (value, not _same(value, first))
        return compared[id(value), key][1]

    def record(index, block, args, kwargs):
        hidden, kw = split_hidden(block, args, kwargs)
        kw = {**without_cache(kw), "use_cache": False}
        if index == 0:
            hidden_states.append(on_host(hidden) if job.config.offload_activations else hidden)
            arguments[0].append(kw)
            compared.clear()
        else:  # only what differs from the first block's: equal masks are not held twice
            first = arguments[0][len(arguments[index])]
            arguments[index].append({**{k: _ABSENT for k in first if k not in kw},
                                     **{k: v for k, v in kw.items() if differs(k, v, first.get(k))}})

    originals = list(blocks)
    masks = []
    device = input_device(job.model, job.accelerator.device)
    try:
        for index, block in enumerate(originals):
            blocks[index] = _Recorder(block, index, index == len(originals) - 1, record)
        with torch.no_grad(), failing_together(job.accelerator, "capture"):
            for batch in batches(job.read_data(), job.accelerator, device, "capture", False):
                masks.append(batch.get("attention_mask"))
                try:
                    # the batch as the model reads it (its position ids, or its embeddings instead of ids)
                    job.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
                except _Captured:
                    pass
                except (ValueError, TypeError) as error:  # between the first two blocks: the model's own loop
                    if len(originals) > 1 and len(arguments[0]) > len(arguments[1]):
                        raise ValueError(f"the sequential pipeline cannot walk {type(job.model).__name__}'s blocks: each "
                                         "hands the next more than its hidden states (Zaya's router states, HY-V4's "
                                         "top-k indices); use pipeline='whole_model'") from error
                    raise
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
    inputs = [(hidden, kwargs, mask) for hidden, kwargs, mask in zip(hidden_states, arguments[0], masks)]
    return inputs, BlockArguments(arguments[0], arguments[1:])


def _next(blocks: torch.nn.ModuleList, index: int) -> torch.nn.Module | None:
    """The block a walk visits after block ``index`` (its weights are copied meanwhile)."""
    return blocks[index + 1] if index + 1 < len(blocks) else None


def _stream(job: Job, groups: list[list[str]]) -> Iterator[tuple[list[str], Statistics]]:
    """For each dense block in turn (greedy planning): its layers and their statistics (the
    gradient statistics plus the block's input statistics), with the block placed on its device
    until the consumer asks for the next (its weights may be read later, wherever they are); the
    inputs advance through the block in the same pass."""
    prefix, blocks = block_list(job.model)
    device = job.accelerator.device
    inputs, arguments = None, None
    if job.input_needs:
        with outside_blocks_on(job.model, prefix, device):
            inputs, arguments = capture(job, blocks)
    show = job.show_progress and job.accelerator.is_local_main_process
    for index, (block, names) in enumerate(zip(tqdm(blocks, desc="planning", disable=not show), groups)):
        if arguments is not None:
            arguments.use(inputs, index)
        with placed(block, device, _next(blocks, index)) as block_device:
            if names and inputs is not None:
                with job.timed("statistics"):
                    stats = _input_statistics(job, block, names, inputs, block_device, in_place=True)
                yield names, stats
                del stats  # the block's Grams: not held while the next block's are collected
            else:
                yield names, job.statistics
                if inputs is not None:
                    run_block(block, inputs, block_device)
    inputs = None
    release_host_cache()


def _planned_spectra(job: Job, window: list, values: dict, weights: dict) -> None:
    """Add the spectra and loss weights of the blocks in ``window`` to ``values`` and ``weights``, and
    empty it."""
    if window:
        block_values, block_weights = spectra(job, window)
        values.update(block_values)
        weights.update(block_weights or {})
        window.clear()


def _input_statistics(job: Job, block: torch.nn.Module, names: list[str], inputs: list, device: torch.device,
                      in_place: bool) -> Statistics:
    """The gradient statistics plus the input statistics of ``names`` from running ``block`` on
    ``inputs`` (``in_place``: its outputs replace them)."""
    hooks = InputHooks({n: job.module(n) for n in names}, job.input_needs)
    try:
        with failing_together(job.accelerator, "block statistics"):
            run_block(block, inputs, device, hooks, in_place=in_place)
    finally:
        hooks.remove()
    hooks.reduce(job.accelerator, job.accelerator.device)
    measured = hooks.result()
    stats = job.statistics.merged(measured)
    if not measured.tokens and not stats.has([n for n in names if n in job.targets], job.input_needs):
        raise ValueError(EMPTY_DATA_MESSAGE)
    _check_reached(job, names, stats, measured)
    return stats


def _check_reached(job: Job, names: list[str], stats: Statistics, measured: Statistics) -> None:
    """Raise naming the layers of ``names`` whose block's run (``measured``) never called them, where
    ``stats`` lack what the method reads of them (Mamba's dt_proj, whose weight the model reads itself)."""
    if stats.has([n for n in names if n in job.targets], job.input_needs):  # an experts module has its own
        return
    unreached = [name for name in names if name not in measured.tokens]
    if not unreached:
        raise ValueError(EMPTY_DATA_MESSAGE)
    raise ValueError(f"no token of the calibration data reached {unreached[:3]} ({len(unreached)} target layers "
                     f"of this block): {unreached_advice(unreached, names)}")


def _walk(job: Job, groups: list[list[str]], ranks: dict[str, int]) -> None:
    """Compress block by block: each block's layers ``groups[i]`` in the stages a modifier splits
    them into (else the whole block), each stage on the statistics a modifier takes (else the
    block's input statistics on the compressed model's inputs), then the block re-run on them."""
    modifiers = job.modifiers
    prefix, blocks = block_list(job.model)
    device = job.accelerator.device
    inputs, arguments = None, None
    if job.input_needs or any(m.needs_activations for m in modifiers):
        with outside_blocks_on(job.model, prefix, device):
            inputs, arguments = capture(job, blocks)
    for modifier in modifiers:
        modifier.on_walk_start(job, inputs)
    labels = [m.walk_label for m in modifiers if m.walk_label]
    desc = "blocks" + "".join(f" ({label})" for label in labels)
    show = job.show_progress and job.accelerator.is_local_main_process
    for index, (module, names) in enumerate(zip(tqdm(blocks, desc=desc, disable=not show), groups)):
        if arguments is not None:
            arguments.use(inputs, index)
        with placed(module, device, _next(blocks, index)) as block_device:
            block = Block(index, module, block_device, {n: job.targets[n][len(f"{prefix}.{index}."):] for n in names},
                          inputs)
            for modifier in modifiers:
                modifier.on_block_start(job, block)
            stages = (first(modifiers, lambda m: m.stages(job, block)) or [names]) if names else []
            for stage in stages:
                layers = observed(job, ranks, stage)
                if not layers:
                    continue
                with job.timed("statistics"):
                    stats = first(modifiers, lambda m: m.collect(job, block, layers))
                    if stats is None:
                        stats = _input_statistics(job, module, layers, inputs, block_device, in_place=False) \
                            if inputs is not None else job.statistics
                    else:  # a modifier's (compensation's paired run): checked as the block's own run is
                        _check_reached(job, layers, stats, stats)
                compress_group(job, ranks, stage, stats, block)
                del stats  # this stage's Grams (and cross moments): not held through the next stage's
            for modifier in modifiers:
                modifier.on_block_end(job, block)
            if inputs is not None:
                run_block(module, inputs, block_device)
    for modifier in modifiers:
        modifier.on_walk_end(job)
    inputs = block = None  # the streams (a block holds its inputs and targets): their pinned memory goes back
    release_host_cache()


@register_pipeline("sequential")
def run(job: Job) -> dict[str, int]:
    check_inputs(job)
    require_data(job)
    job.model.eval()
    prefix, blocks = block_list(job.model)
    cuts = Cuts.of(job)
    shapes = candidates(job, skip=frozenset(cuts.members))  # the layers to factorize
    check_allocation(job, shapes, cuts)
    in_block = [[n for n in sorted(job.targets) if job.targets[n].startswith(f"{prefix}.{i}.")] for i in range(len(blocks))]
    # Planning also takes the experts modules' statistics (they are cut at the end of their block's walk).
    experts = [[n for n in sorted(job.experts) if job.experts[n].startswith(f"{prefix}.{i}.")] for i in range(len(blocks))]
    gradient_pass(job, [*shapes, *sorted(cuts.observed())])  # a consumer's loss weighs its MLP's channels

    with job.timed("allocate"):
        if job.config.allocation == "uniform":
            ranks = uniform(job, shapes) if shapes else {}
            channels = cuts.uniform(job)
        else:
            values, weights, window = {}, {}, []
            observed_layers = cuts.observed()
            planned = [[n for n in names + more if n in shapes or n in observed_layers]
                       for names, more in zip(in_block, experts)]
            for names, stats in _stream(job, planned):
                # As many blocks as processes share one split of their solves: one block's largest solve
                # (an MLP's channels) would otherwise keep the other processes waiting. Each process then
                # holds that many blocks' statistics.
                window.append(([n for n in names if n in shapes], cuts.in_block(names), stats))
                if len(window) == job.accelerator.num_processes:
                    _planned_spectra(job, window, values, weights)
                del stats  # the block's Grams (the loop variable would hold the last block's to the end)
            _planned_spectra(job, window, values, weights)
            ranks, channels = greedy_allocation(job, shapes, values, weights if job.solver.loss_scale else None, cuts)
    members = cuts.hand_out(job, channels).members
    with job.timed("factorize"):
        _walk(job, [[n for n in names if n in ranks or n in members] for names in in_block], ranks)
    return ranks
