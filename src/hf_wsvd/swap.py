"""Module swap: install factors into a model and turn it into a factorized checkpoint class."""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from .config import WSVDConfig
from .runtime.factorized_embedding import FactorizedEmbedding, output_scale
from .runtime.factorized_linear import FactorizedLinear
from .runtime.modeling_wsvd import (
    BASE_TYPE_KEY,
    CLASS_PREFIX,
    MODEL_TYPE,
    RECIPE_KEY,
    tie_to_factorized_embeddings,
    wsvd_config_class,
    wsvd_model_class,
)


def factors_like(module: torch.nn.Module, up: torch.Tensor, down: torch.Tensor) -> FactorizedLinear:
    """``FactorizedLinear(up, down)`` standing in for the linear-like ``module``: its bias, dtype,
    device and training mode."""
    dtype, device = module.weight.dtype, module.weight.device
    bias = module.bias.detach() if module.bias is not None else None
    layer = FactorizedLinear.from_factors(up.to(device, dtype), down.to(device, dtype), bias)
    layer.train(module.training)
    return layer


def replace_embedding_with_factors(
    model: torch.nn.Module, full_name: str, table: torch.Tensor, projection: torch.Tensor
) -> FactorizedEmbedding:
    """Replace the ``nn.Embedding`` ``full_name`` by ``FactorizedEmbedding(table, projection)``
    (``W ≈ table @ projection.T``), keeping its padding index, output scale, dtype and device; modules tied to
    it (an LM head) are rebuilt on the same factors, so the tie holds in the compressed model."""
    module = model.get_submodule(full_name)
    if not isinstance(module, torch.nn.Embedding):
        raise TypeError(f"{full_name!r} is a {type(module).__name__}, not an nn.Embedding")
    dtype, device = module.weight.dtype, module.weight.device
    embed_scale, scale_in_dtype = output_scale(module)
    layer = FactorizedEmbedding.from_factors(table.to(device, dtype), projection.to(device, dtype), module.padding_idx,
                                             embed_scale, scale_in_dtype)
    layer.train(module.training).requires_grad_(module.weight.requires_grad)
    model.set_submodule(full_name, layer)
    tie_to_factorized_embeddings(model)
    return layer


def attach_recipe(model: PreTrainedModel, recipe: WSVDConfig) -> PreTrainedModel:
    """Make ``model`` (already holding its ``FactorizedLinear`` layers) an instance of its
    ``Wsvd<Class>`` checkpoint class, with the recipe in its config, so that ``save_pretrained``
    writes a checkpoint the Auto classes rebuild."""
    config = model.config
    if config.model_type != MODEL_TYPE:
        base_type = config.model_type
        # The model gets its own copy of the top-level config, held by every module that held the old
        # one (sub-models share it): the object the caller also built other models from (a teacher
        # beside its student) keeps its class and fields; what it holds (sub-configs, id2label) is
        # shared, as sub-models' links to it need, and nothing here edits it. Both classes are
        # attribute-free subclasses, so switching keeps all state.
        shared, config = config, copy.copy(config)
        for module in model.modules():
            if getattr(module, "config", None) is shared:
                module.config = config
        config.__class__ = wsvd_config_class(type(config))
        # Configs read from a file carry model_type as an instance attribute that would hide the class's.
        config.__dict__.pop("model_type", None)
        setattr(config, BASE_TYPE_KEY, base_type)
    setattr(config, RECIPE_KEY, recipe.to_versioned_dict())
    if not type(model).__name__.startswith(CLASS_PREFIX):
        model.__class__ = wsvd_model_class(type(model))
    # Saved as it is held: transformers would write back the layout of the file the dense model came
    # from (a Hub Mixtral's experts one weight each), which no conversion turns back for this class.
    model._weight_conversions = []
    return model
