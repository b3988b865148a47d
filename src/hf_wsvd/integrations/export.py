"""Dense export: multiply the factors back into the stock modules and save a checkpoint of the base
architecture that stock transformers loads without hf_wsvd and without remote code."""

from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel

from ..runtime.factorized_embedding import FactorizedEmbedding, FactorizedTiedHead
from ..runtime.factorized_linear import FactorizedLinear, LowRankCorrectedLinear
from ..data import TOKENIZER_FILES
from ..methods.attention_pruning import rotary_index
from ..runtime.modeling_wsvd import (ATTENTION_KEY, BASE_TYPE_KEY, EXPERTS_KEY, MODEL_TYPE, RECIPE_KEY, attention_layout,
                                    cut_shape)

# config attributes a factorized checkpoint adds to its base config
_WSVD_KEYS = (RECIPE_KEY, BASE_TYPE_KEY, "auto_map")


FACTORIZED = (FactorizedLinear, FactorizedEmbedding, FactorizedTiedHead)


def _stock_module(module: torch.nn.Module, stock: torch.nn.Module) -> torch.nn.Module:
    """A dense module of the type of ``stock`` (the stock class's module there, built on the meta
    device) computing what the factorized ``module`` does."""
    dense = module.to_dense()
    if isinstance(module, FactorizedEmbedding) and type(stock) is not torch.nn.Embedding:
        # A scaled embedding (BART, Gemma 3, ...): the stock module itself, given the product and,
        # where it holds its scale as a tensor (empty on the meta device), the scale.
        stock.weight = dense.weight
        if isinstance(getattr(stock, "embed_scale", None), torch.Tensor):
            stock.embed_scale = torch.tensor(module.embed_scale, device=dense.weight.device)
        return stock
    if type(stock).__name__ != "Conv1D":  # GPT-2's Conv1D: the only other stock type to_dense does not give
        return dense
    conv = type(stock)(module.out_features, module.in_features)  # GPT-2 Conv1D(nf=out, nx=in), weight in × out
    conv.to(device=dense.weight.device, dtype=dense.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(dense.weight.t())
        conv.bias.copy_(dense.bias)
    return conv


# What stock configs call their MLPs' width (OPT and XGLM: ffn_dim).
_MLP_SIZE_KEYS = ("intermediate_size", "ffn_dim")


def _pruned_sizes(config) -> dict[str, int]:
    """The stock config value a model whose MLPs were all pruned to one size needs (its
    ``intermediate_size`` or ``ffn_dim``), else nothing."""
    pruned = getattr(config, RECIPE_KEY).get("pruned", {})
    key = next((key for key in _MLP_SIZE_KEYS if isinstance(getattr(config, key, None), int)), None)
    if pruned and key is None:
        raise ValueError(f"{type(config).__name__} has no intermediate_size to give the pruned MLPs' size: a dense "
                         "export cannot describe them; use the compressed checkpoint, which loads with the Auto classes")
    kept = {entry["shape"][0] for entry in pruned.values() if entry["shape"][0] < entry["dense_shape"][0]}
    return {key: kept.pop()} if len(kept) == 1 else {}


def _check_pruned_shapes(model: PreTrainedModel, skeleton: PreTrainedModel) -> None:
    """Raise unless every plain linear of a model with pruned MLPs has the shape the stock class
    builds there."""
    if not getattr(model.config, RECIPE_KEY).get("pruned"):
        return
    for name, stock in skeleton.named_modules():
        module = model.get_submodule(name)
        if type(module) is torch.nn.Linear and module.weight.shape != stock.weight.shape:
            raise ValueError(f"{name!r} has shape {tuple(module.weight.shape)}, but the stock {type(skeleton).__name__} "
                             f"builds {tuple(stock.weight.shape)} there (its config has one size for every MLP): a dense export needs "
                             "every MLP pruned to the same size; use the compressed checkpoint, which loads with "
                             "the Auto classes")


def _uncut_attention(model: PreTrainedModel, key: str, entry: dict) -> None:
    """Give the attention ``key`` cut by attention pruning its dense head size back, computing the
    same function: each head's cut query/key features return to their rotary positions (or take
    the first ones) and its values and output columns the first ones, zeros elsewhere."""
    prefix = f"{model.base_model_prefix}." if hasattr(model, model.base_model_prefix) else ""
    attention = model.get_submodule(prefix + key)
    dense, cut = entry["dense_head_dim"], entry["head_dim"]
    first = torch.arange(cut)
    query_key = rotary_index(entry["rotary"], dense) if entry.get("rotary") else first
    for role, name in zip("qkvo", entry["projections"]):
        old = model.get_submodule(prefix + name)
        in_features, out_features = cut_shape(role, (old.in_features, old.out_features), dense, cut)
        layer = torch.nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                                dtype=old.weight.dtype)
        place = (query_key if role in "qk" else first).to(old.weight.device)
        with torch.no_grad():
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
            if role == "o":
                layer.weight.view(out_features, -1, dense)[:, :, place] = old.weight.view(out_features, -1, cut)
                if old.bias is not None:
                    layer.bias.copy_(old.bias)
            else:
                layer.weight.view(-1, dense, in_features)[:, place] = old.weight.view(-1, cut, in_features)
                if old.bias is not None:
                    layer.bias.view(-1, dense)[:, place] = old.bias.view(-1, cut)
        model.set_submodule(prefix + name, layer)
    setattr(attention, attention_layout(attention)[2], dense)
    del attention.wsvd_dense_head_dim
    if entry.get("rotary"):
        attention.wsvd_rotary_hook.remove()
        del attention.wsvd_rotary_hook, attention._buffers["wsvd_rotary_index"]


