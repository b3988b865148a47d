"""The ``compensation`` modifier (``WSVDConfig.compensate``, sequential mode): each layer is factorized so that its
outputs on the *compressed* model's inputs match the *dense* layer's outputs on the dense model's
inputs, which absorbs the error the layers before it left.

With X the layer's inputs in the compressed model and X_d in the dense one (token by token), the
target is min ‖W·X_d − W'·X‖² + λ‖W' − W‖² over rank-r W' (the ridge pulls W' toward the dense
weight where the inputs carry little signal). Its minimizer without the rank limit is
W* = W·(M + λI)·(C + λI)⁻¹ with C = E[x xᵀ], M = E[x_d xᵀ], and the objective equals
‖(W' − W*)·S‖² + const with S·Sᵀ = C + λI. So the method solves the ordinary problem with W*
in place of W and C + λI in place of the Gram: ``whiten`` and ``fisher_whiten`` find its exact
rank-r optimum. Within a block the layers are compensated in the order they run (q/k/v, then
o, then gate/up, then down), each stage seeing the stages before it already compressed.
"""

from __future__ import annotations

import dataclasses
import torch

from ...blocks import host_clone, module_copy, run_block
from ...linalg import plus_diagonal, ridged
from ...solvers import LayerProblem
from ...statistics import GRAM, Statistics
from ...statistics.names import CROSS
from ...statistics.paired import PairedInputHooks
from ..step import Job, experts_in
from . import Block, Modifier, register_modifier


def compensated(problem: LayerProblem, gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> LayerProblem:
    """``problem`` with the compensated target weight W* and the ridge-raised Gram (see the module)."""
    gram, lam = ridged(gram, ridge, problem.weight.device)
    cross = cross.double().to(problem.weight.device)
    raised = plus_diagonal(gram, lam)
    del gram
    # W* = W·(M + λI)·(C + λI)⁻¹, i.e. W*ᵀ = (C + λI)⁻¹·(M + λI)ᵀ·Wᵀ, C symmetric.
    target = torch.linalg.solve(raised, plus_diagonal(cross, lam).T @ problem.weight.double().T).T
    if not torch.isfinite(target).all():
        raise FloatingPointError(f"{problem.name}: the compensated weight is not finite; raise compensation_ridge")
    return dataclasses.replace(problem, weight=target.to(problem.weight.dtype), gram=raised.to(problem.weight.dtype))


def stages(block: torch.nn.Module, names: dict[str, str], hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """``names`` (layer name → module path inside ``block``) grouped in the order the block calls
    them, layers reading the same input tensor together; found by running ``block`` once."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [block.get_submodule(path).register_forward_pre_hook(
        lambda module, args, name=name: calls.append((name, args[0]))) for name, path in names.items()]
    try:
        with torch.no_grad():
            block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    last = None
    seen = set()
    for name, tensor in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and tensor is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = tensor
    return groups + [[n] for n in names if n not in seen]  # layers the forward never reached, last


def paired_statistics(reference: torch.nn.Module, block: torch.nn.Module, names: dict[str, str],
                      dense: list, current: list, device: torch.device, accelerator) -> Statistics:
    """The Gram of ``names``' inputs in ``block`` on the ``current`` (compressed) hidden states and
    their cross moment with the inputs of the same layers in ``reference`` on the ``dense`` ones."""
    hooks = PairedInputHooks({n: reference.get_submodule(p) for n, p in names.items()},
                             {n: block.get_submodule(p) for n, p in names.items()})
    try:
        with torch.no_grad():
            for (dense_hidden, kwargs, mask), (hidden, _, _) in zip(dense, current):
                hooks.new_batch(mask)
                reference(dense_hidden.to(device, non_blocking=True), **kwargs)
                block(hidden.to(device, non_blocking=True), **kwargs)
    finally:
        hooks.remove()
    return hooks.result(accelerator)


@register_modifier
class Compensation(Modifier):
    """Two streams of hidden states advance together through the walk, the dense model's and the
    compressed model's; within a block each stage of layers (``stages``) is fitted to a dense copy
    of the block before the next stage's inputs are taken. An attention is cut at the stage of its
    q/k/v projections and its output projection refitted at its own stage (``attention_pruning``)."""

    name = "compensation"
    field = "compensate"
    needs_activations = True
    walk_label = "compensated"

    def __init__(self) -> None:
        self.dense: list = []  # the dense model's (hidden, kwargs, mask) entering the current block

    def problem(self, job: Job, layer: LayerProblem, stats: Statistics) -> LayerProblem:
        cross = stats.get(layer.name, CROSS)
        if cross is None:  # statistics of the dense model (greedy planning): nothing to compensate
            return layer
        return compensated(layer, stats.get(layer.name, GRAM), cross, job.config.compensation_ridge)

    def on_walk_start(self, job: Job, inputs: list | None) -> None:
        processes = job.accelerator.num_processes
        if processes > 1:  # each process finds the block's stages on its own batch
            fewest = torch.tensor([len(inputs)], device=job.accelerator.device)
            torch.distributed.all_reduce(fewest, op=torch.distributed.ReduceOp.MIN)
            if not int(fewest):
                raise ValueError(f"compensate=True in {processes} processes needs calibration data in every process; "
                                 f"one has none of the {len(job.data)} batches: give more data or a smaller batch_size")
        self.dense = [(host_clone(hidden), kwargs, mask) for hidden, kwargs, mask in inputs]

    def on_block_start(self, job: Job, block: Block) -> None:
        # The dense block, what every stage is fitted to and what advances the dense stream (an
        # offloaded block's copy keeps its own copy of the offloaded weights); a block whose only
        # cut is its experts (at its end) needs one too.
        if block.paths or experts_in(job, block.module, job.experts):
            block.reference = module_copy(block.module)

    def stages(self, job: Job, block: Block) -> list[list[str]]:
        hidden, kwargs, _ = block.inputs[0]
        return stages(block.reference, block.paths, hidden.to(block.device, non_blocking=True), kwargs)

    def collect(self, job: Job, block: Block, names: list[str]) -> Statistics:
        return job.statistics.merged(paired_statistics(block.reference, block.module, {n: block.paths[n] for n in names},
                                                       self.dense, block.inputs, block.device, job.accelerator))

    def on_block_end(self, job: Job, block: Block) -> None:
        # The dense stream advances: the block's targets.
        run_block(block.reference if block.reference is not None else block.module, self.dense, block.device)
        block.reference, block.targets = None, self.dense

    def on_walk_end(self, job: Job) -> None:
        self.dense = []
