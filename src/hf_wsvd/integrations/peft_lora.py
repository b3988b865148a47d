"""LoRA (peft) on factorized models.

Two ways to put adapters on a compressed model:

* on the inner linears of each ``FactorizedLinear`` — ``LoraConfig(target_modules=["up", "down"])``:
  stock peft, and merging keeps every rank;
* on each ``FactorizedLinear`` as a whole, through :class:`FactorizedLoraLayer`, registered with
  :func:`register_factorized_lora` (peft's experimental ``_register_custom_module``). Its merge is
  exact: the LoRA factors are appended to the layer's own (``up ← [up | s·B]``,
  ``down ← [down ; A]``), so rank ``r`` becomes ``r + lora_r``; :func:`merge_and_unload` then
  records the new ranks in ``config.wsvd`` so that the merged model saves and reloads.

peft does not save the custom-layer mapping in ``adapter_config.json``: reload adapters with
:func:`load_adapter`, which registers it again before ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from transformers import PreTrainedModel

from ..runtime.factorized_linear import FactorizedLinear, FullPrecisionLinear
from ..runtime.modeling_wsvd import CLASS_PREFIX, MODEL_TYPE, RECIPE_KEY, record_ranks
from .checkpoint import folder_model_type
from .quantization import is_quantized_tensor


def _set_factors(layer: FactorizedLinear, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give ``layer`` new factors (any rank up to min(in, out)), keeping dtype, device and
    ``requires_grad`` of the old ones."""
    rank = down.shape[0]
    if not 1 <= rank <= min(layer.in_features, layer.out_features):
        raise ValueError(
            f"merging gives rank {rank} for a {layer.out_features}x{layer.in_features} layer, above "
            f"min(in, out)={min(layer.in_features, layer.out_features)}: merge into the inner linears "
            "instead (target_modules=['up', 'down']) or export the model dense"
        )
    old_up, old_down = layer.up, layer.down
    kwargs = {"device": old_up.weight.device, "dtype": old_up.weight.dtype}
    new_up = nn.Linear(rank, layer.out_features, bias=old_up.bias is not None, **kwargs)
    new_down = nn.Linear(layer.in_features, rank, bias=False, **kwargs)
    with torch.no_grad():
        new_up.weight.copy_(up)
        new_down.weight.copy_(down)
        if bias is not None:
            new_up.bias.copy_(bias)
    for new, old in ((new_up, old_up), (new_down, old_down)):
        new.requires_grad_(old.weight.requires_grad)
        new.train(old.training)
    layer.up, layer.down = new_up, new_down


class _SizedLoraLinear(LoraLinear):
    """peft's LoRA layer on a base it does not know, which gives its sizes as ``nn.Linear`` does."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # peft's own lookup knows only its layer types and warns "Unsupported layer type" on others.
        return module.in_features, module.out_features


class FullPrecisionLoraLayer(_SizedLoraLinear):
    """peft LoRA layer for a ``FullPrecisionLinear`` (a factor a quantized checkpoint keeps in its
    dtype): stock LoRA, merged into its weight."""


class FactorizedLoraLayer(_SizedLoraLinear):
    """peft LoRA layer for a whole ``FactorizedLinear``: ``y = up(down(x)) + s·B(A(x))``.

    ``merge`` appends the LoRA factors to the layer's factors (exact, rank ``r → r + lora_r``);
    ``unmerge`` removes them again. DoRA and other LoRA variants are not supported.
    """

    @property
    def lora_variants(self) -> dict:
        return {(): None}

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        if any(is_quantized_tensor(factor.weight) for factor in (base.up, base.down)):
            raise ValueError("cannot merge LoRA into quantized factors: merge the adapter into the checkpoint loaded "
                             "without its quantization_config, then quantize the merged model")
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            dtype = base.up.weight.dtype
            scaling = self.scaling[name]
            lora_b = self.lora_B[name]
            up = torch.cat([base.up.weight, (lora_b.weight * scaling).to(dtype)], dim=1)
            down = torch.cat([base.down.weight, self.lora_A[name].weight.to(dtype)], dim=0)
            bias = base.up.bias
            if self.lora_bias[name]:
                if bias is None:
                    raise RuntimeError("cannot merge a LoRA bias into a layer without bias")
                bias = bias + (lora_b.bias * scaling).to(dtype)
            if safe_merge and not all(torch.isfinite(t).all() for t in (up, down) + ((bias,) if bias is not None else ())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            _set_factors(base, up.detach(), down.detach(), None if bias is None else bias.detach())
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            keep = base.rank - self.r[name]
            bias = base.up.bias
            if self.lora_bias[name]:
                bias = bias - (self.lora_B[name].bias * self.scaling[name]).to(bias.dtype)
            _set_factors(base, base.up.weight[:, :keep].detach(), base.down.weight[:keep].detach(),
                         None if bias is None else bias.detach())

    def __repr__(self) -> str:
        return "factorized_" + super().__repr__()


def register_factorized_lora(config: LoraConfig) -> LoraConfig:
    """Let ``config`` put LoRA on ``FactorizedLinear`` modules, and on the ``FullPrecisionLinear``
    factors a checkpoint quantized at load keeps in its dtype (peft's experimental custom-module
    API); returns ``config``. Needed again before ``PeftModel.from_pretrained``."""
    config._register_custom_module({FactorizedLinear: FactorizedLoraLayer, FullPrecisionLinear: FullPrecisionLoraLayer})
    return config


def factorized_module_names(model: nn.Module) -> list[str]:
    """Full names of the model's ``FactorizedLinear`` modules, usable as LoRA ``target_modules``."""
    return [name for name, module in model.named_modules() if isinstance(module, FactorizedLinear)]


