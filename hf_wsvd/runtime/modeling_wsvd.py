"""Config and model classes of factorized checkpoints (``model_type: "hf_wsvd"``).

A compressed checkpoint keeps its base architecture (say ``BertForSequenceClassification``) and
records in ``config.json`` which modules are factorized and at which rank. Its model class is a
thin subclass of the stock one, ``Wsvd<BaseClass>``, that swaps those modules for empty
``FactorizedLinear`` layers before the weights load, so loading goes through the stock
``from_pretrained`` (``dtype=``, ``device_map=``, sharding, offload).

The custom ``model_type`` is what keeps a checkpoint from ever loading as a dense model with random
weights: stock transformers refuses an unknown model type unless it may run the code saved with the
checkpoint (this file, ``factorized_linear.py`` and ``factorized_embedding.py``, copied by
``save_pretrained``). With hf_wsvd imported, the Auto classes resolve it without remote code.

The recorded ranks may name an embedding (``nn.Embedding``) as well as linear layers: the type of
the module found at that name decides between ``FactorizedEmbedding`` and ``FactorizedLinear``.
Modules tied to a factorized embedding (an LM head, T5's per-stack token embeddings) are rebuilt on
the same factors and their factor names added to the model's tied-weights keys, so the checkpoint
stores the factors once and transformers re-ties them at load.

This file ships inside every compressed checkpoint, so it may import only torch and transformers.
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from .factorized_embedding import FactorizedEmbedding, FactorizedTiedHead
from .factorized_linear import FactorizedLinear, linear_shape

MODEL_TYPE = "hf_wsvd"
CLASS_PREFIX = "Wsvd"
# config.json keys: the compression recipe (with its per-module ranks) and the base model type.
RECIPE_KEY = "wsvd"
BASE_TYPE_KEY = "wsvd_base_model_type"
# Auto classes a factorized checkpoint can be loaded with, when its base architecture has them.
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForPreTraining",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice",
)

_config_classes: dict[type, type] = {}
_model_classes: dict[type, type] = {}


def relative_module_name(model: nn.Module, name: str) -> str:
    """``name`` relative to the base model, so that heads and bare models share module names."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + "."):
        return name[len(prefix) + 1 :]
    return name


def empty_factorized(module: nn.Module, rank: int) -> nn.Module:
    """An uninitialised factorized replacement of ``module`` at ``rank``, on its device and dtype:
    a ``FactorizedEmbedding`` for an ``nn.Embedding``, else a ``FactorizedLinear``."""
    device, dtype = module.weight.device, module.weight.dtype
    if isinstance(module, nn.Embedding):
        return FactorizedEmbedding(module.num_embeddings, module.embedding_dim, rank, module.padding_idx,
                                   device=device, dtype=dtype)
    in_features, out_features = linear_shape(module)
    return FactorizedLinear(in_features, out_features, rank, bias=module.bias is not None,
                            device=device, dtype=dtype)


def tie_to_factorized_embeddings(model: nn.Module) -> dict[str, str]:
    """Rebuild every module whose weight is tied to a ``FactorizedEmbedding`` on that embedding's
    factors (an embedding becomes a ``FactorizedEmbedding``, a linear head a
    ``FactorizedTiedHead``), and declare the projection tie next to the stock table tie.

    Returns the added ``{target: source}`` tied-weights keys (full parameter names)."""
    if not isinstance(model, PreTrainedModel):
        return {}
    added = {}
    for target, source in model.get_expanded_tied_weights_keys(all_submodels=True).items():
        if not (target.endswith(".weight") and source.endswith(".weight")):
            continue
        source_module, target_module = source[: -len(".weight")], target[: -len(".weight")]
        embedding = model.get_submodule(source_module)
        module = model.get_submodule(target_module)
        if not isinstance(embedding, FactorizedEmbedding) or module is embedding:
            continue
        if isinstance(module, (nn.Embedding, FactorizedEmbedding)):
            replacement = FactorizedEmbedding(embedding.num_embeddings, embedding.embedding_dim, embedding.rank,
                                              module.padding_idx, device="meta")
            replacement.weight, replacement.proj.weight = embedding.weight, embedding.proj.weight
        else:
            replacement = FactorizedTiedHead.tied_to(embedding, getattr(module, "bias", None))
        replacement.train(module.training)
        model.set_submodule(target_module, replacement)
        added[f"{target_module}.proj.weight"] = f"{source_module}.proj.weight"
    if added:
        # Instance-level: the stock class attribute stays untouched for dense models.
        model._tied_weights_keys = {**(model._tied_weights_keys or {}), **added}
        if hasattr(model, "all_tied_weights_keys"):
            model.all_tied_weights_keys.update(added)
    return added


