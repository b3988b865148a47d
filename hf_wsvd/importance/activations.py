"""Calibration statistics of each target layer's input: the Gram matrix E[x xᵀ] (float64) and the
mean absolute activation per input feature, over real (non-padding) tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ..runtime.factorized_linear import linear_shape
from .passes import batches, default_accelerator, reduce_sums


@dataclass
class ActivationStats:
    """Per module: ``gram`` = mean of x xᵀ over tokens (in × in, float64), ``mean_abs`` = mean |x|
    per input feature (float64), and the token count they average over (all processes)."""

    gram: dict[str, torch.Tensor]
    mean_abs: dict[str, torch.Tensor]
    tokens: dict[str, int]


class ActivationHooks:
    """Forward pre-hooks accumulating Σ x xᵀ, Σ |x| and the token count per module.

    Set ``mask`` (batch × tokens, 1 for real tokens) before each forward so padding is excluded;
    inputs whose leading shape differs from the mask (e.g. a decoder's) count every position.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.mask: torch.Tensor | None = None
        self.gram: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, torch.Tensor] = {}
        # q/k/v projections read the same tensor: compute its statistics once per forward.
        self._last: tuple | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Real tokens of ``x`` as rows (float64)."""
        if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            x = x[self.mask.bool()]
        return x.reshape(-1, x.shape[-1]).double()

    def _contribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Identity, not the data pointer: freed memory is reused by later tensors of the same shape.
        # Holding the tensor in ``_last`` keeps it alive, so ``is`` cannot match a newer tensor.
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            return self._last[2]
        source, version = x, x._version
        x = self._tokens(x.detach())
        result = (x.T @ x, x.abs().sum(dim=0), torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
        self._last = (source, version, result)
        return result

    def _hook(self, name: str):
        def hook(module, args):
            gram, abs_sum, count = self._contribution(args[0])
            if name in self.gram:
                self.gram[name] += gram
                self.abs_sum[name] += abs_sum
                self.count[name] += count
            else:
                self.gram[name], self.abs_sum[name], self.count[name] = gram.clone(), abs_sum.clone(), count.clone()
            # Returning None leaves the module input unchanged.

        return hook

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self._last = None

    def result(self) -> ActivationStats:
        """Means over the accumulated tokens (modules that saw no token get zeros)."""
        return ActivationStats(
            {n: g / self.count[n].clamp_min(1) for n, g in self.gram.items()},
            {n: a / self.count[n].clamp_min(1) for n, a in self.abs_sum.items()},
            {n: int(c.item()) for n, c in self.count.items()},
        )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module,
    dataloader: DataLoader,
    modules: dict[str, nn.Module],
    accelerator: Accelerator | None = None,
    show_progress: bool = True,
) -> ActivationStats:
    """Input statistics of ``modules`` (name → module) over ``dataloader``; across processes the
    sums and token counts are added before dividing, so the result equals a single-process run."""
    accelerator = accelerator or default_accelerator()
    was_training = model.training
    model.eval()
    hooks = ActivationHooks(modules)
    try:
        for batch in batches(model, dataloader, accelerator, "activations", show_progress):
            hooks.new_batch(batch.get("attention_mask"))
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        hooks.remove()
        model.train(was_training)
    if accelerator.num_processes > 1:
        sums, counts = {}, {}
        for name, module in modules.items():
            width = linear_shape(module)[0]
            zeros = torch.zeros(width, width, dtype=torch.float64, device=accelerator.device)
            sums[f"{name}/gram"] = hooks.gram.get(name, zeros)
            sums[f"{name}/abs"] = hooks.abs_sum.get(name, zeros[0])
            counts[name] = hooks.count.get(name, torch.zeros((), dtype=torch.float64, device=accelerator.device))
        sums, counts = reduce_sums(accelerator, sums, counts)
        hooks.gram = {n: sums[f"{n}/gram"] for n in modules}
        hooks.abs_sum = {n: sums[f"{n}/abs"] for n in modules}
        hooks.count = counts
    if not hooks.count or all(c.item() == 0 for c in hooks.count.values()):
        raise ValueError("the calibration data is empty: no token reached the target layers")
    return hooks.result()
