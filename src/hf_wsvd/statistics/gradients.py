"""Statistics of per-example gradients: the empirical Fisher information of the task loss per
entry (``fisher``), or only its row or column sums (``fisher_rows``, ``fisher_cols``: O(out) or
O(in) memory per layer).

F = (1/N) Σ_n (∂ℓ_n/∂W)², in ``nn.Linear`` layout (out × in). Per-example gradients are rebuilt
from each layer's input x and output gradient g (∂ℓ_n/∂W = Σ_t g_nt x_ntᵀ) by tensor hooks, so they
are squared before anything is summed, no ``param.grad`` is needed and the model is never wrapped
in DDP (whose gradient averaging would square the mean instead of the per-example gradients).

When every layer lies in the model's block list, backpropagation runs one block at a time
(``BlockwiseBackward``): the forward pass keeps only each block's input, and the backward pass
recomputes one block at a time, where it lives. Memory is then one block's activations plus the
block inputs, whatever the depth, and a model dispatched over several GPUs or kept in CPU memory
is processed block by block.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from accelerate import Accelerator
from torch import nn

from ..blocks import (
    block_list, first_output, given_back, input_device, input_embeddings, is_dispatched, kept_flags, outside_blocks_on,
    placed, split_hidden,
    with_hidden,
    without_cache,
)
from ..runtime.factorized_linear import linear_shape
from ..targets import unreached_advice
from ..tasks import LossFn
from .collectors import COLLECTORS, Collector, collectors_for
from .passes import batches, default_accelerator, exact_16bit_products, failing_together, sum_across_processes
from .result import FLOAT16_OVERFLOW, Statistics

# Largest transient of the batched per-example gradients (examples × out × in) on accelerators:
# 2^28 elements (1 GiB in float32), whatever the layer and batch sizes.
CHUNK_ELEMENTS = 1 << 28


class GradientHooks:
    """Accumulates the gradient statistics ``needs`` of each module from its input and output
    gradient, on the module's device."""

    def __init__(self, modules: dict[str, nn.Module], needs: Iterable[str]) -> None:
        self.modules = modules
        self.names = collectors_for(set(needs), gradients=True)
        self.collectors: dict[str, dict[str, Collector]] = {m: {n: COLLECTORS[n]() for n in self.names} for m in modules}
        self.seen: set[str] = set()
        self._handles = [module.register_forward_hook(self._forward_hook(name)) for name, module in modules.items()]

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            if output.requires_grad:
                x = args[0].detach()
                output.register_hook(lambda g: self._accumulate(name, x, g))
            # Returning None keeps the module output unchanged.

        return hook

    def _accumulate(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        self.seen.add(name)
        for squares in _squared_gradients(x, g):
            for collector in self.collectors[name].values():
                collector.add(collector.reduce(squares))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _squared_gradients(x: torch.Tensor, g: torch.Tensor) -> Iterator[torch.Tensor]:
    """Σ_n (g_nᵀ x_n)² over chunks of the examples (out × in, float32), one chunk at a time."""
    if g.device.type != "cpu":
        # Batched float32 products (exact TF32 for 16-bit activations), a chunk of examples at a
        # time: few large kernels, no host syncs, bounded transient memory.
        chunk = max(1, CHUNK_ELEMENTS // (g.shape[-1] * x.shape[-1]))
        with exact_16bit_products(g):
            for start in range(0, g.shape[0], chunk):
                gradients = torch.einsum("bto,bti->boi", g[start:start + chunk].float(), x[start:start + chunk].float())
                yield gradients.square_().sum(dim=0)
        return
    # CPU: one example at a time into a reused out × in buffer that stays in cache, over the token
    # rows whose output gradient is not all zero only: padding (masked keys, ignored labels) gets
    # exact zeros and contributes exactly nothing, so dropping those rows skips work, not terms.
    x, g = x.float(), g.float()
    live = g.ne(0).any(dim=-1)
    buffer = torch.empty(g.shape[-1], x.shape[-1], dtype=torch.float32)  # whatever the default dtype
    for n in range(g.shape[0]):
        rows = live[n]
        if not rows.any():
            continue
        g_n, x_n = (g[n], x[n]) if rows.all() else (g[n][rows], x[n][rows])
        torch.mm(g_n.t(), x_n, out=buffer)
        yield buffer.square_()


class BlockwiseBackward:
    """Backpropagation one block at a time (block-level activation checkpointing).

    Inside the context, each block of ``blocks`` runs without autograd and records its input; its
    output is returned as a fresh leaf. ``backward(loss)`` backpropagates the loss to the last
    block's output, then recomputes each block from its recorded input, last to first, and
    backpropagates through it alone. Blocks are placed as ``hf_wsvd.blocks.placed`` says.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device) -> None:
        self.blocks, self.device = blocks, device
        self.records: list[tuple] = []
        self.output: torch.Tensor | None = None
        self._restore: list[tuple] = []

    def __enter__(self) -> "BlockwiseBackward":
        for index, block in enumerate(self.blocks):
            original = block.forward
            self._restore.append((block, "forward" in block.__dict__, original))
            # the walk goes on to the next block, and from the last into the backward pass
            block.forward = self._forward(block, original, self.blocks[min(index + 1, len(self.blocks) - 1)])
        return self

    def __exit__(self, *exc) -> None:
        for block, own, original in self._restore:
            if own:
                block.forward = original
            else:
                del block.forward
        self._restore.clear()
        self.records.clear()

    def _forward(self, block: nn.Module, original, upcoming: nn.Module):
        def forward(*args, **kwargs):
            hidden, kw = split_hidden(block, args, kwargs)
            kw = without_cache(kw)
            with torch.no_grad(), placed(block, self.device, upcoming) as device:
                out = original(hidden.to(device), **kw)
            self.records.append((block, original, hidden.detach(), kw))
            self.output = first_output(out).detach().requires_grad_()
            return with_hidden(out, self.output)

        return forward

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        grad = self.output.grad if self.output is not None else None
        if grad is None:
            raise RuntimeError("the loss does not depend on the last block's output; pass a loss_fn that uses it")
        records = self.records[::-1]
        for index, (block, original, hidden, kw) in enumerate(records):
            upcoming = records[index + 1][0] if index + 1 < len(records) else None  # the block before
            with torch.enable_grad(), placed(block, self.device, upcoming) as device:
                leaf = hidden.to(device).requires_grad_()
                out = first_output(original(leaf, **kw))
                torch.autograd.backward(out, grad.to(out.device))
            grad = leaf.grad
        self.records.clear()
        self.output = None


def _inside(modules: dict[str, nn.Module], blocks: nn.ModuleList) -> bool:
    members = {id(m) for m in blocks.modules()}
    return all(id(m) in members for m in modules.values())


def gradient_statistics(
    model: nn.Module,
    data: Iterable[dict],
    modules: dict[str, nn.Module],
    needs: Iterable[str],
    loss_fn: LossFn,
    accelerator: Accelerator | None = None,
    show_progress: bool = True,
) -> Statistics:
    """The gradient statistics ``needs`` (``fisher``, ``fisher_rows``, ``fisher_cols``) of
    ``loss_fn`` for each of ``modules`` (name → module) over ``data`` (batches with ``labels``).

    In several processes each one takes its share of the batches; sums and example counts are
    added across processes before dividing, so the result equals a single-process run. The
    statistics are on the accelerator. The model stays where it is (blocks kept in CPU memory visit
    the accelerator one at a time) when every module lies in its block list; otherwise, unless
    dispatched, it moves to the accelerator, and back where it was on one device.
    """
    accelerator = accelerator or default_accelerator()
    device = accelerator.device
    try:
        prefix, blocks = block_list(model)
    except ValueError:
        prefix, blocks = "", None
    # An encoder-decoder model's decoder blocks also read the encoder's output, which a walk back
    # through one block list would not reach: its backward runs whole.
    streamed = blocks is not None and _inside(modules, blocks) \
        and not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    with given_back(model):  # a model moved to the accelerator goes back where it was
        if not streamed and not is_dispatched(model):
            model.to(device)
        hooks = GradientHooks(modules, needs)
        count = torch.zeros((), dtype=torch.float64, device=device)
        with contextlib.ExitStack() as stack:
            stack.enter_context(kept_flags(model))  # the pass runs in eval mode, no weight trainable
            model.eval().requires_grad_(False)
            stack.callback(hooks.remove)
            if streamed:
                stack.enter_context(outside_blocks_on(model, prefix, device))
                replay = stack.enter_context(BlockwiseBackward(blocks, device))
            else:
                # Activations must carry gradients although no parameter does: from every lookup (an
                # encoder-decoder model's encoder and decoder each hold a module of their own, sharing
                # the table or not; position tables too, which is harmless).
                embedding = input_embeddings(model)
                for module in model.modules():
                    if module is embedding or isinstance(module, nn.Embedding):
                        # (ProphetNet's positional embeddings return a tuple, and carry nothing to score)
                        handle = module.register_forward_hook(
                            lambda module, args, output: output.requires_grad_(True)
                            if isinstance(output, torch.Tensor) and output.is_floating_point() else None)
                        stack.callback(handle.remove)
            stack.enter_context(failing_together(accelerator, "Fisher"))
            for index, batch in enumerate(batches(data, accelerator, input_device(model, device), "Fisher",
                                                  show_progress)):
                if "labels" not in batch:
                    raise ValueError(f"the importance batches have no 'labels' (keys: {sorted(batch)}): the Fisher "
                                     "information needs the task loss; give labels (causal LMs: the input ids)")
                losses = loss_fn(model, batch)
                if not isinstance(losses, torch.Tensor) or not losses.requires_grad:
                    shown = "a tensor without gradient" if isinstance(losses, torch.Tensor) else repr(losses)
                    raise ValueError(f"loss_fn returned {shown}: it must return the batch's per-example losses "
                                     "computed from the model's outputs")
                examples = batch["labels"].shape[0]
                # One loss per example (a row, or a column of them): a mean over several examples, fewer
                # rows, or per-token losses (or logits) summed would scale, drop or reweigh examples silently.
                if (losses.shape[:1] != (examples,) or losses.numel() != examples) \
                        and not (losses.dim() == 0 and examples == 1):
                    raise ValueError(f"loss_fn returned a tensor of shape {tuple(losses.shape)} for importance batch "
                                     f"{index} of {examples} examples: it must return one loss per example "
                                     "(reduction='none', averaged over each example's tokens)")
                if not bool(torch.isfinite(losses.detach()).all()):  # it would spread to every statistic
                    half = FLOAT16_OVERFLOW if next(model.parameters()).dtype == torch.float16 else ""
                    raise ValueError(f"the importance loss is NaN or infinite for importance batch {index} (of "
                                     "this process): check that batch's labels (an example whose labels are all "
                                     "-100 has no loss to average) and the model's outputs (or the loss_fn "
                                     f"given){half}")
                losses = losses.sum()
                replay.backward(losses) if streamed else losses.backward()
                count += examples
    missing = sorted(set(modules) - hooks.seen)
    if missing and count > 0:
        raise ValueError(f"no gradient reached {missing[:3]} ({len(missing)} target layers): the forward pass does not "
                         f"call them; {unreached_advice(missing, modules)}")
    totals = []
    for name, module in modules.items():
        in_features, out_features = linear_shape(module)
        for collector in hooks.collectors[name].values():
            if collector.total is None:  # a process that got no batch still joins the reduction
                collector.total = collector.zeros(in_features, out_features, device)
            totals.append(collector.total)
    sum_across_processes(accelerator, [*totals, count])
    total = int(count.item())
    if total == 0:
        raise ValueError("the importance data is empty: no example reached the Fisher pass")
    if not any(bool(t.any()) for t in totals):  # every importance would be 0: ranks settled by ties
        raise ValueError(f"the Fisher information of all {len(modules)} layers is zero: none of the {total} examples "
                         "gave the loss a target (labels all -100, or causal-LM sequences of one token); give "
                         "labelled data, or method='whiten', which needs none")
    values = {name: {n: c.result(total) for n, c in collectors.items()} for name, collectors in hooks.collectors.items()}
    return Statistics(values, total, {})
