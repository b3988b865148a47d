"""The step both pipelines run on a group of layers — collect → allocate → solve → swap — and the
``Job`` it runs in. Nothing here knows a method nor a modifier: a method is its ``Solver`` (what it
needs, its spectrum, its loss scale, its solve) and its options; a modifier (MLP or attention
pruning, compensation, refinement, embeddings: ``hf_wsvd.pipelines.modifiers``) is called through
its hooks.

In several processes (``accelerate launch`` / ``torchrun``) each process holds the model and its
share of the calibration data; the statistics are summed once per group, and the spectra and
factorizations of a group are split between the processes by estimated cost, then broadcast, so
every process swaps in the same factors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import align_module_device
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..allocation import (Budgeted, greedy_ranks, greedy_start, kept_channels, rank_for_ratio, round_rank,
                          uniform_ranks)
from ..blocks import execution_device, hooked, loaded, offloaded
from ..runtime.factorized_linear import linear_shape, linear_weight
from ..runtime.modeling_wsvd import all_finite, experts_shape, is_experts
from ..solvers import LayerProblem, MethodOptions, Solver
from ..solvers.registry import naming_the_layer
from ..statistics import GRADIENT_STATISTICS, INPUT_STATISTICS, Statistics, gradient_statistics
from ..statistics.result import FLOAT16_OVERFLOW
from ..swap import factors_like
from ..targets import experts_alone
from ..tasks import LossFn, per_example_loss, task_of
from .modifiers import Block, ChannelGroup, ChannelModifier, Modifier, enabled_modifiers
from .registry import get_pipeline

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One compression run: the model, the recipe's method and options, the target layers
    (base-model-relative name → full module name) and what the passes need."""

    model: PreTrainedModel
    config: "object"  # the WSVDConfig recipe (read: allocation, param_ratio, ranks options, dtype)
    solver: Solver
    options: MethodOptions
    targets: dict[str, str]
    data: Iterable[dict] | None
    loss_fn: LossFn | None
    accelerator: Accelerator
    statistics: Statistics = field(default_factory=Statistics)
    seconds: dict[str, float] = field(default_factory=dict)
    show_progress: bool = True
    # Layers cut by MLP pruning: name → {"shape": [in, out], "dense_shape": [in, out]}.
    pruned: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    # Attentions cut by attention pruning: name → {"head_dim", "dense_head_dim", "projections", "rotary"}.
    attention: dict[str, dict] = field(default_factory=dict)
    # Experts modules MLP pruning may cut (no target layers: 3-D weights): relative → full name.
    experts: dict[str, str] = field(default_factory=dict)
    # Experts modules cut by MLP pruning: name → {"channels", "dense_channels"}.
    cut_experts: dict[str, dict[str, int]] = field(default_factory=dict)
    # Blocks trained by block refinement: index → [relative error before, after].
    refined: dict[str, list[float]] = field(default_factory=dict)
    # What the run did otherwise than the recipe asked, for the report (``notice``).
    notices: list[str] = field(default_factory=list)
    # Whether a pass read ``data`` (``read_data``): reused statistics can leave it unread.
    data_read: bool = False
    _open_stages: list[list[float]] = field(default_factory=list, repr=False)

    @functools.cached_property
    def modifiers(self) -> list[Modifier]:
        """The modifiers the recipe turns on, in the order they are called."""
        return enabled_modifiers(self.config)

    @property
    def needs(self) -> frozenset[str]:
        return self.solver.needs_for(self.options)

    @property
    def input_needs(self) -> frozenset[str]:
        return self.needs & INPUT_STATISTICS

    @property
    def gradient_needs(self) -> frozenset[str]:
        return self.needs & GRADIENT_STATISTICS

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.config.compute_dtype)

    def path(self, name: str) -> str:
        """The full module name of the target layer or experts module ``name`` (base-model-relative)."""
        return self.targets[name] if name in self.targets else self.experts[name]

    def module(self, name: str) -> torch.nn.Module:
        """The target layer or experts module ``name`` (base-model-relative)."""
        return self.model.get_submodule(self.path(name))

    def experts_record(self) -> dict[str, dict[str, int]]:
        """Every experts module of MLP pruning's budget and the channels it keeps (the recipe's record:
        the counts of what param_ratio budgeted hold those kept whole too, which are no target layers)."""
        record = {}
        for name in self.experts:
            channels = experts_shape(self.module(name))[1]  # all of them, where not cut
            record[name] = self.cut_experts.get(name, {"channels": channels, "dense_channels": channels})
        return record

    def shapes(self, names: Iterable[str]) -> dict[str, tuple[int, int]]:
        return {n: linear_shape(self.module(n)) for n in names}

    def read_data(self) -> Iterable[dict] | None:
        """``data``, for a pass over it (recorded as ``data_read``)."""
        self.data_read = True
        return self.data

    def notice(self, message: str) -> None:
        """Log ``message`` as a warning and keep it for the report's ``notices``."""
        logger.warning(message)
        self.notices.append(message)

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Add the seconds spent in ``stage`` to ``seconds``, less those of stages timed inside it (so
        that the stages add up to the whole)."""
        import time

        frame = [time.perf_counter(), 0.0]  # start, seconds of the stages nested in this one
        self._open_stages.append(frame)
        try:
            yield
        finally:
            self._open_stages.pop()
            elapsed = time.perf_counter() - frame[0]
            self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed - frame[1]
            if self._open_stages:
                self._open_stages[-1][1] += elapsed


def require_data(job: Job, method: str = "") -> None:
    """Raise unless the statistics the method (``method`` names it, else the solver) needs can be had:
    from ``data``, or given for every target layer."""
    if not job.needs or job.data is not None or job.statistics.has(job.targets, job.needs):
        return
    needs = ", ".join(sorted(job.needs))
    held = sorted(n for n in job.targets if job.statistics.has([n], job.needs))
    if held:  # statistics of another selection of layers: say which are missing, not only that data is
        missing = sorted(set(job.targets) - set(held))
        raise ValueError(f"the statistics given hold {needs} for {len(held)} of the {len(job.targets)} target layers, "
                         f"not for {missing[0]!r}: pass data too, or the target_modules they were taken for")
    raise ValueError(f"{method or f'method={job.solver.name!r}'} needs {needs} statistics: pass calibration data")


def gradient_pass(job: Job, names: Iterable[str]) -> None:
    """The gradient statistics the method needs, over the whole model (skipped when given)."""
    names = [n for n in names if n in job.targets]  # an experts module has no linear weight to score
    if not job.gradient_needs or job.statistics.has(names, job.gradient_needs):
        return
    with job.timed("importance"):
        stats = gradient_statistics(job.model, job.read_data(), {n: job.module(n) for n in names}, job.gradient_needs,
                                    job.loss_fn or per_example_loss(task_of(job.model)), job.accelerator,
                                    job.show_progress)
    job.statistics = job.statistics.merged(stats)


def uniform(job: Job, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """The same kept ratio for every layer (``allocation="uniform"``), rounded, slow layers dropped."""
    config = job.config
    return uniform_ranks(shapes, config.param_ratio, config.max_kept_ratio_for_speed, config.rank_multiple)


def check_speed_table(job: Job, cut: set[str]) -> None:
    """Refuse a per-shape ``max_kept_ratio_for_speed`` none of whose shapes is a target layer's (a typo,
    or another model's table, would limit nothing); a notice names the entries that match no layer,
    and those that match only layers ``cut`` by a modifier (MLP or attention pruning), never factorized."""
    table = job.config.max_kept_ratio_for_speed
    if not isinstance(table, dict) or not table:
        return
    shapes = job.shapes(job.targets)
    present = sorted({f"{i}x{o}" for i, o in shapes.values()})
    factorized = {f"{i}x{o}" for name, (i, o) in shapes.items() if name not in cut}
    unused = [shape for shape in table if shape not in present]
    if len(unused) == len(table):
        raise ValueError(f"max_kept_ratio_for_speed={table!r} (--max-kept-ratio-for-speed) names no shape of the "
                         f"{len(job.targets)} target layers (INxOUT: {', '.join(present)}): key the limits by these")
    if unused:
        job.notice(f"max_kept_ratio_for_speed: no target layer has the shape {', '.join(unused)} (INxOUT); "
                   "those limits apply to nothing")
    pruned = [shape for shape in table if shape in present and shape not in factorized]
    if pruned:
        job.notice(f"max_kept_ratio_for_speed: only layers that pruning cuts (not factorized) have the shape "
                   f"{', '.join(pruned)} (INxOUT); those limits apply to nothing")


def candidates(job: Job, skip: frozenset[str] = frozenset()) -> dict[str, tuple[int, int]]:
    """Shapes of the targets (but ``skip``, layers compressed otherwise) that can be factorized: all
    (greedy), or those whose uniform rank saves parameters and passes the speed limit."""
    shapes = job.shapes(n for n in job.targets if n not in skip)
    if job.config.allocation == "uniform":
        shapes = {n: shapes[n] for n in uniform(job, shapes)}
    if not shapes and not skip:
        config = job.config
        if not job.targets:  # experts modules alone were chosen
            raise ValueError(f"{experts_alone(config.target_modules, config.exclude_modules)} and mlp_pruning can cut "
                             "none of them (the notice before says why): name linear layers too")
        speed = config.max_kept_ratio_for_speed
        zero = [n for n, (i, o) in job.shapes(job.targets).items()
                if round_rank(rank_for_ratio(i, o, config.param_ratio), config.rank_multiple) == 0]
        if zero:  # too little kept: rounded down to rank 0, the layer would vanish
            which = "every one" if len(zero) == len(job.targets) else str(len(zero))
            others = "" if len(zero) == len(job.targets) else " and saves nothing on the others"
            raise ValueError(f"param_ratio={config.param_ratio} rounds the rank of {which} of the {len(job.targets)} "
                             f"target layers down to 0 (rank_multiple={config.rank_multiple}; first: {zero[0]!r})"
                             f"{others}; raise param_ratio or {config.rank_multiple_remedy()}")
        raise ValueError(f"param_ratio={config.param_ratio} saves nothing on any of the {len(job.targets)} "
                         "target layers" + (f" or keeps more than max_kept_ratio_for_speed={speed}" if speed else "")
                         + "; lower it to compress")
    return shapes


def layer_weight(job: Job, name: str) -> torch.Tensor:
    """One layer's dense weight (out × in) in the compute dtype, where the solve runs: on the
    accelerator, an offloaded layer's weight read on its execution device."""
    module = job.module(name)
    offloaded = module.weight.device.type == "meta"  # weights held in memory were checked up front (run)
    with align_module_device(module):
        weight = linear_weight(module).detach().to(job.compute_dtype)
    if weight.device.type == "cpu" and job.accelerator.device.type != "cpu":
        weight = weight.to(job.accelerator.device)  # solve where the compute is
    if offloaded and not all_finite(weight):  # said as such on every device (CUDA's decompositions raise on NaN)
        raise _non_finite(name)
    return weight


