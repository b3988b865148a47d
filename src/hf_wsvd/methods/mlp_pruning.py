"""MLP pruning (``WSVDConfig.mlp_pruning``): shrink each MLP by keeping its most useful intermediate
channels instead of factorizing its linears, the module-pair compression of MoDeGPT (type II).

An MLP is producers (``gate_proj``/``up_proj``, or ``fc1``) → an element-wise activation → a
consumer (``down_proj``, or ``fc2``). Keeping k of its n intermediate channels keeps k/n of its
weights exactly, where a rank-r factorization of each linear pays r·(in + out) per layer: at 80% of
the parameters a 576 × 1536 layer keeps 58% of its rank, the MLP 80% of its channels (measured on
SmolLM2-135M, −25% of every MLP: perplexity 1.9× dense pruned, 8.4× factorized with ``whiten``).

With C = E[h hᵀ] the Gram of the consumer's inputs h (the channels) on the compressed model,
M = E[h_d hᵀ] their cross moment with the dense model's (C itself without compensation) and λ =
ridge × mean diag C, the kept set S is the first k channels of a greedy order in which each step
takes the channels whose part not explained by those already taken carries most of the consumer's
output W·h (MoDeGPT ranks by ridge leverage, which ignores W), and the consumer is refitted in
closed form,
W' = argmin ‖W·h_d − W'·h_S‖² + λ‖W' − W_S‖² = (W·M_S + λ·W_S)·(C_SS + λI)⁻¹: the removed
channels' contribution is carried by the kept ones. The producers keep their rows of S unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import refitted, ridged
from .attention_pruning import cut_linear

# Steps of the greedy channel order: one channel a step costs n rank-1 updates of an n × n matrix
# (hours for a 70B model's 28672 channels), 256 steps about one Cholesky.
ORDER_STEPS = 256

# (producers, consumer) paths of the MLPs found, relative to a common parent: Llama, Mistral, Qwen2,
# Gemma (gated); OPT, Phi (fc1/fc2); BERT, RoBERTa (intermediate.dense -> output.dense, an element-wise
# activation inside BertIntermediate).
MLP_LAYOUTS = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("fc1",), "fc2"),
    (("intermediate.dense",), "output.dense"),
)


@dataclass(frozen=True)
class MlpPair:
    """One MLP: its producer layers and its consumer layer (base-model-relative names) and its
    number of intermediate channels."""

    producers: tuple[str, ...]
    consumer: str
    channels: int

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.producers, self.consumer)

    @property
    def key(self) -> str:
        """Its name in the allocation: the consumer's."""
        return self.consumer

    @property
    def anchor(self) -> str:
        """The layer whose statistics choose its channels: the consumer."""
        return self.consumer

    @property
    def observed(self) -> tuple[str, ...]:
        return (self.consumer,)


def find_pairs(shapes: dict[str, tuple[int, int]]) -> list[MlpPair]:
    """The MLPs whose producers and consumer are all among ``shapes`` (name → (in, out)) with
    matching intermediate size, in name order."""
    pairs = []
    for name in sorted(shapes):
        for producers, consumer in MLP_LAYOUTS:
            if name != consumer and not name.endswith("." + consumer):
                continue
            prefix = name[: len(name) - len(consumer)]
            names = tuple(prefix + p for p in producers)
            channels = shapes[name][0]
            if all(n in shapes and shapes[n][1] == channels for n in names):
                pairs.append(MlpPair(names, name, channels))
    return pairs


def element_wise(model: nn.Module, targets: dict[str, str], pair: MlpPair) -> bool:
    """Whether the MLP ``pair`` of ``model`` (``targets``: relative → full names) treats each
    intermediate channel on its own, so that dropping some leaves the others as they were: no other
    weight over its channels (BitNet's norm of them), no activation that reads them all (Gemma 3n's
    sparsity threshold from their mean and spread)."""
    paths = [targets[name].split(".") for name in pair.members]
    common = next((i for i, parts in enumerate(zip(*paths)) if len(set(parts)) > 1), min(map(len, paths)))
    parent = model.get_submodule(".".join(paths[0][:common]))  # the MLP (BERT: the layer)
    own = {id(p) for name in pair.members for p in model.get_submodule(targets[name]).parameters()}
    if any(id(p) not in own and pair.channels in p.shape for p in parent.parameters()):
        return False
    return not any(getattr(module, "activation_sparsity", 0) for module in parent.modules())