def _refuse_quantized(model: PreTrainedModel) -> None:
    """Raise if ``model`` holds quantized weights: its factors can neither be multiplied out as they are
    nor stored back quantized in a stock checkpoint."""
    if any(isinstance(m, LowRankCorrectedLinear) for m in model.modules()):
        raise ValueError("a quantized_residual (Q + L) model has no dense form (its low-rank terms correct its "
                         "quantization): use the compressed checkpoint as it is; it loads with the Auto classes")
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", None)
        raise ValueError(f"the model is quantized ({getattr(method, 'value', method)}), which has no exact dense form: "
                         "export a checkpoint saved unquantized (compress without --quantize, or the model loaded "
                         "without its quantization_config), then quantize the dense model at load")


def densify(model: PreTrainedModel, show_progress: bool = False) -> PreTrainedModel:
    """Turn a factorized model back into an instance of its stock class, in place: every factorized
    module becomes the module type the stock class builds there (``nn.Linear``, ``Conv1D`` or
    ``nn.Embedding``) holding the product of its factors, and the config loses the hf_wsvd keys."""
    config = model.config
    if config.model_type != MODEL_TYPE:
        raise ValueError(f"{type(model).__name__} is not an hf_wsvd model (model_type={config.model_type!r})")
    _refuse_quantized(model)
    if getattr(config, RECIPE_KEY).get(EXPERTS_KEY):
        # A stock config says one width for its experts (intermediate_size or moe_intermediate_size,
        # depending on the model), which this export does not rewrite: refused, not saved unloadable.
        raise ValueError("the model's mixture-of-experts experts were cut by mlp_pruning, which a dense export does not "
                         "support: use the compressed checkpoint, which loads with the stock Auto classes")
    stock_class = type(model).__bases__[-1]
    stock_config_class = type(config)._wsvd_base
    sizes = _pruned_sizes(config)
    stock = {k: v for k, v in config.to_dict().items() if k not in _WSVD_KEYS and k != "model_type"} | sizes
    # The stock class on the meta device tells which module type each factorized name had.
    with torch.device("meta"):
        skeleton = stock_class(stock_config_class.from_dict(stock))
    for key, entry in getattr(config, RECIPE_KEY).get(ATTENTION_KEY, {}).items():
        _uncut_attention(model, key, entry)
    _check_pruned_shapes(model, skeleton)
    factorized = [(name, module) for name, module in model.named_modules() if isinstance(module, FACTORIZED)]
    for name, module in tqdm(factorized, desc="dense export", disable=not show_progress):
        model.set_submodule(name, _stock_module(module, skeleton.get_submodule(name)))
    for key, value in sizes.items():
        setattr(config, key, value)
    config.__class__ = stock_config_class
    for key in (*_WSVD_KEYS, "model_type"):  # an instance model_type would hide the stock class's
        if key in config.__dict__:
            delattr(config, key)
    model.__class__ = stock_class
    # Drop the projection ties that tie_to_factorized_embeddings declared on the instance: the
    # stock class's own ties (the dense table) apply again.
    model.__dict__.pop("_tied_weights_keys", None)
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def export_dense(source: str, output: str, dtype: torch.dtype | None = None, show_progress: bool = True) -> PreTrainedModel:
    """Load the factorized checkpoint ``source``, densify it and save it (with its tokenizer, if
    any) to ``output`` as a stock checkpoint; returns the dense model."""
    from .checkpoint import load_factorized

    # The model first: the tokenizer's loader reads config.json too, and would take the blame for it.
    model = load_factorized(source, **({"dtype": dtype} if dtype else {}))
    tokenizer = None
    if any(os.path.isfile(os.path.join(source, name)) for name in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)  # never the folder's own code
        except Exception as error:  # whatever the damaged file made the tokenizer class raise
            detail = (str(error).splitlines() or [type(error).__name__])[0]
            raise ValueError(f"the tokenizer saved in {source!r} cannot be loaded ({type(error).__name__}: {detail}): "
                             "restore its files or delete them to export without one") from error
    model = densify(model, show_progress)
    model.save_pretrained(output)
    leftover = [f for f in os.listdir(output) if f.endswith(".py")]
    for name in leftover:  # never ship code with a stock checkpoint
        os.remove(os.path.join(output, name))
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return model
