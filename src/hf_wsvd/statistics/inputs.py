"""Statistics of the layers' inputs (``gram``, ``mean_abs``) and their token counts, from forward
pre-hooks, over real (non-padding) tokens."""

from __future__ import annotations

from typing import Iterable

import torch
from accelerate import Accelerator
from torch import nn

from ..runtime.factorized_linear import linear_shape
from ..runtime.modeling_wsvd import experts_shape, is_experts
from ..targets import unreached_advice
from ..tasks import labels_feed_decoder, scoring_inputs, shifted_right
from .collectors import COLLECTORS, collectors_for
from .names import EXPERT_GRAM
from .passes import batches, default_accelerator, exact_16bit_products, failing_together, sum_across_processes
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
    excluded; inputs whose leading shape differs from the mask count every position. Given the
    whole ``model``, when it is an encoder-decoder one, the modules outside its encoder (the
    decoder, an output head) take ``new_batch``'s ``decoder_mask`` instead, except where they read
    the encoder's states (cross-attention keys and values). Modules reading the same tensor (q/k/v
    projections) share one computation of each contribution and one copy of the sums
    (``SharedSums``). Accumulators live on the device of the module's input. An experts module
    (``runtime.modeling_wsvd.is_experts``) gets the per-expert Gram of its routed intermediate
    channels instead (``EXPERT_GRAM``, ``methods.expert_pruning.routed_grams``), whatever ``needs``.
    """

    # How a decoder's modules are handed the encoder's states (T5 and BART attention, BERT layers).
    ENCODER_STATES = ("encoder_hidden_states", "key_value_states")

    def __init__(self, modules: dict[str, nn.Module], needs: Iterable[str], model: nn.Module | None = None) -> None:
        self.modules = modules
        self.names = collectors_for(set(needs), gradients=False)
        self.sums = SharedSums()
        self.mask: torch.Tensor | None = None
        self.decoder_mask: torch.Tensor | None = None
        self._encoder_states: list[torch.Tensor] = []  # this batch's, each copy that reached a decoder module
        self._last: tuple | None = None
        encoder_decoder = model is not None and getattr(model.config, "is_encoder_decoder", False) \
            and hasattr(model, "get_encoder") and hasattr(model, "get_decoder")
        inside = {id(m) for m in model.get_encoder().modules()} if encoder_decoder else set()
        self._decoder_side = {name for name, m in modules.items() if encoder_decoder and id(m) not in inside}
        self._handles = [m.register_forward_pre_hook(self._expert_hook(name), with_kwargs=True) if is_experts(m)
                         else m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]
        if self._decoder_side:
            # The encoder's output, and what decoder modules are handed as such: projected to the
            # decoder's width by some models, copied to another device by a dispatched one.
            self._handles.append(model.get_encoder().register_forward_hook(
                lambda module, args, output: self._encoder_states.append(output[0])))
            self._handles += [module.register_forward_pre_hook(self._seen_encoder_states, with_kwargs=True)
                              for module in model.get_decoder().modules()]

    def _seen_encoder_states(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._encoder_states += [kwargs[key] for key in self.ENCODER_STATES if kwargs.get(key) is not None]

    def _contributions(self, x: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        # Identity, not the data pointer: freed memory is reused by later tensors of the same shape.
        # Holding the tensor in ``_last`` keeps it alive, so ``is`` cannot match a newer tensor.
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            return self._last[2]
        with exact_16bit_products(x) as dtype:
            rows = token_rows(x.detach(), mask, dtype)
            # One batch in ``dtype``, the running sums in float64.
            result = {n: COLLECTORS[n].reduce(rows).double() for n in self.names}
        result[TOKENS] = torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=rows.device)
        self._last = (x, x._version, result)
        return result

    def _hook(self, module_name: str):
        decoder = module_name in self._decoder_side

        def hook(module, args):
            x = args[0]
            encoder_side = not decoder or any(x is states for states in self._encoder_states)
            mask = self.mask if encoder_side else self.decoder_mask
            self.sums.add(module_name, self._contributions(x, mask))
            # Returning None leaves the module input unchanged.

        return hook

    def _expert_hook(self, module_name: str):
        from ..methods.expert_pruning import routed_grams

        def hook(module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            hidden, index, weights = [*args, *(kwargs[name] for name in names[len(args):])][:3]
            mask = self.mask
            real = mask.to(hidden.device).reshape(-1).bool() if mask is not None and mask.numel() == len(hidden) else None
            tokens = float(real.sum()) if real is not None else float(len(hidden))
            self.sums.add(module_name, {EXPERT_GRAM: routed_grams(module, hidden, index, weights, real),
                                        TOKENS: torch.tensor(tokens, dtype=torch.float64, device=hidden.device)})

        return hook

    def new_batch(self, mask: torch.Tensor | None, decoder_mask: torch.Tensor | None = None) -> None:
        self.mask, self.decoder_mask = mask, decoder_mask
        self._encoder_states.clear()
        self._last = None
        self.sums.finish()  # the last batch's contributions become sums (the first batch's, without a copy)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None
        self._encoder_states.clear()

    def reduce(self, accelerator: Accelerator, device: torch.device) -> None:
        """Sum the accumulators and token counts over processes (one reduction for all modules)."""
        def zeros(name: str) -> dict[str, torch.Tensor]:
            if is_experts(self.modules[name]):
                experts, channels, _ = experts_shape(self.modules[name])
                return {EXPERT_GRAM: torch.zeros(experts, channels, channels, dtype=torch.float64, device=device),
                        TOKENS: torch.zeros((), dtype=torch.float64, device=device)}
            in_features, out_features = linear_shape(self.modules[name])
            return {**{n: COLLECTORS[n]().zeros(in_features, out_features, device) for n in self.names},
                    TOKENS: torch.zeros((), dtype=torch.float64, device=device)}

        self.sums.reduce(accelerator, list(self.modules), zeros)

    def result(self) -> Statistics:
        """Means over the accumulated tokens (modules that saw none get no entry); the sums are
        divided in place, so the hooks are spent."""
        return self.sums.statistics(list(self.modules))


def _forward_inputs(model: nn.Module, batch: dict) -> tuple[dict, torch.Tensor | None]:
    """What the model is called with: ``batch`` without its labels (no loss is needed); and the mask
    of its decoder's real positions (None: every position, or not an encoder-decoder model). A
    sequence-to-sequence LM's decoder inputs are built from the labels where the batch has none
    (``tasks.scoring_inputs``), and the positions whose label is -100 are padding; a model that shifts its input ids into its decoder
    (BART, without labels or as a classifier) has the attention mask shifted with them."""
    inputs = scoring_inputs(model, batch)
    if not getattr(model.config, "is_encoder_decoder", False):
        return inputs, None
    decoder_ids = batch.get("decoder_input_ids", batch.get("decoder_inputs_embeds"))
    labels = batch.get("labels") if labels_feed_decoder(model) else None
    mask = batch.get("decoder_attention_mask")
    if mask is not None:
        return inputs, mask
    if labels is not None and labels.dim() == 2 and (decoder_ids is None or decoder_ids.shape[:2] == labels.shape[:2]):
        return inputs, labels != -100
    encoder_mask = batch.get("attention_mask")
    if decoder_ids is None and labels is None and encoder_mask is not None and encoder_mask.dim() == 2:
        # the decoder start token, then the ids one place right
        return inputs, torch.cat([torch.ones_like(encoder_mask[:, :1]), encoder_mask[:, :-1]], dim=1)
    return inputs, None


def decoder_tokens(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The token ids an encoder-decoder ``model``'s decoder reads for ``batch`` and the mask of the
    real ones (see ``_forward_inputs``): its decoder input ids, else the labels or (BART) the input
    ids shifted one place right behind the decoder start token; None for a model of another kind or
    decoder inputs given as embeddings."""
    if not getattr(model.config, "is_encoder_decoder", False) or "decoder_inputs_embeds" in batch:
        return None
    inputs, mask = _forward_inputs(model, batch)
    ids, config = inputs.get("decoder_input_ids"), model.config
    if ids is None:
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
        if start is None:  # the model's own shift fails without one: nothing the decoder reads to count
            return None
        ids = shifted_right(inputs.get("labels", batch["input_ids"]), start, config.pad_token_id)
    elif mask is None and config.pad_token_id is not None:  # decoder ids given alone: their padding is no token read
        mask = ids != config.pad_token_id
        mask[:, 0] = True  # the start token, which may be the padding token (T5)
    return ids, mask


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
        hooks = InputHooks(modules, needs, model)
        examples = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        try:
            with failing_together(accelerator, "activations"):
                for batch in batches(data, accelerator, device, "activations", show_progress):
                    examples += len(batch["input_ids"]) if "input_ids" in batch else 0
                    inputs, decoder_mask = _forward_inputs(model, batch)
                    hooks.new_batch(batch.get("attention_mask"), decoder_mask)
                    try:
                        model(**inputs)
                    except ValueError as error:  # T5, Marian: no decoder input without one of them
                        if not labels_feed_decoder(model) or {"labels", "decoder_input_ids",
                                                              "decoder_inputs_embeds"} & set(batch):
                            raise
                        raise ValueError(f"{type(model).__name__} needs each batch's labels (the target text's ids) or "
                                         f"decoder_input_ids to run its decoder ({error})") from error
        finally:
            hooks.remove()
    hooks.reduce(accelerator, accelerator.device)
    sum_across_processes(accelerator, [examples])
    stats = hooks.result()
    stats.examples = int(examples.item())
    if not stats.tokens:
        raise ValueError(EMPTY_DATA_MESSAGE)
    unreached = [name for name in modules if name not in stats.tokens]
    if unreached:
        decoder = ("an encoder-decoder model's decoder reads the positions whose label is not -100; "
                   if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else "")
        raise ValueError(f"no token of the calibration data reached {unreached[:3]} ({len(unreached)} target layers): "
                         f"{decoder}{unreached_advice(unreached, modules)}")
    return stats
