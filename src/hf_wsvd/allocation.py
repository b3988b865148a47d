"""Rank allocation: turn the kept-parameter ratio into one rank per target layer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .runtime.factorized_linear import saves_parameters


def rank_for_ratio(in_features: int, out_features: int, param_ratio: float) -> int:
    """Largest rank whose factors keep at most ``param_ratio`` of the layer's weights (≥ 1)."""
    return max(1, int(param_ratio * in_features * out_features / (in_features + out_features)))


def kept_ratio(in_features: int, out_features: int, rank: int) -> float:
    """The fraction of a layer's weights its rank-``rank`` factors keep, r·(in+out) / (in·out)."""
    return rank * (in_features + out_features) / (in_features * out_features)


SpeedLimit = float | dict[str, float] | None  # one kept-ratio limit, or one per "INxOUT" shape


def speed_limit(shape: tuple[int, int], max_kept_ratio: SpeedLimit) -> float | None:
    """The kept-ratio limit of a layer of ``shape`` (in, out): the one number, or its entry in a
    per-shape table keyed ``"INxOUT"`` (a shape not in the table has no limit)."""
    if isinstance(max_kept_ratio, dict):
        return max_kept_ratio.get(f"{shape[0]}x{shape[1]}")
    return max_kept_ratio


def drop_slow_layers(ranks: dict[str, int], shapes: dict[str, tuple[int, int]],
                     max_kept_ratio: SpeedLimit) -> dict[str, int]:
    """``ranks`` without the layers whose kept ratio exceeds their limit (``speed_limit``):
    factorized at that ratio they would run no faster than dense
    (``WSVDConfig.max_kept_ratio_for_speed``), so they stay dense. None keeps every layer."""
    kept = {}
    for name, rank in ranks.items():
        limit = speed_limit(shapes[name], max_kept_ratio)
        if limit is None or kept_ratio(*shapes[name], rank) <= limit:
            kept[name] = rank
    return kept


def round_rank(rank: int, multiple: int) -> int:
    """``rank`` rounded down to a multiple of ``multiple``; 0 (the layer stays dense) below it.

    Why: GPU matrix kernels want aligned inner dimensions. Measured on an H100 in bf16 (16384
    tokens, 4096 → r → 4096): r = 1228 takes 1.49 ms, r = 1232 0.46 ms, the dense layer 0.72 ms."""
    return rank // multiple * multiple


def kept_channels(channels: int, param_ratio: float, multiple: int) -> int:
    """The channels a group of ``channels`` (an MLP's, an attention's head dimensions) keeps at
    ``param_ratio`` (uniform allocation): rounded down to ``multiple``, at least ``multiple`` (never
    more than all)."""
    return min(channels, max(multiple, round_rank(int(param_ratio * channels), multiple)))


def uniform_ranks(shapes: dict[str, tuple[int, int]], param_ratio: float,
                  max_kept_ratio: SpeedLimit = None, multiple: int = 1) -> dict[str, int]:
    """The same kept ratio for every layer (``shapes``: name → (in, out)), ranks rounded down to
    ``multiple``. Layers whose rank rounds to 0, would not save parameters, or would keep more
    than their ``max_kept_ratio`` limit of them, are left out: they stay dense."""
    ranks = {}
    for name, (in_features, out_features) in shapes.items():
        rank = round_rank(rank_for_ratio(in_features, out_features, param_ratio), multiple)
        if rank > 0 and saves_parameters(in_features, out_features, rank):
            ranks[name] = rank
    return drop_slow_layers(ranks, shapes, max_kept_ratio)


def max_saving_rank(in_features: int, out_features: int) -> int:
    """The largest rank whose factors still hold fewer weights than the dense matrix."""
    return (in_features * out_features - 1) // (in_features + out_features)


@dataclass(frozen=True)
class Budgeted:
    """A layer as the greedy allocation sees it: the parameters one unit costs (a rank: in + out;
    an MLP channel: its rows and column in the MLP's linears), its dense parameter count, the
    most units it may keep, and the units it keeps a multiple of (rotary pairs: 2; the experts'
    aligned rows: 8), on top of the allocation's own multiple."""

    unit_params: int
    dense_params: int
    limit: int
    step: int = 1

    def steps(self, multiple: int) -> int:
        """The units one allocation step adds: a multiple of both ``multiple`` and ``step``."""
        return math.lcm(multiple, self.step)


