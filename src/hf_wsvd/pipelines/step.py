"""The step both pipelines run on a group of layers — collect → allocate → solve → swap — and the
``Job`` it runs in. Nothing here knows a method: a method is its ``Solver`` (what it needs, its
spectrum, its loss scale, its solve) and its options.

In several processes (``accelerate launch`` / ``torchrun``) each process holds the model and its
share of the calibration data; the statistics are summed once per group, and the spectra and
factorizations of a group are split between the processes by estimated cost, then broadcast, so
every process swaps in the same factors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import align_module_device
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..allocation import Budgeted, drop_slow_layers, greedy_ranks, uniform_ranks
from ..methods.attention_pruning import (AttentionGroup, CutAttention, attention_groups, cut_attention, cut_bias, cut_linear,
                                 head_spectrum)
from ..blocks import execution_device, hooked, loaded, offloaded
from ..linalg import refitted, ridged
from ..methods.mlp_pruning import MlpPair, channel_spectrum, find_pairs, kept_channels, select_channels, shrunk
from ..runtime.modeling_wsvd import cut_heads, cut_shape
from ..runtime.factorized_linear import linear_shape, linear_weight
from ..solvers import LayerProblem, MethodOptions, Solver
from ..statistics import GRADIENT_STATISTICS, GRAM, INPUT_STATISTICS, Statistics, gradient_statistics
from ..statistics.names import CROSS
from ..swap import factors_like
from ..tasks import LossFn, per_example_loss, task_of
from .compensation import compensated


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
    # Blocks trained by block refinement: index → [relative error before, after].
    refined: dict[str, list[float]] = field(default_factory=dict)
    _open_stages: list[list[float]] = field(default_factory=list, repr=False)

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

    def module(self, name: str) -> torch.nn.Module:
        return self.model.get_submodule(self.targets[name])

    def shapes(self, names: Iterable[str]) -> dict[str, tuple[int, int]]:
        return {n: linear_shape(self.module(n)) for n in names}

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


def require_data(job: Job) -> None:
    if job.needs and job.data is None and not job.statistics.has(job.targets, job.needs):
        raise ValueError(f"method={job.solver.name!r} needs {', '.join(sorted(job.needs))} statistics: pass importance data")


def gradient_pass(job: Job, names: Iterable[str]) -> None:
    """The gradient statistics the method needs, over the whole model (skipped when given)."""
    names = list(names)
    if not job.gradient_needs or job.statistics.has(names, job.gradient_needs):
        return
    with job.timed("importance"):
        stats = gradient_statistics(job.model, job.data, {n: job.module(n) for n in names}, job.gradient_needs,
                                    job.loss_fn or per_example_loss(task_of(job.model)), job.accelerator,
                                    job.show_progress)
    job.statistics = job.statistics.merged(stats)


def uniform(job: Job, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """The same kept ratio for every layer (``allocation="uniform"``), rounded, slow layers dropped."""
    config = job.config
    return uniform_ranks(shapes, config.param_ratio, config.max_kept_ratio_for_speed, config.rank_multiple)


def candidates(job: Job, skip: frozenset[str] = frozenset()) -> dict[str, tuple[int, int]]:
    """Shapes of the targets (but ``skip``, layers compressed otherwise) that can be factorized: all
    (greedy), or those whose uniform rank saves parameters and passes the speed limit."""
    shapes = job.shapes(n for n in job.targets if n not in skip)
    if job.config.allocation == "uniform":
        shapes = {n: shapes[n] for n in uniform(job, shapes)}
    if not shapes and not skip:
        speed = job.config.max_kept_ratio_for_speed
        raise ValueError(f"param_ratio={job.config.param_ratio} saves nothing on any of the {len(job.targets)} "
                         "target layers" + (f" or keeps more than max_kept_ratio_for_speed={speed}" if speed else "")
                         + "; lower it to compress")
    return shapes


def layer_weight(job: Job, name: str) -> torch.Tensor:
    """One layer's dense weight (out × in) in the compute dtype, where the solve runs: on the
    accelerator, an offloaded layer's weight read on its execution device."""
    module = job.module(name)
    with align_module_device(module):
        weight = linear_weight(module).detach().to(job.compute_dtype)
    if weight.device.type == "cpu" and job.accelerator.device.type != "cpu":
        weight = weight.to(job.accelerator.device)  # solve where the compute is
    return weight


