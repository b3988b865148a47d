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
layers of that shape before the weights load. An attention cut by attention pruning is recorded
under ``attention`` (its head size, the dense one, its four projections and, for a rotary
attention, the kept rotary pairs): the projections are rebuilt at the cut size, the head size its
forward reshapes with set, and for a rotary attention a forward pre-hook cuts the rotary tables it
receives to the kept pairs. (Kept apart from ``pruned`` so that a loader that does not know
attention pruning fails on the shapes instead of running the dense head size.)
A mixture-of-experts module whose experts were cut by MLP pruning is recorded under ``experts``
(its kept intermediate channels, the same for every expert, and the dense number): its 3-D
``gate_up_proj`` / ``down_proj`` are rebuilt at that width, so the stock experts forward (eager,
grouped_mm, batched_mm) runs on the smaller tensors.
Layers stored quantized with a low-rank correction of their quantization error (``residual``:
name → rank) are rebuilt as ``LowRankCorrectedLinear``; such a checkpoint loads only with its
quantization config and quantized base weights.

Under a quantization config, a factor or pruned linear whose shape the quantizer cannot take (an
input size that is not a multiple of its group size) becomes a ``FullPrecisionLinear``, which no
quantizer converts, and keeps its dtype.

The recorded ranks may name an embedding (``nn.Embedding``) as well as linear layers: the type of
the module found at that name decides between ``FactorizedEmbedding`` and ``FactorizedLinear``.
Modules tied to a factorized embedding (an LM head, T5's per-stack token embeddings) are rebuilt on
the same factors and their factor names added to the model's tied-weights keys, so the checkpoint
stores the factors once and transformers re-ties them at load (an empty model about to load gets
them untied, so that a factor missing from the file is reported missing).

This file ships inside every compressed checkpoint, so it may import only torch and transformers.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import threading
from contextlib import contextmanager
from itertools import chain
from typing import Any, Iterable, Iterator

import torch
import transformers
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from .factorized_embedding import FactorizedEmbedding, FactorizedTiedHead
from .factorized_linear import (FactorizedLinear, FullPrecisionLinear, LowRankCorrectedLinear, linear_shape,
                                share_input_factors)

logger = transformers.utils.logging.get_logger(__name__)
# How transformers' load report names a weight its quantizer could not rebuild (5.x).
_DESTINED = re.compile(r"on tensors destined for (\S+?)\.?(?:\s|$)")

MODEL_TYPE = "hf_wsvd"
CLASS_PREFIX = "Wsvd"
# config.json keys: the compression recipe (with its per-module ranks) and the base model type.
RECIPE_KEY = "wsvd"
BASE_TYPE_KEY = "wsvd_base_model_type"
# The recipe key of the attentions whose head dimension was cut, and the attentions that can be:
# (q, k, v children of the attention module; its output projection, relative to the module's
# parent, "{}" standing for the module's own name; the attribute its forward reshapes heads with).
ATTENTION_KEY = "attention"
ATTENTION_LAYOUTS = (
    (("q_proj", "k_proj", "v_proj"), "{}.o_proj", "head_dim"),  # Llama, Mistral, Qwen2 (rotary)
    (("query", "key", "value"), "output.dense", "attention_head_size"),  # BERT, RoBERTa
)
# The recipe key of the experts modules whose experts keep fewer intermediate channels:
# name → {"channels": kept, "dense_channels": dense}.
EXPERTS_KEY = "experts"
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


def record_ranks(model: PreTrainedModel) -> dict[str, int]:
    """Write over ``config.wsvd["ranks"]`` the current rank of each module it names (a LoRA merged
    into whole factorized layers changes them); returns the ranks. Names it lacks are not added: a
    layer still wrapped by peft is found under another name (``….base_layer``)."""
    recipe = getattr(model.config, RECIPE_KEY, None)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("ranks"), dict):
        return {}
    current = {relative_module_name(model, name): int(module.rank)
               for name, module in model.named_modules() if isinstance(module, FactorizedLinear)}
    ranks = {name: current.get(name, rank) for name, rank in recipe["ranks"].items()}
    if ranks != recipe["ranks"]:
        setattr(model.config, RECIPE_KEY, {**recipe, "ranks": ranks})
    return ranks


def empty_factorized(module: nn.Module, rank: int) -> nn.Module:
    """An uninitialised factorized replacement of ``module`` at ``rank``, on its device and dtype:
    a ``FactorizedEmbedding`` for an ``nn.Embedding``, else a ``FactorizedLinear``."""
    device, dtype = module.weight.device, module.weight.dtype
    if isinstance(module, nn.Embedding):
        return FactorizedEmbedding.like(module, rank, device, dtype)
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
            replacement = FactorizedEmbedding.like(module, embedding.rank, "meta", embedding.weight.dtype)
        else:
            replacement = FactorizedTiedHead(embedding.embedding_dim, embedding.num_embeddings, embedding.rank,
                                             device="meta", dtype=embedding.weight.dtype)
            replacement.bias = getattr(module, "bias", None)
        if not embedding.weight.is_meta:
            replacement.weight, replacement.proj.weight = embedding.weight, embedding.proj.weight
        # else: an empty model about to load. Its ties are left to from_pretrained (the keys declared
        # below): a tensor shared already would count as loaded once its tied twin is marked
        # initialized, and a checkpoint lacking it would load with the tensor still on "meta".
        replacement.train(module.training)
        model.set_submodule(target_module, replacement)
        added[f"{target_module}.proj.weight"] = f"{source_module}.proj.weight"
    if added:
        # Instance-level: the stock class attribute stays untouched for dense models.
        model._tied_weights_keys = {**(model._tied_weights_keys or {}), **added}
        if hasattr(model, "all_tied_weights_keys"):
            model.all_tied_weights_keys.update(added)
    return added


def attention_layout(module: nn.Module) -> tuple[tuple[str, str, str], str, str] | None:
    """The entry of ``ATTENTION_LAYOUTS`` that ``module`` follows (its q/k/v children plain linears,
    an integer head-size attribute), else None."""
    for projections, output, attribute in ATTENTION_LAYOUTS:
        if all(type(getattr(module, p, None)) is nn.Linear for p in projections) \
                and type(getattr(module, attribute, None)) is int:
            return projections, output, attribute
    return None


