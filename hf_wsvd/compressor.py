"""`compress`: importance → solver → rank allocation → module swap, on one model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .allocation import uniform_ranks
from .checkpoint import parameter_counts
from .config import WSVDConfig
from .importance import FisherResult, compute_fisher
from .runtime.factorized_linear import linear_shape, linear_weight
from .runtime.modeling_wsvd import MODEL_TYPE
from .solvers import FISHER, LayerProblem, get_solver
from .swap import attach_recipe, replace_with_factors
from .targets import select_targets
from .tasks import LossFn, per_example_loss, task_of


@dataclass
class CompressionReport:
    """What ``compress`` did and measured."""

    method: str
    param_ratio: float
    ranks: dict[str, int]
    dense_targets: list[str]  # targets left dense because their rank would save nothing
    params_before: int
    params_after: int
    importance_examples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def compress(
    model: PreTrainedModel,
    config: WSVDConfig,
    data: Iterable[dict] | None = None,
    loss_fn: LossFn | None = None,
    accelerator: Accelerator | None = None,
    importance: FisherResult | None = None,
    show_progress: bool = True,
) -> tuple[PreTrainedModel, CompressionReport]:
    """Factorize ``model`` in place following ``config``; return it with a report.

    ``data`` yields tokenized batches with ``labels`` (see ``hf_wsvd.data``); it is needed by
    methods that use importance (``fwsvd``). ``loss_fn(model, batch) -> per-example losses``
    defaults to the model's task loss (classification, regression or causal LM). ``importance``
    reuses a Fisher result computed earlier on the same dense model (e.g. across ratios) instead of
    ``data``. The returned model saves with ``save_pretrained`` and reloads with the stock Auto
    classes.
    """
    if model.config.model_type == MODEL_TYPE:
        raise ValueError("this model is already factorized by hf_wsvd; compress its dense original instead")
    torch.manual_seed(config.seed)
    solver = get_solver(config.method)
    targets = select_targets(model, config.target_modules, config.exclude_modules)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear/Conv1D layer inside repeated transformer blocks "
            "to compress; name the layers with target_modules"
        )
    shapes = {name: linear_shape(model.get_submodule(full)) for name, full in targets.items()}
    ranks = uniform_ranks(shapes, config.param_ratio)
    if not ranks:
        raise ValueError(
            f"param_ratio={config.param_ratio} saves nothing on any of the {len(targets)} target layers; "
            "lower it to compress"
        )
    params_before = sum(p.numel() for p in model.parameters())
    seconds: dict[str, float] = {}

    fisher, examples = {}, 0
    if FISHER in solver.needs and importance is not None:
        missing = sorted(set(ranks) - set(importance.fisher))
        if missing:
            raise ValueError(f"the given importance has no Fisher information for {missing[:3]}")
        fisher, examples = importance.fisher, importance.num_examples
    elif FISHER in solver.needs:
        if data is None:
            raise ValueError(f"method={config.method!r} needs importance data (task examples with labels)")
        start = time.perf_counter()
        result = compute_fisher(
            model, data, {name: model.get_submodule(targets[name]) for name in ranks},
            loss_fn or per_example_loss(task_of(model)), accelerator, show_progress,
        )
        fisher, examples = result.fisher, result.num_examples
        seconds["importance"] = time.perf_counter() - start

    start = time.perf_counter()
    dtype = getattr(torch, config.compute_dtype)
    for name, rank in tqdm(ranks.items(), desc=f"{config.method} factorization", disable=not show_progress):
        full_name = targets[name]
        weight = linear_weight(model.get_submodule(full_name)).detach()
        problem = LayerProblem(
            name, weight.to(dtype), rank,
            fisher=fisher[name].to(weight.device) if name in fisher else None, config=config,
        )
        up, down = solver.solve(problem)
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise FloatingPointError(f"{config.method} produced non-finite factors for {name!r}")
        replace_with_factors(model, full_name, up, down)
    seconds["factorize"] = time.perf_counter() - start

    recipe = replace(config, ranks=dict(ranks))
    attach_recipe(model, recipe)
    params_after, _ = parameter_counts(model)
    report = CompressionReport(
        config.method, config.param_ratio, dict(ranks), sorted(set(targets) - set(ranks)),
        params_before, params_after, examples, seconds,
    )
    return model, report
