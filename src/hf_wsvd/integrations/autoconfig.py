"""The ``hf_wsvd`` model type in transformers' ``AutoConfig``, registered when this module is
imported; ``hf_wsvd/__init__`` imports it as soon as transformers is imported (``import hf_wsvd``
itself stays free of torch and transformers)."""

from __future__ import annotations

import transformers
from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedConfig

# = runtime.modeling_wsvd.MODEL_TYPE, repeated because this module must not import the package's
# torch modules, which may be half-imported when transformers is first imported (a test checks).
MODEL_TYPE = "hf_wsvd"


class WsvdCheckpointConfig(PreTrainedConfig):
    """Registered with ``AutoConfig`` for ``model_type="hf_wsvd"``: builds the ``Wsvd<Base>Config``
    of the checkpoint's base architecture (read from ``wsvd_base_model_type``)."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> PreTrainedConfig:
        from ..runtime.modeling_wsvd import RECIPE_KEY, check_recipe, wsvd_config_class
        from ..solvers import SOLVERS

        base_type = base_model_type(config_dict)
        loaded = wsvd_config_class(CONFIG_MAPPING[base_type]).from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded  # (config, unused) with return_unused_kwargs
        check_recipe(config)
        method = getattr(config, RECIPE_KEY)["method"]
        if method not in SOLVERS:
            raise ValueError(f"config.json {RECIPE_KEY}['method']={method!r} is not one of {sorted(SOLVERS)}")
        return loaded


def base_model_type(config_dict: dict) -> str:
    """The stock model type a factorized config records, checked against its architectures."""
    from ..runtime.modeling_wsvd import BASE_TYPE_KEY, stock_model_class

    base_type = config_dict.get(BASE_TYPE_KEY)
    if not isinstance(base_type, str) or not base_type:
        raise ValueError(f"config.json lacks {BASE_TYPE_KEY} (the base architecture's model_type, e.g. 'bert'): "
                         "the checkpoint's config is damaged")
    if base_type == MODEL_TYPE:
        raise ValueError(f"config.json {BASE_TYPE_KEY}={base_type!r} must name the base architecture "
                         "(e.g. 'bert'), not hf_wsvd itself")
    if base_type not in CONFIG_MAPPING:
        raise ValueError(f"config.json {BASE_TYPE_KEY}={base_type!r} is not a model type known to transformers "
                         f"{transformers.__version__} (a newer architecture: upgrade transformers)")
    architectures = config_dict.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise ValueError(f"config.json architectures={architectures!r} must be a list of model class names "
                         "(such as ['WsvdLlamaForCausalLM']): the checkpoint's config is damaged")
    for architecture in architectures or []:
        stock_type = getattr(getattr(stock_model_class(architecture), "config_class", None), "model_type", None)
        if stock_type and stock_type != base_type:
            raise ValueError(f"config.json {BASE_TYPE_KEY}={base_type!r} does not match its architecture "
                             f"{architecture!r} (model type {stock_type!r})")
    return base_type


def register_with_transformers() -> None:
    """Register the ``hf_wsvd`` model type with ``AutoConfig`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, WsvdCheckpointConfig, exist_ok=True)


register_with_transformers()