def _cut_rotary(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a cut rotary attention: its rotary tables, to the kept pairs' features."""
    if kwargs.get("position_embeddings") is None:
        raise ValueError(f"{type(module).__name__} was called without position_embeddings: its head dimension was "
                         "cut by attention pruning, which needs the rotary tables passed by keyword")
    cos, sin = kwargs["position_embeddings"]
    if cos.shape[-1] != module.wsvd_dense_head_dim:
        raise ValueError(f"{type(module).__name__}: rotary tables of {cos.shape[-1]} features for a head dimension of "
                         f"{module.wsvd_dense_head_dim}: attention pruning needs rotary over the whole head")
    index = module.wsvd_rotary_index
    if index.device != cos.device:  # moved once: a copy in every step would sync decoding and break CUDA-graph capture
        index = module.wsvd_rotary_index = index.to(cos.device)
    return args, {**kwargs, "position_embeddings": (cos.index_select(-1, index), sin.index_select(-1, index))}


def cut_shape(role: str, shape: tuple[int, int], head_dim: int, dense_head_dim: int) -> tuple[int, int]:
    """The (in, out) of projection ``role`` (q, k, v: heads on the output side; o: on the input
    side) of dense (in, out) ``shape`` once its heads keep ``head_dim`` of ``dense_head_dim``."""
    in_features, out_features = shape
    if role == "o":
        return in_features // dense_head_dim * head_dim, out_features
    return in_features, out_features // dense_head_dim * head_dim


def cut_heads(attention: nn.Module, head_dim: int, rotary: list[int] | None) -> None:
    """Set the head size the stock ``attention`` forward reshapes with to ``head_dim``; for a
    rotary attention (``rotary``: the kept pairs) also cut the rotary tables it receives to the
    kept pairs' features (``rotate_half`` layout: first halves, then second halves) with a forward
    pre-hook. The projections are replaced apart."""
    if hasattr(attention, "wsvd_dense_head_dim"):
        raise ValueError(f"{type(attention).__name__}: its head dimension was already cut")
    attribute = attention_layout(attention)[2]
    dense = getattr(attention, attribute)
    setattr(attention, attribute, head_dim)
    attention.wsvd_dense_head_dim = dense
    if rotary is None:
        return
    # Saved with the weights (transformers re-creates non-persistent buffers empty at load), and a
    # loader that does not know it finds an unexpected tensor instead of running the dense head size.
    device = next((p.device for p in attention.parameters() if p.device.type != "meta"), torch.device("cpu"))
    index = torch.tensor(list(rotary) + [r + dense // 2 for r in rotary], dtype=torch.long, device=device)
    attention.register_buffer("wsvd_rotary_index", index)
    attention.wsvd_rotary_hook = attention.register_forward_pre_hook(_cut_rotary, with_kwargs=True)


def _cut_attention_modules(model: nn.Module, prefix: str, key: str, entry: dict) -> None:
    """Rebuild the attention ``key`` (base-model-relative; ``prefix`` + key is its full name) as
    ``entry`` records it: its four projections uninitialised ``nn.Linear`` layers of the cut size,
    its head size cut (``cut_heads``)."""
    attention = model.get_submodule(prefix + key)
    layout = attention_layout(attention)
    dense = getattr(attention, layout[2]) if layout else None
    names = entry["projections"]
    if getattr(attention, "wsvd_dense_head_dim", None) == entry["dense_head_dim"] and dense == entry["head_dim"]:
        # Already cut as recorded: transformers' generic task heads (sequence and token
        # classification, question answering) build their base model through AutoModel, whose own
        # post_init has rebuilt it before the task model's.
        return
    modules = [model.get_submodule(prefix + n) if _has_module(model, prefix + n) else None for n in names]
    if dense != entry["dense_head_dim"] or not all(type(m) is nn.Linear for m in modules) \
            or (entry.get("rotary") and max(entry["rotary"]) >= dense // 2):
        raise ValueError(f"config.json {RECIPE_KEY}[{ATTENTION_KEY!r}][{key!r}] records an attention of head dimension "
                         f"{entry['dense_head_dim']} with projections {names}, but the module there is "
                         f"{type(attention).__name__} (head size {dense}): the config was edited or belongs to another "
                         "architecture")
    for role, name, old in zip("qkvo", names, modules):
        in_features, out_features = cut_shape(role, (old.in_features, old.out_features), entry["head_dim"], dense)
        layer = nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                          dtype=old.weight.dtype)
        layer.train(old.training)
        model.set_submodule(prefix + name, layer)
    cut_heads(attention, entry["head_dim"], entry.get("rotary"))


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module (``use_experts_implementation``: one 3-D
    weight per projection, experts first)."""
    down = getattr(module, "down_proj", None)
    return hasattr(module, "has_gate") and isinstance(down, torch.Tensor) and down.dim() == 3


def experts_unsupported(module: nn.Module) -> str | None:
    """Why the experts of ``module`` (``is_experts``) cannot keep fewer intermediate channels, or
    None: the layout cut is [gate; up] concatenated in one E × 2I × H ``gate_up_proj`` with the
    default gate act(gate)·up, an E × H × I ``down_proj``, no bias, no norm after the experts."""
    from transformers.integrations import moe

    flags = {"has_bias": "biases", "is_transposed": "transposed weights", "has_post_expert_norm": "a norm after "
             "the experts"}
    found = next((why for flag, why in flags.items() if getattr(module, flag, False)), None)
    if found is None and not getattr(module, "has_gate", False):
        found = "no gate projection"
    if found is None and not getattr(module, "is_concatenated", True):
        found = "interleaved gate/up rows"
    if found is None and getattr(type(module), "_apply_gate", None) is not getattr(moe, "_default_apply_gate", None):
        found = "a gate of its own (_apply_gate)"
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if found is None and not (isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3 and down.dim() == 3
                              and gate_up.shape[0] == down.shape[0] and gate_up.shape[1] == 2 * down.shape[2]
                              and gate_up.shape[2] == down.shape[1]):
        found = "weights of another layout than gate_up_proj (E, 2I, H) and down_proj (E, H, I)"
    return f"{type(module).__name__} has {found}" if found else None


def experts_shape(module: nn.Module) -> tuple[int, int, int]:
    """(experts, intermediate channels, hidden size) of a supported experts ``module``."""
    experts, hidden, channels = module.down_proj.shape
    return experts, channels, hidden


def set_experts(module: nn.Module, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Give the experts ``module`` the weights ``gate_up`` (E × 2k × H) and ``down`` (E × H × k) of
    k intermediate channels, trainable as its old ones were."""
    trainable = module.down_proj.requires_grad
    module.gate_up_proj = nn.Parameter(gate_up, requires_grad=trainable)
    module.down_proj = nn.Parameter(down, requires_grad=trainable)
    if hasattr(module, "intermediate_dim"):  # what the stock class records of its width (no forward reads it)
        module.intermediate_dim = down.shape[2]


def _cut_experts_module(module: nn.Module, key: str, entry: dict) -> None:
    """Rebuild the experts ``module`` (config.json's ``experts`` names it ``key``) at the recorded
    width, uninitialised, on its device and dtype."""
    where = f"config.json {RECIPE_KEY}[{EXPERTS_KEY!r}][{key!r}]"
    why = experts_unsupported(module) if is_experts(module) else f"{type(module).__name__} is no experts module"
    if why is not None:
        raise ValueError(f"{where} names a module whose experts cannot be cut ({why}): the config was edited or "
                         "belongs to another architecture")
    experts, channels, hidden = experts_shape(module)
    if channels == entry["channels"]:
        return
    if channels != entry["dense_channels"]:
        raise ValueError(f"{where} records experts of {entry['dense_channels']} intermediate channels, but "
                         f"{type(module).__name__} there has {channels}: the config was edited or belongs to another "
                         "architecture")
    kept, like = entry["channels"], {"device": module.down_proj.device, "dtype": module.down_proj.dtype}
    set_experts(module, torch.empty(experts, 2 * kept, hidden, **like), torch.empty(experts, hidden, kept, **like))


def check_experts(experts: object, where: str) -> dict[str, dict]:
    """``experts`` after checking it maps names to ``{"channels": k, "dense_channels": n}`` with 0 < k <= n."""
    if not isinstance(experts, dict):
        raise ValueError(f"{where} must map each cut experts module to its channels; got {short_repr(experts)}")
    for name, entry in experts.items():
        kept, dense = [entry.get(k) if isinstance(entry, dict) else None for k in ("channels", "dense_channels")]
        if not (type(kept) is int and type(dense) is int and 0 < kept <= dense):
            raise ValueError(f"{where}[{name!r}]={short_repr(entry)} is not {{'channels': k, 'dense_channels': n}} "
                             "with 0 < k <= n")
    return experts


def reshaped_layers(recipe: dict) -> set[str]:
    """The base-model-relative names of the modules whose shape the recipe changed: the layers cut
    by MLP pruning, the projections of the cut attentions and the cut experts modules."""
    cut = {name for entry in recipe.get(ATTENTION_KEY, {}).values() for name in entry["projections"]}
    return set(recipe.get("pruned", {})) | cut | set(recipe.get(EXPERTS_KEY, {}))


def dense_shape(recipe: dict, key: str, module: nn.Module) -> tuple[int, int] | None:
    """The dense (in, out) of ``module``, the plain linear named ``key`` (base-model-relative),
    when the recipe changed its shape; else None."""
    entry = recipe.get("pruned", {}).get(key)
    if entry is not None:
        return tuple(entry["dense_shape"])
    for entry in recipe.get(ATTENTION_KEY, {}).values():
        if key in entry["projections"]:
            role = "qkvo"[entry["projections"].index(key)]
            return cut_shape(role, (module.in_features, module.out_features), entry["dense_head_dim"],
                             entry["head_dim"])
    return None


def factorize_modules(model: nn.Module, ranks: dict[str, int], pruned: dict[str, dict] | None = None,
                      attention: dict[str, dict] | None = None, residual: dict[str, int] | None = None,
                      experts: dict[str, dict] | None = None) -> None:
    """Replace each module named in ``ranks`` (base-model-relative names) by an uninitialised
    ``FactorizedLinear`` or ``FactorizedEmbedding`` of that rank, each linear named in ``pruned``
    by an uninitialised ``nn.Linear`` of its recorded shape, cut the head dimension of each
    attention named in ``attention`` (its projections rebuilt at the cut size, ``cut_heads``) and
    replace each linear named in ``residual`` by an uninitialised ``LowRankCorrectedLinear`` of that
    rank, and rebuild each experts module named in ``experts`` at its kept width, on the module's
    device and dtype; then rebuild the modules tied to factorized embeddings on their factors."""
    pruned, attention, residual, experts = pruned or {}, attention or {}, residual or {}, experts or {}
    matched = set()
    for name, module in list(model.named_modules()):
        key = relative_module_name(model, name)
        if key in experts:
            matched.add(key)
            _cut_experts_module(module, key, experts[key])
        if key in attention:
            matched.add(key)
            _cut_attention_modules(model, name[: len(name) - len(key)], key, attention[key])
        if key in pruned:
            matched.add(key)
            model.set_submodule(name, _empty_pruned(module, key, pruned[key]))
        if key in residual:
            matched.add(key)
            _check_linear(module, key, "residual")
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
        if not isinstance(module, nn.Embedding):
            _check_linear(module, key, "ranks")
        model.set_submodule(name, empty_factorized(module, int(ranks[key])))
    tie_to_factorized_embeddings(model)
    # A name whose top-level part this class lacks belongs to a head of another class (loading a
    # classifier checkpoint with AutoModel); any other unmatched name was edited or belongs to
    # another architecture.
    roots = {relative_module_name(model, name).split(".")[0] for name, _ in model.named_modules()}
    recorded = {**{n: "ranks" for n in ranks}, **{n: "pruned" for n in pruned},
                **{n: ATTENTION_KEY for n in attention}, **{n: "residual" for n in residual},
                **{n: EXPERTS_KEY for n in experts}}
    unknown = sorted(name for name in set(recorded) - matched if name.split(".")[0] in roots)
    if unknown or (recorded and not matched):
        name = (unknown or sorted(recorded))[0]
        raise ValueError(
            f"config.json {RECIPE_KEY}[{recorded[name]!r}] names {name!r}, which is no module of {type(model).__name__}: "
            "the config was edited or belongs to another architecture"
        )


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hand-edited list of every layer is no error message)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_attention(attention: object, where: str) -> dict[str, dict]:
    """``attention`` after checking it maps names to ``{"head_dim": d', "dense_head_dim": d,
    "projections": [q, k, v, o names], "rotary": [d'/2 distinct pair indices, ascending] (rotary
    attentions only)}`` with 0 < d' ≤ d, even where rotary."""
    if not isinstance(attention, dict):
        raise ValueError(f"{where} must map each cut attention to its head dimensions; got {short_repr(attention)}")
    for name, entry in attention.items():
        values = [entry.get(k) if isinstance(entry, dict) else None
                  for k in ("head_dim", "dense_head_dim", "projections", "rotary")]
        head_dim, dense, projections, rotary = values
        valid = (all(type(v) is int and v > 0 for v in (head_dim, dense)) and head_dim <= dense
                 and isinstance(projections, list) and len(projections) == 4
                 and all(isinstance(p, str) and p for p in projections))
        if rotary is not None:
            valid = valid and head_dim % 2 == 0 and dense % 2 == 0 and isinstance(rotary, list) \
                and all(type(r) is int and r >= 0 for r in rotary) and len(rotary) == head_dim // 2 \
                and rotary == sorted(set(rotary))
        if not valid:
            raise ValueError(f"{where}[{name!r}]={short_repr(entry)} is not {{'head_dim': d', 'dense_head_dim': d, "
                             "'projections': [q, k, v, o], 'rotary': [d'/2 ascending distinct pair indices] (rotary "
                             "attentions)}} with 0 < d' <= d, both even where rotary")
    return attention


def _check_linear(module: nn.Module, key: str, field: str) -> None:
    """Raise unless ``module``, which config.json's ``field`` names ``key``, is a linear layer."""
    try:
        linear_shape(module)
    except TypeError:
        raise ValueError(f"config.json {RECIPE_KEY}[{field!r}] names {key!r}, a {type(module).__name__}, not a linear "
                         "layer (or input embedding) that compression replaces: the config was edited or belongs to "
                         "another architecture") from None


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
        raise ValueError(f"{where} must map each pruned layer to its shapes; got {short_repr(pruned)}")
    for name, entry in pruned.items():
        shapes = [entry.get(k) if isinstance(entry, dict) else None for k in ("shape", "dense_shape")]
        valid = all(isinstance(s, list) and len(s) == 2 and all(type(v) is int and v > 0 for v in s) for s in shapes)
        if not valid or any(a > b for a, b in zip(*shapes)):
            raise ValueError(f"{where}[{name!r}]={short_repr(entry)} is not {{'shape': [in, out], 'dense_shape': "
                             "[in, out]}} of positive integers with shape <= dense_shape")
    return pruned


def check_recipe(config: PreTrainedConfig
                 ) -> tuple[dict[str, int], dict[str, dict], dict[str, dict], dict[str, int], dict[str, dict]]:
    """The ``ranks``, ``pruned`` shapes, cut ``attention``, ``residual`` ranks and cut ``experts`` of a factorized
    config after a minimal check of its recipe and base type (this file cannot import hf_wsvd's
    full recipe validation): ranks and residual name → positive int maps, pruned
    (``check_pruned``), attention (``check_attention``), experts (``check_experts``), not all empty, ``method`` a string,
    ``param_ratio`` in (0, 1], ``wsvd_base_model_type`` the config class's base, and a
    quantization config wherever ``residual`` is set."""
    recipe = getattr(config, RECIPE_KEY, None)
    where = f"config.json {RECIPE_KEY!r}"
    if not isinstance(recipe, dict):
        raise ValueError(f"{where} must be the compression recipe (a dict with 'ranks'), not {short_repr(recipe)}")
    ranks = recipe.get("ranks")
    pruned = check_pruned(recipe.get("pruned", {}), f"{where}['pruned']")
    attention = check_attention(recipe.get(ATTENTION_KEY, {}), f"{where}[{ATTENTION_KEY!r}]")
    experts = check_experts(recipe.get(EXPERTS_KEY, {}), f"{where}[{EXPERTS_KEY!r}]")
    residual = recipe.get("residual", {})
    if not isinstance(residual, dict):
        raise ValueError(f"{where}['residual'] must map each corrected layer to its rank; got {short_repr(residual)}")
    if not isinstance(ranks, dict) or not (ranks or pruned or attention or residual or experts):
        raise ValueError(f"{where}['ranks'] must map each factorized module to its rank (or {where}['pruned'] list "
                         f"the pruned layers); got ranks={short_repr(ranks)}")
    cut = {name: None for entry in attention.values() for name in entry["projections"]}
    sections = {"ranks": ranks, "pruned": pruned, ATTENTION_KEY: cut, "residual": residual}
    for first, second in (("ranks", "pruned"), ("ranks", ATTENTION_KEY), ("pruned", ATTENTION_KEY),
                          ("ranks", "residual"), ("pruned", "residual"), (ATTENTION_KEY, "residual")):
        both = sorted(set(sections[first]) & set(sections[second]))
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
    return ranks, pruned, attention, residual, experts


FACTORIZED = (FactorizedLinear, FactorizedEmbedding, FactorizedTiedHead, LowRankCorrectedLinear)
# Names under which quantizers store a weight's parts: torchao (``_weight_qdata``), bitsandbytes
# 4-bit (the weight's ``absmax``, ``quant_map``, ``quant_state.*``) and 8-bit (``SCB``).
_QUANTIZED_KEY = re.compile(r"\._weight_qdata$|\.weight\.(absmax|nested_absmax|quant_map|quant_state\..+)$|\.SCB$")
# An expert's own weight (the Hub's mixture-of-experts layout, "...experts.3.w1.weight"), which
# transformers fuses into the experts module's 3-D tensors for the stock classes only.
_PER_EXPERT_KEY = re.compile(r"\.experts\.\d+\.")


def check_loaded(model: PreTrainedModel, info: dict, ignore_mismatched_sizes: bool = False) -> None:
    """After ``from_pretrained``: raise unless every factorized or pruned module got each of its
    tensors from the file at the right shape (every tensor, unless ``ignore_mismatched_sizes`` lets
    a head outside the base model be re-initialized), no tensor in the file for a module of this
    class went unused (the factors of a module the recipe does not list), and every loaded weight is
    finite. ``info`` is the ``output_loading_info`` dict."""
    reshaped = reshaped_layers(getattr(model.config, RECIPE_KEY, {}))
    factorized = {name: m for name, m in model.named_modules()
                  if isinstance(m, FACTORIZED) or relative_module_name(model, name) in reshaped}
    owned = {f"{name}.{p}" for name, m in factorized.items() for p, _ in m.named_parameters(remove_duplicate=False)}
    absent = unloaded(model, [k for k in info["missing_keys"] if k not in owned])
    # A tensor of the wrong shape inside the base model, even under ignore_mismatched_sizes=True
    # (which re-initializes it): a pruned layer whose record was deleted would otherwise load at its
    # dense shape with random weights. A head outside it may be re-initialized (a new label count).
    mismatched = sorted((tuple(k) for k in info["mismatched_keys"] if not ignore_mismatched_sizes or k[0] in owned
                         or _in_base_model(model, k[0])), key=lambda k: k[0])
    # The file stores a tie once, under its source: name that tensor before the ties' other ends.
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = sorted((k for k in info["missing_keys"] if k in owned), key=lambda k: (k in tied, k))
    # Before the missing and mismatched tensors these leave (torchao stores other names, bitsandbytes
    # packed data under the weight's own name and its scales beside it).
    quantized = next((k for k in sorted(info["unexpected_keys"]) if _QUANTIZED_KEY.search(k)), None)
    if quantized is not None and getattr(model, "hf_quantizer", None) is None:
        raise ValueError(f"the weights file holds quantized tensors (such as {quantized!r}), but config.json has no "
                         "quantization_config that transformers reads them with (missing, or of an unknown "
                         "quant_method): the config was edited; restore its quantization_config")
    per_expert = next((k for k in sorted(info["unexpected_keys"]) if _PER_EXPERT_KEY.search(k)), None)
    if per_expert is not None and any(is_experts(module) for module in model.modules()):
        raise ValueError(f"the weights file stores each expert's weights on their own (such as {per_expert!r}): the "
                         "Hub's layout, in which hf_wsvd releases before recipe_version 5 saved a mixture-of-experts "
                         "model loaded from the Hub and which this class does not fuse; compress the dense model again")
    if missing:
        stored = sorted(info["unexpected_keys"])
        # e.g. a file of another recipe, or with other names
        instead = f" (it holds {stored[0]!r}, which this model has no place for)" if stored else ""
        why = "the file is damaged or belongs to another recipe"
        tops = {name for name, _ in model.named_children()}
        ours = type(model).__name__.removeprefix(CLASS_PREFIX)
        saved = (getattr(model.config, "architectures", None) or [ours])[0].removeprefix(CLASS_PREFIX)
        if stored and saved != ours and all(key.split(".")[0] not in tops for key in stored):
            # another class's layout of the same weights, not a damaged file
            why = (f"{ours} keeps its layers under other names than {saved}, the class the checkpoint was saved as: "
                   "load it as that class (its Auto class)")
        raise ValueError(f"the tensor {missing[0]!r} is missing from the checkpoint's weights{instead} ({len(missing)} "
                         f"tensors affected): {why}")
    # A quantizer that loads its own tensors (torchao) replaces a weight whole, whatever its shape:
    # the load's report then lists no mismatch for an edited rank or a damaged quantized tensor.
    mismatched = mismatched or [(".".join(filter(None, (name, path, "weight"))), shape, (sub.out_features, sub.in_features))
                                for name, module in factorized.items() for path, sub in module.named_modules()
                                if isinstance(sub, nn.Linear) and sub.weight.device.type != "meta"
                                and (shape := _logical_shape(sub.weight)) != (sub.out_features, sub.in_features)]
    # A quantized weight's scales or zero points of another shape than its data and block size give
    # would broadcast (one scale for every row) or fail in the first forward.
    mismatched = mismatched or _misshapen_parts(model)
    if mismatched:
        key, *shapes = mismatched[0]
        found = f": {tuple(shapes[0])} in the file, {tuple(shapes[1])} in the model" if len(shapes) == 2 else ""
        why = (f"the file is damaged, or config.json's {RECIPE_KEY} ranks or pruned, attention or experts shapes were "
               "edited"
               if key in owned or _in_base_model(model, key) else "pass ignore_mismatched_sizes=True to re-initialize a head of "
               "another size")
        raise ValueError(f"the tensor {key!r} has the wrong shape in the checkpoint's weights{found} "
                         f"({len(mismatched)} tensors affected); {why}")
    modules = {relative_module_name(model, name): module for name, module in model.named_modules() if name}
    compressed = {relative_module_name(model, name) for name in factorized}
    for key in sorted(info["unexpected_keys"]):
        parts = relative_module_name(model, key).split(".")
        depth = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules), None)
        if depth is None:
            continue
        owner, rest = ".".join(parts[:depth]), parts[depth:]
        # What a recipe's record makes: a linear's factors ("up.weight") or a cut attention's buffer.
        linear = isinstance(modules[owner], nn.Linear) or type(modules[owner]).__name__ == "Conv1D"
        recorded = (len(rest) == 2 and linear) or (len(rest) == 1 and rest[0].startswith("wsvd_"))
        if any(owner == c or owner.startswith(c + ".") for c in compressed) or not recorded:
            # not a compressed layer's factors that the recipe lost: a tensor this model has no place for
            raise ValueError(f"the checkpoint's tensor {key!r} has no place in this model (module {owner!r} has no "
                             f"{'.'.join(parts[depth:])!r}): the weights file holds extra tensors, or config.json's "
                             "sizes were edited")
        raise ValueError(f"the checkpoint's tensor {key!r} was not loaded: module {owner!r} is not factorized "
                         f"in config.json {RECIPE_KEY}['ranks'] nor listed in {RECIPE_KEY}['pruned'], "
                         f"{RECIPE_KEY}[{EXPERTS_KEY!r}] or "
                         f"{RECIPE_KEY}[{ATTENTION_KEY!r}] (edited, or another checkpoint's config)")
    if absent:
        raise random_weights_error(absent)
    stranded = next((name for name, tensor in chain(model.named_parameters(), model.named_buffers())
                     if tensor.is_meta and not _offloaded(model, name)), None)
    if stranded is not None:
        # Whatever the load's report said (a tie can hide a missing tensor from it): a tensor left on
        # "meta" has no values, and the model would compute garbage with it.
        raise ValueError(f"the tensor {stranded!r} was not filled by the checkpoint's weights (it has no values): the "
                         "file is damaged or belongs to another recipe")
    attention = getattr(model.config, RECIPE_KEY, {}).get(ATTENTION_KEY, {})
    for name, module in model.named_modules():
        entry = attention.get(relative_module_name(model, name))
        index = getattr(module, "wsvd_rotary_index", None)
        if entry is None or entry.get("rotary") is None or index is None or index.device.type == "meta":
            continue
        half = entry["dense_head_dim"] // 2
        if index.tolist() != entry["rotary"] + [r + half for r in entry["rotary"]]:
            raise ValueError(f"the tensor {name}.wsvd_rotary_index does not hold the rotary pairs config.json records "
                             f"for {relative_module_name(model, name)!r}: the checkpoint was edited or is damaged")
    # Every weight, not only the factors: a NaN in a norm or a layer kept dense spoils every output
    # as surely, and would otherwise load, evaluate, export and push without a word.
    for name, tensor in model.named_parameters():
        if tensor.device.type != "meta" and not all_finite(tensor):
            raise ValueError(f"the tensor {name} holds NaN or infinite values: the checkpoint is damaged")
    for name, module in factorized.items():
        if isinstance(module, LowRankCorrectedLinear) and _plain_float(module.base):
            # The correction fits the quantization error of the stored base: on a full-precision
            # base (W + correction) it would be wrong.
            raise ValueError(f"{name}.base loaded unquantized, but its low-rank correction fits the error of its "
                             "quantization: load the checkpoint with its own quantization_config")


