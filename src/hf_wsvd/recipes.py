"""The recommended recipe: the ``WSVDConfig`` fields left None, resolved from the model and the data.

Each resolvable field has one rule, ``rule(recipe, evidence) -> (value, notice or None)``, applied in
``RULES`` order to the recipe resolved so far; an explicit value is always kept.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .blocks import block_list
from .config import GROUPED_QUANTIZE_SPECS, WSVDConfig
from .methods.expert_pruning import find_experts
from .methods.mlp_pruning import find_pairs
from .runtime.factorized_linear import linear_shape
from .runtime.modeling_wsvd import TORCHAO_INT8_ALIGNMENT
from .solvers import solver_for
from .statistics.names import GRAM
from .targets import select_targets
from .tasks import CAUSAL_LM, task_of

logger = logging.getLogger(__name__)

# Block refinement steps by where the blocks compute, at the default learning rate 1e-2. Measured
# (docs/benchmarks/llm.md, quantization.md): 256 steps beat 64 wherever both ran (SmolLM2-135M -40%:
# 1.55x against 1.66x dense perplexity; Qwen2.5-0.5B int4 Q + L: 54% against 47% of the gap closed).
# The time is linear in the steps: on an H200 64 steps cost 40 s of the 7B shape's 203 s, so 256 keep
# it under twice the unrefined compression's time; on a CPU 64 already cost ~25 minutes for SmolLM2.
ACCELERATOR_BLOCK_REFINE_STEPS = 256
CPU_BLOCK_REFINE_STEPS = 64


def default_block_refine_steps(device: torch.device) -> int:
    """The default ``block_refine_steps`` where the blocks compute on ``device``."""
    return CPU_BLOCK_REFINE_STEPS if torch.device(device).type == "cpu" else ACCELERATOR_BLOCK_REFINE_STEPS


@dataclass(frozen=True)
class Evidence:
    """What the recipe is resolved from."""

    data: bool  # calibration data was given
    labels: bool  # its batches carry labels: the Fisher information can be estimated
    causal_lm: bool  # a causal LM with a stack of repeated blocks (what sequential mode walks)
    device: torch.device  # where the blocks compute (the accelerator's device)
    mlps: bool = True  # the targets hold an MLP that MLP pruning can cut (nn.Linear producers and consumer)
    statistics: bool = False  # statistics of the targets taken earlier were given (compress(statistics=))


def _method(recipe: WSVDConfig, evidence: Evidence) -> tuple[str, str | None]:
    if evidence.labels:
        return "fisher_whiten", None
    if evidence.data:
        return "whiten", ("the data's batches carry no labels, so there is no Fisher information: method=whiten "
                          "(activations only); for fisher_whiten give labels (--label-column, or 'labels' in "
                          "each batch)")
    return "svd", ("no data: method=svd (plain truncated SVD); importance data (--data) gives far better "
                   "results at the same size")


def _allocation(recipe: WSVDConfig, evidence: Evidence) -> tuple[str, None]:
    # Greedy reads every layer's loss from the method's spectrum (lp and the element-wise methods have none),
    # which the data's statistics give, or those given again.
    greedy = (evidence.data or evidence.statistics) and solver_for(recipe).spectrum is not None
    return ("greedy" if greedy else "uniform"), None


def _sequential(recipe: WSVDConfig, evidence: Evidence) -> tuple[bool, None]:
    if recipe.pipeline is not None:
        return recipe.pipeline == "sequential", None
    return evidence.data and evidence.causal_lm, None


def _pipeline(recipe: WSVDConfig, evidence: Evidence) -> tuple[str, None]:
    return ("sequential" if recipe.sequential else "whole_model"), None


def _reads_gram_in_sequence(recipe: WSVDConfig, evidence: Evidence) -> tuple[bool, None]:
    # Compensation fits each layer through its input Gram, MLP and attention pruning choose what
    # they keep on it: the methods that read one can use them. Block by block only: in whole-model
    # mode on MiniLM at kept 0.5, MLP pruning (with or without attention pruning) cost MRPC 2.4
    # points of accuracy against factorizing (SST-2 gained 0.5), so classifiers stay factorized.
    return bool(recipe.sequential) and GRAM in solver_for(recipe).needs_for(recipe.method_options()), None


def _mlp_pruning(recipe: WSVDConfig, evidence: Evidence) -> tuple[bool, None]:
    # Off where there is no MLP it can cut (GPT-2's Conv1D MLP): the recipe records what was done.
    return _reads_gram_in_sequence(recipe, evidence)[0] and evidence.mlps, None


def _attention_pruning(recipe: WSVDConfig, evidence: Evidence) -> tuple[bool, None]:
    # Off unless asked: it makes the output fastest (Llama-7B shape, one H200, CUDA-graph decode at
    # batch 1: 1.08x / 1.20x dense at -20% / -40%, against about 1.02x / 1.11x with factorized
    # attentions), but its query/key cuts cost quality the factorized attentions do not (SmolLM2-135M,
    # whole WikiText-2 test: 1.35x / 2.29x dense perplexity with it, 1.22x / 1.89x without;
    # docs/benchmarks/llm.md).
    return False, None


def _block_refine_steps(recipe: WSVDConfig, evidence: Evidence) -> tuple[int, None]:
    # Refinement trains each block toward the dense stream that compensation keeps.
    return (default_block_refine_steps(evidence.device) if recipe.compensate else 0), None


def _offload_activations(recipe: WSVDConfig, evidence: Evidence) -> tuple[bool, None]:
    # Measured (docs/scale.md, one H200, Llama-7B shape, 128 x 2048 tokens): the walk's two hidden-state
    # streams are 3.9 GiB of its 22.3 GiB peak; in pinned CPU memory the peak falls by that much for 8%
    # more time. On a CPU they are in CPU memory already; elsewhere no pinned memory makes the copies
    # asynchronous, and the trade was measured on CUDA only.
    return bool(recipe.sequential) and evidence.device.type == "cuda", None


# Ranks in steps of 8 align GPU matrix kernels. A quantizer takes a factor only where its input size
# (the rank, for an up factor) is a multiple of its group size.
DEFAULT_RANK_MULTIPLE = 8


def default_rank_multiple(config: WSVDConfig) -> int:
    """The ``rank_multiple`` of ``config`` when unset: 8, or the multiple of 8 that its ``quantize``
    needs to take every factor and pruned layer (its group size, 16 for int8: torchao's int8 compiles
    on a CPU only then, ``runtime.modeling_wsvd.TORCHAO_INT8_ALIGNMENT``)."""
    if config.quantize == "int8":
        return math.lcm(DEFAULT_RANK_MULTIPLE, TORCHAO_INT8_ALIGNMENT)
    if config.quantize in GROUPED_QUANTIZE_SPECS:
        return math.lcm(DEFAULT_RANK_MULTIPLE, config.quantize_group_size)
    return DEFAULT_RANK_MULTIPLE


def _rank_multiple(recipe: WSVDConfig, evidence: Evidence) -> tuple[int, None]:
    return default_rank_multiple(recipe), None


def residual_block_refine_steps(config: WSVDConfig, model: nn.Module, data: Iterable[dict] | None,
                                device: torch.device) -> int:
    """``block_refine_steps`` of a ``quantized_residual`` recipe whose blocks compute on ``device``: as
    given, else on for a causal LM with calibration data (``default_block_refine_steps``; the other
    fields of ``RULES`` do not apply)."""
    if config.block_refine_steps is not None:
        return config.block_refine_steps
    return default_block_refine_steps(device) if data is not None and is_causal_lm(model) else 0


Rule = Callable[[WSVDConfig, Evidence], tuple[Any, "str | None"]]
RULES: dict[str, Rule] = {"method": _method, "allocation": _allocation, "sequential": _sequential, "pipeline": _pipeline,
                          "compensate": _reads_gram_in_sequence, "mlp_pruning": _mlp_pruning,
                          "attention_pruning": _attention_pruning,
                          "block_refine_steps": _block_refine_steps, "offload_activations": _offload_activations,
                          "rank_multiple": _rank_multiple}


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal LM with a stack of transformer blocks."""
    try:  # both raise for models without a known task loss / without repeated blocks
        return task_of(model) == CAUSAL_LM and bool(block_list(model))
    except ValueError:
        return False


