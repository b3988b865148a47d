"""The ``block_refinement`` modifier (``WSVDConfig.block_refine_steps``, compensated sequential mode): after a block
is compressed and compensated, its compressed layers — the factors of its factorized layers, its
pruned linears, biases included, and its cut experts — are trained with Adam so that the block's outputs on the
*compressed* model's hidden states match the dense block's outputs on the *dense* model's hidden
states (the same targets compensation fits layer by layer, here for the whole block at once: the
layers learn to work together and to undo what the blocks before them left). Shapes and ranks do
not change.

Loss: the squared error of the block's outputs over the real tokens, each token's error relative to
its target's squared norm (hidden states carry a few tokens of huge norm that would otherwise take
the whole loss). Optimizer: Adam, each tensor's step size ``block_refine_learning_rate`` times its
root mean square (factors are scaled however the factorization split them), decayed to 0 on a
cosine. Each step reads ``block_refine_batches`` stored calibration batches, in order, cycling.

The block trains as a float32 copy on the device where it runs (bf16 autocast on CUDA); its layers
are written back, in the model's dtype and offloaded again where accelerate offloaded them, only if
the loss over all calibration data fell (the relative error recorded for each block, before and after,
measured in the block's own precision: autocast on CUDA only for a bf16 or fp16 block).
Several processes: each holds a slice of every global batch where the batch size is a multiple of
their count, else the global batches p, p + P, ... (``hf_wsvd.statistics.passes.shard``); a step
reads the same global batches whatever the number of processes and the gradients are summed across
processes, so every process takes the steps one process would take, and ends with the same weights
(broadcast from process 0). With slices, every process computes on every step; with whole batches in
turn, those holding one of the step's batches (all of them where ``block_refine_batches`` is at least
the number of processes and the number of batches a multiple of it).

``train_block`` is the training alone; ``quantized_residual`` trains its corrections with it too.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import recursively_apply, send_to_device
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ...blocks import detached_copy, first_output
from ...runtime.factorized_linear import FactorizedLinear
from ...statistics.passes import splits_batches
from ..step import Job, experts_in, install
from . import Block, Modifier, register_modifier


@register_modifier
class BlockRefinement(Modifier):
    """At the end of each block (after compensation has advanced the dense stream to the block's
    targets), train the block's compressed layers toward them."""

    name = "block_refinement"
    field = "block_refine_steps"

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return bool(config.block_refine_steps) and bool(config.compensate)

    def on_block_end(self, job: Job, block: Block) -> None:
        # The cut experts train with the block's other compressed layers (their router as it is).
        layers = refined_layers(job, block.paths) | experts_in(job, block.module, job.cut_experts)
        if layers:
            with job.timed("refine"):
                job.refined[str(block.index)] = refine_block(job, block.module, block.index, layers, block.inputs,
                                                             block.targets, block.device)


def refined_layers(job: Job, paths: dict[str, str]) -> dict[str, str]:
    """The compressed layers among ``paths`` (layer name → module path inside its block): factorized,
    cut by MLP pruning, or projections of a cut attention."""
    cut = {name for entry in job.attention.values() for name in entry["projections"]}
    return {n: p for n, p in paths.items()
            if n in job.pruned or n in cut or isinstance(job.module(n), FactorizedLinear)}


def refine_block(job: Job, block: torch.nn.Module, index: int, layers: dict[str, str], inputs: list, targets: list,
                 device: torch.device) -> list[float]:
    """Train ``layers`` (name → path inside ``block``, the block's compressed layers) so that ``block``
    maps ``inputs`` (the compressed stream: hidden states, keyword arguments, mask) to ``targets``
    (the dense block's outputs on the dense stream); returns the block's relative error over the
    calibration data before and after (equal where training did not lower it and was undone)."""
    precision = next(block.parameters()).dtype  # an offloaded block's (meta) weights keep theirs
    # float32 at least (a half-precision block trains in float32), a float64 block as it is
    work = detached_copy(block, device, torch.promote_types(precision, torch.float32)).eval().requires_grad_(False)
    params = [p for path in layers.values() for p in work.get_submodule(path).parameters()]
    before, after = train_block(job, work, params, inputs, targets, device, f"refining block {index}", precision)
    if not after < before:  # never worse than compensation alone on its own data (nor NaN)
        return [before, before]
    for name, path in layers.items():
        install(job, name, lambda module, trained=work.get_submodule(path): _like(trained.requires_grad_(False), module))
    return [before, after]


def train_block(job: Job, work: torch.nn.Module, params: list[torch.nn.Parameter], inputs: list, targets: list,
                device: torch.device, desc: str, precision: torch.dtype) -> tuple[float, float]:
    """Train ``params`` of ``work`` (a float32 working copy of a block on ``device``) for
    ``job.config.block_refine_steps`` Adam steps so that it maps ``inputs`` (hidden states, keyword
    arguments, mask) to ``targets`` (outputs first); returns the relative error over the
    calibration data before and after, measured in ``precision`` (the dtype the block computes in).
    Whether to keep the result is the caller's choice."""
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.zeros_like(p)
    pairs = [(hidden, kwargs, mask, target) for (hidden, kwargs, mask), (target, _, _) in zip(inputs, targets)]
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    # The errors that decide whether the training is kept are the block's own: under autocast only
    # where it computes in half precision (a float32 block's error under bf16 autocast is mostly
    # rounding, and at full rank training on it would replace exact factors with worse ones).
    half = precision in (torch.bfloat16, torch.float16)
    measured = dict(amp, dtype=precision if half else amp["dtype"], enabled=amp["enabled"] and half)
    indices, tokens = _global_batches(pairs, device, job.accelerator, splits_batches(job.data, job.accelerator))
    before = _error(work, pairs, tokens, device, measured, job.accelerator)
    _train(job, work, params, pairs, indices, tokens, device, amp, desc)
    return before, _error(work, pairs, tokens, device, measured, job.accelerator)