def greedy_start(shapes: dict[str, tuple[int, int]], param_ratio: float, multiple: int = 1,
                 extra: dict[str, Budgeted] | None = None, max_kept_ratio: SpeedLimit = None,
                 lengths: dict[str, int] | None = None, remedy: str = "lower rank_multiple",
                 ) -> tuple[dict[str, Budgeted], dict[str, int], float, int]:
    """Where ``greedy_ranks`` starts: (the layers and groups it allocates, each one's largest rank
    or channel count short of dense, the budget, the parameters spent with every layer at its first
    step and those its speed limit keeps dense); raises if no layer can be cut or the
    first steps exceed the budget. Shapes alone decide it (``lengths``: each spectrum's length, by
    default the full rank), so it can be checked before any pass over the data. ``remedy`` ends the
    error where ``multiple`` leaves no rank (``WSVDConfig.rank_multiple_remedy``)."""
    lengths = lengths or {}
    items = {n: Budgeted(i + o, i * o, min(max_saving_rank(i, o), lengths.get(n, min(i, o))))
             for n, (i, o) in shapes.items()}
    items.update(extra or {})
    steps = {n: item.steps(multiple) for n, item in items.items()}
    limits = {n: item.limit // steps[n] * steps[n] for n, item in items.items()}
    slow = {}  # layers that save parameters but whose speed limit allows no rank: dense, inside the budget
    for name, (i, o) in shapes.items():
        limit = speed_limit((i, o), max_kept_ratio)
        if limit is not None and limits[name] > 0:
            limits[name] = min(limits[name], int(limit * i * o / (i + o)) // multiple * multiple)
            if limits[name] == 0:
                slow[name] = items[name].dense_params
    items = {n: item for n, item in items.items() if limits[n] > 0}
    if not items:
        raise ValueError(f"no target layer has a rank that is a multiple of rank_multiple={multiple}, saves "
                         "parameters" + (f" and keeps at most max_kept_ratio_for_speed={max_kept_ratio}"
                                         if max_kept_ratio is not None else "") + f"; {remedy}")
    budget = param_ratio * (sum(item.dense_params for item in items.values()) + sum(slow.values()))
    spent = sum(steps[n] * item.unit_params for n, item in items.items()) + sum(slow.values())
    if spent > budget:
        firsts = "/".join(str(n) for n in sorted({steps[n] for n in extra or {} if n in items}))
        cut = f" ({firsts} channels for a pruned MLP, attention or experts module)" if firsts else ""
        raise ValueError(
            f"param_ratio={param_ratio} is below the cost of rank {multiple}{cut} for every target layer"
            + (f" with {len(slow)} kept dense by max_kept_ratio_for_speed={max_kept_ratio}" if slow else "")
            + f" ({spent:,} parameters for a budget of {budget:,.0f}): raise param_ratio"
            + (f", or {remedy}" if multiple > 1 else "")
        )
    return items, {n: limits[n] for n in items}, budget, spent


def greedy_ranks(
    shapes: dict[str, tuple[int, int]],
    spectra: dict[str, torch.Tensor],
    param_ratio: float,
    layer_weights: dict[str, float] | None = None,
    multiple: int = 1,
    extra: dict[str, Budgeted] | None = None,
    max_kept_ratio: SpeedLimit = None,
) -> dict[str, int]:
    """Ranks, all multiples of ``multiple``, under one budget of ``param_ratio`` × (the weights of
    the layers that can be factorized), spent ``multiple`` ranks at a time where they remove the
    most normalized truncation loss per parameter; layers left out stay dense. (An ``extra`` item
    with a ``Budgeted.step`` moves in steps of both.)

    Ranks i of layer l remove σ_i² / Σσ² of its weighted loss (times ``layer_weights[l]``, default
    1) at a cost of in+out parameters each. Every layer keeps at least rank ``multiple`` and never
    a rank that saves nothing; from its largest rank that saves parameters, the last step keeps the
    layer dense (it removes the rest of the loss for the rest of the dense weights), so a budget of
    all the weights (``param_ratio`` 1) leaves every layer dense. A layer where no multiple of
    ``multiple`` saves parameters is left out. ``extra`` adds layers counted in other units (the MLP
    channels of ``hf_wsvd.methods.mlp_pruning``, whose ``spectra`` entry holds √ of each channel's loss,
    largest first; an MLP that keeps all its channels stays dense). ``max_kept_ratio`` (``speed_limit``)
    caps each layer's rank at its limit, so that from there the next step keeps it dense; a layer
    whose limit allows no rank stays dense and its weights count against the budget, which the
    other layers then meet. Deterministic: ties go to the earlier layer name and lower rank.
    """
    lengths = {n: len(values) for n, values in spectra.items()}
    items, limits, budget, spent = greedy_start(shapes, param_ratio, multiple, extra, max_kept_ratio, lengths)
    steps = {n: item.steps(multiple) for n, item in items.items()}
    costs = {n: steps[n] * item.unit_params for n, item in items.items()}  # the parameters of one step
    ranks = dict(steps)
    candidates = []  # (sort key: minus the loss removed per parameter, layer, units before the step, its cost)
    for name in sorted(items):
        energy = spectra[name].double().square()
        total = energy.sum().item() or 1.0
        weight = (layer_weights or {}).get(name, 1.0)
        key = None
        step = steps[name]
        for start in range(step, limits[name], step):  # the step from rank ``start`` to start + step
            key = -weight * energy[start:start + step].sum().item() / total / costs[name]
            candidates.append((key, name, start, costs[name]))
        # The dense step, never before the layer's last rank step (it needs that rank first).
        dense_cost = items[name].dense_params - limits[name] * items[name].unit_params
        if dense_cost > 0:
            dense_key = -weight * energy[limits[name]:].sum().item() / total / dense_cost
            candidates.append((dense_key if key is None else max(key, dense_key), name, limits[name], dense_cost))
    candidates.sort()
    dense = set()
    for _, name, start, cost in candidates:
        if ranks[name] == start and spent + cost <= budget:
            spent += cost
            if start == limits[name]:
                dense.add(name)
            else:
                ranks[name] += steps[name]
    return {n: r for n, r in ranks.items() if n not in dense}