def problem(job: Job, name: str, stats: Statistics, rank: int = 0) -> LayerProblem:
    """The factorization problem of one layer (``layer_weight``, the method's statistics, and the
    compensated target in sequential mode)."""
    weight = layer_weight(job, name)
    values = {k: stats.get(name, k).to(weight.device) for k in job.needs}
    layer = LayerProblem(name, weight, rank, job.options, **values)
    cross = stats.get(name, CROSS)
    if cross is not None:  # compensation (sequential mode): fit the dense layer's outputs
        layer = compensated(layer, stats.get(name, GRAM), cross, job.config.compensation_ridge)
    return layer


def _cost(shape: tuple[int, int]) -> float:
    in_features, out_features = shape
    return in_features ** 3 + min(in_features, out_features) ** 2 * max(in_features, out_features)


def owners(job: Job, names: list[str]) -> dict[str, int]:
    """Which process computes each layer: largest first onto the least loaded (deterministic)."""
    load = [0.0] * job.accelerator.num_processes
    owner = {}
    for name in sorted(names, key=lambda n: (-_cost(linear_shape(job.module(n))), n)):
        process = min(range(len(load)), key=lambda p: (load[p], p))
        owner[name] = process
        load[process] += _cost(linear_shape(job.module(name)))
    return owner


def _broadcast(job: Job, tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, source: int) -> torch.Tensor:
    buffer = tensor.to(job.accelerator.device, dtype).contiguous() if tensor is not None else \
        torch.empty(shape, dtype=dtype, device=job.accelerator.device)
    torch.distributed.broadcast(buffer, src=source)
    return buffer


def layer_spectrum(solver: Solver, problem: LayerProblem) -> tuple[torch.Tensor, float | None]:
    """The singular values ``solver`` truncates on ``problem`` (float64) and, for a method with a
    loss scale, the absolute weight of that layer's loss (its predicted total); None otherwise."""
    values = solver.spectrum(problem).double()
    if solver.loss_scale is None:
        return values, None
    return values, solver.loss_scale(problem) * float(values.square().sum())


def spectra(job: Job, names: list[str], stats: Statistics) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """Each layer's spectrum (the singular values its method truncates) and, for methods with a
    loss scale, the absolute weight of its loss; split between processes, then shared."""
    if job.solver.spectrum is None:
        raise ValueError(f"allocation={job.config.allocation!r} needs a method with a spectrum; {job.solver.name!r} has none")
    owner = owners(job, names)
    mine = [n for n in names if owner[n] == job.accelerator.process_index]
    values, weights = {}, {}
    for name in mine:
        values[name], weights[name] = layer_spectrum(job.solver, problem(job, name, stats))
    if job.accelerator.num_processes > 1:
        for name in names:
            length = min(linear_shape(job.module(name)))
            values[name] = _broadcast(job, values.get(name), (length,), torch.float64, owner[name])
            if job.solver.loss_scale is not None:
                weight = torch.tensor(weights[name], dtype=torch.float64) if name in weights else None
                weights[name] = float(_broadcast(job, weight, (), torch.float64, owner[name]))
    return values, (weights if job.solver.loss_scale is not None else None)


Cut = MlpPair | AttentionGroup  # a module group compressed by keeping some of its channels


