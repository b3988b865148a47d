"""The ``attention_pruning`` modifier (``WSVDConfig.attention_pruning``): each attention keeps some
of its head dimensions instead of having its projections factorized (the maths:
``hf_wsvd.methods.attention_pruning``). An attention is priced at its output projection and cut
with its query/key/value projections; compensated, its output projection is refitted at its own
stage to the dense block's outputs."""

from __future__ import annotations

from typing import Sequence

import torch
from accelerate.utils import align_module_device

from ...allocation import Budgeted
from ...linalg import refitted, ridged
from ...methods.attention_pruning import AttentionGroup, CutAttention, attention_groups, cut_attention, cut_bias, \
    cut_linear, head_spectrum, unsupported
from ...runtime.factorized_linear import linear_shape, linear_weight
from ...runtime.modeling_wsvd import attention_layout, cut_heads, cut_shape
from ...statistics import GRAM, Statistics
from ...statistics.names import CROSS
from ..step import Job, broadcast, install, layer_weight, loss_scale, owners, problem
from . import Block, ChannelModifier, register_modifier


@register_modifier
class AttentionPruning(ChannelModifier):
    name = "attention_pruning"
    field = "attention_pruning"

    def groups(self, job: Job) -> list[AttentionGroup]:
        """The attentions of the targets; one whose head size leaves no step of ``rank_multiple`` to
        cut (64 at 64) is left to factorization, said in one notice."""
        groups = attention_groups(job.model, job.targets)
        kept = [group for group in groups if group.head_dim > job.config.rank_multiple]
        if kept and len(kept) < len(groups):  # e.g. quantize=int4 steps ranks by its group of 64: as wide as a head
            job.notice(f"attention_pruning: {len(groups) - len(kept)} of {len(groups)} attentions have a head size of "
                       f"at most rank_multiple={job.config.rank_multiple}, which leaves no step to cut: they are "
                       "factorized instead (a smaller rank_multiple cuts them)")
        return kept

    def none_found(self, job: Job) -> str:
        if attention_groups(job.model, job.targets):  # found, and every one too narrow (groups)
            return (f"no attention it can cut (every head size is at most rank_multiple={job.config.rank_multiple}, "
                    "which leaves no step to cut; a smaller rank_multiple cuts them)")
        reason = next((f"{type(m).__name__}: {why}" for m in job.model.modules()
                       if attention_layout(m) is not None and (why := unsupported(m)) is not None), None)
        return f"no attention it can cut ({reason})" if reason else super().none_found(job)

    def budget(self, job: Job, group: AttentionGroup) -> Budgeted:
        """A head dimension costs its rows of q/k/v (with their biases) in every head and its columns
        of o; an attention keeps whole rotary pairs (an even number of head dimensions)."""
        unit = 0
        for name in group.members:
            module = job.module(name)
            bias = module.bias is not None and name != group.o  # o's bias does not shrink
            unit += (module.weight.numel() + (module.bias.numel() if bias else 0)) // group.head_dim
        return Budgeted(unit, unit * group.head_dim, group.head_dim, step=2)

    def spectrum(self, job: Job, group: AttentionGroup, stats: Statistics) -> tuple[torch.Tensor, float | None]:
        """The head dimensions carry their predicted losses."""
        q, k, o = (problem(job, n, stats) for n in (group.q, group.k, group.o))
        values = head_spectrum(group, q, k, o, (loss_scale(job, q), loss_scale(job, k), loss_scale(job, o)))
        return values, float(values.square().sum()) if job.solver.loss_scale is not None else None

    def _cut_in(self, names: Sequence[str]) -> list[AttentionGroup]:
        return [group for group in self.kept if group.q in names]

    def _refit_in(self, names: Sequence[str]) -> list[AttentionGroup]:
        """The attentions whose output projection comes in a later stage than their q/k/v (compensation)."""
        return [group for group in self.kept if group.o in names and group.q not in names]

    def observed(self, names: Sequence[str]) -> list[str]:
        return [n for group in self._cut_in(names) for n in group.members] + [g.o for g in self._refit_in(names)]

    def compress(self, job: Job, names: Sequence[str], stats: Statistics, block: Block | None) -> None:
        with job.timed("prune"):
            cut_attentions_and_swap(job, self._cut_in(names), self.channels, stats)
            for group in self._refit_in(names):
                refit_cut_output(job, group.o, block.reference.get_submodule(block.paths[group.o]), stats)


def cut_attentions_and_swap(job: Job, groups: list[AttentionGroup], dims: dict[str, int], stats: Statistics) -> None:
    """Cut each attention of ``groups`` to ``dims[name]`` head dimensions chosen on its statistics
    (compensated: from the compensated q/k/v weights), swap in the smaller projections where they
    live and record the cut in ``job.attention``. Each attention is solved by one process and shared."""
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
        tensors[role] = broadcast(job, getattr(cut, role) if cut else None, (out_features, in_features),
                                  torch.float64, source)
    maps = {role: broadcast(job, cut.maps[role] if cut else None, (group.kv_heads, keep, group.head_dim),
                            torch.float64, source) for role in "qkv"}
    rotary = None
    if group.rotary:
        rotary = broadcast(job, torch.tensor(cut.rotary) if cut else None, (keep // 2,), torch.int64, source).tolist()
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
        weight = broadcast(job, weight, (shape[1], shape[0]), torch.float64, source)
    install(job, name, lambda module: cut_linear(module, weight, module.bias))