def _non_finite(name: str) -> FloatingPointError:
    return FloatingPointError(f"layer {name!r} has non-finite weights (NaN or inf): the checkpoint is damaged; "
                              "compress an intact copy")


def refuse_non_finite_weights(job: Job) -> None:
    """Refuse a damaged model before any pass, in every process at once (a NaN found by one
    process's solve would leave the others waiting in its broadcast, after the statistics' time):
    the weights held in memory, named (a NaN elsewhere, e.g. in the embeddings, would surface as a
    target layer's NaN statistics); offloaded target weights are checked where they are read."""
    targets = {full: name for name, full in job.targets.items()}
    for name, weight in job.model.named_parameters():
        if weight.device.type != "meta" and not all_finite(weight):
            module = name.rpartition(".")[0]
            raise _non_finite(targets[module]) if module in targets else FloatingPointError(
                f"the parameter {name!r} has non-finite values (NaN or inf): the checkpoint is damaged; compress an "
                "intact copy")


def layer_statistics(job: Job, name: str, stats: Statistics, device: torch.device) -> dict[str, torch.Tensor]:
    """The statistics the method reads for layer ``name``, on ``device``; NaN or inf in one is named
    here, once for every method, not as its decomposition's failure."""
    values = {k: stats.get(name, k).to(device) for k in job.needs}
    spoilt = next((k for k, value in sorted(values.items()) if not all_finite(value)), None)
    if spoilt is not None:
        half = FLOAT16_OVERFLOW if next(job.model.parameters()).dtype == torch.float16 else ""
        raise ValueError(f"the {spoilt} statistics of layer {name!r} hold NaN or inf values: the model's activations "
                         f"or gradients overflowed on the calibration data{half}")
    return values


