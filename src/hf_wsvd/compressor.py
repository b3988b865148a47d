"""``compress(model, config, data)``: pick the targets, run the recipe's pipeline and modifiers, record the recipe."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from .blocks import block_list, given_back, input_embeddings, is_dispatched, kept_flags
from .integrations.checkpoint import parameter_counts, target_counts
from .integrations.quantization import check_quantizable, is_quantized_tensor
from .methods.embeddings import embedding_table_name
from .config import RESULT_FIELDS, WSVDConfig
from .data import check_batch, forked_streams, seed_streams
from .pipelines.step import Job, run
from .recipes import default_rank_multiple, residual_block_refine_steps, resolve
from .runtime.factorized_embedding import FactorizedEmbedding
from .runtime.factorized_linear import FactorizedLinear, linear_shape, share_input_factors
from .runtime.modeling_wsvd import MODEL_TYPE, is_experts, relative_module_name, reshaped_layers
from .solvers import solver_for
from .solvers.quantized_residual import quantized_residual
from .statistics import Statistics, default_accelerator
from .statistics.passes import check_processes_agree, check_shardable
from .statistics.names import SHAPES
from .swap import attach_recipe
from .targets import experts_alone, select_targets, selected_experts
from .tasks import LossFn

logger = logging.getLogger(__name__)


@dataclass
class CompressionReport:
    """What ``compress`` did and measured."""

    method: str
    param_ratio: float
    ranks: dict[str, int]
    dense_targets: list[str]  # targets neither factorized nor cut (their rank would save nothing or be slow)
    params_before: int
    params_after: int
    importance_examples: int = 0
    # Wall seconds by stage, each counted once: "importance" (the Fisher pass), "statistics" (the
    # sequential walks' block input statistics), "allocate", "factorize", "prune" (MLP and attention
    # cuts), "refine", ... (the stages a recipe runs).
    seconds: dict[str, float] = field(default_factory=dict)
    allocation: str = "uniform"
    pipeline: str = "whole_model"
    # The statistics gathered over the whole model (sequential mode: the gradient statistics
    # only), reusable as ``compress(..., statistics=)`` on the same dense model.
    statistics: Statistics = field(default_factory=Statistics, repr=False)
    # Why the recipe fell back from the recommended one (see ``hf_wsvd.recipes``), and options it did not read.
    notices: list[str] = field(default_factory=list)
    compensated: bool = False  # sequential mode fitted each layer to the dense layer's outputs
    # Layers cut by MLP pruning: name → {"shape": [in, out], "dense_shape": [in, out]}.
    pruned: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    # Attentions cut by attention pruning: name → {"head_dim", "dense_head_dim", "projections", "rotary"}.
    attention: dict[str, dict] = field(default_factory=dict)
    # Blocks trained by block refinement: index → [relative output error before, after].
    refined: dict[str, list[float]] = field(default_factory=dict)
    # The experts modules of MLP pruning's budget: name → {"channels": kept per expert, "dense_channels"}
    # (equal where the budget kept the module whole).
    experts: dict[str, dict[str, int]] = field(default_factory=dict)
    # Parameters of the target layers (``hf_wsvd.integrations.checkpoint.target_counts``) after and before.
    target_params_after: int = 0
    target_params_before: int = 0

    @property
    def target_kept(self) -> float:
        """The fraction of the target layers' parameters kept (what ``param_ratio`` budgets)."""
        return self.target_params_after / self.target_params_before

    @property
    def model_kept(self) -> float:
        """The fraction of the whole model's parameters kept."""
        return self.params_after / self.params_before

    @property
    def pruned_mlps(self) -> list[str]:
        """The consumer layer of each pruned MLP (its input side was cut)."""
        return [n for n, entry in self.pruned.items() if entry["shape"][0] < entry["dense_shape"][0]]


