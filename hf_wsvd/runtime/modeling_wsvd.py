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

Layers cut by MLP pruning are recorded with their shape (``pruned``) and rebuilt as ``nn.Linear``
layers of that shape before the weights load. Layers stored quantized with a low-rank correction
of their quantization error (``residual``: name → rank) are rebuilt as ``LowRankCorrectedLinear``;
such a checkpoint loads only with its quantization config and quantized base weights.

Under a quantization config, a factor or pruned linear whose shape the quantizer cannot take (an
input size that is not a multiple of its group size) becomes a ``FullPrecisionLinear``, which no
quantizer converts, and keeps its dtype.

The recorded ranks may name an embedding (``nn.Embedding``) as well as linear layers: the type of
the module found at that name decides between ``FactorizedEmbedding`` and ``FactorizedLinear``.
Modules tied to a factorized embedding (an LM head, T5's per-stack token embeddings) are rebuilt on
the same factors and their factor names added to the model's tied-weights keys, so the checkpoint
stores the factors once and transformers re-ties them at load.

This file ships inside every compressed checkpoint, so it may import only torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from .factorized_embedding import FactorizedEmbedding, FactorizedTiedHead
from .factorized_linear import FactorizedLinear, FullPrecisionLinear, LowRankCorrectedLinear, linear_shape

logger = transformers.utils.logging.get_logger(__name__)

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


def factorize_modules(model: nn.Module, ranks: dict[str, int], pruned: dict[str, dict] | None = None,
                      residual: dict[str, int] | None = None) -> None:
    """Replace each module named in ``ranks`` (base-model-relative names) by an uninitialised
    ``FactorizedLinear`` or ``FactorizedEmbedding`` of that rank, each linear named in ``pruned``
    by an uninitialised ``nn.Linear`` of its recorded shape and each linear named in ``residual``
    by an uninitialised ``LowRankCorrectedLinear`` of that rank, on the module's device and dtype;
    then rebuild the modules tied to factorized embeddings on their factors."""
    pruned, residual = pruned or {}, residual or {}
    matched = set()
    for name, module in list(model.named_modules()):
        key = relative_module_name(model, name)
        if key in pruned:
            matched.add(key)
            model.set_submodule(name, _empty_pruned(module, key, pruned[key]))
        if key in residual:
            matched.add(key)
            if not isinstance(module, LowRankCorrectedLinear):
                in_features, out_features = linear_shape(module)
                model.set_submodule(name, LowRankCorrectedLinear(
                    in_features, out_features, int(residual[key]), bias=module.bias is not None,
                    device=module.weight.device, dtype=module.weight.dtype))
        if key not in ranks:
            continue
        matched.add(key)
        if isinstance(module, (FactorizedLinear, FactorizedEmbedding)):
            continue
        model.set_submodule(name, empty_factorized(module, int(ranks[key])))
    tie_to_factorized_embeddings(model)
    # A name whose top-level part this class lacks belongs to a head of another class (loading a
    # classifier checkpoint with AutoModel); any other unmatched name was edited or belongs to
    # another architecture.
    roots = {relative_module_name(model, name).split(".")[0] for name, _ in model.named_modules()}
    recorded = {**{n: "ranks" for n in ranks}, **{n: "pruned" for n in pruned}, **{n: "residual" for n in residual}}
    unknown = sorted(name for name in set(recorded) - matched if name.split(".")[0] in roots)
    if unknown or (recorded and not matched):
        name = (unknown or sorted(recorded))[0]
        raise ValueError(
            f"config.json {RECIPE_KEY}[{recorded[name]!r}] names {name!r}, which is no module of {type(model).__name__}: "
            "the config was edited or belongs to another architecture"
        )


def _empty_pruned(module: nn.Module, key: str, entry: dict) -> nn.Linear:
    """The uninitialised ``nn.Linear`` of the recorded pruned ``entry`` standing in for ``module``."""
    found = tuple(linear_shape(module)) if isinstance(module, nn.Linear) else None
    if found not in (tuple(entry["dense_shape"]), tuple(entry["shape"])):
        raise ValueError(f"config.json {RECIPE_KEY}['pruned'][{key!r}] records a linear of (in, out) "
                         f"{tuple(entry['dense_shape'])}, but the module there is {type(module).__name__} {found}: "
                         "the config was edited or belongs to another architecture")
    in_features, out_features = entry["shape"]
    return nn.Linear(in_features, out_features, bias=module.bias is not None, device=module.weight.device,
                     dtype=module.weight.dtype)


def check_pruned(pruned: object, where: str) -> dict[str, dict]:
    """``pruned`` after checking it maps names to ``{"shape": [in, out], "dense_shape": [in, out]}``
    of positive integers, no side larger than dense."""
    if not isinstance(pruned, dict):
        raise ValueError(f"{where} must map each pruned layer to its shapes; got {pruned!r}")
    for name, entry in pruned.items():
        shapes = [entry.get(k) if isinstance(entry, dict) else None for k in ("shape", "dense_shape")]
        valid = all(isinstance(s, list) and len(s) == 2 and all(type(v) is int and v > 0 for v in s) for s in shapes)
        if not valid or any(a > b for a, b in zip(*shapes)):
            raise ValueError(f"{where}[{name!r}]={entry!r} is not {{'shape': [in, out], 'dense_shape': [in, out]}} "
                             "of positive integers with shape <= dense_shape")
    return pruned


def check_recipe(config: PreTrainedConfig) -> tuple[dict[str, int], dict[str, dict], dict[str, int]]:
    """The ``ranks``, ``pruned`` shapes and ``residual`` ranks of a factorized config after a
    minimal check of its recipe and base type (this file cannot import hf_wsvd's full recipe
    validation): ranks and residual name → positive int maps, pruned (``check_pruned``), not all
    empty, ``method`` a string, ``param_ratio`` in (0, 1], ``wsvd_base_model_type`` the config
    class's base, and a quantization config wherever ``residual`` is set."""
    recipe = getattr(config, RECIPE_KEY, None)
    where = f"config.json {RECIPE_KEY!r}"
    if not isinstance(recipe, dict):
        raise ValueError(f"{where} must be the compression recipe (a dict with 'ranks'), not {recipe!r}")
    ranks = recipe.get("ranks")
    pruned = check_pruned(recipe.get("pruned", {}), f"{where}['pruned']")
    residual = recipe.get("residual", {})
    if not isinstance(residual, dict):
        raise ValueError(f"{where}['residual'] must map each corrected layer to its rank; got {residual!r}")
    if not isinstance(ranks, dict) or not (ranks or pruned or residual):
        raise ValueError(f"{where}['ranks'] must map each factorized module to its rank (or {where}['pruned'] list "
                         f"the pruned layers); got ranks={ranks!r}")
    for first, second in (("ranks", "pruned"), ("ranks", "residual"), ("pruned", "residual")):
        both = sorted(set(recipe.get(first) or {}) & set(recipe.get(second) or {}))
        if both:
            raise ValueError(f"{where} lists {both[0]!r} under both {first!r} and {second!r}: the config was edited")
    for key, entries in (("ranks", ranks), ("residual", residual)):
        for name, rank in entries.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"{where}[{key!r}][{name!r}]={rank!r} is not a positive integer")
    if residual and getattr(config, "quantization_config", None) is None:
        # Its base weights are stored quantized and its corrections fit that quantization's error:
        # without the quantizer they cannot load (nor would W + correction mean anything).
        raise ValueError(f"{where}['residual'] lists layers stored quantized with a low-rank correction, but the "
                         "config has no quantization_config: the checkpoint was edited (restore config.json)")
    if not isinstance(recipe.get("method"), str):
        raise ValueError(f"{where}['method']={recipe.get('method')!r} is not a method name")
    ratio = recipe.get("param_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"{where}['param_ratio']={ratio!r} is not a kept fraction in (0, 1]")
    base = getattr(type(config), "_wsvd_base", None)
    recorded = getattr(config, BASE_TYPE_KEY, None)
    if base is not None and recorded != base.model_type:
        raise ValueError(f"config.json {BASE_TYPE_KEY}={recorded!r} does not match the checkpoint's architecture "
                         f"({type(config).__name__}, model type {base.model_type!r})")
    return ranks, pruned, residual


FACTORIZED = (FactorizedLinear, FactorizedEmbedding, FactorizedTiedHead, LowRankCorrectedLinear)


def check_loaded(model: PreTrainedModel, info: dict) -> None:
    """After ``from_pretrained``: raise unless every factorized or pruned module got each of its
    tensors from the file at the right shape, no tensor in the file for a module of this class went
    unused (the factors of a module the recipe does not list), and those tensors are finite.
    ``info`` is the ``output_loading_info`` dict."""
    pruned = getattr(model.config, RECIPE_KEY, {}).get("pruned", {})
    factorized = {name: m for name, m in model.named_modules()
                  if isinstance(m, FACTORIZED) or relative_module_name(model, name) in pruned}
    owned = {f"{name}.{p}" for name, m in factorized.items() for p, _ in m.named_parameters(remove_duplicate=False)}
    missing = sorted(k for k in info["missing_keys"] if k in owned)
    # A tensor of the wrong shape inside the base model, even under ignore_mismatched_sizes=True
    # (which re-initializes it): a pruned layer whose record was deleted would otherwise load at its
    # dense shape with random weights. A head outside it may be re-initialized (a new label count).
    prefix = getattr(model, "base_model_prefix", "")
    inside = (lambda key: key.startswith(prefix + ".")) if prefix and hasattr(model, prefix) else (lambda key: True)
    mismatched = sorted(k[0] for k in info["mismatched_keys"] if k[0] in owned or inside(k[0]))
    if missing or mismatched:
        key = (missing or mismatched)[0]
        problem = "is missing from" if missing else "has the wrong shape in"
        raise ValueError(f"the tensor {key!r} {problem} the checkpoint's weights ({len(missing) + len(mismatched)} "
                         "tensors affected): the file is damaged or belongs to another recipe")
    modules = {relative_module_name(model, name) for name, _ in model.named_modules() if name}
    for key in sorted(info["unexpected_keys"]):
        parts = relative_module_name(model, key).split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules), None)
        if owner is not None:
            raise ValueError(f"the checkpoint's tensor {key!r} was not loaded: module {owner!r} is not factorized "
                             f"in config.json {RECIPE_KEY}['ranks'] nor listed in {RECIPE_KEY}['pruned'] (edited, or "
                             "another checkpoint's config)")
    for name, module in factorized.items():
        for pname, tensor in module.named_parameters():
            if tensor.device.type != "meta" and not all_finite(tensor):
                raise ValueError(f"the factor {name}.{pname} holds NaN or infinite values: the checkpoint is damaged")
        if isinstance(module, LowRankCorrectedLinear) and _plain_float(module.base):
            # The correction fits the quantization error of the stored base: on a full-precision
            # base (W + correction) it would be wrong.
            raise ValueError(f"{name}.base loaded unquantized, but its low-rank correction fits the error of its "
                             "quantization: load the checkpoint with its own quantization_config")


