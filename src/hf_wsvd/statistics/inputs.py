"""Statistics of the layers' inputs (``gram``, ``mean_abs``) and their token counts, from forward
pre-hooks, over real (non-padding) tokens."""

from __future__ import annotations

from typing import Iterable

import torch
from accelerate import Accelerator
from torch import nn

from ..runtime.factorized_linear import linear_shape
from .collectors import COLLECTORS, collectors_for
from .passes import batches, default_accelerator, exact_16bit_products
from .result import Statistics
from .shared import TOKENS, SharedSums

# Said wherever a pass over the calibration data brought no token to the layers it observes.
EMPTY_DATA_MESSAGE = "the calibration data is empty: no token reached the target layers"


def token_rows(x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A layer input as (tokens × features) rows in ``dtype``, padding removed where ``mask``
    (batch × tokens, 1 = real) matches its leading shape (a decoder's inputs count every position)."""
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        x = x[mask.to(x.device).bool()]
    return x.reshape(-1, x.shape[-1]).to(dtype)


class InputHooks:
    """Forward pre-hooks accumulating the input statistics ``needs`` of each module.

    Call ``new_batch(mask)`` (batch × tokens, 1 for real tokens) before each forward so padding is
    excluded; inputs whose leading shape differs from the mask (e.g. a decoder's) count every
    position. Modules reading the same tensor (q/k/v projections) share one computation of each
    contribution and one copy of the sums (``SharedSums``). Accumulators live on the device of the
    module's input.
    """

    def __init__(self, modules: dict[str, nn.Module], needs: Iterable[str]) -> None:
        self.modules = modules
        self.names = collectors_for(set(needs), gradients=False)
        self.sums = SharedSums()
        self.mask: torch.Tensor | None = None
        self._last: tuple | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]


    def _contributions(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Identity, not the data pointer: freed memory is reused by later tensors of the same shape.
        # Holding the tensor in ``_last`` keeps it alive, so ``is`` cannot match a newer tensor.
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            return self._last[2]
        with exact_16bit_products(x) as dtype:
            rows = token_rows(x.detach(), self.mask, dtype)
            # One batch in ``dtype``, the running sums in float64.
            result = {n: COLLECTORS[n].reduce(rows).double() for n in self.names}
        result[TOKENS] = torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=rows.device)
        self._last = (x, x._version, result)
        return result

    def _hook(self, module_name: str):
        def hook(module, args):
            self.sums.add(module_name, self._contributions(args[0]))
            # Returning None leaves the module input unchanged.

        return hook

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self._last = None
        self.sums.finish()  # the last batch's contributions become sums (the first batch's, without a copy)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None

    def reduce(self, accelerator: Accelerator, device: torch.device) -> None:
        """Sum the accumulators and token counts over processes (one reduction for all modules)."""
        def zeros(name: str) -> dict[str, torch.Tensor]:
            in_features, out_features = linear_shape(self.modules[name])
            return {**{n: COLLECTORS[n]().zeros(in_features, out_features, device) for n in self.names},
                    TOKENS: torch.zeros((), dtype=torch.float64, device=device)}

        self.sums.reduce(accelerator, list(self.modules), zeros)

    def result(self) -> Statistics:
        """Means over the accumulated tokens (modules that saw none get no entry); the sums are
        divided in place, so the hooks are spent."""
        return self.sums.statistics(list(self.modules))


def _forward_inputs(model: nn.Module, batch: dict) -> dict:
    """``batch`` without its labels (no loss is needed); an encoder-decoder model (T5) that builds
    its decoder's inputs from the labels gets them built, as its own forward would."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if (getattr(model.config, "is_encoder_decoder", False) and prepare is not None and "labels" in batch
            and "decoder_input_ids" not in batch and "decoder_inputs_embeds" not in batch):
        inputs["decoder_input_ids"] = prepare(labels=batch["labels"])
    return inputs


@torch.no_grad()
def input_statistics(
    model: nn.Module,
    data: Iterable[dict],
    modules: dict[str, nn.Module],
    needs: Iterable[str],
    accelerator: Accelerator | None = None,
    show_progress: bool = True,
) -> Statistics:
    """The input statistics ``needs`` of ``modules`` (name → module) over ``data``, on the accelerator,
    in one forward pass of the whole model where it is placed (a model on one device visits the
    accelerator and goes back); across processes the sums and token counts are added before
    dividing, so the result equals a single-process run."""
    from ..blocks import given_back, input_device, is_dispatched, kept_flags

    accelerator = accelerator or default_accelerator()
    with given_back(model), kept_flags(model):  # the pass runs in eval mode
        if not is_dispatched(model):
            model.to(accelerator.device)
        device = input_device(model, accelerator.device)
        model.eval()
        hooks = InputHooks(modules, needs)
        try:
            for batch in batches(data, accelerator, device, "activations", show_progress):
                hooks.new_batch(batch.get("attention_mask"))
                model(**_forward_inputs(model, batch))
        finally:
            hooks.remove()
    hooks.reduce(accelerator, accelerator.device)
    stats = hooks.result()
    if not stats.tokens:
        raise ValueError(EMPTY_DATA_MESSAGE)
    return stats
