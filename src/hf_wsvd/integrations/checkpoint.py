"""Loading factorized checkpoints with their own class, and what a checkpoint holds."""

from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import median
from typing import Iterator

from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from ..config import check_refined
from ..fields import is_integer
from ..runtime.factorized_embedding import FactorizedEmbedding
from ..runtime.factorized_linear import FactorizedLinear, FullPrecisionLinear, LowRankCorrectedLinear
from ..runtime.modeling_wsvd import (EXPERTS_KEY, MODEL_TYPE, RECIPE_KEY, dense_shape, experts_shape, is_experts,
                                    relative_module_name, stock_model_class, wsvd_model_class)


@dataclass
class LayerSummary:
    """One compressed layer of a model."""

    name: str
    shape: tuple[int, int]  # (out, in); (vocab, hidden) for an embedding; (experts, channels) for an experts module
    rank: int | None  # None: a dense layer (or experts module) cut by MLP or attention pruning (its shape is the cut one)
    params: int
    dense_params: int
    embedding: bool = False  # the input embeddings (not a target layer)

    @property
    def kind(self) -> str:
        """The rank, or "pruned" for a layer cut by MLP or attention pruning."""
        return "pruned" if self.rank is None else str(self.rank)


def summarize(model: nn.Module) -> list[LayerSummary]:
    """One row per factorized or pruned layer of ``model`` (linears, the input embeddings and the
    experts modules MLP pruning cut; a head tied to a factorized embedding shares its parameters and
    has no row): shape, rank (None: a pruned dense layer), parameters now and when dense."""
    rows, tables = [], set()
    config = getattr(model, "config", None)
    recipe = (recipe_of(config) or {}) if config is not None else {}
    experts = recipe.get(EXPERTS_KEY) or {}
    for name, module in model.named_modules():
        entry = experts.get(relative_module_name(model, name))
        if entry is not None and is_experts(module):  # counted from the record: the 3-D weights of every expert
            count, kept, hidden = experts_shape(module)
            rows.append(LayerSummary(relative_module_name(model, name), (count, kept), None, 3 * count * kept * hidden,
                                     3 * count * entry["dense_channels"] * hidden))
        # a pruned layer quantized (bitsandbytes' own Linear class), or kept unquantized by its shape
        plain = isinstance(module, (nn.Linear, FullPrecisionLinear))
        shape = dense_shape(recipe, relative_module_name(model, name), module) if plain else None
        if shape is not None:
            (dense_in, dense_out), bias = shape, module.bias is not None
            rows.append(LayerSummary(  # counted from its shape: a quantizer's packed data has other sizes
                relative_module_name(model, name), (module.out_features, module.in_features), None,
                module.in_features * module.out_features + (module.out_features if bias else 0),
                dense_in * dense_out + (dense_out if bias else 0),
            ))
        # Embeddings tied to another (T5's per-stack token embeddings) share its table: one row.
        if isinstance(module, FactorizedEmbedding) and id(module.weight) not in tables:
            tables.add(id(module.weight))
            rows.append(LayerSummary(
                relative_module_name(model, name), (module.num_embeddings, module.embedding_dim), module.rank,
                module.num_parameters(), module.num_embeddings * module.embedding_dim, embedding=True,
            ))
        if isinstance(module, LowRankCorrectedLinear):  # quantized base plus its correction
            dense_params = module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
            rows.append(LayerSummary(
                relative_module_name(model, name), (module.out_features, module.in_features), module.rank,
                dense_params + module.rank * (module.in_features + module.out_features), dense_params,
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


def quantization_summary(model: nn.Module) -> str | None:
    """What a quantized model's weights cost (``hf_wsvd.integrations.quantization.WeightBits.describe``), with
    its quantization method; None for an unquantized model."""
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is None:
        return None
    from .quantization import weight_bits

    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    return f"{getattr(method, 'value', method)}: {weight_bits(model).describe()}"


def _dense_targets(model: nn.Module, rows: list[LayerSummary]) -> dict[str, str]:
    """The targets of ``model``'s recipe (``target_modules`` / ``exclude_modules``) that stayed
    dense (name → full name): neither a compressed layer (``rows``) nor a linear inside one (a
    corrected layer's own base and factors)."""
    from ..targets import select_targets

    recipe = recipe_of(model.config) or {}
    compressed = {row.name for row in rows}
    inside = tuple(f"{name}." for name in compressed)
    try:
        targets = select_targets(model, recipe.get("target_modules"), recipe.get("exclude_modules"))
    except ValueError:  # named targets that are all factorized now: none stayed dense
        return {}
    return {name: full for name, full in targets.items() if name not in compressed and not name.startswith(inside)}


def target_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters now, parameters when dense) of a compressed model's target layers: its
    factorized, pruned and corrected linears, and the targets of its recipe that stayed dense.
    What ``param_ratio`` budgets, as kept."""
    rows = [row for row in summarize(model) if not row.embedding]
    dense = sum(p.numel() for full in _dense_targets(model, rows).values() for p in model.get_submodule(full).parameters())
    return sum(row.params for row in rows) + dense, sum(row.dense_params for row in rows) + dense


def _span(values: set[int]) -> str:
    ordered = sorted(values)
    return f"{ordered[0]}" if len(ordered) == 1 else f"{ordered[0]}-{ordered[-1]}"


def structure(model: nn.Module) -> str:
    """What a compressed model holds, counted on it: its factorized linears, pruned MLPs (their
    channels, dense -> kept), cut attentions (their head dimension), quantized layers with a
    low-rank correction, factorized input embeddings, and the target layers kept dense."""
    recipe = recipe_of(model.config) or {}
    rows = summarize(model)
    corrected = sum(isinstance(m, LowRankCorrectedLinear) for m in model.modules())
    factorized = sum(isinstance(m, FactorizedLinear) for m in model.modules())
    pruned = recipe.get("pruned") or {}
    consumers = [n for n, e in pruned.items() if e["shape"][0] < e["dense_shape"][0]]
    attention = recipe.get("attention") or {}
    parts = [f"{_count(factorized, 'layer')} factorized"] if factorized else []
    if consumers:
        parts.append(f"{_count(len(consumers), 'MLP')} pruned to "
                     f"{_span({pruned[n]['dense_shape'][0] for n in consumers})} -> "
                     f"{_span({pruned[n]['shape'][0] for n in consumers})} channels")
    recorded = recipe.get(EXPERTS_KEY) or {}
    experts = {n: e for n, e in recorded.items() if e["channels"] < e["dense_channels"]}
    if experts:
        parts.append(f"{_count(len(experts), 'experts module')} pruned to "
                     f"{_span({e['dense_channels'] for e in experts.values()})} -> "
                     f"{_span({e['channels'] for e in experts.values()})} channels per expert")
    if attention:
        parts.append(f"{_count(len(attention), 'attention')} cut to head dim "
                     f"{_span({e['dense_head_dim'] for e in attention.values()})} -> "
                     f"{_span({e['head_dim'] for e in attention.values()})}")
    if corrected:
        parts.append(f"{_count(corrected, 'layer')} quantized with a low-rank correction")
    if any(row.embedding for row in rows):
        parts.append("the input embeddings factorized")
    dense = len(_dense_targets(model, [r for r in rows if not r.embedding]))
    parts.append(f"{_count(dense, 'layer') if not parts else dense} kept dense")
    if len(recorded) > len(experts):
        parts[-1] += f" and {_count(len(recorded) - len(experts), 'experts module')} kept whole"
    return ", ".join(parts)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def error_falls(refined: dict[str, list[float]]) -> list[float]:
    """Block refinement's fall of each block's relative output error, 1 − after / before, sorted."""
    return sorted(1 - after / before if before > 0 else 0.0 for before, after in refined.values())


def refinement_summary(refined: dict[str, list[float]], steps: int | None = None, batches: int = 1) -> str | None:
    """One line on block refinement (``refined``: a recipe's per-block errors, ``steps`` and ``batches``
    a step: its settings; None if it refined nothing)."""
    if not refined:
        return None
    check_refined(refined, f"config.json {RECIPE_KEY!r}['refined']")
    several = is_integer(batches) and batches > 1  # a hand-edited value is left out, not compared
    each = f" ({steps} steps {f'of {batches} batches ' if several else ''}each)" if steps else ""
    # A block whose training did not lower its error keeps its compensated weights ([e, e]); one
    # without error (an exact block) had nothing to lower.
    kept = {block: errors for block, errors in refined.items() if errors[1] < errors[0] or errors[0] == 0}
    if not kept:
        return (f"{len(refined)} blocks refined{each}, none kept: training lowered no block's error (a smaller "
                "block_refine_learning_rate may)")
    falls = error_falls(kept)
    undone = f", {len(kept)} kept (training did not lower the others' error)" if len(kept) < len(refined) else ""
    return (f"{len(refined)} blocks refined{each}{undone}: relative output error fell "
            f"by a median {median(falls):.0%} (least {falls[0]:.0%}, most {falls[-1]:.0%})")


WEIGHTS_FILE, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
# A peft adapter's config: transformers loads the adapter (alone in a folder, with its base model) from it.
ADAPTER_CONFIG = "adapter_config.json"
# The JSON files a tokenizer's loader cannot do without; each must hold a JSON object, as must
# config.json and generation_config.json.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_checkpoint_folder(path: str | os.PathLike) -> None:
    """Raise a one-line error unless ``path`` is a folder with a ``config.json`` whose JSON files
    (``check_model_files``, ``check_tokenizer_files``) are sound."""
    if os.path.isdir(path):
        check_no_adapter(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{os.fspath(path)!r} holds no config.json: not a checkpoint folder")
        check_model_files(path)
        return check_tokenizer_files(path)
    if os.path.exists(path):
        raise NotADirectoryError(f"{os.fspath(path)!r} is a file, not a checkpoint folder")
    raise FileNotFoundError(f"checkpoint folder {os.fspath(path)!r} does not exist")


def check_model_files(folder: str | os.PathLike) -> None:
    """Raise a one-line ValueError naming the file where the ``config.json`` or
    ``generation_config.json`` of a model folder is not a JSON object, or the safetensors index it
    loads from names no weight files: read unchecked, a hand-edited or cut config ends in a type
    error deep inside transformers, and a generation config in silence as none (a saved copy then
    lacks the model's end-of-text ids and sampling defaults)."""
    for name in ("config.json", "generation_config.json"):
        json_object(os.path.join(os.fspath(folder), name))
    if not os.path.exists(os.path.join(os.fspath(folder), WEIGHTS_FILE)):  # else the index is not read
        index_shards(folder)


def check_no_adapter(folder: str | os.PathLike) -> None:
    """Refuse a folder holding a peft adapter (``adapter_config.json``): transformers would load it
    onto the model, or onto its base model in place of the model, and a command would then count,
    compress or save the adapter's layers with it (or fail at the end, where it saves)."""
    folder = os.fspath(folder)
    adapter = json_object(os.path.join(folder, ADAPTER_CONFIG))
    if adapter is None:
        return
    base = adapter.get("base_model_name_or_path")
    of = f", for the base model {base!r}" if base else ""
    if os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder!r} holds a peft adapter beside the model ({ADAPTER_CONFIG}{of}), which transformers "
                         "would load onto it: merge it into the model and save that (peft's merge_and_unload, then "
                         "save_pretrained into a new folder), or move the adapter's files to a folder of their own")
    raise ValueError(f"{folder!r} holds a peft adapter ({ADAPTER_CONFIG}{of}), not a model: load its base model with "
                     "the adapter, merge it (peft's merge_and_unload) and save that with save_pretrained")