def _channel_order(weight: torch.Tensor, gram: torch.Tensor, lam: float,
                   gains: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The channels in the order that lowers the consumer's output error most: at each step those
    whose part not explained by the channels already taken carries most of W·h, score
    ‖W·R[:, j]‖² / R_jj with R the residual covariance of C + λI, taken ``ceil(n / ORDER_STEPS)``
    at a time; ties to the lower index. ``gram`` (C, float64, symmetric) is overwritten. With
    ``gains``, also ‖W·L[:, i]‖² for each position i of the order, L·Lᵀ = C + λI in that order: what
    each channel adds beyond those before it (else None)."""
    size = gram.shape[0]
    residual = gram
    residual.diagonal().add_(lam)
    projected = weight.double() @ residual
    # The channels not taken yet are kept in the leading ``active`` rows and columns (those taken are
    # swapped behind them, as pivoted Cholesky does): each step updates only what is still free, in
    # place, and no n × n temporary is made (fresh pages written twice were most of a CPU's time).
    channel = torch.arange(size, device=gram.device)  # the channel at each position
    block = -(-size // ORDER_STEPS)
    order, added = [], []
    for active in range(size, 0, -block):
        free, weighted = residual[:active, :active], projected[:, :active]
        score = weighted.square().sum(dim=0) / free.diagonal().clamp_min(torch.finfo(torch.float64).tiny)
        by_channel = channel[:active].argsort()  # so that the stable sort breaks ties to the lower channel
        chosen = by_channel[torch.sort(score[by_channel], descending=True, stable=True).indices[:min(block, active)]]
        pivot = free[chosen][:, chosen]  # R_BB
        if gains:  # L's columns of the chosen: R[:, B]·L_BBᵀ⁻¹ (R: the Schur complement so far, a blocked Cholesky)
            factor = torch.linalg.cholesky(pivot)
            added.append(torch.linalg.solve_triangular(factor, weighted[:, chosen].T, upper=False).square().sum(dim=1))
        update = torch.linalg.solve(pivot, free[chosen])  # R_BB⁻¹·R_B:
        free.addmm_(free[:, chosen], update, alpha=-1)  # the Schur complement: what the chosen leave unexplained
        weighted.addmm_(weighted[:, chosen], update, alpha=-1)
        order += channel[chosen].tolist()
        _swap_behind(chosen, active, free, weighted, channel)
    if not gains:
        return torch.tensor(order, device=gram.device), None
    return torch.tensor(order, device=gram.device), torch.cat(added) if added else projected.new_zeros(0)


def _swap_behind(chosen: torch.Tensor, active: int, free: torch.Tensor, weighted: torch.Tensor,
                 channel: torch.Tensor) -> None:
    """Move the ``chosen`` positions of the first ``active`` to its end, swapping them with the free
    positions there: rows and columns of ``free`` (active × active), columns of ``weighted``, ``channel``."""
    tail = active - len(chosen)
    taken = torch.zeros(active, dtype=torch.bool, device=channel.device)
    taken[chosen] = True
    ahead = taken[:tail].nonzero().squeeze(1)  # chosen positions before the tail
    behind = (~taken[tail:]).nonzero().squeeze(1) + tail  # free positions in the tail, as many
    if not len(ahead):
        return
    both, swapped = torch.cat([ahead, behind]), torch.cat([behind, ahead])
    free[both] = free[swapped]
    free[:, both] = free[:, swapped]
    weighted[:, both] = weighted[:, swapped]
    channel[both] = channel[swapped]


def select_channels(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor | None, keep: int,
                    ridge: float, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ``keep`` kept channel indices, ascending; the refitted consumer weight, out × keep) for a
    consumer ``weight`` (out × channels) with input Gram ``gram`` and, compensated, the cross
    moment ``cross`` = E[h_dense hᵀ] (see the module). Computed in float64; ``name`` names the layer
    in errors."""
    symmetric, lam = ridged(gram, ridge, weight.device)
    # The order consumes the symmetrized copy (one n × n float64 matrix less at this step's peak); the
    # kept parts are then taken from the caller's matrices, symmetrized alike.
    kept = _channel_order(weight, symmetric, lam)[0][:keep].sort().values
    del symmetric
    index = kept.to(gram.device)
    columns = (gram[:, index].double() + gram[index].double().T).div_(2).to(weight.device)  # C[:, kept]
    kept_gram = columns[kept]
    kept_cross = columns if cross is None else cross[:, kept.to(cross.device)].double().to(weight.device)
    del gram, cross  # the caller's n × n matrices, if it no longer holds them: only their kept parts from here
    dense = weight.double()
    refit = refitted(dense, dense[:, kept], kept_gram, kept_cross, lam)
    if not torch.isfinite(refit).all():
        layer = repr(name) if name else "MLP consumer"
        raise FloatingPointError(f"the refitted {layer} is not finite: check the layer's weights and statistics "
                                 "for NaN/inf, or raise compensation_ridge")
    return kept, refit


def channel_gains(weight: torch.Tensor, gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """The output loss each channel removes when added in the kept order: with C + λI = L·Lᵀ in
    that order, ‖W·L[:, i]‖², what channel i adds beyond the channels before it. Float64."""
    symmetric, lam = ridged(gram, ridge, weight.device)
    return _channel_order(weight, symmetric, lam, gains=True)[1]  # consumes the symmetrized copy


def channel_spectrum(weight: torch.Tensor, gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """√ of the output loss each channel removes when added in the kept order (what greedy
    allocation reads, as it reads a layer's singular values): ``channel_gains`` made
    non-increasing (a later channel never counts more than an earlier one). Float64."""
    return as_spectrum(channel_gains(weight, gram, ridge))


def as_spectrum(gains: torch.Tensor) -> torch.Tensor:
    """√ of ``gains`` (losses removed, in the kept order) made non-increasing."""
    return gains.cummin(dim=0).values.sqrt()


def shrunk(module: nn.Linear, kept: torch.Tensor, consumer_weight: torch.Tensor | None) -> nn.Linear:
    """``module`` cut to the ``kept`` channels, in its dtype, device and training mode: a producer
    keeps those output rows (and bias entries); the consumer (``consumer_weight`` given) takes the
    refitted weight on them, its bias unchanged."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"MLP pruning needs nn.Linear layers, got {type(module).__name__}")
    weight, bias = module.weight.detach(), module.bias.detach() if module.bias is not None else None
    kept = kept.to(weight.device)
    if consumer_weight is None:
        weight, bias = weight[kept], bias[kept] if bias is not None else None
    else:
        weight = consumer_weight
    return cut_linear(module, weight, bias)