def _misshapen_part(weight: torch.Tensor) -> tuple[str, tuple, tuple] | None:
    """The part of a torchao quantized ``weight`` (its scale, zero point), its shape and the shape
    the weight's data and block size give it, where the two differ; None where none does."""
    block = getattr(weight, "block_size", None)
    if type(weight) in (torch.Tensor, nn.Parameter) or not hasattr(weight, "__tensor_flatten__") \
            or block is None or len(block) != 2:
        return None
    names, _ = weight.__tensor_flatten__()
    data = getattr(weight, "qdata", None)
    if data is None or tuple(data.shape) != tuple(weight.shape):  # packed data (int4-gpu): another layout
        return None
    expected = (weight.shape[0] // block[0], weight.shape[1] // block[1])
    for name in ("scale", "zero_point"):  # an activation's scales (act_quant_scale) have shapes of their own
        part = getattr(weight, name, None) if name in names else None
        if isinstance(part, torch.Tensor) and tuple(part.shape) != expected:
            return name, tuple(part.shape), expected
    return None


def _misshapen_parts(model: nn.Module) -> list[tuple[str, tuple, tuple]]:
    """(stored key, shape, expected shape) of each linear's misshapen quantized part (``_misshapen_part``)."""
    found = []
    for name, module in model.named_modules():
        misshapen = _misshapen_part(module.weight) if isinstance(module, nn.Linear) else None
        if misshapen is not None:
            part, shape, expected = misshapen
            found.append((f"{name}._weight_{part}", shape, expected))
    return found


def _logical_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape of the matrix ``weight`` stands for (bitsandbytes' 4-bit weights are packed; their
    quantization state keeps it)."""
    return tuple(getattr(getattr(weight, "quant_state", None), "shape", None) or weight.shape)


def _offloaded(model: nn.Module, name: str) -> bool:
    """Whether the tensor ``name`` is held off the model by an offloading hook (accelerate's, under
    ``device_map`` with CPU or disk offload), which puts its values in place at each forward."""
    parts = name.split(".")[:-1]
    for depth in range(len(parts), -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:depth])), "_hf_hook", None)
        for one in getattr(hook, "hooks", None) or [hook]:
            if getattr(one, "offload", False) or getattr(one, "weights_map", None) is not None:
                return True
    return False


def stock_model_class(name: object) -> type[PreTrainedModel] | None:
    """The transformers model class an ``architectures`` entry names (``WsvdLlamaForCausalLM`` or
    ``LlamaForCausalLM``), else None (a hand edit can name an Auto class, a tokenizer, anything)."""
    base = getattr(transformers, name.removeprefix(CLASS_PREFIX), None) if isinstance(name, str) else None
    usable = isinstance(base, type) and issubclass(base, PreTrainedModel) and base is not PreTrainedModel
    return base if usable else None


def unloaded(model: PreTrainedModel, missing: Iterable[str]) -> list[str]:
    """The keys among ``missing`` (a load's missing keys) that the class the checkpoint was saved as
    holds, base model first: loaded, they hold random values. A module only this class has (another
    task's head or pooler: the stock way to start one, with transformers' warning) is not among them;
    where the saved class is unknown, those outside the base model are taken to be such."""
    missing = list(missing)
    names = getattr(model.config, "architectures", None) or [""]
    if missing and type(model).__name__ != names[0]:
        base = stock_model_class(names[0])
        if base is not None:
            with torch.device("meta"):  # its names only; a copy of the config, which some classes edit
                wsvd = names[0].startswith(CLASS_PREFIX)
                saved = (wsvd_model_class(base) if wsvd else base)(copy.deepcopy(model.config))
            keys = {relative_module_name(saved, key) for key in saved.state_dict()}
            missing = [k for k in missing if relative_module_name(model, k) in keys]
        else:
            missing = [k for k in missing if _in_base_model(model, k)]
    return sorted(missing, key=lambda k: (not _in_base_model(model, k), k))


def random_weights_error(keys: list[str], where: str = "") -> ValueError:
    """The error for a load that left ``keys`` (``unloaded``) at random values."""
    return ValueError(f"{where}the tensor {keys[0]!r} is missing from the checkpoint's weights ({len(keys)} tensors "
                      "affected) and would load with random values: the file is damaged, or config.json was edited "
                      "(its layer count, sizes or tie_word_embeddings)")


def _in_base_model(model: PreTrainedModel, key: str) -> bool:
    prefix = getattr(model, "base_model_prefix", "")
    return not (prefix and hasattr(model, prefix)) or key.startswith(prefix + ".")


def _plain_float(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` holding a plain floating-point weight (unquantized)."""
    weight = getattr(module, "weight", None)
    return type(module) is nn.Linear and type(weight) is nn.Parameter and weight.is_floating_point()


# torchao's int8 weight-only (one scale per row) takes any shape, but torch.compile on a CPU lowers its
# matmul to aten._weight_int8pack_mm, which computes wrong values or reads out of bounds where the input
# size is not a multiple of 16 (PyTorch 2.13: a 24-wide input gave 1e19; eager, and 16, 32, 64, were
# exact). Factor ranks and pruned widths are multiples of the recipe's rank_multiple (8 without quantize).
TORCHAO_INT8_ALIGNMENT = 16


def _quantization_dicts(config: PreTrainedConfig) -> list[dict]:
    """Every dict nested in the config's quantization config, outermost first."""
    quantization = getattr(config, "quantization_config", None)
    found = [] if quantization is None else [quantization.to_dict() if hasattr(quantization, "to_dict") else quantization]
    dicts = []
    while found:
        item = found.pop(0)
        if isinstance(item, dict):
            dicts.append(item)
            found.extend(item.values())
        elif isinstance(item, (list, tuple)):
            found.extend(item)
    return dicts


def keep_unquantizable(model: PreTrainedModel) -> list[str]:
    """Under a quantization config with a group size, make each factor or pruned linear, and each
    dense linear of a repeated block (a target layer left dense), whose input size is not a multiple
    of it a ``FullPrecisionLinear`` (no quantizer converts it: it keeps its dtype), said in one log
    line. Returns their names. Under torchao's int8, warns once of the layers
    that a compiled CPU model would compute wrong (``TORCHAO_INT8_ALIGNMENT``)."""
    quantization = _quantization_dicts(model.config)
    # The group size: the first ``group_size`` (torchao's ``PerGroup`` granularity or ``group_size``, HQQ's
    # weight parameters).
    group = next((item["group_size"] for item in quantization if type(item.get("group_size")) is int), None)
    int8 = any(item.get("_type") == "Int8WeightOnlyConfig" for item in quantization)
    if not group and not int8:
        return []
    reshaped = reshaped_layers(getattr(model.config, RECIPE_KEY, {}))
    blocks = tuple(f"{name}.{index}." for name, module in model.named_modules() if isinstance(module, nn.ModuleList)
                   for index in range(len(module)))
    owned = tuple(f"{name}." for name, module in model.named_modules()
                  if isinstance(module, (FactorizedLinear, LowRankCorrectedLinear)))
    compressed, dense = [], []
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear):
            compressed += [(f"{name}.down", module.down), (f"{name}.up", module.up)]
        elif relative_module_name(model, name) in reshaped:
            compressed.append((name, module))
        elif type(module) is nn.Linear and name.startswith(blocks) and not name.startswith(owned):
            dense.append((name, module))  # a target layer left dense
    compressed = [(name, module) for name, module in compressed if type(module) is nn.Linear]
    unaligned = [name for name, module in compressed if int8 and module.in_features % TORCHAO_INT8_ALIGNMENT]
    if unaligned:
        logger.warning(f"hf_wsvd: {len(unaligned)} of the {len(compressed)} factor and pruned linears have an input size "
                       f"that is not a multiple of {TORCHAO_INT8_ALIGNMENT} (first: {unaligned[0]}): torchao int8 computes them "
                       f"right in eager mode, but wrong under torch.compile on a CPU (PyTorch's _weight_int8pack_mm); "
                       f"compress with rank_multiple={TORCHAO_INT8_ALIGNMENT} to compile it there")
    linears = compressed + dense
    kept = [name for name, module in linears if group and module.in_features % group]
    for name in kept:
        module = model.get_submodule(name)
        model.set_submodule(name, FullPrecisionLinear(module.in_features, module.out_features, module.bias is not None,
                                                      device=module.weight.device, dtype=module.weight.dtype))
    if kept:
        what = "factor and pruned linears" if not dense else "factor, pruned and dense block linears"
        logger.warning(f"hf_wsvd: {len(kept)} of the {len(linears)} {what} stay unquantized in "
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
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        # bitsandbytes 4-bit: the data are packed codes, stored in any dtype (bfloat16 under FSDP-QLoRA),
        # whose values are read through the scales of the quantization state (double quantization:
        # quantized scales, with their own state2).
        scales = (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None))
        return all(all_finite(s) for s in scales if isinstance(s, torch.Tensor))
    # Integer data (a quantizer's packed weights) is finite by construction.
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: no aminmax kernel on every device; read in float32 chunks
        flat = tensor.detach().reshape(-1)
        return all(bool(torch.isfinite(flat[i:i + (1 << 24)].float()).all()) for i in range(0, flat.numel(), 1 << 24))
    # The extremes carry any NaN or inf, read in one pass without a mask the size of the tensor
    # (checked on every load).
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _local_folder(path: str | os.PathLike | None, kwargs: dict[str, Any]) -> str | None:
    """The folder on this machine that ``from_pretrained(path, **kwargs)`` reads: a local folder (and its
    ``subfolder``), or a Hub model's files in the local cache once downloaded (None: neither)."""
    if path is None:
        return None
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        return os.path.join(os.fspath(path), subfolder)
    try:
        from transformers.utils import cached_file

        config = cached_file(os.fspath(path), "config.json", subfolder=subfolder, revision=kwargs.get("revision"),
                             cache_dir=kwargs.get("cache_dir"), local_files_only=True,
                             _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):
        return None
    return os.path.dirname(config) if config else None


def _weights_files(folder: str | None) -> list[str]:
    """The ``.safetensors`` files a load reads from ``folder``: ``model.safetensors``, else the shards
    its index names (none where it has neither, or is no folder here)."""
    if folder is None or not os.path.isdir(folder):
        return []
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return ["model.safetensors"]
    try:
        with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as handle:
            return sorted(set(json.load(handle)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no index, or one the load refused
        return []


def check_stored_dtypes(model: nn.Module, folder: str | None) -> None:
    """Raise where a weights file the load read from ``folder`` stores a tensor of ``model`` that is
    floating point (and not quantized) as integers or booleans: the load casts them to numbers that
    were never the weight's (a raw quantized dump without its scales)."""
    from safetensors import safe_open  # transformers' own dependency

    floats = {name: tensor for name, tensor in chain(model.named_parameters(), model.named_buffers())
              if type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_floating_point()}
    for name in _weights_files(folder):
        with safe_open(os.path.join(folder, name), "pt") as handle:
            for key in handle.keys():
                stored = handle.get_slice(key).get_dtype()
                if key in floats and not stored.startswith(("F", "BF")):
                    raise ValueError(f"the tensor {key!r} is stored as {stored} in {name}, but is a {floats[key].dtype} "
                                     "weight of the model: the file is damaged, or holds quantized data without the "
                                     "quantization_config that reads it")


def _unparsed_index(folder: str | None) -> str | None:
    """The sharded save's index in ``folder`` where it does not parse (None: it does, or is not there);
    the one JSON file a load reads that transformers does not report by name (a generation config
    that does not parse is dropped with a warning)."""
    index = os.path.join(folder, "model.safetensors.index.json") if folder and os.path.isdir(folder) else None
    try:
        with open(index, encoding="utf-8") as handle:
            json.load(handle)
    except (TypeError, OSError):  # no folder here, or no index in it
        return None
    except ValueError:
        return index
    return None


def _damaged_file(path: str) -> str | None:
    """The first ``.safetensors`` file of the folder ``path`` whose header or size is damaged (None:
    none is, or ``path`` is no folder here)."""
    from safetensors import SafetensorError, safe_open  # transformers' own dependency

    if os.path.isdir(path):
        for name in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
            try:
                with safe_open(os.path.join(path, name), "pt"):
                    pass
            except (SafetensorError, OSError):
                return os.path.join(path, name)
    return None


@contextmanager
def readable_weights(path: str | os.PathLike | None) -> Iterator[None]:
    """Report a weights file of the folder ``path`` that cannot be read (truncated, or written by a
    run whose disk filled) as a one-line ``ValueError`` naming the file, instead of safetensors' own
    error; safetensors' other errors pass as they are."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        damaged = _damaged_file(os.fspath(path)) if path is not None else None
        if damaged is None:
            raise
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{damaged} cannot be read ({detail}): the file is damaged or incomplete; write or "
                         "download it again") from error


def _both_weights_files(path: str | os.PathLike | None) -> str | None:
    """Where the folder ``path`` holds a single weights file beside a sharded save's index (an older
    save left in place), the clause saying which one was read; else None."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return None
    names = set(os.listdir(path))
    if {"model.safetensors", "model.safetensors.index.json"} <= names:
        return ("the folder holds both model.safetensors and a sharded save's model.safetensors.index.json, and "
                "transformers read model.safetensors: delete whichever an older save left")
    return None


@contextmanager
def held_records(name: str) -> Iterator[list[logging.LogRecord]]:
    """Within: the records the logger ``name`` logs from this thread are held back in the list yielded,
    and logged when the block ends, unless the caller cleared it: a caller whose own one-line error
    says what they would (transformers' load report, listing the tensors ``check_loaded`` names) drops them.
    Warnings are held even where the logger's level is higher (``TRANSFORMERS_VERBOSITY=error``), for the
    caller to read; only those the level lets through are logged at the end."""
    log = logging.getLogger(name)
    held: list[logging.LogRecord] = []
    thread = threading.get_ident()
    shown = _lower_level(log)

    def hold(record: logging.LogRecord) -> bool:
        if record.thread != thread:  # another thread's: logged as the level the user set says
            return record.levelno >= shown
        held.append(record)
        return False

    # First: an inner block holds before an outer one (a logger stops at the first filter refusing),
    # and its records, logged at its end, pass through the outer block's.
    log.filters.insert(0, hold)
    try:
        yield held
    finally:
        log.removeFilter(hold)
        _restore_level(log)
        for record in held:
            if record.levelno >= shown:
                log.handle(record)


_levels_lock = threading.Lock()
_lowered: dict[str, list[int]] = {}  # logger name → [blocks holding it, the level its user set, the effective one]


def _lower_level(log: logging.Logger) -> int:
    """Let ``log`` make warnings while a block holds it; the effective level its user set (what the
    blocks log at their end). The first block lowers it, the last one out restores it."""
    with _levels_lock:
        state = _lowered.get(log.name)
        if state is None:
            state = _lowered[log.name] = [0, log.level, log.getEffectiveLevel()]
            if state[2] > logging.WARNING:
                log.setLevel(logging.WARNING)
        state[0] += 1
        return state[2]


def _restore_level(log: logging.Logger) -> None:
    with _levels_lock:
        state = _lowered[log.name]
        state[0] -= 1
        if not state[0]:
            del _lowered[log.name]
            if state[2] > logging.WARNING:
                log.setLevel(state[1])


def _unbuilt_weight(records: list[logging.LogRecord]) -> str | None:
    """The weight transformers' load report (among ``records``) says a quantizer could not rebuild
    from the stored tensors ("... on tensors destined for NAME."), or None where it names none."""
    for record in records:
        match = _DESTINED.search(record.getMessage())
        if match:
            return match.group(1)
    return None


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
    """Writes an ``auto_map`` covering every Auto class of the base architecture; a recorded dtype
    that names no torch dtype is refused by name (torch's AttributeError named neither)."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        for key in ("dtype", "torch_dtype"):
            value = config_dict.get(key)
            if value is not None and not isinstance(
                    value if isinstance(value, torch.dtype) else getattr(torch, str(value), None), torch.dtype):
                raise ValueError(f"config.json {key}={value!r} is not a torch dtype (such as 'bfloat16'): the "
                                 "checkpoint's config was edited or written by another tool; restore the dtype "
                                 "it was saved in")
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        module = __name__.rsplit(".", 1)[-1]
        auto_map = {"AutoConfig": f"{module}.{type(self).__name__}"}
        for auto_name, model_class in _supported_auto_classes(self._wsvd_base).items():
            auto_map[auto_name] = f"{module}.{CLASS_PREFIX}{model_class.__name__}"
        output["auto_map"] = auto_map
        return output


class _WsvdModelMixin:
    """Factorizes the modules listed in the config before the stock ``post_init``, checks after
    loading that the file filled every factor (see :func:`check_loaded`), then lets factorized
    layers that read the same input share their down matmul (``share_input_factors``), again
    after each conversion (``.to``, ``.half``)."""

    def post_init(self) -> None:
        factorize_modules(self, *check_recipe(self.config))
        keep_unquantizable(self)
        super().post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        wants_info = kwargs.pop("output_loading_info", False)
        # transformers would raise a RuntimeError naming no tensor on a wrong shape (after logging
        # its report); loaded with the mismatch allowed, check_loaded raises the ValueError naming it,
        # in place of the report.
        ignore = kwargs.pop("ignore_mismatched_sizes", False)
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        folder = _local_folder(path, kwargs)
        with readable_weights(folder), held_records("transformers.modeling_utils") as report:
            try:
                model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True,
                                                      **kwargs)
            except json.JSONDecodeError as error:  # json names no file
                damaged = _unparsed_index(folder)
                if damaged is None:
                    raise
                raise ValueError(f"{damaged} is not valid JSON ({error}): the file is damaged; write or download it "
                                 "again") from error
            except RuntimeError as error:
                if "conversion of the weights" not in str(error):
                    raise
                # a quantizer could not rebuild a weight from the stored tensors (one deleted or cut)
                weight = _unbuilt_weight(report)
                named = f"the weight {weight!r}" if weight else "a weight (transformers' load report names it)"
                raise ValueError(f"transformers could not rebuild {named} from the checkpoint's stored tensors: the "
                                 "weights file is damaged, or does not match config.json's quantization_config") from error
            try:
                check_loaded(model, info, ignore)
                check_stored_dtypes(model, folder)
            except ValueError as error:
                report.clear()
                both = _both_weights_files(folder)
                if both:
                    raise ValueError(f"{error}; {both}") from error
                raise
        share_input_factors(model)
        return (model, info) if wants_info else model

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                **kwargs: Any) -> Any:
        # transformers' resize copies rows of an nn.Embedding; a factorized table has none to copy.
        # A call that keeps the size (a getter, or len(tokenizer) in a fine-tuning script) passes.
        table = self.get_input_embeddings()
        size = new_num_tokens
        if size is not None and pad_to_multiple_of:
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        if isinstance(table, FactorizedEmbedding) and size not in (None, table.num_embeddings):
            raise ValueError("resize_token_embeddings cannot resize a factorized embedding table (compressed with "
                             "embeddings=True): resize the dense model before compressing it, or export this one dense "
                             "(hf-wsvd export) and resize that")
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # A conversion releases the shared down factors (FactorizedLinear._apply): stack them again.
        shared = any(isinstance(m, FactorizedLinear) and m.shared_down is not None for m in self.modules())
        result = super()._apply(fn, recurse)
        if shared:
            share_input_factors(self)
        return result

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        # A LoRA merged into whole factorized layers by peft's own merge_and_unload changed their
        # ranks: the config must say the ranks the saved factors have, or the checkpoint never reloads.
        record_ranks(self)
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