def _like(layer: torch.nn.Module, module: torch.nn.Module) -> torch.nn.Module:
    """``layer`` with the device, dtype and ``requires_grad`` of ``module``'s weights."""
    reference = next(module.parameters())
    return layer.to(reference.device, reference.dtype).requires_grad_(reference.requires_grad)


def _sums(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (batch × tokens, float32): the squared error and the target's squared norm; padding zeroed."""
    target = target.float()
    error = (output.float() - target).square().sum(dim=-1)
    energy = target.square().sum(dim=-1)
    if mask is not None:
        keep = mask.to(error.device, error.dtype)
        error, energy = error * keep, energy * keep
    return error, energy


def _token_losses(error: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Each token's loss: its squared error relative to its target's squared norm (padding: 0)."""
    return error / energy.clamp_min(torch.finfo(torch.float32).tiny)


def _forward(work: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device, amp: dict) -> torch.Tensor:
    hidden, kwargs = hidden.to(device, non_blocking=True), send_to_device(kwargs, device)
    if not amp["enabled"]:
        # Without autocast (a CPU) the float32 copy of a half-precision block takes its inputs in
        # float32: a LayerNorm (GPT-2, OPT) would refuse bf16 hidden states against float32 weights.
        dtype = next(work.parameters()).dtype
        hidden, kwargs = recursively_apply(lambda t: t.to(dtype), (hidden, kwargs),
                                           test_type=lambda t: torch.is_tensor(t) and t.is_floating_point())
    with torch.autocast(**amp):
        return first_output(work(hidden, **kwargs))


@torch.no_grad()
def _error(work: torch.nn.Module, pairs: list, tokens: torch.Tensor, device: torch.device, amp: dict,
           accelerator) -> float:
    """The loss over every process's batches: the mean over real tokens of ‖y − ŷ‖² / ‖y‖²."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for hidden, kwargs, mask, target in pairs:
        output = _forward(work, hidden, kwargs, device, amp)
        total += _token_losses(*_sums(output, target.to(device, non_blocking=True), mask)).sum().double()
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(total)
    return float(total) / max(float(tokens.sum()), 1.0)


def _global_batches(pairs: list, device: torch.device, accelerator, split: bool) -> tuple[list[int], torch.Tensor]:
    """The global index of each of this process's batches (its slice of every batch where ``split``,
    else accelerate's round-robin share) and the real tokens of every global batch."""
    processes, rank = accelerator.num_processes, accelerator.process_index
    indices = list(range(len(pairs))) if split else [i * processes + rank for i in range(len(pairs))]
    count = torch.tensor([len(pairs)], dtype=torch.int64, device=device)
    if processes > 1:  # with slices, a process may lack only the last batch (one smaller than the others)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX if split else torch.distributed.ReduceOp.SUM)
    tokens = torch.zeros(int(count), dtype=torch.float64, device=device)
    for index, (hidden, _, mask, _) in zip(indices, pairs):
        tokens[index] = float(mask.sum()) if mask is not None else hidden.shape[0] * hidden.shape[1]
    if processes > 1:
        torch.distributed.all_reduce(tokens)
    return indices, tokens.cpu()


def _train(job: Job, work: torch.nn.Module, params: list[torch.nn.Parameter], pairs: list, indices: list[int],
           tokens: torch.Tensor, device: torch.device, amp: dict, desc: str) -> None:
    """``block_refine_steps`` Adam steps on ``params`` (see the module), gradients summed across
    processes; ``indices``: the global index of each of ``pairs``, ``tokens``: every global batch's
    real tokens."""
    config, accelerator = job.config, job.accelerator
    steps, per_step = config.block_refine_steps, config.block_refine_batches
    optimizer = torch.optim.Adam([{"params": [p], "lr": config.block_refine_learning_rate * float(
        p.detach().square().mean().sqrt().clamp_min(1e-12))} for p in params], fused=device.type == "cuda")
    schedule = get_cosine_schedule_with_warmup(optimizer, 0, steps)
    mine = {g: i for i, g in enumerate(indices)}
    total = len(tokens)
    show = job.show_progress and accelerator.is_local_main_process
    for step in tqdm(range(steps), desc=desc, leave=False, disable=not show):
        group = sorted({(step * per_step + j) % total for j in range(min(per_step, total))})
        count = float(tokens[group].sum())
        for g in group:
            if g in mine:
                hidden, kwargs, mask, target = pairs[mine[g]]
                output = _forward(work, hidden, kwargs, device, amp)
                error, energy = _sums(output, target.to(device, non_blocking=True), mask)
                _token_losses(error, energy).sum().div(max(count, 1.0)).backward()
        if accelerator.num_processes > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            torch.distributed.all_reduce(flat)
            for p, grad in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(grad.view_as(p))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=False)
    if accelerator.num_processes > 1:
        for p in params:
            torch.distributed.broadcast(p.data, src=0)
