"""MLP pruning of mixture-of-experts experts (``WSVDConfig.mlp_pruning``): each expert of an experts
module is an MLP (act(gate)·up → down) stored as one slice of the module's 3-D ``gate_up_proj``
(E × 2I × H) and ``down_proj`` (E × H × I), as transformers 5 stores Mixtral's, OLMoE's and
Qwen-MoE's experts.

Every expert of a module keeps the same number k of intermediate channels, so the tensors stay
rectangular (E × 2k × H, E × H × k) and the stock experts forward — its eager loop and its
grouped_mm / batched_mm kernels — runs unchanged on smaller matmuls. Each expert chooses its own k
channels as MLP pruning chooses an MLP's (``mlp_pruning.select_channels``: the greedy channel order
on the Gram of its down projection's inputs, then the closed-form refit of its down slice), on the
tokens the router sends it, each weighted by its routing weight squared (the expert's output is
scaled by it): C_e = (1/T) Σ_{t → e} r_te² h_t h_tᵀ over the T tokens reaching the module, so that
Σ_e tr(W_e C_e W_eᵀ) is the energy of the module's output. Its gate/up rows of the kept channels
stay as they are. An expert no token reached keeps the channels of its largest down columns,
unchanged (its Gram is zero: the ridge alone decides).

Memory: the statistics of one experts module are E Grams of I × I in float64 (E·I²·8 bytes:
Mixtral-8x7B, 8 × 14336², 13 GiB per block; OLMoE-1B-7B, 64 × 1024², 0.5 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import align_module_device
from torch import nn

from ..blocks import block_list
from ..runtime.modeling_wsvd import experts_shape, experts_unsupported, is_experts, relative_module_name, set_experts
from .mlp_pruning import channel_gains, select_channels


@dataclass(frozen=True)
class ExpertsGroup:
    """One experts module (base-model-relative ``name``): ``experts`` MLPs of ``channels``
    intermediate channels reading and writing ``hidden`` features. ``probe``: the layer of its
    block whose method's predicted loss per unit of output energy prices the module's output (the
    attention's output projection, or a hybrid block's out_proj, which writes the same residual
    stream: ``modifiers.mlp_pruning.PROBES``), for methods with a loss scale; None otherwise."""

    name: str
    experts: int
    channels: int
    hidden: int
    probe: str | None = None

    @property
    def members(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def key(self) -> str:
        return self.name

    @property
    def anchor(self) -> str:
        return self.name

    @property
    def observed(self) -> tuple[str, ...]:
        return (self.name,) if self.probe is None else (self.name, self.probe)


def find_experts(model: nn.Module) -> tuple[dict[str, str], list[str]]:
    """(base-model-relative → full name of each experts module of ``model``'s blocks whose experts
    can be cut, why each of the others cannot: ``experts_unsupported``, or a forward that does not
    compute what the cut assumes)."""
    try:
        prefix, _ = block_list(model)
    except ValueError:
        return {}, []
    found, refused = {}, []
    for name, module in model.named_modules():
        if not name.startswith(prefix + ".") or not is_experts(module):
            continue
        why = experts_unsupported(module) or _forward_differs(module)
        if why is None:
            found[relative_module_name(model, name)] = name
        else:
            refused.append(f"{name}: {why}")
    return found, refused


def intermediate(module: nn.Module, expert: int, hidden: torch.Tensor) -> torch.Tensor:
    """Expert ``expert``'s intermediate channels act(gate)·up on the token rows ``hidden``."""
    gate, up = nn.functional.linear(hidden, module.gate_up_proj[expert]).chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _forward_differs(module: nn.Module) -> str | None:
    """Why ``module``'s forward (whichever experts implementation its config picks) is not
    Σ_k r_k·down(act(gate)·up) of the experts chosen for each token, on a few random tokens (a
    class computing more, or otherwise, is left dense); None where it is."""
    experts, _, hidden_size = experts_shape(module)
    with align_module_device(module), torch.no_grad():
        weight = module.down_proj
        if weight.device.type == "meta":
            return "weights on the meta device"
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(8, hidden_size, generator=generator).to(weight.device, weight.dtype)
        top_k = min(2, experts)
        index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(8)]).to(weight.device)
        weights = torch.rand(8, top_k, generator=generator).to(weight.device, weight.dtype)
        expected = torch.zeros_like(hidden)
        for slot in range(top_k):
            for token in range(8):
                expert = int(index[token, slot])
                out = nn.functional.linear(intermediate(module, expert, hidden[token:token + 1]), weight[expert])
                expected[token] += weights[token, slot] * out[0]
        got = module(hidden, index, weights)
    got = got[0] if isinstance(got, tuple) else got
    scale = float(expected.abs().max()) or 1.0
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or \
            not torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * scale):
        return f"{type(module).__name__}'s forward computes other than the routed act(gate)*up -> down experts"
    return None


