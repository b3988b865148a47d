"""``quantized_residual``: quantize each layer, then fit a low-rank correction to its quantization
error with the importance weighting of another method (LQER, QERA, EoRA): W ≈ Q + L.

Q is what the stock quantizer stores (``from_pretrained(dense, quantization_config=...)``, read
back dequantized); L = argmin ‖D·(W − Q − L)·R‖_F at rank ``residual_rank`` by the weighted SVD
of ``residual_method`` (``fisher_whiten``: D from the row-summed Fisher, R the input Gram's square
root; ``whiten``: R only; ``svd``: neither), so the correction spends its rank where the task loss
and the calibration inputs make the quantization error cost most.

Block refinement (``block_refine_steps``, ``block_refine_learning_rate``; the sequential pipeline's
``hf_wsvd.pipelines.modifiers.refinement``): each layer's L is fitted alone, blind to how the errors
of a block's layers add up, so the blocks are then walked in order with two streams of hidden
states over the calibration data, the dense model's and the corrected quantized model's; each
block's corrections (``up``/``down``; Q frozen) are trained so that the corrected block's outputs on
its own stream match the dense block's outputs on the dense stream, on a float32 working copy whose
base weights are Q dequantized (gradients reach the earlier layers of the block through it), and
kept where the block's error over the calibration data fell (``refined``: per block, before and after).

The checkpoint stores Q quantized and L in full precision (``LowRankCorrectedLinear``, recorded
under ``residual``): it loads only with its own quantization config and quantized base weights,
never as W + L nor as Q without L. ``residual_adapter`` writes L as a peft LoRA adapter for the
stock quantized dense model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..runtime.factorized_linear import FullPrecisionLinear, LowRankCorrectedLinear, linear_shape, linear_weight
from .options import QuantizedResidualOptions
from .registry import LayerProblem, get_solver, register_solver


def _inner(problem: LayerProblem) -> tuple[Any, LayerProblem]:
    """The weighting method's solver and its problem: the quantization error at the same rank."""
    if problem.quantized is None:
        raise ValueError(f"quantized_residual needs the quantized weight of {problem.name!r}: run it through "
                         "hf_wsvd.compress with quantize set")
    solver = get_solver(problem.options.residual_method)
    error = problem.weight - problem.quantized.to(problem.weight.device, problem.weight.dtype)
    return solver, dataclasses.replace(problem, weight=error, options=None, quantized=None)


def _needs(options: QuantizedResidualOptions) -> frozenset[str]:
    solver = get_solver(options.residual_method)
    return solver.needs_for(solver.options())


@register_solver("quantized_residual", needs=_needs, options=QuantizedResidualOptions,
                 description="low-rank correction of the quantization error: min ‖D·(W − Q − L)·R‖_F")
def solve_residual(problem: LayerProblem) -> tuple[torch.Tensor, torch.Tensor]:
    solver, residual = _inner(problem)
    return solver.solve(residual)