def _check_arguments(model: Any, config: Any, data: Any, loss_fn: Any, accelerator: Any, statistics: Any,
                     dtype: Any) -> None:
    """Raise a one-line TypeError for an argument of the wrong kind (a ValueError for a ``dtype``
    the method would not read), before any work."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model is a {type(model).__name__}: compress takes a transformers PreTrainedModel "
                        "(e.g. from AutoModelForCausalLM.from_pretrained)")
    if not isinstance(config, WSVDConfig):
        raise TypeError(f"config is a {type(config).__name__}: pass a WSVDConfig (WSVDConfig(**fields) or "
                        "WSVDConfig.from_dict)")
    datasets = sys.modules.get("datasets")  # a DatasetDict is a dict too: not a batch
    if datasets is not None and isinstance(data, datasets.DatasetDict):
        raise TypeError(f"data is a DatasetDict of splits {sorted(data)}: pass tokenized batches of one split "
                        "(hf_wsvd.cli.workflow.data_loader(model, tokenizer, data['train'], ...))")
    if isinstance(data, Mapping):  # one batch (a dict, a tokenizer's BatchEncoding) iterates as its keys
        raise TypeError(f"data is one batch (a {type(data).__name__}): pass an iterable of batches, e.g. [batch] or "
                        "a DataLoader")
    if isinstance(data, (str, bytes, os.PathLike, torch.Tensor)) or \
            (data is not None and not isinstance(data, Iterable)):
        raise TypeError(f"data is a {type(data).__name__}: pass an iterable of tokenized batches (dicts of tensors: "
                        "a DataLoader or a list; hf_wsvd.cli.workflow.data_loader reads files)")
    if torch.is_inference_mode_enabled():  # its tensors never take gradients, nor could the weights made there
        raise RuntimeError("compress was called under torch.inference_mode(): the Fisher pass and block refinement "
                           "take gradients, and the weights made there could never be trained; call it outside")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r}: pass a function loss_fn(model, batch) returning the batch's "
                        "per-example losses, or None (the model's task loss)")
    if accelerator is not None and not isinstance(accelerator, Accelerator):
        raise TypeError(f"accelerator={accelerator!r}: pass an accelerate.Accelerator or None (the default one)")
    if statistics is not None and not isinstance(statistics, Statistics):
        raise TypeError(f"statistics is a {type(statistics).__name__}: pass the report.statistics of an earlier "
                        "compress of the same dense model, or None")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype={dtype!r}: pass a floating-point torch.dtype (e.g. torch.bfloat16) or None")
    if dtype is not None and config.method != "quantized_residual":
        raise ValueError(f"dtype={dtype}: only method='quantized_residual' reads it (the dtype of the quantized model "
                         f"it returns); method={config.method!r} factorizes the model in its own dtype: cast the "
                         "result instead (model.to(dtype))")


def recipe_targets(model: PreTrainedModel, config: WSVDConfig) -> dict[str, str]:
    """The target layers of ``config`` in ``model`` (``select_targets``); raises where its exclusion
    leaves none, or a target's weight is quantized (a checkpoint loaded with its quantization
    config: the solvers read float weights, and the result is quantized after)."""
    targets = select_targets(model, config.target_modules, config.exclude_modules)
    # Experts modules left to MLP pruning are something to compress (``_compress`` checks it is on).
    if not targets and config.exclude_modules is not None and not (
            config.mlp_pruning is not False and selected_experts(model, config.target_modules, config.exclude_modules)):
        raise ValueError(f"exclude_modules={config.exclude_modules!r} excludes every target layer of "
                         f"{type(model).__name__}: nothing is left to compress; exclude fewer layers")
    # The weights, not config.quantization_config: a GGUF checkpoint keeps its quantizer's record
    # but loads dequantized to float, and compresses as it is.
    for name, full_name in targets.items():
        weight = getattr(model.get_submodule(full_name), "weight", None)
        if isinstance(weight, torch.Tensor) and is_quantized_tensor(weight):
            raise ValueError(f"{name!r} holds a quantized weight ({type(weight).__name__}, {weight.dtype}): compress the "
                             "dense float checkpoint (loaded without its quantization_config) and quantize the result "
                             "(WSVDConfig.quantize, --quantize)")
    return targets


def _recorded_calibration(config: WSVDConfig, data: Any, examples: int) -> WSVDConfig:
    """``config`` recording the examples sampled from the data and the blocks the model wrote itself
    that ``data`` holds (``data_loader`` marks its loaders with their numbers; batches given as they
    are hold ``examples``): the recipe says what the calibration data was."""
    written = getattr(data, "generated_samples", 0)
    if config.generated_samples and not written:
        logger.warning(f"generated_samples={config.generated_samples}: compress uses the batches it is given as they "
                       "are and none of them was written by the model (hf_wsvd.cli.workflow.data_loader writes them); "
                       "the recipe records 0")
    sampled = getattr(data, "num_samples", examples or config.num_samples)
    changed = {name: value for name, value in (("generated_samples", written), ("num_samples", sampled))
               if value != getattr(config, name)}
    return replace(config, **changed) if changed else config


def _taken_on(config: WSVDConfig, statistics: Statistics) -> WSVDConfig:
    """``config`` recording the calibration that reused ``statistics`` were taken on, where no data
    given was read: the examples sampled, and those the model wrote (``Statistics.generated``)."""
    sampled = statistics.examples - statistics.generated
    return replace(config, num_samples=sampled if sampled > 0 else config.num_samples,
                   generated_samples=statistics.generated)


def _expert_parameters(model: PreTrainedModel, mlp_pruning: bool) -> int:
    """How many parameters of ``model``'s blocks are 3-D tensors of one matrix per expert (experts ×
    out × in, as Mixtral, OLMoE and Qwen3-MoE store their experts in transformers 5) that stay
    dense: no linear layer; with ``mlp_pruning``, those outside transformers' experts modules (Llama
    4's, JetMoE's), which it never reads (it names the experts modules it leaves dense itself).
    Other 3-D weights (RecurrentGemma's block-diagonal gates) are no experts."""
    config = getattr(model, "config", None)
    experts = {getattr(config, key, None) for key in _EXPERT_COUNT_KEYS} - {None}
    try:
        prefix, blocks = block_list(model)
    except ValueError:
        return 0
    return sum(p.numel() for module in blocks.modules()
               if not isinstance(module, torch.nn.modules.conv._ConvNd) and not (mlp_pruning and is_experts(module))
               for p in module.parameters(recurse=False) if p.dim() == 3 and p.shape[0] in experts)


# Where a config keeps its number of experts (Mixtral: num_local_experts; OLMoE, Qwen3-MoE: num_experts;
# DeepSeek: n_routed_experts).
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _weight_samples(model: PreTrainedModel, targets: dict[str, str]) -> dict[str, torch.Tensor]:
    """16 entries of each target's dense weight at fixed places (float32, CPU): what statistics taken
    on ``model`` record of it (``Statistics.weights``). Weights offloaded to the meta device are left out."""
    samples = {}
    for name, path in targets.items():
        flat = model.get_submodule(path).weight.detach().reshape(-1)  # its own layout: no copy of a Conv1D
        if not flat.is_meta:
            # integer places: float32 positions past 2**24 entries would round off the end (a 7B MLP)
            samples[name] = flat[torch.arange(16, device=flat.device) * (flat.numel() - 1) // 15].float().cpu()
    return samples


def _check_statistics(model: PreTrainedModel, targets: dict[str, str], statistics: Statistics,
                      samples: dict[str, torch.Tensor]) -> None:
    """Raise, naming the layer, where reused ``statistics`` do not fit a target layer's shape, or were
    taken on other weights (``samples``: this model's, ``_weight_samples``): another model's."""
    for name in sorted(set(targets) & set(statistics.values)):
        in_features, out_features = linear_shape(model.get_submodule(targets[name]))
        for statistic, value in statistics.values[name].items():
            shape = SHAPES.get(statistic)
            if shape is not None and tuple(value.shape) != shape(in_features, out_features):
                raise ValueError(f"statistics of {name!r}: {statistic} has shape {tuple(value.shape)}, the layer "
                                 f"({in_features} inputs, {out_features} outputs) takes "
                                 f"{shape(in_features, out_features)}: statistics of another model")
    for name in sorted(set(targets) & set(statistics.weights) & set(samples)):
        taken, now = statistics.weights[name], samples[name]
        # loose enough for the same weights loaded in another dtype (bf16 rounds to 0.4%)
        if taken.shape != now.shape or not torch.allclose(now, taken, rtol=1e-2, atol=1e-2 * float(taken.abs().max())):
            raise ValueError(f"statistics of {name!r} were taken on other weights than this model's: statistics of "
                             "another model (reuse them only on the dense model they came from)")


# Marks a notice about the model object the caller holds: the command line, which holds none after a
# failure (and quantizes what compress returns), does not print it.
MODEL_IN_MEMORY = {"model_in_memory": True}


def _record_replaced_layers(model: PreTrainedModel, config: WSVDConfig, job: Job) -> None:
    """After a run stopped midway (an error, Ctrl-C): the layers it had replaced stay in ``model``,
    recorded in its recipe, so that it computes, saves and reloads as it is — never a stock model
    holding factors its class has no place for, which would reload with random weights."""
    ranks = {name: module.rank for name, path in job.targets.items()
             if isinstance(module := model.get_submodule(path), FactorizedLinear)}
    factorized = len(ranks)
    embedding = input_embeddings(model)
    if isinstance(embedding, FactorizedEmbedding):  # recorded by its table's name, as the modifier factorized it
        ranks[relative_module_name(model, embedding_table_name(model))] = embedding.rank
    if not ranks and not job.pruned and not job.attention and not job.cut_experts:
        return  # nothing was replaced: the model is as it was
    try:
        attach_recipe(model, replace(config, ranks=ranks, pruned=dict(job.pruned), attention=dict(job.attention),
                                     experts=job.experts_record(), refined=dict(job.refined)))
    except Exception as error:  # the run's own error is the one to see
        logger.warning(f"compress stopped midway, and recording the layers it had replaced failed too ({error}): "
                       "do not save this model; load the dense model again", extra=MODEL_IN_MEMORY)
        return
    embeddings = " (and the factorized input embeddings)" if len(ranks) > factorized else ""
    experts = f" and {len(job.cut_experts)} cut experts modules" if job.cut_experts else ""
    logger.warning(f"compress stopped midway: {factorized} factorized and {len(job.pruned)} pruned of the "
                   f"{len(job.targets)} target layers{embeddings}{experts} stay in the model, recorded in its recipe (it "
                   "saves and reloads as it is); load the dense model again to start over", extra=MODEL_IN_MEMORY)


def compress(
    model: PreTrainedModel,
    config: WSVDConfig,
    data: Iterable[dict] | None = None,
    loss_fn: LossFn | None = None,
    accelerator: Accelerator | None = None,
    statistics: Statistics | None = None,
    show_progress: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, CompressionReport]:
    """Factorize ``model`` in place following ``config``; return it with a report.

    ``data`` yields tokenized batches (see ``hf_wsvd.data``); methods that use importance or
    activations need it (``labels`` for Fisher). The recipe's fields left None (``method``,
    ``allocation``, ``sequential``) are resolved to the recommended recipe for ``model`` and
    ``data`` (``hf_wsvd.recipes``); the report and the saved checkpoint hold the resolved values.
    ``loss_fn(model, batch) -> per-example losses`` defaults to the model's task loss
    (classification, regression, causal or sequence-to-sequence LM). ``statistics``
    reuses statistics computed earlier on the same dense model (e.g. across ratios); sequential
    mode takes input statistics block by block whatever is given. Under ``accelerate launch`` /
    ``torchrun`` each process takes its share of ``data``, a plain ``DataLoader`` over a map-style
    dataset (a slice of every batch where the batch size is a multiple of the process count, never
    an example twice); every process ends with the same model. The returned model saves with
    ``save_pretrained`` and reloads with the stock Auto classes; its factorized layers that read the
    same input share their down matmul at inference (``share_input_factors``). The
    work runs on the accelerator; a model given on one device ends on it, a dispatched model keeps
    its placement, and one spread by hand over several devices may end on the accelerator.

    ``method="quantized_residual"`` (``hf_wsvd.solvers.quantized_residual``) leaves ``model`` dense
    and returns a new model: ``model`` quantized by ``config.quantize`` in ``dtype`` (default: the
    model's) with a low-rank correction of each target's quantization error; no other method takes ``dtype``.

    The work is seeded by ``config.seed``: the CPU's random stream and the accelerator's, on a fork
    of them (the caller's streams come back as they were; no other device's is touched). A run that
    stops midway (an error, Ctrl-C) leaves the layers it had replaced in ``model``, recorded in its
    recipe: the model saves and reloads as it is; load the dense model again to start over.
    """
    _check_arguments(model, config, data, loss_fn, accelerator, statistics, dtype)
    accelerator = accelerator or default_accelerator()
    # The Fisher pass and block refinement take gradients, wherever compress is called from
    # (a caller's torch.no_grad() is a common habit around "inference-like" work).
    with forked_streams(accelerator.device), torch.enable_grad():
        seed_streams(config.seed, accelerator.device)
        return _compress(model, config, data, loss_fn, accelerator, statistics, show_progress, dtype)


def _compress(model: PreTrainedModel, config: WSVDConfig, data: Iterable[dict] | None, loss_fn: LossFn | None,
              accelerator: Accelerator, statistics: Statistics | None, show_progress: bool, dtype: torch.dtype | None,
              ) -> tuple[PreTrainedModel, CompressionReport]:
    if model.config.model_type == MODEL_TYPE:
        raise ValueError("this model is already factorized by hf_wsvd; compress its dense original instead")
    # A model holds peft's layers only where peft is imported: compress itself does not import it.
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    adapted = tuners and next((name for name, module in model.named_modules()
                               if isinstance(module, tuners.BaseTunerLayer)), None)
    if adapted is not None:  # its targets are peft's wrappers: they would be left dense, and the save unloadable
        raise ValueError(f"the model holds peft adapter layers (the first: {adapted!r}): merge them first "
                         "(merge_and_unload()) and compress the merged model")
    recorded = [name for name in RESULT_FIELDS if getattr(config, name)]
    if recorded:  # a checkpoint's recipe given again: what it records of its own result is not an input
        logger.warning(f"config.{', config.'.join(recorded)}: what an earlier compress recorded of its result, not an "
                       "input; compress ignores it and records its own")
        config = replace(config, **{name: {} for name in recorded})
    unloaded = None if is_dispatched(model) else next((n for n, p in model.named_parameters() if p.is_meta), None)
    if unloaded is not None:  # built on the meta device: nothing to read (a dispatched model's hooks load them)
        raise ValueError(f"the model's weights are not loaded ({unloaded!r} is on the meta device): load it with "
                         "from_pretrained (or dispatch it with a device_map) before compressing")
    if config.quantize and config.method == "quantized_residual":  # it quantizes: refused now, not after the work
        check_quantizable(model, config.quantize, config.quantize_group_size, dtype)
    given = data  # data_loader marks the loader itself with what it sampled and wrote
    if data is not None:
        check_shardable(data, accelerator)  # before a one-shot iterable becomes a list
    if data is not None and iter(data) is data:
        data = list(data)  # one-shot: the recipe reads its first batch, and some pipelines pass twice
    examples, count = 0, 0
    for count, batch in enumerate(data if data is not None else [], 1):  # named now, not as an IndexError mid-pass
        check_batch(model, batch, count - 1, task_labels=loss_fn is None)
        examples += len(batch["input_ids"]) if "input_ids" in batch else 0
    if data is not None and count == 0:  # else a notice about labels, then a pass over nothing
        raise ValueError("data holds no batch (an empty list, or a generator already consumed): pass the calibration "
                         "batches, or data=None for a method that reads none (method='svd')")
    if data is None and statistics is not None:  # statistics given again: the calibration they were taken on
        config = _taken_on(config, statistics)
    else:
        config = _recorded_calibration(config, given, examples)
    # The targets come from the recipe's patterns, which resolving leaves as they are: found once.
    targets = recipe_targets(model, config)  # before resolving the recipe, which reads the data
    reused = statistics is not None and bool(set(statistics.values) & set(targets))
    if data is None and reused and config.method is None and config.param_ratio < 1:
        raise ValueError("statistics given without data: the recommended recipe is chosen from the data, so name the "
                         "one the statistics were computed for (method=..., e.g. 'fisher_whiten' with "
                         "sequential=False)")
    notices: list[str] = []
    if config.method != "quantized_residual":
        config, notices = resolve(config, model, data, accelerator.device, targets, reused)
    else:
        config = replace(config, block_refine_steps=residual_block_refine_steps(config, model, data,
                                                                                accelerator.device),
                         rank_multiple=config.rank_multiple or default_rank_multiple(config))
    if config.quantize and config.method != "quantized_residual":  # shaped for it, returned unquantized
        notice = (f"quantize={config.quantize!r}: compress returns the model unquantized (with rank_multiple unset, "
                  "its ranks step by what this quantizer needs); quantize it with hf_wsvd.integrations.quantization.quantize(model, "
                  f"quantization_config({config.quantize!r}, {config.quantize_group_size})) before saving (hf-wsvd "
                  "compress --quantize does both)")
        logger.warning(notice, extra=MODEL_IN_MEMORY)
        notices.append(notice)
    unread = config.unread_options()
    if unread:  # set for another method: said, not silently recorded as if it had shaped the result
        notice = "; ".join(f"{name}={getattr(config, name)!r} is an option of {', '.join(methods)}"
                           for name, methods in unread.items()) + \
            f": this recipe (method={config.method!r}) does not read {'it' if len(unread) == 1 else 'them'}"
        logger.warning(notice)
        notices.append(notice)
    experts = _expert_parameters(model, bool(config.mlp_pruning))
    if experts:  # said, not left to be found in the parameter count
        which = "of a layout mlp_pruning does not know" if config.mlp_pruning else "which only mlp_pruning cuts"
        notice = (f"{experts:,} parameters ({experts / sum(p.numel() for p in model.parameters()):.0%} of the model) are "
                  f"mixture-of-experts weights stored as 3-D tensors {which}: they stay dense, and only the other "
                  "layers are compressed")
        logger.warning(notice)
        notices.append(notice)
    samples = _weight_samples(model, targets)
    if accelerator.num_processes > 1:  # the data is a DataLoader over a map-style dataset (check_shardable)
        check_processes_agree(accelerator, {
            "recipe": json.dumps(config.to_dict(), sort_keys=True, default=str).encode(),
            "target layers": json.dumps(sorted(targets.items())).encode(),
            "model's weights (sampled)": b"".join(samples[name].numpy().tobytes() for name in sorted(samples)),
            "calibration batches": f"{examples} examples, batch size {getattr(given, 'batch_size', None)}, "
                                   f"{len(data) if data is not None else 0} batches".encode()})
    if statistics is not None:
        _check_statistics(model, targets, statistics, samples)
        if statistics.values and targets and not reused:  # given to be reused: said that none of them is
            held = sorted(statistics.values)
            notice = (f"the statistics given hold none of this recipe's target layers (they hold {len(held)}, such "
                      f"as {held[0]!r}; the targets are such as {sorted(targets)[0]!r}): they are not used, and "
                      "the statistics are computed anew")
            logger.warning(notice)
            notices.append(notice)
    statistics = (statistics or Statistics()).merged(Statistics(weights=samples))
    if not targets:
        if not selected_experts(model, config.target_modules, config.exclude_modules):
            raise ValueError(f"{type(model).__name__} has no nn.Linear/Conv1D layer inside repeated transformer blocks "
                             "to compress; name the layers with target_modules")
        if not config.mlp_pruning:  # experts modules alone
            raise ValueError(f"{experts_alone(config.target_modules, config.exclude_modules)}, which mlp_pruning cuts: "
                             "set mlp_pruning=True (--mlp-pruning), or name linear layers too")
    params_before = sum(p.numel() for p in model.parameters())
    if config.method == "quantized_residual":
        quantized, residual, job = quantized_residual(model, config, data, targets, loss_fn, accelerator, statistics,
                                                      show_progress, dtype)
        attach_recipe(quantized, replace(config, param_ratio=1.0, residual=residual, refined=dict(job.refined)))
        job.statistics.generated = config.generated_samples
        target_after, target_before = target_counts(quantized)
        report = CompressionReport(config.method, 1.0, dict(residual), [], params_before, parameter_counts(quantized)[0],
                                   job.statistics.examples, job.seconds, "uniform", "quantized_residual", job.statistics,
                                   notices + job.notices, refined=dict(job.refined), target_params_after=target_after,
                                   target_params_before=target_before)
        return quantized, report
    job = Job(model, config, solver_for(config), config.method_options(), targets, data, loss_fn,
              accelerator, statistics, {}, show_progress)
    if loss_fn is not None and not job.gradient_needs:  # said, not silently passed over
        job.notice(f"loss_fn is not used: method={config.method!r} reads no gradient statistics (the Fisher-weighted "
                   "methods do, such as fisher_whiten)")
    try:
        # The walks run in eval mode: each module comes back in the mode it came in (a model in training
        # with some blocks frozen in eval included); a layer made by the run, in the one it replaced.
        with kept_flags(model), given_back(model):
            ranks = run(job)
    except BaseException:
        _record_replaced_layers(model, config, job)
        raise
    if not ranks and not job.pruned and not job.attention and not job.cut_experts:  # nothing swapped: still the dense model
        raise ValueError(f"param_ratio={config.param_ratio} leaves every target layer dense, which saves "
                         "nothing: lower it to compress")
    if data is not None and reused and not job.data_read:  # the statistics given held all it needed: said, recorded
        job.notice(f"the data was not read: the given statistics hold everything method={config.method!r} "
                   f"needs for every target layer (taken on {job.statistics.examples} examples); the recipe records "
                   "those examples, not the data's")
        config = _taken_on(config, job.statistics)
    elif job.data_read:  # what the statistics were taken on, for a later reuse to record
        job.statistics.generated = config.generated_samples
    recipe = replace(config, ranks=dict(ranks), pruned=dict(job.pruned), attention=dict(job.attention),
                     experts=job.experts_record(), refined=dict(job.refined))
    attach_recipe(model, recipe)
    share_input_factors(model)
    params_after, _ = parameter_counts(model)
    changed = set(ranks) | reshaped_layers(recipe.to_dict())
    report = CompressionReport(
        config.method, config.param_ratio, dict(ranks), sorted(set(targets) - changed),
        params_before, params_after, job.statistics.examples, job.seconds, config.allocation, config.pipeline,
        job.statistics, notices + job.notices, bool(config.compensate), dict(job.pruned), dict(job.attention),
        dict(job.refined), dict(recipe.experts),
        *target_counts(model),
    )
    if report.target_kept > 1.1 * config.param_ratio + 0.01:  # e.g. uniform rounding at a tiny ratio: said
        remedies = [config.rank_multiple_remedy()] if config.rank_multiple > 1 else []
        if config.allocation != "greedy":
            remedies.append("use allocation='greedy', which meets the budget")
        notice = (f"kept {report.target_kept:.1%} of the target layers' parameters for param_ratio="
                  f"{config.param_ratio}: a cut layer or MLP keeps at least rank_multiple={config.rank_multiple} "
                  "ranks or channels, and a layer stays dense where a rank would save nothing or be slow"
                  + (f"; {', or '.join(remedies)}" if remedies else ""))
        logger.warning(notice)
        report.notices.append(notice)
    return model, report