@torch.no_grad()
def routed_grams(module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                 real: torch.Tensor | None) -> torch.Tensor:
    """Σ over the token rows of ``hidden`` (tokens × H; ``real``: the rows that are no padding) of
    r² h hᵀ for each expert the row is routed to (``index``, tokens × top-k) with routing weight r
    (``weights``), h its intermediate channels: E × I × I, float64."""
    experts, channels, _ = experts_shape(module)
    grams = torch.zeros(experts, channels, channels, dtype=torch.float64, device=hidden.device)
    hidden, index, weights = hidden.detach(), index.detach(), weights.detach()
    if real is not None:
        hidden, index, weights = hidden[real], index[real], weights[real]
    for expert in range(experts):
        tokens, slot = (index == expert).nonzero(as_tuple=True)
        if len(tokens):
            h = intermediate(module, expert, hidden[tokens]).double()
            grams[expert] = (h * weights[tokens, slot].double().square()[:, None]).T @ h
    return grams


def experts_gains(down: torch.Tensor, grams: torch.Tensor, ridge: float) -> torch.Tensor:
    """What each channel position removes of the module's output loss, summed over the experts the
    calibration tokens reach (each in its own kept order, ``mlp_pruning.channel_gains``); float64.
    An expert no token reached has no loss on the data (its ridge alone would price its channels)."""
    reached = [expert for expert in range(down.shape[0]) if grams[expert].diagonal().any()]
    return sum((channel_gains(down[expert], grams[expert], ridge) for expert in reached),
               torch.zeros(down.shape[2], dtype=torch.float64, device=down.device))


def select_experts(down: torch.Tensor, grams: torch.Tensor, keep: int, ridge: float,
                   name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ``keep`` channels each expert keeps, E × keep ascending; their refitted down
    weights, E × H × keep, float64) for the experts' ``down`` weights (E × H × I) with routed
    Grams ``grams`` (E × I × I); ``name`` names the module in errors."""
    chosen = [select_channels(down[expert], grams[expert], None, keep, ridge, f"{name} expert {expert}")
              for expert in range(down.shape[0])]
    return torch.stack([kept for kept, _ in chosen]), torch.stack([refit for _, refit in chosen])


def cut_experts(module: nn.Module, kept: torch.Tensor, refit: torch.Tensor) -> None:
    """Cut every expert of ``module`` to its ``kept`` channels (E × k): their gate and up rows as
    they are, the ``refit`` down weights (E × H × k), in the module's dtype and device."""
    gate_up = module.gate_up_proj.detach()
    channels = gate_up.shape[1] // 2
    kept = kept.to(gate_up.device)
    rows = torch.cat([kept, kept + channels], dim=1)  # the gate rows, then the up rows
    cut = torch.stack([gate_up[expert, rows[expert]] for expert in range(gate_up.shape[0])])
    set_experts(module, cut, refit.to(gate_up.device, gate_up.dtype).contiguous())