class Cuts:
    """The module groups a recipe compresses by keeping channels: MLPs (``mlp_pruning``) and
    attentions (``attention_pruning``)."""

    def __init__(self, pairs: list[MlpPair], attentions: list[AttentionGroup]) -> None:
        self.pairs, self.attentions = pairs, attentions
        self.consumers = {pair.consumer: pair for pair in pairs}

    @classmethod
    def of(cls, job: Job) -> "Cuts":
        """The groups of the job's targets the recipe cuts, whose layers are all ``nn.Linear``. An
        attention whose head size leaves no step of ``rank_multiple`` to cut (64 at 64) is left to
        factorization."""
        def plain(group: Cut) -> bool:
            return all(type(job.module(n)) is torch.nn.Linear for n in group.members)

        pairs = find_pairs(job.shapes(job.targets)) if job.config.mlp_pruning else []
        attentions = attention_groups(job.model, job.targets) if job.config.attention_pruning else []
        return cls([p for p in pairs if plain(p)],
                   [a for a in attentions if plain(a) and a.head_dim > job.config.rank_multiple])

    @property
    def groups(self) -> list[Cut]:
        return [*self.pairs, *self.attentions]

    @property
    def members(self) -> set[str]:
        return {name for group in self.groups for name in group.members}

    def observed(self) -> set[str]:
        """The layers whose statistics price and cut the groups: MLP consumers, attention projections."""
        return set(self.consumers) | {name for group in self.attentions for name in group.members}

    def in_block(self, names: list[str]) -> list[Cut]:
        """The groups whose channels are priced from the layers ``names``."""
        return [g for g in self.groups if (g.consumer if isinstance(g, MlpPair) else g.o) in names]

    def kept(self, channels: dict[str, int]) -> "Cuts":
        """The groups that keep fewer channels than they have (the others stay dense)."""
        return Cuts([p for p in self.pairs if channels[unit_key(p)] < p.channels],
                     [a for a in self.attentions if channels[unit_key(a)] < a.channels])


def unit_key(group: Cut) -> str:
    """The name a cut group goes by in allocation and spectra: an MLP's consumer, an attention's name."""
    return group.consumer if isinstance(group, MlpPair) else group.name


def greedy_allocation(job: Job, shapes: dict[str, tuple[int, int]], values: dict[str, torch.Tensor],
                      weights: dict[str, float] | None, groups: Sequence[Cut] = ()) -> tuple[dict[str, int], dict[str, int]]:
    """(ranks, kept channels of each group of ``groups`` by ``unit_key``: an MLP's intermediate
    channels, an attention's head dimensions) under one global budget (``allocation="greedy"``)
    in steps of ``rank_multiple``, slow layers dropped. ``values`` holds the layers' spectra and
    the groups' channel spectra."""
    units = greedy_ranks(shapes, values, job.config.param_ratio, weights, job.config.rank_multiple,
                         {unit_key(group): channel_budget(job, group) for group in groups})
    # A group too small for one step of rank_multiple channels is not in ``units``: it stays whole.
    channels = {unit_key(group): _even(group, units.pop(unit_key(group), group.channels)) for group in groups}
    return drop_slow_layers(units, shapes, job.config.max_kept_ratio_for_speed), channels


def _even(group: Cut, channels: int) -> int:
    """An attention keeps whole rotary pairs: an even number of head dimensions."""
    return channels if isinstance(group, MlpPair) else max(2, channels - channels % 2)


def uniform_channels(job: Job, group: Cut) -> int:
    """The channels ``group`` keeps under uniform allocation: ``param_ratio`` of them, rounded."""
    return _even(group, kept_channels(group.channels, job.config.param_ratio, job.config.rank_multiple))


def channel_budget(job: Job, group: Cut) -> Budgeted:
    """A cut group as the greedy allocation sees it: an MLP channel costs its producer rows and
    its consumer column; an attention head dimension its rows of q/k/v (with their biases) in every
    head and its columns of o."""
    if isinstance(group, MlpPair):
        unit = sum(linear_shape(job.module(n))[0] for n in group.producers) + linear_shape(job.module(group.consumer))[1]
        return Budgeted(unit, unit * group.channels, group.channels)
    unit = 0
    for name in group.members:
        module = job.module(name)
        bias = module.bias is not None and name != group.o  # o's bias does not shrink
        unit += (module.weight.numel() + (module.bias.numel() if bias else 0)) // group.head_dim
    return Budgeted(unit, unit * group.head_dim, group.head_dim)


def loss_scale(job: Job, layer: LayerProblem) -> float:
    """The method's loss scale of ``layer`` (1 for a method without one)."""
    return job.solver.loss_scale(layer) if job.solver.loss_scale is not None else 1.0