def _has_cuttable_mlps(model: nn.Module, targets: dict[str, str]) -> bool:
    linears = {n: linear_shape(model.get_submodule(f)) for n, f in targets.items()
               if type(model.get_submodule(f)) is nn.Linear}
    return bool(find_pairs(linears)) or bool(find_experts(model)[0])


def resolve(config: WSVDConfig, model: nn.Module, data: Iterable[dict] | None, device: torch.device,
            targets: dict[str, str] | None = None, statistics: bool = False) -> tuple[WSVDConfig, list[str]]:
    """``config`` with its None fields (``RULES``) resolved for ``model``, ``data`` and the
    ``device`` the blocks compute on, and the notices explaining a fallback from the best recipe
    (each logged once as a warning). ``data`` must be re-iterable (its first batch is read to look
    for labels); ``targets``: the recipe's target layers, if already found (``select_targets``);
    ``statistics``: whether statistics of the targets taken earlier are given."""
    unresolved = [name for name in RULES if getattr(config, name) is None]
    if not unresolved:
        return config, []
    first = next(iter(data), None) if data is not None else None
    evidence = Evidence(data=data is not None, labels=first is not None and first.get("labels") is not None,
                        causal_lm=is_causal_lm(model), device=device, statistics=statistics,
                        mlps=config.mlp_pruning is not None or _has_cuttable_mlps(
                            model, targets or select_targets(model, config.target_modules, config.exclude_modules)))
    notices = []
    for name in unresolved:
        value, notice = RULES[name](config, evidence)
        config = dataclasses.replace(config, **{name: value})
        if notice:
            logger.warning(notice)
            notices.append(notice)
    return config, notices