def corrected(base: nn.Module, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> LowRankCorrectedLinear:
    """A ``LowRankCorrectedLinear`` around the (quantized) linear ``base`` with the correction
    ``up @ down`` stored in ``dtype`` (the dtype the quantized model computes in)."""
    in_features, out_features = linear_shape(base)
    layer = LowRankCorrectedLinear(in_features, out_features, up.shape[1], bias=base.bias is not None, device="meta")
    layer.base = base
    device = next(base.parameters()).device
    for name, factor in (("down", down), ("up", up)):
        linear = FullPrecisionLinear(factor.shape[1], factor.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(factor.detach().to(device, dtype).contiguous(), requires_grad=False)
        setattr(layer, name, linear)
    layer.train(base.training)
    return layer


def quantized_residual(
    model: PreTrainedModel,
    config: Any,
    data: Iterable[dict] | None,
    targets: dict[str, str],
    loss_fn: Any = None,
    accelerator: Accelerator | None = None,
    statistics: Any = None,
    show_progress: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, dict[str, int], Any]:
    """``(quantized model, residual ranks, job)``: ``model`` (dense, left unchanged) quantized by
    ``config.quantize`` the stock way in ``dtype`` (default: its own), each of ``targets``
    (base-model-relative name → module name) with its correction fitted on ``data``."""
    from ..blocks import given_back
    from ..pipelines.step import Job, layer_statistics, refuse_non_finite_weights, require_data
    from ..config import GROUPED_QUANTIZE_SPECS
    from ..pipelines.whole_model import collect
    from ..integrations.quantization import dequantized_weight, is_quantized_tensor, quantization_config, quantize
    from ..statistics import Statistics, default_accelerator

    group = config.quantize_group_size
    for name, full_name in targets.items():
        module = model.get_submodule(full_name)
        if not isinstance(module, nn.Linear):  # torchao, for one, leaves GPT-2's Conv1D unquantized
            raise ValueError(f"quantized_residual corrects quantized nn.Linear layers, and {name!r} is a "
                             f"{type(module).__name__}: exclude it (exclude_modules) or compress with a low-rank method")
        in_features, out_features = linear_shape(module)
        if config.quantize in GROUPED_QUANTIZE_SPECS and in_features % group:
            raise ValueError(f"{name!r} has {in_features} inputs, not a multiple of quantize_group_size={group}: "
                             "choose a group size that divides every target's input size")
        if not 1 <= config.residual_rank <= min(in_features, out_features):
            raise ValueError(f"residual_rank={config.residual_rank} does not fit {name!r} ({out_features}x{in_features})")
    solver = get_solver("quantized_residual")
    job = Job(model, config, solver, config.method_options(), targets, data, loss_fn,
              accelerator or default_accelerator(), statistics or Statistics(), {}, show_progress)
    refuse_non_finite_weights(job)
    require_data(job, f"quantized_residual with residual_method={config.residual_method!r}")
    with given_back(model):  # statistics on the accelerator; quantized from the model's own device
        model.to(job.accelerator.device)
        collect(job, targets)
    with job.timed("quantize"):
        quantized = quantize(model, quantization_config(config.quantize, group), dtype=dtype)
    ranks = {}
    bar = tqdm(sorted(targets), desc="quantized_residual correction", disable=not show_progress)
    with job.timed("factorize"):
        for name in bar:
            base = quantized.get_submodule(targets[name])
            if not is_quantized_tensor(base.weight):
                raise ValueError(f"{config.quantize!r} left {name!r} unquantized (the quantization config skips it): "
                                 "exclude it from the targets (exclude_modules)")
            weight = linear_weight(model.get_submodule(targets[name])).detach().to(job.compute_dtype)
            problem = LayerProblem(name, weight, config.residual_rank, job.options,
                                   quantized=dequantized_weight(base).to(weight.device),
                                   **layer_statistics(job, name, job.statistics, weight.device))
            up, down = solver.finite_solve(problem)
            quantized.set_submodule(targets[name], corrected(base, up, down, quantized.dtype))
            ranks[name] = config.residual_rank
    if config.block_refine_steps:
        with job.timed("refine"):
            job.refined = refine_corrections(job, quantized)
    return quantized, ranks, job


def refine_corrections(job: Any, quantized: PreTrainedModel) -> dict[str, list[float]]:
    """Block refinement of ``quantized``'s corrections toward the dense ``job.model`` on ``job.data``
    (see the module); returns block index → the block's relative output error before and after
    (equal where training did not lower it and was undone). Both models run on the job's device
    for the duration."""
    from ..blocks import block_list, detached_copy, given_back, run_block
    from ..integrations.quantization import dequantized_modules
    from ..pipelines.modifiers.refinement import train_block
    from ..pipelines.sequential import capture

    device = job.accelerator.device
    refined = {}
    with given_back(job.model), given_back(quantized):
        for model in (job.model, quantized):
            model.to(device)
        dense_blocks, blocks = block_list(job.model)[1], block_list(quantized)[1]
        (dense_stream, dense_arguments), (stream, arguments) = \
            capture(job, dense_blocks), capture(dataclasses.replace(job, model=quantized), blocks)
        show = job.show_progress and job.accelerator.is_local_main_process
        for index, (dense_block, block) in enumerate(zip(dense_blocks, tqdm(blocks, desc="blocks (refining corrections)",
                                                                             disable=not show))):
            dense_arguments.use(dense_stream, index)
            arguments.use(stream, index)
            targets = list(dense_stream)
            run_block(dense_block, targets, device)
            layers = {path: m for path, m in block.named_modules() if isinstance(m, LowRankCorrectedLinear)}
            if layers:
                work = detached_copy(block, device, torch.promote_types(quantized.dtype, torch.float32),
                                     dequantized_modules(block)).eval().requires_grad_(False)
                params = [getattr(work.get_submodule(path), factor).weight for path in layers for factor in ("up", "down")]
                before, after = train_block(job, work, params, stream, targets, device, f"refining block {index}",
                                            quantized.dtype)
                fell = after < before  # kept only where the block's error over the calibration data fell
                refined[str(index)] = [before, after if fell else before]
                if fell:
                    with torch.no_grad():
                        for path, layer in layers.items():
                            for factor in ("up", "down"):
                                getattr(layer, factor).weight.copy_(getattr(work.get_submodule(path), factor).weight)
            run_block(block, stream, device)
            dense_stream = targets
    return refined


def residual_adapter(model: PreTrainedModel, folder: str | os.PathLike, base_model: str | None = None) -> None:
    """Write the corrections of a ``quantized_residual`` model as a peft LoRA adapter into
    ``folder``: ``PeftModel.from_pretrained(base, folder)`` on the dense model quantized the stock
    way with the same config (``from_pretrained(dense, quantization_config=...)``) computes Q + L.
    On an unquantized base it would compute W + L: load the base quantized. ``base_model`` is
    recorded as the adapter's ``base_model_name_or_path``."""
    from peft import LoraConfig

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LowRankCorrectedLinear)}
    if not layers:
        raise ValueError("the model has no quantized_residual corrections (LowRankCorrectedLinear) to export")
    ranks = {m.rank for m in layers.values()}
    rank = max(ranks)
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=sorted(layers), bias="none", lora_dropout=0.0,
        rank_pattern={name: m.rank for name, m in layers.items() if m.rank != rank},
        alpha_pattern={name: m.rank for name, m in layers.items() if m.rank != rank},
        base_model_name_or_path=base_model, task_type=None,
    )
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    tensors = {}
    for name, module in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = module.down.weight.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = module.up.weight.detach().contiguous().cpu()
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    quantization = getattr(model.config, "quantization_config", None)
    note = {"base": "the dense model loaded with this quantization_config (on an unquantized base the adapter "
                    "computes W + L, not Q + L)",
            "quantization_config": quantization.to_dict() if hasattr(quantization, "to_dict") else quantization}
    with open(os.path.join(folder, "hf_wsvd_residual.json"), "w", encoding="utf-8") as f:
        json.dump(note, f, indent=2, default=str)