def problem(job: Job, name: str, stats: Statistics, rank: int = 0) -> LayerProblem:
    """The factorization problem of one layer: ``layer_weight`` and the method's statistics, as
    each modifier sets it (``Modifier.problem``: compensation's target in sequential mode)."""
    weight = layer_weight(job, name)
    layer = LayerProblem(name, weight, rank, job.options, **layer_statistics(job, name, stats, weight.device))
    for modifier in job.modifiers:
        layer = modifier.problem(job, layer, stats)
    return layer


def _cost(shape: tuple[int, int]) -> float:
    in_features, out_features = shape
    return in_features ** 3 + min(in_features, out_features) ** 2 * max(in_features, out_features)


def _module_cost(job: Job, name: str) -> float:
    """The estimated cost of solving layer ``name``; an experts module's: one MLP's per expert."""
    module = job.module(name)
    if is_experts(module):
        experts, channels, hidden = experts_shape(module)
        return experts * _cost((channels, hidden))
    return _cost(linear_shape(module))


def owners(job: Job, names: list[str]) -> dict[str, int]:
    """Which process computes each layer: largest first onto the least loaded (deterministic)."""
    load = [0.0] * job.accelerator.num_processes
    owner = {}
    for name in sorted(names, key=lambda n: (-_module_cost(job, n), n)):
        process = min(range(len(load)), key=lambda p: (load[p], p))
        owner[name] = process
        load[process] += _module_cost(job, name)
    return owner


