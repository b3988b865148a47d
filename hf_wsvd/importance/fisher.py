"""Per-example empirical Fisher information of each target weight, computed with accelerate.

F = (1/N) Σ_n (∂ℓ_n/∂W)², in ``nn.Linear`` layout (out × in). Per-example gradients are rebuilt
from each layer's input x and output gradient g (∂ℓ_n/∂W = Σ_t g_nt x_ntᵀ) by tensor hooks, so they
are squared before anything is summed, no ``param.grad`` is needed and the model is never wrapped
in DDP (whose gradient averaging would square the mean instead of the per-example gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ..runtime.factorized_linear import linear_shape
from ..tasks import LossFn
from .passes import batches, default_accelerator, reduce_sums


@dataclass
class FisherResult:
    """Mean squared per-example gradient per module (out × in, float32, CPU) and the number of
    examples it averages over (all processes together)."""

    fisher: dict[str, torch.Tensor]
    num_examples: int


class _SquaredGradientHooks:
    """Accumulates Σ_n (∂ℓ_n/∂W)² for each module from its input and output gradient."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self._handles = [
            module.register_forward_hook(self._forward_hook(name)) for name, module in modules.items()
        ]

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            x = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: self._accumulate(name, x, g))
            # Returning None keeps the module output unchanged.

        return hook

    def _accumulate(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        x = x.float().reshape(x.shape[0], -1, x.shape[-1])
        g = g.float().reshape(g.shape[0], -1, g.shape[-1])
        total = self.sums.get(name)
        if total is None:
            total = self.sums[name] = torch.zeros(g.shape[-1], x.shape[-1], device=g.device)
        if g.device.type != "cpu":
            # One batched product on accelerators (few large kernels, no host syncs).
            total += torch.einsum("bto,bti->boi", g, x).square_().sum(dim=0)
            return
        # CPU: one example at a time into a reused out × in buffer that stays in cache, squared
        # and added in place (no batch × out × in intermediate), over the token rows whose output
        # gradient is not all zero only: padding (masked keys, ignored labels) gets exact zeros
        # and contributes exactly nothing, so dropping those rows skips work, not terms.
        live = g.ne(0).any(dim=-1)
        buffer = torch.empty_like(total)
        for n in range(g.shape[0]):
            rows = live[n]
            if not rows.any():
                continue
            g_n, x_n = (g[n], x[n]) if rows.all() else (g[n][rows], x[n][rows])
            torch.mm(g_n.t(), x_n, out=buffer)
            total.addcmul_(buffer, buffer)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def compute_fisher(
    model: nn.Module,
    dataloader: DataLoader,
    modules: dict[str, nn.Module],
    loss_fn: LossFn,
    accelerator: Accelerator | None = None,
    show_progress: bool = True,
) -> FisherResult:
    """Empirical Fisher of ``loss_fn`` for each of ``modules`` (name → module) over ``dataloader``.

    In several processes each one takes its shard of the batches; sums and example counts are
    added across processes before dividing, so the result equals a single-process run.
    """
    accelerator = accelerator or default_accelerator()
    loader = batches(model, dataloader, accelerator, "Fisher", show_progress)

    was_training = model.training
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # Activations must carry gradients although no parameter does.
    embedding_hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output.requires_grad_(True)
    )
    hooks = _SquaredGradientHooks(modules)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    try:
        for batch in loader:
            loss_fn(model, batch).sum().backward()
            count += batch["labels"].shape[0]
    finally:
        hooks.remove()
        embedding_hook.remove()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)

    missing = sorted(set(modules) - set(hooks.sums))
    if missing and count > 0:
        raise RuntimeError(f"no gradient reached {missing[:3]}: are these modules used by the forward pass?")
    # A process that got no batch still joins the reduction with zeros.
    sums = {
        name: hooks.sums[name] if name in hooks.sums else torch.zeros(linear_shape(m)[::-1], device=accelerator.device)
        for name, m in modules.items()
    }
    sums, counts = reduce_sums(accelerator, sums, {"examples": count})
    count = counts["examples"]
    total = int(count.item())
    if total == 0:
        raise ValueError("the importance data is empty: no example reached the Fisher pass")
    return FisherResult({name: (s / total).float().cpu() for name, s in sums.items()}, total)