def _group_spectrum(job: Job, group: Cut, stats: Statistics) -> tuple[torch.Tensor, float | None]:
    """A cut group's channel spectrum and, for methods with a loss scale, its absolute loss: an
    MLP's channels weigh its consumer's loss as if it were factorized (``mlp_pruning``); an
    attention's head dimensions carry their predicted losses (``attention_pruning``)."""
    if isinstance(group, MlpPair):
        layer = problem(job, group.consumer, stats)
        values = channel_spectrum(layer.weight, stats.get(group.consumer, GRAM), job.config.compensation_ridge)
        return values, layer_spectrum(job.solver, layer)[1] if job.solver.loss_scale is not None else None
    q, k, o = (problem(job, n, stats) for n in (group.q, group.k, group.o))
    values = head_spectrum(group, q, k, o, (loss_scale(job, q), loss_scale(job, k), loss_scale(job, o)))
    return values, float(values.square().sum()) if job.solver.loss_scale is not None else None


def channel_spectra(job: Job, groups: Sequence[Cut], stats: Statistics) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each cut group's channel spectrum and loss weight (``_group_spectrum``), keyed by
    ``unit_key``; split between processes like the layers' spectra, then shared."""
    keys = {unit_key(group): group for group in groups}
    owner = owners(job, [_solve_owner(group) for group in groups])
    values, weights = {}, {}
    for key, group in keys.items():
        if owner[_solve_owner(group)] == job.accelerator.process_index:
            values[key], weights[key] = _group_spectrum(job, group, stats)
    if job.accelerator.num_processes > 1:
        for key, group in keys.items():
            source = owner[_solve_owner(group)]
            values[key] = _broadcast(job, values.get(key), (group.channels,), torch.float64, source)
            if job.solver.loss_scale is not None:
                weight = torch.tensor(weights[key], dtype=torch.float64) if key in weights else None
                weights[key] = float(_broadcast(job, weight, (), torch.float64, source))
    return values, {k: w for k, w in weights.items() if w is not None}


def _solve_owner(group: Cut) -> str:
    """The layer whose cost places a cut group's work on a process: an MLP's consumer, an attention's o."""
    return group.consumer if isinstance(group, MlpPair) else group.o


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
        up, down = job.solver.solve(problem(job, name, stats, ranks[name]))
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise FloatingPointError(f"{job.solver.name} produced non-finite factors for {name!r}: "
                                     "check the layer's weights and statistics for NaN/inf")
        solved[name] = (up, down)
    for name in names:
        up, down = solved.get(name, (None, None))
        if job.accelerator.num_processes > 1:
            in_features, out_features = linear_shape(job.module(name))
            up = _broadcast(job, up, (out_features, ranks[name]), job.compute_dtype, owner[name])
            down = _broadcast(job, down, (ranks[name], in_features), job.compute_dtype, owner[name])
        swap(job, name, up, down)


def swap(job: Job, name: str, up: torch.Tensor, down: torch.Tensor) -> None:
    """Install the factors of one layer where the layer lives."""
    install(job, name, lambda module: factors_like(module, up, down))


