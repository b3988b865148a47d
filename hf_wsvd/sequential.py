"""Layer-by-layer compression of large decoders (the GPTQ-style calibration pattern).

The inputs of the first block are captured once; then, block after block, the statistics of the
block's layers are taken on inputs produced by the *already compressed* blocks before it, the
block is factorized, and the compressed block is re-run to feed the next. Only the parts outside
the blocks (embeddings, final norm, head) and one block sit on the device at a time, with the
calibration activations; the other blocks stay where they are (CPU memory).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterable

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .allocation import uniform_ranks
from .config import WSVDConfig
from .importance import FisherResult, compute_fisher, default_accelerator
from .importance.activations import ActivationHooks
from .runtime.factorized_linear import linear_shape
from .solvers import FISHER, Solver
from .tasks import CAUSAL_LM, per_example_loss, task_of


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: its largest ``nn.ModuleList``."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _move_outside_blocks(model: nn.Module, prefix: str, device: torch.device) -> dict:
    """Move every parameter and buffer outside ``prefix`` to ``device``; return where they were."""
    where = {}
    for name, module in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for kind in ("_parameters", "_buffers"):
            for key, tensor in getattr(module, kind).items():
                if tensor is not None:
                    where[(name, kind, key)] = tensor.device
                    _place(module, kind, key, tensor.to(device))
    return where


def _place(module: nn.Module, kind: str, key: str, tensor: torch.Tensor) -> None:
    if kind == "_parameters":
        module._parameters[key].data = tensor
    else:
        module._buffers[key] = tensor


def _restore(model: nn.Module, where: dict) -> None:
    for (name, kind, key), device in where.items():
        module = model.get_submodule(name)
        _place(module, kind, key, getattr(module, kind)[key].to(device))


def _capture_block_inputs(model, block, batches, device) -> list[tuple[torch.Tensor, dict, torch.Tensor | None]]:
    """(hidden states, keyword arguments, 2-D attention mask) of the first block for each batch."""
    captured = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {**kwargs, "use_cache": False, "past_key_values": None}))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    masks = []
    try:
        with torch.no_grad():
            for batch in batches:
                masks.append(batch.get("attention_mask"))
                inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                try:
                    model(**inputs, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return [(hidden, kwargs, mask) for (hidden, kwargs), mask in zip(captured, masks)]


def _run_block(block: nn.Module, inputs: list, hooks: ActivationHooks | None = None) -> list:
    """Run ``block`` on every captured input; return the outputs as the next block's inputs."""
    outputs = []
    with torch.no_grad():
        for hidden, kwargs, mask in inputs:
            if hooks is not None:
                hooks.new_batch(mask.to(hidden.device) if mask is not None else None)
            out = block(hidden, **kwargs)
            outputs.append((out[0] if isinstance(out, tuple) else out, kwargs, mask))
    return outputs


def check_sequential_inputs(model: PreTrainedModel, data: Iterable[dict] | None) -> None:
    """Raise unless sequential mode can run: a causal LM and calibration data."""
    if task_of(model) != CAUSAL_LM:
        raise ValueError(f"sequential mode is for causal LMs; {type(model).__name__} is not one")
    if data is None:
        raise ValueError("sequential mode needs calibration data")


def compress_sequential(
    model: PreTrainedModel,
    config: WSVDConfig,
    solver: Solver,
    targets: dict[str, str],
    data: Iterable[dict] | None,
    importance: FisherResult | None,
    accelerator: Accelerator | None,
    seconds: dict[str, float],
    show_progress: bool,
    planned: dict[str, int] | None = None,
) -> tuple[dict[str, int], int]:
    """Factorize ``targets`` block by block; return the ranks and the Fisher example count.

    ``planned``: the ranks allocated beforehand (on the dense model's statistics); None: the same
    kept ratio for every layer."""
    from .compressor import Statistics, factorize_layers, layer_problem

    check_sequential_inputs(model, data)
    accelerator = accelerator or default_accelerator()
    device = accelerator.device
    prefix, blocks = decoder_blocks(model)
    model.eval()

    fisher, examples = importance, 0
    if FISHER in solver.needs and fisher is None:
        start = time.perf_counter()
        fisher = compute_fisher(model, data, {n: model.get_submodule(f) for n, f in targets.items()},
                                per_example_loss(CAUSAL_LM), accelerator, show_progress)
        seconds["importance"] = time.perf_counter() - start
    examples = fisher.num_examples if fisher else 0

    start = time.perf_counter()
    where = _move_outside_blocks(model, prefix, device)
    ranks: dict[str, int] = {}
    try:
        block_devices = [next(b.parameters()).device for b in blocks]
        blocks[0].to(device)
        inputs = _capture_block_inputs(model, blocks[0], data, device)
        for index, block in enumerate(tqdm(blocks, desc="blocks", disable=not show_progress)):
            block.to(device)
            block_prefix = f"{prefix}.{index}."
            names = {n: f for n, f in targets.items() if f.startswith(block_prefix)}
            shapes = {n: linear_shape(model.get_submodule(f)) for n, f in names.items()}
            if planned is None:
                block_ranks = uniform_ranks(shapes, config.param_ratio, config.max_kept_ratio_for_speed,
                                            config.rank_multiple)
            else:
                block_ranks = {n: planned[n] for n in names if n in planned}
            if block_ranks:
                modules = {n: model.get_submodule(names[n]) for n in block_ranks}
                hooks = ActivationHooks(modules)
                try:
                    _run_block(block, inputs, hooks)
                finally:
                    hooks.remove()
                stats = Statistics(fisher, hooks.result())
                problems = {n: replace(layer_problem(model, n, names[n], config, stats), rank=r)
                            for n, r in block_ranks.items()}
                factorize_layers(model, solver, problems, names, show_progress=False)
                ranks.update(block_ranks)
            inputs = _run_block(block, inputs)
            block.to(block_devices[index])
    finally:
        _restore(model, where)
    seconds["factorize"] = time.perf_counter() - start
    if not ranks:
        raise ValueError(f"param_ratio={config.param_ratio} saves nothing on any target layer; lower it to compress")
    return ranks, examples