def check_tokenizer_files(folder: str | os.PathLike) -> None:
    """Raise a one-line ValueError naming the file where a tokenizer's JSON file in ``folder``
    (``TOKENIZER_JSON_FILES``) is not a JSON object (a large tokenizer.json is read once, where the
    tokenizer loads, not by every look at the folder's config)."""
    for name in TOKENIZER_JSON_FILES:
        json_object(os.path.join(os.fspath(folder), name))


def json_object(path: str) -> dict | None:
    """The JSON object in the file ``path`` (None where there is no such file); a file that holds
    anything else is a one-line ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle)
    except OSError:  # no such file (or none to read): what it holds is the loader's to say
        return None
    except ValueError as error:  # not JSON, or not text
        recorded, detail = None, str(error)
    else:
        detail = f"it holds {_json_kind(recorded)}"
    if not isinstance(recorded, dict):
        raise ValueError(f"{path} is not a JSON object ({detail}): the checkpoint was edited or is damaged")
    return recorded


def _json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


def index_shards(folder: str | os.PathLike) -> list[str] | None:
    """The weight files the ``model.safetensors.index.json`` of ``folder`` names (None without
    one); an index that is no ``weight_map`` of tensor → .safetensors file of the folder is a
    one-line ValueError naming it."""
    index = os.path.join(os.fspath(folder), WEIGHTS_INDEX)
    recorded = json_object(index)
    if recorded is None:
        return None
    weight_map = recorded.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} is not a safetensors index (its 'weight_map' of tensor -> file is "
                         f"{'missing' if weight_map is None else _json_kind(weight_map)})")
    for name in weight_map.values():
        if not isinstance(name, str) or os.path.basename(name) != name or name.startswith(".") \
                or not name.endswith(".safetensors"):
            raise ValueError(f"{index} names the weights file {name!r}, not a .safetensors file of the folder")
    return sorted(set(weight_map.values()))


def folder_model_type(folder: str | os.PathLike) -> str | None:
    """The ``model_type`` the ``config.json`` of ``folder`` records (None without one); a
    ``config.json`` that is not a JSON object is a one-line ValueError naming it."""
    return (json_object(os.path.join(os.fspath(folder), "config.json")) or {}).get("model_type")


def recipe_of(config: PreTrainedConfig) -> dict | None:
    """The stored ``WSVDConfig`` dict of a factorized checkpoint's config, else None."""
    return getattr(config, RECIPE_KEY, None) if config.model_type == MODEL_TYPE else None