def run(job: Job) -> dict[str, int]:
    """Compress: the recipe's pipeline over the target layers (none at ``param_ratio`` 1, where only
    what the modifiers compress outside it is), then each modifier's ``on_end``; the ranks."""
    refuse_non_finite_weights(job)
    for modifier in job.modifiers:
        modifier.on_start(job)
    ranks = get_pipeline(job.config.pipeline)(job) if job.config.param_ratio < 1 else {}
    for modifier in job.modifiers:
        ranks = {**ranks, **modifier.on_end(job)}
    return ranks


def observed(job: Job, ranks: dict[str, int], names: Sequence[str]) -> list[str]:
    """The layers among ``names`` whose statistics their compression reads: those factorized, and
    those the modifiers read."""
    return list(dict.fromkeys([*(n for n in names if n in ranks),
                               *(n for modifier in job.modifiers for n in modifier.observed(names))]))


def compress_group(job: Job, ranks: dict[str, int], names: Sequence[str], stats: Statistics,
                   block: Block | None = None, progress: bool = False) -> None:
    """Factorize the layers of ``names`` that have a rank, then let each modifier compress what is
    its own among them."""
    solve_and_swap(job, {n: ranks[n] for n in names if n in ranks}, stats, progress)
    for modifier in job.modifiers:
        modifier.compress(job, names, stats, block)


def broadcast(job: Job, tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, source: int) -> torch.Tensor:
    """``tensor`` of process ``source`` (``shape``, ``dtype``) on every process."""
    buffer = tensor.to(job.accelerator.device, dtype).contiguous() if tensor is not None else \
        torch.empty(shape, dtype=dtype, device=job.accelerator.device)
    torch.distributed.broadcast(buffer, src=source)
    return buffer


def layer_spectrum(solver: Solver, problem: LayerProblem) -> tuple[torch.Tensor, float | None]:
    """The singular values ``solver`` truncates on ``problem`` (float64) and, for a method with a
    loss scale, the absolute weight of that layer's loss (its predicted total); None otherwise."""
    with naming_the_layer(problem.name):
        values = solver.spectrum(problem).double()
    if solver.loss_scale is None:
        return values, None
    return values, solver.loss_scale(problem) * float(values.square().sum())


def spectra(job: Job, items: list[tuple[list[str], Cuts, Statistics]]) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, float] | None]:
    """The spectra of ``items`` — (layers, channel groups, their statistics), e.g. of several blocks:
    each layer's singular values its method truncates, each group's channel spectrum (its modifier's
    ``spectrum``, keyed by the group's key) — and, for methods with a loss scale, the absolute weight
    of each one's loss. Split between processes by cost over all of them at once, then shared."""
    if job.solver.spectrum is None and any(layers for layers, _, _ in items):
        raise ValueError(f"allocation={job.config.allocation!r} needs a method with a spectrum; {job.solver.name!r} has none")
    owner = owners(job, [key for layers, cuts, _ in items for key in (*layers, *(g.anchor for g in cuts.groups))])
    mine = job.accelerator.process_index
    values, weights = {}, {}
    for layers, cuts, stats in items:
        for name in layers:
            if owner[name] == mine:
                values[name], weights[name] = layer_spectrum(job.solver, problem(job, name, stats))
        for modifier, group in cuts.owned:
            if owner[group.anchor] == mine:
                values[group.key], weights[group.key] = modifier.spectrum(job, group, stats)
    if job.accelerator.num_processes > 1:
        for layers, cuts, _ in items:
            for name in layers:
                _share_spectrum(job, values, weights, name, min(linear_shape(job.module(name))), owner[name])
            for group in cuts.groups:
                _share_spectrum(job, values, weights, group.key, group.channels, owner[group.anchor])
    if job.solver.loss_scale is None:
        return values, None
    return values, {k: w for k, w in weights.items() if w is not None}