def sync_recipe_ranks(model: PreTrainedModel) -> dict[str, int]:
    """Record in ``config.wsvd["ranks"]`` the current rank of each module it names (after a merge
    changed them; ``save_pretrained`` does it too, so the checkpoint reloads). Returns the ranks."""
    if not isinstance(getattr(model.config, RECIPE_KEY, None), dict):
        raise ValueError(f"{type(model).__name__} is not an hf_wsvd model (no config.{RECIPE_KEY})")
    return record_ranks(model)


def merge_and_unload(model: PeftModel, **kwargs) -> PreTrainedModel:
    """``model.merge_and_unload(**kwargs)`` with the factorized ranks recorded in the config."""
    merged = model.merge_and_unload(**kwargs)
    sync_recipe_ranks(merged)
    return merged


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around wrapping a model with peft: peft (0.21) reads transformers' deprecated
    ``is_gradient_checkpointing``, whose FutureWarning a user of hf_wsvd cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _compressed_base(config: LoraConfig) -> str | None:
    """What says the adapter of ``config`` was trained on an hf_wsvd model, if anything does: the
    base class peft records (only for adapters of no task type), or the base folder's config.json."""
    trained_on = (config.auto_mapping or {}).get("base_model_class") or ""
    if trained_on.startswith(CLASS_PREFIX):
        return trained_on
    base = config.base_model_name_or_path
    try:
        model_type = folder_model_type(base) if isinstance(base, str) and os.path.isdir(base) else None
    except ValueError:  # a damaged base config says nothing
        return None
    return f"{base}, model_type {model_type!r}" if model_type == MODEL_TYPE else None


def load_adapter(base: PreTrainedModel, adapter: str | os.PathLike, **kwargs) -> PeftModel:
    """``PeftModel.from_pretrained(base, adapter)`` with :class:`FactorizedLoraLayer` registered, so
    adapters trained on whole ``FactorizedLinear`` modules load (harmless for others)."""
    config = register_factorized_lora(LoraConfig.from_pretrained(os.fspath(adapter)))
    trained_on = _compressed_base(config)
    if trained_on and getattr(base.config, "model_type", None) != MODEL_TYPE:
        # its layers' shapes fit the dense model's too: peft would load it there without a word
        raise ValueError(f"the adapter {os.fspath(adapter)!r} was trained on a model compressed by hf_wsvd "
                         f"({trained_on}): load it onto that compressed checkpoint, not onto the dense "
                         f"{type(base).__name__}")
    with peft_wrapping():
        return PeftModel.from_pretrained(base, os.fspath(adapter), config=config, **kwargs)