def factorize_modules(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each module named in ``ranks`` (base-model-relative names) by an uninitialised
    ``FactorizedLinear`` or ``FactorizedEmbedding`` of that rank, on the module's device and
    dtype, then rebuild the modules tied to factorized embeddings on their factors."""
    matched = set()
    for name, module in list(model.named_modules()):
        key = relative_module_name(model, name)
        if key not in ranks:
            continue
        matched.add(key)
        if isinstance(module, (FactorizedLinear, FactorizedEmbedding)):
            continue
        model.set_submodule(name, empty_factorized(module, int(ranks[key])))
    tie_to_factorized_embeddings(model)
    if ranks and not matched:
        some = ", ".join(sorted(ranks)[:3])
        raise ValueError(
            f"none of the factorized modules recorded in the config ({some}, ...) exists in "
            f"{type(model).__name__}: the checkpoint does not belong to this architecture"
        )


def _supported_auto_classes(base_config_class: type) -> dict[str, type]:
    """Auto class name → stock model class, for the Auto classes that support this config."""
    found = {}
    for auto_name in AUTO_CLASSES:
        mapping = getattr(transformers, auto_name)._model_mapping
        if base_config_class in mapping:
            model_class = mapping[base_config_class]
            found[auto_name] = model_class[0] if isinstance(model_class, tuple) else model_class
    return found


class _WsvdConfigMixin:
    """Writes an ``auto_map`` covering every Auto class of the base architecture."""

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        module = __name__.rsplit(".", 1)[-1]
        auto_map = {"AutoConfig": f"{module}.{type(self).__name__}"}
        for auto_name, model_class in _supported_auto_classes(self._wsvd_base).items():
            auto_map[auto_name] = f"{module}.{CLASS_PREFIX}{model_class.__name__}"
        output["auto_map"] = auto_map
        return output


class _WsvdModelMixin:
    """Factorizes the modules listed in the config before the stock ``post_init``."""

    def post_init(self) -> None:
        recipe = getattr(self.config, RECIPE_KEY, None)
        if not isinstance(recipe, dict) or "ranks" not in recipe:
            raise ValueError(
                f"{type(self).__name__} needs config.{RECIPE_KEY}['ranks'] (the factorized modules "
                f"and their ranks); this config has {RECIPE_KEY}={recipe!r}"
            )
        factorize_modules(self, recipe["ranks"])
        super().post_init()


def wsvd_config_class(base: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
    """The ``Wsvd<Base>Config`` class for a stock config class; registers its model classes with
    the Auto classes on first use."""
    if base not in _config_classes:
        name = CLASS_PREFIX + base.__name__
        cls = type(name, (_WsvdConfigMixin, base), {
            "model_type": MODEL_TYPE, "_auto_class": "AutoConfig", "_wsvd_base": base,
            "__module__": __name__, "__qualname__": name,
        })
        _config_classes[base] = cls
        for auto_name, model_class in _supported_auto_classes(base).items():
            getattr(transformers, auto_name).register(cls, wsvd_model_class(model_class), exist_ok=True)
    return _config_classes[base]


def wsvd_model_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The ``Wsvd<Base>`` model class for a stock model class."""
    if base not in _model_classes:
        name = CLASS_PREFIX + base.__name__
        _model_classes[base] = type(name, (_WsvdModelMixin, base), {
            "config_class": wsvd_config_class(base.config_class),
            "__module__": __name__, "__qualname__": name,
        })
    return _model_classes[base]


def __getattr__(name: str) -> type:
    # Resolves the class names written in auto_map ("WsvdBertForSequenceClassification") when
    # transformers loads this file as remote code.
    base = getattr(transformers, name[len(CLASS_PREFIX):], None) if name.startswith(CLASS_PREFIX) else None
    if isinstance(base, type) and issubclass(base, PreTrainedConfig):
        return wsvd_config_class(base)
    if isinstance(base, type) and issubclass(base, PreTrainedModel):
        return wsvd_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
