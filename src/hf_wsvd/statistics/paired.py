"""Inputs of the same layers in two copies of a block, token by token: the dense reference and the
block being compressed. Their moments let a layer's factors be refit so that its outputs on the
compressed model's inputs match the dense layer's outputs on the dense model's inputs."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from ..runtime.factorized_linear import linear_shape

from .inputs import token_rows
from .names import CROSS, GRAM
from .passes import exact_16bit_products
from .result import Statistics
from .shared import TOKENS, SharedSums


class PairedInputHooks:
    """Forward pre-hooks on ``reference[name]`` and ``current[name]`` (the same layers of a dense and
    a compressed block). Run the reference block, then the current block, on the same batch: the
    current layers accumulate ``gram`` = E[x xᵀ] of their own inputs and ``cross`` = E[x_ref xᵀ].

    ``new_batch(mask)`` before each pair of runs excludes padding (batch × tokens, 1 = real)."""

    def __init__(self, reference: dict[str, nn.Module], current: dict[str, nn.Module]) -> None:
        self.current = current
        self.stash: dict[str, torch.Tensor] = {}
        self.sums = SharedSums()  # one copy for layers reading the same pair of tensors (q/k/v)
        self.mask: torch.Tensor | None = None
        self._last: tuple | None = None
        self._handles = [m.register_forward_pre_hook(self._keep(n)) for n, m in reference.items()]
        self._handles += [m.register_forward_pre_hook(self._pair(n)) for n, m in current.items()]

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self.stash.clear()
        self._last = None
        self.sums.finish()  # the last batch's contributions become sums (the first batch's, without a copy)

    def _keep(self, name: str):
        def hook(module, args):
            self.stash[name] = args[0].detach()

        return hook

    def _moments(self, x: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        # Layers reading the same pair of tensors (q/k/v, gate/up) share one computation.
        if self._last is not None and self._last[0] is x and self._last[1] is reference:
            return self._last[2]
        with exact_16bit_products(x) as dtype:
            rows = token_rows(x.detach(), self.mask, dtype)
            ref = token_rows(reference.to(x.device), self.mask, dtype)
            moments = {GRAM: (rows.T @ rows).double(), CROSS: (ref.T @ rows).double(),
                       TOKENS: torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=rows.device)}
        self._last = (x, reference, moments)
        return moments

    def _pair(self, name: str):
        def hook(module, args):
            if name not in self.stash:
                raise RuntimeError(f"run the reference block before the current one: {name!r} has no reference input")
            self.sums.add(name, self._moments(args[0], self.stash[name]))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.stash.clear()
        self._last = None

    def result(self, accelerator: Accelerator) -> Statistics:
        """The means over every process's tokens (the sums are divided in place: the hooks are spent)."""
        names = sorted(self.current)

        def zeros(name: str) -> dict[str, torch.Tensor]:  # a process whose share reached no token still joins the sums
            size = linear_shape(self.current[name])[0]
            zero = torch.zeros(size, size, dtype=torch.float64, device=accelerator.device)
            return {GRAM: zero, CROSS: zero.clone(), TOKENS: torch.zeros((), dtype=torch.float64, device=accelerator.device)}

        self.sums.reduce(accelerator, names, zeros)
        return self.sums.statistics(names)
