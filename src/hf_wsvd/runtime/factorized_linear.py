"""`FactorizedLinear`: a linear layer stored as two thin factors, ``W ≈ up.weight @ down.weight``.

This file ships inside every compressed checkpoint (it is copied next to ``config.json`` so that
``trust_remote_code=True`` works without hf_wsvd), so it may import only torch and transformers.
"""

from __future__ import annotations

import torch
from torch import nn


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """Return ``(in_features, out_features)`` of an ``nn.Linear``, a transformers ``Conv1D``, a
    ``FactorizedLinear``, a ``FullPrecisionLinear`` or a ``LowRankCorrectedLinear``."""
    if isinstance(module, (nn.Linear, FactorizedLinear, FullPrecisionLinear, LowRankCorrectedLinear)):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        # GPT-2 style Conv1D stores weight as (in, out) and computes x @ W + b.
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight of a linear-like module in ``nn.Linear`` layout (out × in)."""
    if isinstance(module, FactorizedLinear):
        return module.up.weight @ module.down.weight
    if isinstance(module, (nn.Linear, FullPrecisionLinear)):
        return module.weight
    if isinstance(module, LowRankCorrectedLinear):
        raise TypeError("a LowRankCorrectedLinear's base weight is quantized: it has no dense weight to read")
    linear_shape(module)  # raises for unsupported modules
    return module.weight.t()


def saves_parameters(in_features: int, out_features: int, rank: int) -> bool:
    """Whether rank ``rank`` factors hold fewer weights than the dense ``out × in`` matrix (or
    embedding table: the rule is symmetric in the two sides)."""
    return rank * (in_features + out_features) < in_features * out_features


def check_rank(rank: int, in_features: int, out_features: int) -> None:
    """Raise unless ``rank`` fits an ``out_features × in_features`` layer."""
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"rank={rank} is invalid for a {out_features}x{in_features} layer: "
            f"it must be between 1 and {min(in_features, out_features)}"
        )


class _RankedFactors:
    """``rank`` and a ``weight`` stand-in of a module with ``down`` (in → r) and ``up`` (r → out) factors."""

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The ``up`` factor, for dtype/device probes only (its shape is out × rank)."""
        return self.up.weight


class FactorizedLinear(_RankedFactors, nn.Module):
    """A drop-in replacement for ``nn.Linear(in_features, out_features)`` of rank ``rank``.

    ``forward(x) = up(down(x))`` with ``down: in → rank`` (no bias) and ``up: rank → out`` carrying
    the original bias. ``weight`` and ``bias`` are read-only stand-ins for dtype/device probes done
    by model code and libraries; the dense matrix is ``to_dense()``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank, in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        # Child names must not end like model projections ("up_proj"): peft matches name suffixes.
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None
    ) -> "FactorizedLinear":
        """Build from ``up`` (out × r), ``down`` (r × in) and an optional ``bias`` (out)."""
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"factor shapes do not chain: up {tuple(up.shape)} and down {tuple(down.shape)}"
            )
        if bias is not None and bias.shape != (up.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={up.shape[0]}")
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None,
                    device=up.device, dtype=up.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down.to(up.dtype))
            if bias is not None:
                layer.up.bias.copy_(bias.to(up.dtype))
        return layer

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def num_parameters(self) -> int:
        """Number of stored parameters (both factors and the bias)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function with the product of the factors."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.up.weight.device, dtype=self.up.weight.dtype)
        dense.weight.copy_(self.up.weight @ self.down.weight)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class FullPrecisionLinear(nn.Module):
    """``nn.Linear``'s computation under another class. Quantizers (torchao, bitsandbytes, HQQ)
    convert ``nn.Linear`` modules only, so this one keeps its dtype under a quantization config:
    a factor whose shape the quantizer's kernels refuse, or a low-rank correction."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    forward = nn.Linear.forward
    extra_repr = nn.Linear.extra_repr


class LowRankCorrectedLinear(_RankedFactors, nn.Module):
    """``base(x) + up(down(x))``: a linear whose weight the checkpoint stores quantized (``base``,
    carrying the bias) plus a rank-``rank`` correction of its quantization error kept in full
    precision (``down: in → rank``, ``up: rank → out``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_rank(rank, in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.down = FullPrecisionLinear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = FullPrecisionLinear(rank, out_features, bias=False, device=device, dtype=dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