def install(job: Job, name: str, build: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
    """Replace layer ``name`` by ``build(layer)`` where the layer lives: ``build`` sees the layer's
    weights in memory, and the replacement of an accelerate-offloaded layer is offloaded the same
    way."""
    module = job.module(name)
    if not hooked(module):
        job.model.set_submodule(job.targets[name], build(module))
        return
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    device, offload = execution_device(module, torch.device("cpu")), offloaded(module)
    with loaded(module, torch.device("cpu")):
        layer = build(module)
    remove_hook_from_module(module, recurse=True)
    job.model.set_submodule(job.targets[name], layer)
    if offload:
        cpu_offload(layer, execution_device=device)
    else:
        layer.to(device)


def cut_attentions_and_swap(job: Job, groups: list[AttentionGroup], dims: dict[str, int], stats: Statistics) -> None:
    """Cut each attention of ``groups`` to ``dims[name]`` head dimensions chosen on its statistics
    (``hf_wsvd.methods.attention_pruning``; compensated, from the compensated q/k/v weights), swap in the
    smaller projections where they live and record the cut in ``job.attention``. Each attention is
    solved by one process and shared."""
    owner = owners(job, [group.o for group in groups])
    for group in groups:
        keep, source = dims[group.name], owner[group.o]
        cut = None
        if source == job.accelerator.process_index:
            q, k, v, o = (problem(job, n, stats) for n in group.members)
            cut = cut_attention(group, q, k, v, o, keep, (loss_scale(job, q), loss_scale(job, k), loss_scale(job, o)))
        if job.accelerator.num_processes > 1:
            cut = _broadcast_cut(job, group, keep, cut, source)
        for role, name in zip("qkvo", group.members):
            install(job, name, lambda module, role=role: cut_linear(
                module, getattr(cut, role), cut_bias(group, cut, role, module.bias)))
        cut_heads(job.model.get_submodule(job.targets[group.q].rpartition(".")[0]), keep, cut.rotary)
        job.attention[group.name] = {"head_dim": keep, "dense_head_dim": group.head_dim,
                                     "projections": list(group.members),
                                     **({"rotary": list(cut.rotary)} if group.rotary else {})}


def _broadcast_cut(job: Job, group: AttentionGroup, keep: int, cut: CutAttention | None, source: int) -> CutAttention:
    """``cut`` as computed by process ``source``, on every process."""
    tensors = {}
    for role, name in zip("qkvo", group.members):
        in_features, out_features = cut_shape(role, linear_shape(job.module(name)), keep, group.head_dim)
        tensors[role] = _broadcast(job, getattr(cut, role) if cut else None, (out_features, in_features),
                                   torch.float64, source)
    maps = {role: _broadcast(job, cut.maps[role] if cut else None, (group.kv_heads, keep, group.head_dim),
                             torch.float64, source) for role in "qkv"}
    rotary = None
    if group.rotary:
        rotary = _broadcast(job, torch.tensor(cut.rotary) if cut else None, (keep // 2,), torch.int64, source).tolist()
    return CutAttention(keep, rotary, **tensors, maps=maps)


def refit_cut_output(job: Job, name: str, reference: torch.nn.Module, stats: Statistics) -> None:
    """Compensation of a cut attention's output projection: refit it so that its outputs on the
    cut attention's outputs match the dense ``reference`` projection's on the dense ones. Solved
    by one process and shared."""
    source = owners(job, [name])[name]
    shape = linear_shape(job.module(name))
    weight = None
    if source == job.accelerator.process_index:
        current = layer_weight(job, name)
        with align_module_device(reference):
            dense = linear_weight(reference).detach().to(current.device)
        gram, lam = ridged(stats.get(name, GRAM), job.config.compensation_ridge, current.device)
        weight = refitted(dense, current, gram, stats.get(name, CROSS).to(current.device), lam)
        if not torch.isfinite(weight).all():
            raise FloatingPointError(f"the refitted {name!r} is not finite: raise compensation_ridge")
    if job.accelerator.num_processes > 1:
        weight = _broadcast(job, weight, (shape[1], shape[0]), torch.float64, source)
    install(job, name, lambda module: cut_linear(module, weight, module.bias))


def prune_and_swap(job: Job, pairs: list[MlpPair], channels: dict[str, int], stats: Statistics) -> None:
    """Cut each MLP of ``pairs`` to ``channels[consumer]`` channels chosen on the consumer's input
    statistics (``hf_wsvd.methods.mlp_pruning``), swap in the smaller layers and record their shapes in
    ``job.pruned``. Each MLP is solved by one process and shared, like a factorization."""
    owner = owners(job, [pair.consumer for pair in pairs])
    for pair in pairs:
        consumer, keep = job.module(pair.consumer), channels[pair.consumer]
        kept = refit = None
        if owner[pair.consumer] == job.accelerator.process_index:
            kept, refit = select_channels(layer_weight(job, pair.consumer), stats.get(pair.consumer, GRAM),
                                          stats.get(pair.consumer, CROSS), keep, job.config.compensation_ridge)
        if job.accelerator.num_processes > 1:
            kept = _broadcast(job, kept, (keep,), torch.int64, owner[pair.consumer])
            refit = _broadcast(job, refit, (linear_shape(consumer)[1], keep), torch.float64, owner[pair.consumer])
        for name in pair.members:
            dense_shape = linear_shape(job.module(name))
            install(job, name, lambda module, name=name: shrunk(module, kept, refit if name == pair.consumer else None))
            job.pruned[name] = {"shape": list(linear_shape(job.module(name))), "dense_shape": list(dense_shape)}