def _share_spectrum(job: Job, values: dict, weights: dict, key: str, length: int, source: int) -> None:
    """Give every process ``values[key]`` (a spectrum of ``length`` values) and, for a method with a
    loss scale, ``weights[key]``, as process ``source`` computed them."""
    values[key] = broadcast(job, values.get(key), (length,), torch.float64, source)
    if job.solver.loss_scale is not None:
        # A group priced without a loss weight (experts modules with no probe layer) travels as NaN.
        weight = torch.tensor(math.nan if weights[key] is None else weights[key], dtype=torch.float64) \
            if key in weights else None
        shared = float(broadcast(job, weight, (), torch.float64, source))
        weights[key] = None if math.isnan(shared) else shared


class Cuts:
    """The layer groups the recipe's modifiers compress by keeping channels, each with its modifier
    (``hf_wsvd.pipelines.modifiers``), in modifier order."""

    def __init__(self, owned: list[tuple[Modifier, ChannelGroup]]) -> None:
        self.owned = owned

    @classmethod
    def of(cls, job: Job) -> "Cuts":
        """The groups the job's modifiers find among its targets whose target layers are all
        ``nn.Linear`` (the others, e.g. GPT-2's ``Conv1D`` MLPs, are factorized instead, said once;
        an experts module is no target)."""
        owned = []
        for modifier in (m for m in job.modifiers if isinstance(m, ChannelModifier)):
            found = modifier.groups(job)
            kept = [g for g in found if all(type(job.module(n)) is torch.nn.Linear for n in g.members if n in job.targets)]
            if not found:
                job.notice(f"{modifier.name} finds {modifier.none_found(job)} among the targets of "
                           f"{type(job.model).__name__}: they are factorized instead")
            elif len(kept) < len(found):
                other = next(g for g in found if g not in kept)
                job.notice(f"{modifier.name} cuts nn.Linear layers only: {len(found) - len(kept)} of its {len(found)} "
                           f"groups (first: {other.key!r}, of {type(job.module(other.members[0])).__name__} layers) "
                           "are factorized instead")
            owned += [(modifier, group) for group in kept]
        return cls(owned)

    @property
    def groups(self) -> list[ChannelGroup]:
        return [group for _, group in self.owned]

    @property
    def members(self) -> set[str]:
        return {name for group in self.groups for name in group.members}

    def observed(self) -> set[str]:
        """The layers whose statistics price and cut the groups."""
        return {name for group in self.groups for name in group.observed}

    def in_block(self, names: list[str]) -> "Cuts":
        """The groups priced from the layers ``names``."""
        return Cuts([(m, g) for m, g in self.owned if g.anchor in names])

    def uniform(self, job: Job) -> dict[str, int]:
        """The channels each group keeps under uniform allocation: ``param_ratio`` of them, rounded."""
        config = job.config
        return {g.key: kept_channels(g.channels, config.param_ratio, m.budget(job, g).steps(config.rank_multiple))
                for m, g in self.owned}

    def hand_out(self, job: Job, channels: dict[str, int]) -> "Cuts":
        """The groups that keep fewer channels than they have (the others stay dense), each handed
        to its modifier with every group's channels."""
        kept = Cuts([(m, g) for m, g in self.owned if channels[g.key] < g.channels])
        for modifier in job.modifiers:
            modifier.on_allocated(job, [g for m, g in kept.owned if m is modifier], channels)
        return kept


def _budgeted(job: Job, cuts: Cuts) -> dict[str, Budgeted]:
    return {g.key: m.budget(job, g) for m, g in cuts.owned}