# What transformers raises on a hand-edited config.json (an unknown dtype or activation, a padding
# index outside the vocabulary, a string for a count) or a file cut short (a .gguf header): not ValueErrors.
DAMAGED_FILE_ERRORS = (AttributeError, AssertionError, KeyError, IndexError, struct.error, StrictDataclassError)


@contextmanager
def damaged_files_named(path: str, what: str = "model") -> Iterator[None]:
    """Loading ``path`` (a ``what``) within: what a hand-edited or cut file makes transformers raise
    (``DAMAGED_FILE_ERRORS``) becomes a one-line ValueError naming the path."""
    try:
        yield
    except ValueError as error:
        if not str(error).startswith("Invalid torchao safetensors metadata"):
            raise
        # torchao's reader, under a torchao quantization_config, of weights it did not write
        raise ValueError(f"the {what} in {str(path)!r} cannot be loaded ({error}): config.json has a torchao "
                         "quantization_config, but the weights were not saved quantized by torchao; the config was "
                         "edited (remove its quantization_config)") from error
    except DAMAGED_FILE_ERRORS as error:
        detail = (str(error).splitlines() or [""])[0]
        damaged = ("the file is damaged or cut short" if str(path).endswith(".gguf")
                   else "its config.json or files are damaged or were edited")
        raise ValueError(f"the {what} in {str(path)!r} cannot be loaded ({type(error).__name__}: {detail}): "
                         f"{damaged}") from error