def _plain_float(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` holding a plain floating-point weight (unquantized)."""
    weight = getattr(module, "weight", None)
    return type(module) is nn.Linear and type(weight) is nn.Parameter and weight.is_floating_point()


def quantization_group_size(config: PreTrainedConfig) -> int | None:
    """The group size of the config's quantization (the first ``group_size`` in its dict: torchao's
    ``PerGroup`` granularity or ``group_size``, HQQ's weight parameters), else None."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    found = [quantization.to_dict() if hasattr(quantization, "to_dict") else quantization]
    while found:
        item = found.pop(0)
        if isinstance(item, dict):
            if type(item.get("group_size")) is int:
                return item["group_size"]
            found.extend(item.values())
        elif isinstance(item, (list, tuple)):
            found.extend(item)
    return None


def keep_unquantizable(model: PreTrainedModel) -> list[str]:
    """Under a quantization config with a group size, make each factor or pruned linear whose input
    size is not a multiple of it a ``FullPrecisionLinear`` (no quantizer converts it: it keeps its
    dtype), said in one log line. Returns their names."""
    group = quantization_group_size(model.config)
    if not group:
        return []
    pruned = getattr(model.config, RECIPE_KEY, {}).get("pruned", {})
    linears = []
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear):
            linears += [(f"{name}.down", module.down), (f"{name}.up", module.up)]
        elif relative_module_name(model, name) in pruned:
            linears.append((name, module))
    kept = [name for name, module in linears if type(module) is nn.Linear and module.in_features % group]
    for name in kept:
        module = model.get_submodule(name)
        model.set_submodule(name, FullPrecisionLinear(module.in_features, module.out_features, module.bias is not None,
                                                      device=module.weight.device, dtype=module.weight.dtype))
    if kept:
        logger.warning(f"hf_wsvd: {len(kept)} of the {len(linears)} factor and pruned linears stay unquantized in "
                       f"the model's dtype: their input size is not a multiple of the quantization group size "
                       f"{group} (first: {kept[0]})")
    return kept


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value ``tensor`` stores is finite, for plain tensors and quantized tensor
    subclasses alike."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        # A quantized wrapper subclass (torchao's Int8Tensor, IntxUnpackedToInt8Tensor, ...) implements
        # only the ops its kernels need, not isfinite; what it stores is its flattened components
        # (integer data, float scales and zero points), so a NaN or inf can only hide in those.
        names, _ = tensor.__tensor_flatten__()
        return all(all_finite(getattr(tensor, inner)) for inner in names)
    # Integer data (a quantizer's packed weights) is finite by construction.
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


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
    """Factorizes the modules listed in the config before the stock ``post_init``, and checks after
    loading that the file filled every factor (see :func:`check_loaded`)."""

    def post_init(self) -> None:
        factorize_modules(self, *check_recipe(self.config))
        keep_unquantizable(self)
        super().post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        check_loaded(model, info)
        return (model, info) if wants_info else model

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        # transformers 5.x records a quantizer's deserialization of a pre-quantized checkpoint
        # (torchao's) among the load-time weight conversions and fails to reverse it at save
        # (NotImplementedError), for stock models too. The quantizer already writes its own
        # serialized form (get_state_dict_and_metadata), so the irreversible conversions are left
        # out of the save.
        conversions = getattr(self, "_weight_conversions", None)
        if not conversions or getattr(self, "hf_quantizer", None) is None:
            return super().save_pretrained(*args, **kwargs)
        self._weight_conversions = [c for c in conversions if _reversible(c)]
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            self._weight_conversions = conversions


def _reversible(conversion: Any) -> bool:
    """Whether a transformers weight conversion can be undone at save."""
    try:
        conversion.reverse_transform()
    except NotImplementedError:
        return False
    return True


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