def check_allocation(job: Job, shapes: dict[str, tuple[int, int]], cuts: Cuts) -> None:
    """Raise, before any pass over the data, where the layers' shapes alone make the greedy budget
    impossible (``param_ratio`` below every layer's first step, ``rank_multiple`` above every rank),
    or the speed table limits none of them (``check_speed_table``)."""
    check_speed_table(job, cuts.members)
    config = job.config
    if config.allocation == "greedy":
        greedy_start(shapes, config.param_ratio, config.rank_multiple, _budgeted(job, cuts),
                     config.max_kept_ratio_for_speed, remedy=config.rank_multiple_remedy())


def greedy_allocation(job: Job, shapes: dict[str, tuple[int, int]], values: dict[str, torch.Tensor],
                      weights: dict[str, float] | None, cuts: Cuts) -> tuple[dict[str, int], dict[str, int]]:
    """(ranks, kept channels of each group of ``cuts`` by key) under one global budget
    (``allocation="greedy"``) in steps of ``rank_multiple`` (a group: of it and its own step), no rank above its speed limit. ``values`` holds
    the layers' spectra and the groups' channel spectra."""
    units = greedy_ranks(shapes, values, job.config.param_ratio, weights, job.config.rank_multiple,
                         _budgeted(job, cuts), job.config.max_kept_ratio_for_speed)
    # A group too small for one step (lcm of rank_multiple and its Budgeted.step) is not in ``units``: it
    # stays whole, outside the budget.
    channels = {g.key: units.pop(g.key, g.channels) for g in cuts.groups}
    return units, channels


def loss_scale(job: Job, layer: LayerProblem) -> float:
    """The method's loss scale of ``layer`` (1 for a method without one)."""
    return job.solver.loss_scale(layer) if job.solver.loss_scale is not None else 1.0


def solve_and_swap(job: Job, ranks: dict[str, int], stats: Statistics, progress: bool) -> None:
    """Factorize each layer at its rank and swap it for its factors; every process solves its
    share and receives the others' factors."""
    names = sorted(ranks)
    owner = owners(job, names)
    solved = {}
    mine = [n for n in names if owner[n] == job.accelerator.process_index]
    bar = tqdm(mine, desc=f"{job.solver.name} factorization",
               disable=not (progress and job.accelerator.is_local_main_process))
    for name in bar:
        up, down = job.solver.finite_solve(problem(job, name, stats, ranks[name]))
        solved[name] = (up, down)
    for name in names:
        up, down = solved.get(name, (None, None))
        if job.accelerator.num_processes > 1:
            in_features, out_features = linear_shape(job.module(name))
            up = broadcast(job, up, (out_features, ranks[name]), job.compute_dtype, owner[name])
            down = broadcast(job, down, (ranks[name], in_features), job.compute_dtype, owner[name])
        swap(job, name, up, down)


def swap(job: Job, name: str, up: torch.Tensor, down: torch.Tensor) -> None:
    """Install the factors of one layer where the layer lives."""
    install(job, name, lambda module: factors_like(module, up, down))


def experts_in(job: Job, block: torch.nn.Module, names: Iterable[str]) -> dict[str, str]:
    """The experts modules among ``names`` that lie inside ``block``: name → path inside it."""
    inside = {id(module): path for path, module in block.named_modules()}
    return {name: inside[id(job.module(name))] for name in names if id(job.module(name)) in inside}


def install(job: Job, name: str, build: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
    """Replace layer (or experts module) ``name`` by ``build(layer)`` where the layer lives: ``build`` sees the layer's
    weights in memory, and the replacement of an accelerate-offloaded layer is offloaded the same
    way."""
    module = job.module(name)
    trainable = next(module.parameters()).requires_grad  # a frozen layer's replacement stays frozen
    if not hooked(module):
        job.model.set_submodule(job.path(name), build(module).requires_grad_(trainable))
        return
    from accelerate.hooks import attach_align_device_hook, remove_hook_from_module

    device, offload = execution_device(module, torch.device("cpu")), offloaded(module)
    with loaded(module, torch.device("cpu")):
        layer = build(module).requires_grad_(trainable)
    remove_hook_from_module(module, recurse=True)
    job.model.set_submodule(job.path(name), layer)
    if offload:
        # One offload hook per module holding weights, as device_map dispatch makes them (not
        # cpu_offload's pair of hooks on a plain linear, which transformers' save_pretrained cannot
        # read). The new weights wait in CPU memory, also where the layer's were on disk.
        attach_align_device_hook(layer, execution_device=device, offload=True,
                                 weights_map={k: v.to("cpu") for k, v in layer.state_dict().items()})
    else:
        layer.to(device)
