"""Save/load: lets the stock Auto classes open factorized checkpoints when hf_wsvd is imported,
and reports what a checkpoint holds."""

from __future__ import annotations

from dataclasses import dataclass

import transformers
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedConfig, PreTrainedModel

from .solvers import SOLVERS
from .runtime.factorized_embedding import FactorizedEmbedding
from .runtime.factorized_linear import FactorizedLinear
from .runtime.modeling_wsvd import (
    BASE_TYPE_KEY,
    CLASS_PREFIX,
    MODEL_TYPE,
    RECIPE_KEY,
    check_recipe,
    relative_module_name,
    wsvd_config_class,
    wsvd_model_class,
)


class WsvdCheckpointConfig(PreTrainedConfig):
    """Registered with ``AutoConfig`` for ``model_type="hf_wsvd"``: builds the ``Wsvd<Base>Config``
    of the checkpoint's base architecture (read from ``wsvd_base_model_type``)."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> PreTrainedConfig:
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
    for architecture in config_dict.get("architectures") or []:
        stock = getattr(transformers, architecture.removeprefix(CLASS_PREFIX), None)
        stock_type = getattr(getattr(stock, "config_class", None), "model_type", None)
        if stock_type and stock_type != base_type:
            raise ValueError(f"config.json {BASE_TYPE_KEY}={base_type!r} does not match its architecture "
                             f"{architecture!r} (model type {stock_type!r})")
    return base_type


def register_with_transformers() -> None:
    """Register the ``hf_wsvd`` model type with ``AutoConfig`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, WsvdCheckpointConfig, exist_ok=True)


@dataclass
class LayerSummary:
    name: str
    shape: tuple[int, int]  # (out, in); (vocab, hidden) for an embedding
    rank: int | None  # None: dense
    params: int
    dense_params: int


def summarize(model: nn.Module) -> list[LayerSummary]:
    """One row per factorized layer of ``model`` (linears and the input embeddings; a head tied to
    a factorized embedding shares its parameters and has no row): shape, rank, parameters now and
    when dense."""
    rows, tables = [], set()
    for name, module in model.named_modules():
        # Embeddings tied to another (T5's per-stack token embeddings) share its table: one row.
        if isinstance(module, FactorizedEmbedding) and id(module.weight) not in tables:
            tables.add(id(module.weight))
            rows.append(LayerSummary(
                relative_module_name(model, name), (module.num_embeddings, module.embedding_dim), module.rank,
                module.num_parameters(), module.num_embeddings * module.embedding_dim,
            ))
        if isinstance(module, FactorizedLinear):
            bias = module.out_features if module.bias is not None else 0
            rows.append(LayerSummary(
                relative_module_name(model, name), (module.out_features, module.in_features), module.rank,
                module.num_parameters(), module.in_features * module.out_features + bias,
            ))
    return rows


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters now, parameters of the dense model), counting shared tensors once."""
    now = sum(p.numel() for p in model.parameters())
    saved = sum(row.dense_params - row.params for row in summarize(model))
    return now, now + saved


def recipe_of(config: PreTrainedConfig) -> dict | None:
    """The stored ``WSVDConfig`` dict of a factorized checkpoint's config, else None."""
    return getattr(config, RECIPE_KEY, None) if config.model_type == MODEL_TYPE else None


def load_factorized(path: str, **kwargs) -> PreTrainedModel:
    """Load a factorized checkpoint with the class it was saved from (``config.architectures``)."""
    config = AutoConfig.from_pretrained(path, **kwargs)
    if config.model_type != MODEL_TYPE:
        raise ValueError(f"{path} is not an hf_wsvd checkpoint (model_type={config.model_type!r})")
    architecture = (config.architectures or ["?"])[0]
    base = getattr(transformers, architecture.removeprefix(CLASS_PREFIX), None)
    if base is None:
        raise ValueError(f"{path}: unknown architecture {architecture!r}")
    return wsvd_model_class(base).from_pretrained(path, config=config, **kwargs)