def load_factorized(path: str, **kwargs) -> PreTrainedModel:
    """Load a factorized checkpoint with the class it was saved from (``config.architectures``); a
    damaged or hand-edited file is a one-line ValueError naming the path (``damaged_files_named``)."""
    with damaged_files_named(path, "checkpoint"):
        return _load_factorized(path, **kwargs)


def _load_factorized(path: str, **kwargs) -> PreTrainedModel:
    # Read first from the file: another model type would have AutoConfig run the folder's own code
    # (its auto_map), or ask whether to.
    folder = os.path.join(path, kwargs.get("subfolder") or "")
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"{folder!r} holds no config.json: not a checkpoint folder")
        recorded = folder_model_type(folder)
        if recorded != MODEL_TYPE:
            raise ValueError(f"{path} is not an hf_wsvd checkpoint (model_type={recorded!r})")
    config = AutoConfig.from_pretrained(path, **{"trust_remote_code": False, **kwargs})
    if config.model_type != MODEL_TYPE:
        raise ValueError(f"{path} is not an hf_wsvd checkpoint (model_type={config.model_type!r})")
    architectures = config.architectures
    base = stock_model_class(architectures[0]) if isinstance(architectures, list) and architectures else None
    if base is None:
        raise ValueError(f"{path}/config.json has architectures={architectures!r}, which names no transformers model "
                         "class (such as ['WsvdLlamaForCausalLM']): the checkpoint was edited or is damaged")
    return wsvd_model_class(base).from_pretrained(path, config=config, **kwargs)
