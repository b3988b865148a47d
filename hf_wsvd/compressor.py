"""`compress`: importance → solver → rank allocation → module swap, on one model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .allocation import drop_slow_layers, greedy_ranks, round_rank, uniform_ranks
from .checkpoint import parameter_counts
from .config import WSVDConfig
from .embeddings import compress_embeddings
from .importance import ActivationStats, FisherResult, collect_activation_stats, compute_fisher
from .runtime.factorized_linear import linear_shape, linear_weight
from .runtime.modeling_wsvd import MODEL_TYPE
from .solvers import ACTIVATIONS, FISHER, LayerProblem, Solver, solver_for
from .swap import attach_recipe, replace_with_factors
from .targets import select_targets
from .tasks import LossFn, per_example_loss, task_of


@dataclass
class CompressionReport:
    """What ``compress`` did and measured."""

    method: str
    param_ratio: float
    ranks: dict[str, int]
    dense_targets: list[str]  # targets left dense: their rank would save nothing or exceed max_kept_ratio_for_speed
    params_before: int
    params_after: int
    importance_examples: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Statistics:
    """The statistics a method needs, per base-model-relative module name."""

    fisher: FisherResult | None = None
    activations: ActivationStats | None = None


def gather_statistics(
    model: PreTrainedModel,
    solver: Solver,
    modules: dict[str, torch.nn.Module],
    data: Iterable[dict] | None,
    loss_fn: LossFn | None,
    accelerator: Accelerator | None,
    given: Statistics,
    seconds: dict[str, float],
    show_progress: bool,
) -> Statistics:
    """Compute what ``solver`` needs and ``given`` lacks (Fisher needs labels; activations don't)."""
    stats = Statistics(given.fisher, given.activations)
    needed = [n for n in (FISHER, ACTIVATIONS) if n in solver.needs]
    if needed and data is None and (FISHER in needed and stats.fisher is None or ACTIVATIONS in needed and stats.activations is None):
        raise ValueError(f"method={solver.name!r} needs {' and '.join(needed)} statistics: pass importance data")
    if FISHER in needed and stats.fisher is None:
        start = time.perf_counter()
        stats.fisher = compute_fisher(model, data, modules, loss_fn or per_example_loss(task_of(model)),
                                      accelerator, show_progress)
        seconds["importance"] = time.perf_counter() - start
    if ACTIVATIONS in needed and stats.activations is None:
        start = time.perf_counter()
        stats.activations = collect_activation_stats(model, data, modules, accelerator, show_progress)
        seconds["activations"] = time.perf_counter() - start
    for kind, result in (("Fisher", stats.fisher and stats.fisher.fisher), ("activation", stats.activations and stats.activations.gram)):
        missing = sorted(set(modules) - set(result)) if result is not None else []
        if missing:
            raise ValueError(f"the given {kind} statistics lack {missing[:3]}")
    return stats


def layer_problem(model: torch.nn.Module, name: str, full_name: str, config: WSVDConfig, stats: Statistics) -> LayerProblem:
    """The factorization problem of one layer (rank to be set), in the compute dtype."""
    weight = linear_weight(model.get_submodule(full_name)).detach().to(getattr(torch, config.compute_dtype))
    fisher = stats.fisher.fisher[name].to(weight.device) if stats.fisher else None
    activations = stats.activations
    return LayerProblem(
        name, weight, 0, fisher=fisher, config=config,
        gram=activations.gram[name].to(weight.device) if activations else None,
        mean_abs=activations.mean_abs[name].to(weight.device) if activations else None,
    )


def allocate(config: WSVDConfig, solver: Solver, shapes: dict[str, tuple[int, int]],
             problems: dict[str, LayerProblem]) -> dict[str, int]:
    """Per-layer ranks under ``config.param_ratio`` with ``config.allocation``."""
    if config.allocation == "uniform":
        return uniform_ranks(shapes, config.param_ratio, config.max_kept_ratio_for_speed, config.rank_multiple)
    if solver.spectrum is None:
        raise ValueError(f"allocation={config.allocation!r} needs a method with a spectrum; {solver.name!r} has none")
    spectra = {name: solver.spectrum(problem) for name, problem in problems.items()}
    layer_weights = None
    if solver.loss_scale is not None:  # absolute predicted losses: undo greedy's normalization
        layer_weights = {name: solver.loss_scale(problem) * float(spectra[name].double().square().sum())
                         for name, problem in problems.items()}
    ranks = greedy_ranks(shapes, spectra, config.param_ratio, layer_weights)
    ranks = {name: round_rank(rank, config.rank_multiple) for name, rank in ranks.items()}
    return drop_slow_layers(ranks, shapes, config.max_kept_ratio_for_speed)


def plan(model: PreTrainedModel, config: WSVDConfig, solver: Solver, targets: dict[str, str],
         data: Iterable[dict] | None, loss_fn: LossFn | None, accelerator: Accelerator | None,
         given: Statistics, seconds: dict[str, float], show_progress: bool,
         ) -> tuple[dict[str, int], Statistics, dict[str, LayerProblem]]:
    """The statistics of the candidate layers, their ranks under ``config.allocation``, and
    their problems at those ranks."""
    shapes = {name: linear_shape(model.get_submodule(full)) for name, full in targets.items()}
    candidates = targets if config.allocation != "uniform" else {
        n: targets[n] for n in uniform_ranks(shapes, config.param_ratio, config.max_kept_ratio_for_speed,
                                             config.rank_multiple)}
    if not candidates:
        speed = config.max_kept_ratio_for_speed
        raise ValueError(f"param_ratio={config.param_ratio} saves nothing on any of the {len(targets)} "
                         "target layers" + (f" or keeps more than max_kept_ratio_for_speed={speed}" if speed else "")
                         + "; lower it to compress")
    modules = {name: model.get_submodule(full) for name, full in candidates.items()}
    stats = gather_statistics(model, solver, modules, data, loss_fn, accelerator, given, seconds, show_progress)
    start = time.perf_counter()
    problems = {name: layer_problem(model, name, targets[name], config, stats) for name in candidates}
    ranks = allocate(config, solver, {n: shapes[n] for n in candidates}, problems)
    seconds["allocate"] = time.perf_counter() - start
    return ranks, stats, {name: replace(problems[name], rank=rank) for name, rank in ranks.items()}


def factorize_layers(model: torch.nn.Module, solver: Solver, problems: dict[str, LayerProblem],
                     full_names: dict[str, str], show_progress: bool) -> None:
    """Solve each problem at its rank and swap the layer for its factors."""
    for name, problem in tqdm(problems.items(), desc=f"{solver.name} factorization", disable=not show_progress):
        up, down = solver.solve(problem)
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise FloatingPointError(f"{solver.name} produced non-finite factors for {name!r}")
        replace_with_factors(model, full_names[name], up, down)


def compress(
    model: PreTrainedModel,
    config: WSVDConfig,
    data: Iterable[dict] | None = None,
    loss_fn: LossFn | None = None,
    accelerator: Accelerator | None = None,
    importance: FisherResult | None = None,
    activations: ActivationStats | None = None,
    show_progress: bool = True,
) -> tuple[PreTrainedModel, CompressionReport]:
    """Factorize ``model`` in place following ``config``; return it with a report.

    ``data`` yields tokenized batches (see ``hf_wsvd.data``); methods that use importance or
    activations need it (``labels`` for Fisher). ``loss_fn(model, batch) -> per-example losses``
    defaults to the model's task loss (classification, regression or causal LM). ``importance``
    and ``activations`` reuse statistics computed earlier on the same dense model (e.g. across
    ratios); sequential mode gathers activations block by block and reads given ones only to
    plan greedy ranks. The returned model saves with ``save_pretrained`` and reloads with the stock Auto
    classes.
    """
    if model.config.model_type == MODEL_TYPE:
        raise ValueError("this model is already factorized by hf_wsvd; compress its dense original instead")
    torch.manual_seed(config.seed)
    solver = solver_for(config)
    targets = select_targets(model, config.target_modules, config.exclude_modules)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear/Conv1D layer inside repeated transformer blocks "
            "to compress; name the layers with target_modules"
        )
    params_before = sum(p.numel() for p in model.parameters())
    seconds: dict[str, float] = {}
    if config.embeddings and config.param_ratio == 1:
        ranks, examples = {}, 0  # embeddings only: every linear layer keeps all its parameters
    elif config.sequential:
        from .sequential import check_sequential_inputs, compress_sequential

        check_sequential_inputs(model, data)  # before any statistics pass
        planned = None
        if config.allocation != "uniform":  # ranks from the dense model's statistics, up front
            planned, stats, problems = plan(model, config, solver, targets, data, loss_fn, accelerator,
                                            Statistics(importance, activations), seconds, show_progress)
            importance = stats.fisher
            del stats, problems  # every layer's dense Gram: block-by-block mode exists not to hold them
        ranks, examples = compress_sequential(model, config, solver, targets, data, importance, accelerator,
                                              seconds, show_progress, planned)
    else:
        ranks, stats, problems = plan(model, config, solver, targets, data, loss_fn, accelerator,
                                      Statistics(importance, activations), seconds, show_progress)
        start = time.perf_counter()
        factorize_layers(model, solver, problems, targets, show_progress)
        seconds["factorize"] = time.perf_counter() - start
        examples = stats.fisher.num_examples if stats.fisher else 0

    if config.embeddings:
        ranks = {**ranks, **compress_embeddings(model, config, data, seconds)}
    attach_recipe(model, replace(config, ranks=dict(ranks)))
    params_after, _ = parameter_counts(model)
    report = CompressionReport(
        config.method, config.param_ratio, dict(ranks), sorted(set(targets) - set(ranks)),
        params_before, params_after, examples, seconds,
    )
    return model, report
