"""`WSVDConfig`: the compression recipe and, once compressed, the per-module ranks it produced;
`CalibrationConfig`: how the calibration data is sampled and batched.

Each field's description, choices and command-line type live in its ``metadata`` (one source for
the API docstring and ``hf-wsvd compress --help``); a method's options are written once, in its
options class (``hf_wsvd.solvers.options``), and the calibration settings in ``CalibrationConfig``:
the recipe takes their fields from there. The recipe saved in a checkpoint carries
``recipe_version``. This module imports no torch: the solvers are loaded only when a recipe is
validated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import textwrap
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .argtypes import fraction, names, non_negative_int, positive_int, speed_limit
from .fields import MAX_COUNT, check_count, field_of, is_count, is_integer, is_number, plain_numbers, recipe_field
from .solvers.options import (AsvdOptions, ElementwiseOptions, FwsvdOptions, LpOptions, MethodOptions,
                              QuantizedResidualOptions, RescueOptions)
from .pipelines.registry import PIPELINES
from .solvers.registry import SOLVERS

COMPUTE_DTYPES = ("float32", "float64")
EMBEDDING_WEIGHTINGS = ("uniform", "frequency")
ALLOCATIONS = ("uniform", "greedy")
# Weight-only quantizations (hf_wsvd.integrations.quantization.quantization_config says what each one is).
QUANTIZE_SPECS = ("int8", "int7", "int6", "int5", "int4", "int3", "int2", "int4-gpu", "nf4", "bnb-int8")
# The specs with one scale (and zero point) per quantize_group_size input weights.
GROUPED_QUANTIZE_SPECS = ("int7", "int6", "int5", "int4", "int3", "int2", "int4-gpu")
# The version of the recipe's keys, saved with it: raise it whenever a release adds a key, so that
# an older release reading the recipe knows the keys it does not know are newer, not mistakes.
# Below it, λ = ridge × mean diag C falls under float64's rounding of a wide Gram (n·eps·‖C‖).
MIN_COMPENSATION_RIDGE = 1e-6
RECIPE_VERSION = 5  # 2: offload_activations; 3: block_refine_batches; 4: generated_samples; 5: experts
VERSION_KEY = "recipe_version"
# The fields compress fills with what it did (a checkpoint's record), never read as its input.
_EMBEDDING_FIELDS = ("embedding_ratio", "embedding_method", "embedding_weighting")  # read under embeddings=True
RESULT_FIELDS = ("ranks", "pruned", "attention", "experts", "refined", "residual")


@dataclass
class CalibrationConfig:
    """How the calibration (importance) data is sampled, tokenized and batched. ``WSVDConfig``
    repeats these fields, so a recipe keeps accepting them; ``WSVDConfig.calibration`` reads them
    back."""

    num_samples: int = recipe_field(512, "examples used to estimate importance (the CLI and data_loader sample "
                                    "them; batches given to compress are used as they are)", type=positive_int)
    batch_size: int = recipe_field(8, "batch size of the importance pass (data_loader's)", type=positive_int)
    max_length: int = recipe_field(128, "token truncation / block length of the importance data (data_loader's)",
                                   type=positive_int)
    seed: int = recipe_field(0, "seed for data sampling and any randomized step", type=int)
    generated_samples: int = recipe_field(
        0, "blocks a causal LM writes itself (continuations of calibration blocks, sampled at temperature 1, "
        "batch_size at a time) added to its calibration data by the CLI and data_loader: more varied text when the "
        "data is small. compress records how many its data holds",
        type=non_negative_int)

    def __post_init__(self) -> None:
        plain_numbers(self)
        for name in ("num_samples", "batch_size"):
            check_count(name, getattr(self, name), 1)
        # only a truncation length: a tokenizer that records none gives transformers' 1e30
        if not is_integer(self.max_length) or self.max_length < 1:
            raise ValueError(f"max_length={self.max_length!r} must be a positive integer")
        check_count("generated_samples", self.generated_samples, 0)
        if not is_integer(self.seed) or not 0 <= self.seed < 2**32:  # what numpy's and every generator's seeding takes
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**32)")


@dataclass
class WSVDConfig:
    """How to compress a model, serialized into the checkpoint's ``config.json`` under ``"wsvd"``.

    The fields left None (``method``, ``allocation``, ``sequential``, ``rank_multiple``, ...) are
    resolved by ``compress`` to the recommended recipe for the model, the data and the device
    (``hf_wsvd.recipes``); the checkpoint stores the resolved values.
    """

    method: str | None = recipe_field(
        None, "factorization method, a name registered in hf_wsvd.solvers. Unset (None): the recommended one for the "
        "data given: fisher_whiten when its batches carry labels (a classifier's labels, or a causal LM's "
        "text), whiten (activations only) for unlabeled data, svd without data", choices=SOLVERS)
    param_ratio: float = recipe_field(
        0.5, "fraction of each target layer's parameters that is KEPT, in (0, 1]: 0.3 keeps 30% of a layer's "
        "weights (rank r = floor(0.3*in*out/(in+out))); a layer whose rank would save nothing stays dense. 1 "
        "saves nothing: only with embeddings=True", type=fraction)
    target_modules: list[str] | str | None = recipe_field(
        None, "modules to factorize, by name relative to the base model: names or name suffixes (on the command "
        "line comma-separated: query,value), or one regular expression matched against the whole name. "
        "Unset (None): every nn.Linear (and GPT-2 Conv1D) inside the transformer blocks; tied modules and heads "
        "outside the blocks are never selected by default", type=names)
    exclude_modules: list[str] | str | None = recipe_field(
        None, "names, suffixes (comma-separated) or a regular expression removed from the targets", type=names)
    fisher_axis: str = field_of(FwsvdOptions, "fisher_axis")
    num_samples: int = field_of(CalibrationConfig, "num_samples")
    batch_size: int = field_of(CalibrationConfig, "batch_size")
    max_length: int = field_of(CalibrationConfig, "max_length")
    compute_dtype: str = recipe_field("float32", "dtype of the decompositions", choices=COMPUTE_DTYPES)
    asvd_alpha: float = field_of(AsvdOptions, "asvd_alpha")
    allocation: str | None = recipe_field(
        None, "how the parameter budget is spread over the layers: 'uniform' (every layer keeps param_ratio) "
        "or 'greedy' (one global budget of param_ratio of all target parameters; ranks go where the "
        "method's weighted truncation loss falls most per parameter, the Fisher-predicted loss increase "
        "for the Fisher methods; keeping a layer dense is one of its choices). Unset (None): greedy with data "
        "(or statistics of it given again) for the methods with a spectrum to budget, else uniform (lp, tfwsvd, "
        "rescue, or no data)", choices=ALLOCATIONS)
    sequential: bool | None = recipe_field(
        None, "compress a causal LM block by block, each block's statistics taken on the inputs produced by "
        "the already compressed blocks before it (one block on the device at a time); with greedy "
        "allocation the ranks are planned first on the dense model's statistics. Unset (None): on for a causal "
        "LM given data, else off", action=argparse.BooleanOptionalAction)
    pipeline: str | None = recipe_field(
        None, "calibration pipeline, a name registered in hf_wsvd.pipelines: 'whole_model' (statistics from passes "
        "over the whole model) or 'sequential' (block by block, see sequential). Unset (None): 'sequential' when "
        "sequential is on, else 'whole_model'", choices=PIPELINES)
    compensate: bool | None = recipe_field(
        None, "sequential mode: factorize each layer so that its outputs on the compressed model's inputs match "
        "the dense layer's outputs on the dense model's inputs (absorbing the error of the layers before it), "
        "layer group by layer group within each block; for the methods that read the activation Gram (whiten, "
        "fisher_whiten). Unset (None): on in sequential mode with such a method", action=argparse.BooleanOptionalAction)
    compensation_ridge: float = recipe_field(
        0.1, "compensate and mlp_pruning: pull toward the dense weight, lambda = this x the mean diagonal of the "
        "layer's input Gram, at least 1e-6 (measured best at 0.01-0.1 on SmolLM2 and Qwen2.5; 1 and 0.001 were worse)", type=float)
    mlp_pruning: bool | None = recipe_field(
        None, "shrink each MLP (gate/up -> down, fc1 -> fc2, BERT's intermediate -> output) to its most useful "
        "intermediate channels, the consumer refitted on them (MoDeGPT's module-pair compression), instead of "
        "factorizing its linears; the experts of a mixture-of-experts module (Mixtral, OLMoE, Qwen-MoE) each keep "
        "as many channels of their own, chosen on the tokens routed to them (greedy: one budget for ranks and "
        "channels; uniform: every MLP keeps param_ratio of its channels). For the methods that read the activation "
        "Gram. Unset (None): on with such a method in "
        "sequential mode",
        action=argparse.BooleanOptionalAction)
    attention_pruning: bool | None = recipe_field(
        None, "shrink each attention's head dimension (queries/keys keep their most useful rotary pairs or logit "
        "subspace, values/outputs a weighted subspace per key/value head) instead of factorizing its projections: "
        "q/k/v/o stay four ordinary matrix products, the KV cache shrinks with them (Llama, Mistral, Qwen2, BERT "
        "attentions; others are factorized). Greedy: one budget with ranks and MLP channels; uniform: every "
        "attention keeps param_ratio of its head dimensions. For the methods that read the activation Gram. "
        "The fastest output, at a cost in quality (docs/benchmarks/speed.md, llm.md). Unset (None): off",
        action=argparse.BooleanOptionalAction)
    block_refine_steps: int | None = recipe_field(
        None, "compensated sequential mode: after each block is compressed, train its compressed layers (factors, "
        "pruned linears) for this many Adam steps, one stored calibration batch each, so that its outputs on the "
        "compressed model's hidden states match the dense block's outputs on the dense model's (block refinement; "
        "not the element-wise refine); kept only where the block's error on the calibration data falls; 0: off. "
        "Method quantized_residual: after the per-layer corrections are fitted, train each block's corrections "
        "(Q frozen) the same way, on the corrected quantized model's hidden states. Unset (None): on in compensated "
        "sequential mode and for quantized_residual on a causal LM with data, 256 steps where the blocks compute on "
        "an accelerator and 64 on a CPU", type=non_negative_int)
    # Measured (docs/benchmarks/llm.md, refinement sweep): 1e-2 beats 3e-3 and 1e-3 at 64 and 256 steps.
    block_refine_learning_rate: float = recipe_field(
        1e-2, "block refinement: Adam's step size relative to each tensor's root mean square, > 0, decayed to 0 on a "
        "cosine over the steps", type=float)
    block_refine_batches: int = recipe_field(
        1, "block refinement: stored calibration batches read by each Adam step (its gradient is their mean over "
        "their real tokens), taken in order, cycling; as many as there are or more: all of them every step. Several "
        "processes holding whole batches in turn all compute on a step that reads at least as many batches as there "
        "are processes (the batch count a multiple of theirs)", type=positive_int)
    offload_activations: bool | None = recipe_field(
        None, "sequential mode: keep the calibration hidden states (two streams with compensation: tokens x hidden "
        "each, 3.9 GiB for 128 x 2048 tokens of a 7B model) in pinned CPU memory, each batch copied to the "
        "GPU when it is used: the same result with less GPU memory, in a little more time. Unset (None): on in "
        "sequential mode where the blocks compute on a CUDA GPU", action=argparse.BooleanOptionalAction)
    seed: int = field_of(CalibrationConfig, "seed")
    generated_samples: int = field_of(CalibrationConfig, "generated_samples")
    p: float = field_of(LpOptions, "p")
    embeddings: bool = recipe_field(
        False, "also factorize the input embeddings (a vocab x hidden nn.Embedding) into a vocab x r lookup and "
        "an r -> hidden projection; a head tied to them computes its logits from the same factors. With "
        "param_ratio 1 only the embeddings are compressed")
    embedding_ratio: float = recipe_field(
        0.5, "fraction of the embedding matrix's parameters that is KEPT, in (0, 1)", type=float)
    embedding_method: str | None = recipe_field(
        None, "method for the embeddings, one usable on embedding rows (which have no Fisher information): svd or lp "
        "(with p). Unset (None): the same as method, which must then be one of these")
    embedding_weighting: str = recipe_field(
        "uniform", "lp row weights of the embeddings: 'uniform', or 'frequency' (1 + the token's count in the "
        "importance data)", choices=EMBEDDING_WEIGHTINGS)
    solver: str = field_of(ElementwiseOptions, "solver")
    refine: bool = recipe_field(
        False, "after method, run the element-wise solver from its factors on the per-entry Fisher objective "
        "sum F_ij (W - AB)^2_ij (needs importance data; not with tfwsvd or rescue, which already are)")
    max_iterations: int = field_of(ElementwiseOptions, "max_iterations")
    tolerance: float = field_of(ElementwiseOptions, "tolerance")
    time_budget: float | None = field_of(ElementwiseOptions, "time_budget")
    importance_power: float = field_of(ElementwiseOptions, "importance_power")
    risk_threshold: float = field_of(RescueOptions, "risk_threshold")
    max_kept_ratio_for_speed: float | dict[str, float] | None = recipe_field(
        None, "keep dense every target layer whose rank keeps more than this fraction of its weights "
        "(r*(in+out)/(in*out)): factorized it runs no faster than dense. A number in (0, 1], or per "
        "shape a dict 'INxOUT' -> limit (on the command line: that JSON object, or a .json file holding it or "
        "the output of benchmarks/layer_speed.py --json-out, whose by_shape it reads; shapes not in it have no "
        "limit, 0 keeps a shape dense). "
        "Unset (None): every layer whose rank saves parameters is factorized. Greedy allocation spends its budget "
        "within the limits (a layer keeps at most its limit or stays dense, and the others meet param_ratio)",
        type=speed_limit)
    # Measured on an H100, bf16, 4096 -> r -> 4096: r = 1228 1.49 ms, r = 1232 0.46 ms, dense 0.72 ms.
    rank_multiple: int | None = recipe_field(
        None, "every rank (and kept channel count) is a multiple of this, >= 1 (uniform: rounded down; greedy: "
        "allocated in steps of it); a layer that cannot get one stays dense. GPU matrix kernels want aligned inner "
        "dimensions, and an unaligned rank can run slower than the dense layer; 1 keeps the exact ranks of "
        "param_ratio. Unset (None): 8, or what quantize needs to take every factor (int2-int7, int4-gpu: "
        "the least multiple of 8 and quantize_group_size; int8: 16)", type=positive_int)
    quantize: str | None = recipe_field(
        None, "weight-only quantization of the result (int8, int2-int7 grouped, int4-gpu, nf4, bnb-int8; see "
        "docs/quantization.md): the compressed checkpoint is saved quantized, and method quantized_residual "
        "corrects this quantization's error. Unset (None): not quantized", choices=QUANTIZE_SPECS)
    quantize_group_size: int = recipe_field(
        64, "quantize int2-int7 and int4-gpu: one scale and zero point per this many input weights; a factor whose "
        "input size is not a multiple of it stays unquantized (rank_multiple unset: it)", type=positive_int)
    residual_method: str = field_of(QuantizedResidualOptions, "residual_method")
    residual_rank: int = recipe_field(
        32, "quantized_residual: rank of each layer's correction (extra weights r*(in+out) per layer)",
        type=positive_int)
    ranks: dict[str, int] = field(default_factory=dict, metadata={
        "help": "filled by the compressor: base-model-relative module name -> rank (the input embeddings, when "
                "compressed, are listed under their name too)", "cli": None})
    pruned: dict[str, dict[str, list[int]]] = field(default_factory=dict, metadata={
        "help": "filled by the compressor: base-model-relative name of each layer cut by mlp_pruning -> "
                "{'shape': [in, out], 'dense_shape': [in, out]}", "cli": None})
    attention: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "filled by the compressor: base-model-relative name of each attention cut by attention_pruning -> "
                "{'head_dim': kept, 'dense_head_dim': dense, 'projections': [q, k, v, o], 'rotary': [kept rotary pair "
                "indices] (rotary attentions)}", "cli": None})
    experts: dict[str, dict[str, int]] = field(default_factory=dict, metadata={
        "help": "filled by the compressor: base-model-relative name of each mixture-of-experts module whose experts "
                "mlp_pruning cut -> {'channels': kept intermediate channels of every expert, 'dense_channels': n}",
        "cli": None})
    refined: dict[str, list[float]] = field(default_factory=dict, metadata={
        "help": "filled by the compressor: index of each block trained by block refinement -> [error before, error "
                "after], its relative output error against the dense block on the calibration data, the mean over tokens of "
                "||y - y'||^2 / ||y||^2 (after = before where training did not lower it and was undone)", "cli": None})
    residual: dict[str, int] = field(default_factory=dict, metadata={
        "help": "filled by quantized_residual: base-model-relative name of each quantized layer -> the rank of its "
                "correction", "cli": None})

    def __post_init__(self) -> None:
        plain_numbers(self)
        for name in RESULT_FIELDS:
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a dict (module name → entry); "
                                 "an empty dict: none")
        if self.method is not None and self.method not in SOLVERS:
            raise ValueError(f"method={self.method!r} is not one of {sorted(SOLVERS)} (or None: the recommended one)")
        ratio = self.param_ratio
        if not is_number(ratio) or not 0 < ratio <= 1:
            raise ValueError(
                f"param_ratio={ratio!r} {'must be' if is_number(ratio) else 'is not a number: pass one'} in (0, 1]: "
                "it is the fraction of each layer's parameters that is kept"
            )
        self.param_ratio = float(ratio)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
            ):
                raise ValueError(f"{name}={value!r} must be None, a regex string or a non-empty list of names")
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as error:
                    raise ValueError(f"{name}={value!r} is not a regular expression ({error}): a string is matched "
                                     "against whole module names; a list gives names or name suffixes") from None
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={self.allocation!r} is not one of {ALLOCATIONS} (or None: the recommended one)")
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise ValueError(f"sequential={self.sequential!r} must be True, False or None (on for causal LMs with data)")
        if self.pipeline is not None and self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline={self.pipeline!r} is not one of {sorted(PIPELINES)} (or None: from sequential)")
        if self.sequential is not None and self.pipeline in ("sequential", "whole_model") and \
                self.sequential != (self.pipeline == "sequential"):
            raise ValueError(f"pipeline={self.pipeline!r} contradicts sequential={self.sequential}: set one of them")
        self._validate_compensation()
        for name in ("mlp_pruning", "attention_pruning"):
            self._validate_pruning(name)
        self._validate_block_refinement()
        if not isinstance(self.refine, bool):
            raise ValueError(f"refine={self.refine!r} must be True or False")
        if self.refine and self.method is not None and SOLVERS[self.method].elementwise:
            raise ValueError(f"refine=True refines another method with the element-wise solver; "
                             f"method={self.method!r} already is one")
        self.calibration  # noqa: B018  (validates the calibration fields)
        if not isinstance(self.embeddings, bool):
            raise ValueError(f"embeddings={self.embeddings!r} must be True or False")
        if self.offload_activations is not None and not isinstance(self.offload_activations, bool):
            raise ValueError(f"offload_activations={self.offload_activations!r} must be True, False or None (on in "
                             "sequential mode on a CUDA GPU)")
        if self.offload_activations and (self.sequential is False or self.pipeline == "whole_model"):
            cause = "sequential=False" if self.sequential is False else "pipeline='whole_model'"
            raise ValueError(f"offload_activations=True keeps the sequential walk's hidden states in CPU memory; this "
                             f"recipe is not sequential ({cause}; sequential mode is for causal LMs with calibration "
                             "data): drop offload_activations")
        ratio = self.embedding_ratio
        if not is_number(ratio) or not 0 < ratio < 1:
            raise ValueError(
                f"embedding_ratio={ratio!r} must be in (0, 1): it is the fraction of the embedding "
                "matrix's parameters that is kept"
            )
        self.embedding_ratio = float(ratio)
        # quantized_residual records 1: it keeps every weight (quantized) and factorizes none.
        if self.param_ratio == 1 and not self.embeddings and self.method != "quantized_residual":
            raise ValueError("param_ratio=1 keeps every parameter of the target layers, which saves nothing: nothing "
                             "to compress; lower it (with embeddings=True, 1 compresses only the embeddings)")
        if self.embedding_method is not None and not _embeddable(self.embedding_method):
            raise ValueError(f"embedding_method={self.embedding_method!r} is not one of {_embeddable_methods()} or None")
        if self.embeddings and self.embedding_method is None and not _embeddable(self.method):
            chosen = (f"method={self.method!r}" if self.method is not None
                      else "method unset (the recommended one reads Fisher information given labelled data)")
            raise ValueError(f"embeddings=True with {chosen}: embedding rows have no Fisher information; "
                             f"set embedding_method to one of {_embeddable_methods()}")
        if self.embedding_weighting not in EMBEDDING_WEIGHTINGS:
            raise ValueError(f"embedding_weighting={self.embedding_weighting!r} is not one of {EMBEDDING_WEIGHTINGS}")
        self._validate_method_options()
        if self.rank_multiple is not None and (not is_integer(self.rank_multiple)
                                               or self.rank_multiple < 1):
            raise ValueError(f"rank_multiple={self.rank_multiple!r} must be a positive integer (8 aligns GPU kernels)")
        self._validate_speed_limit()
        for module, rank in self.ranks.items():
            if not is_integer(rank) or rank < 1:
                raise ValueError(f"ranks[{module!r}]={rank!r} must be a positive integer")
        if self.pruned or self.attention or self.experts:
            from .runtime.modeling_wsvd import check_attention, check_experts, check_pruned

            check_pruned(self.pruned, "pruned")
            check_attention(self.attention, "attention")
            check_experts(self.experts, "experts")
        self._validate_quantization()

    def _validate_quantization(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE_SPECS:
            raise ValueError(f"quantize={self.quantize!r} is not one of {QUANTIZE_SPECS} (or None)")
        for name in ("quantize_group_size", "residual_rank"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.method == "quantized_residual" and self.quantize is None:
            raise ValueError("method='quantized_residual' corrects a quantization's error: set quantize (e.g. 'int4')")
        for module, rank in self.residual.items():
            if not is_integer(rank) or rank < 1:
                raise ValueError(f"residual[{module!r}]={rank!r} must be a positive integer")

    def _validate_compensation(self) -> None:
        if self.compensate is not None and not isinstance(self.compensate, bool):
            raise ValueError(f"compensate={self.compensate!r} must be True, False or None (on in sequential mode)")
        ridge = self.compensation_ridge
        if not is_number(ridge) or not 0 < ridge < float("inf"):
            raise ValueError(f"compensation_ridge={ridge!r} must be a finite number > 0")
        if ridge < MIN_COMPENSATION_RIDGE:
            raise ValueError(f"compensation_ridge={ridge!r} must be at least {MIN_COMPENSATION_RIDGE:g}: a smaller ridge "
                             "leaves a rank-deficient Gram singular in float64 (0.01-0.1 measured best)")
        if not self.compensate:
            return
        if self.sequential is False:
            raise ValueError("compensate=True refits layers on the compressed model's inputs block by block: "
                             "it needs sequential=True")
        from .solvers import solver_for
        from .statistics.names import GRAM

        if self.method is not None and GRAM not in solver_for(self).needs_for(self.method_options()):
            raise ValueError(f"compensate=True needs a method that reads the activation Gram (whiten, fisher_whiten); "
                             f"method={self.method!r} does not")

    def _validate_pruning(self, name: str) -> None:
        """``mlp_pruning`` / ``attention_pruning``: a bool (or None), with a Gram method."""
        value = getattr(self, name)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be True, False or None (on with whiten or fisher_whiten)")
        if not value:
            return
        from .solvers import solver_for
        from .statistics.names import GRAM

        if self.method is not None and GRAM not in solver_for(self).needs_for(self.method_options()):
            raise ValueError(f"{name}=True reads activation Grams, which only whiten and fisher_whiten collect; "
                             f"method={self.method!r} does not: choose one of those or {name}=False")

    def _validate_block_refinement(self) -> None:
        steps, rate = self.block_refine_steps, self.block_refine_learning_rate
        if steps is not None and not is_count(steps, 0):
            raise ValueError(f"block_refine_steps={steps!r} must be an integer from 0 (off) to {MAX_COUNT}, or "
                             "None (on in compensated sequential mode)")
        if not is_number(rate) or not 0 < rate < float("inf"):
            raise ValueError(f"block_refine_learning_rate={rate!r} must be a finite number > 0")
        check_count("block_refine_batches", self.block_refine_batches, 1, "(calibration batches per step)")
        if steps and self.method != "quantized_residual" and (self.compensate is False or self.sequential is False):
            raise ValueError(f"block_refine_steps={steps} trains each block toward the dense block's outputs, which "
                             "only compensation computes: it needs compensate=True (sequential mode with whiten or "
                             "fisher_whiten), or block_refine_steps=0")
        check_refined(self.refined, "refined")

    def _validate_speed_limit(self) -> None:
        speed = self.max_kept_ratio_for_speed
        if speed is None:
            return
        if isinstance(speed, dict):
            for shape, limit in speed.items():
                if not isinstance(shape, str) or not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", shape):
                    raise ValueError(f"max_kept_ratio_for_speed key {shape!r} is not an 'INxOUT' layer shape "
                                     "such as '4096x11008'")
                if not is_number(limit) or not 0 <= limit <= 1:
                    raise ValueError(f"max_kept_ratio_for_speed[{shape!r}]={limit!r} must be in [0, 1] "
                                     "(0: layers of that shape always stay dense)")
            self.max_kept_ratio_for_speed = {shape: float(limit) for shape, limit in speed.items()}
            return
        if not is_number(speed) or not 0 < speed <= 1:
            raise ValueError(
                f"max_kept_ratio_for_speed={speed!r} must be None, in (0, 1], or a dict of 'INxOUT' shape -> "
                "limit in [0, 1]: layers whose rank keeps more than this fraction of their weights stay dense"
            )
        self.max_kept_ratio_for_speed = float(speed)

    def _validate_method_options(self) -> None:
        """Every method's options as read from this recipe (each options class validates its own
        fields), so a bad value is refused whichever method is chosen."""
        for options in {solver.options for solver in SOLVERS.values()}:
            options.from_recipe(self)
        for name in _FLOAT_FIELDS:
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))

    def method_options(self) -> MethodOptions:
        """The options of ``method`` (with ``refine``: the refined method's) from this recipe."""
        from .solvers import solver_for

        if self.method is None:
            raise ValueError("method=None is resolved by compress (hf_wsvd.recipes.resolve); name a method here")
        return solver_for(self).options.from_recipe(self)

    def rank_multiple_remedy(self) -> str:
        """How to lower ``rank_multiple``, for an error it causes: where a grouped ``quantize`` chose it
        (``recipes.default_rank_multiple``), by lowering the group size; else by lowering it."""
        from .recipes import DEFAULT_RANK_MULTIPLE, default_rank_multiple

        if self.quantize in GROUPED_QUANTIZE_SPECS and self.rank_multiple == default_rank_multiple(self) \
                != DEFAULT_RANK_MULTIPLE:
            return (f"lower quantize_group_size (rank_multiple={self.rank_multiple} follows it: quantize="
                    f"{self.quantize!r} takes a factor whose rank is a multiple of the group size)")
        return "lower rank_multiple"

    def unread_options(self) -> dict[str, list[str]]:
        """The method options set away from their defaults that the resolved ``method`` (refined,
        and the embeddings' method) does not read → the methods that would read each (quantized_residual
        reads its own: its residual method runs with that method's defaults); and the options of a part
        of the recipe that is off (the embeddings', the quantization's) → that part."""
        if self.method is None:
            return {}
        read = option_names(self.method_options())
        if self.embeddings:
            read |= option_names(SOLVERS[self.resolved_embedding_method].options.from_recipe(self))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        readers: dict[str, list[str]] = {}
        for name, options in [*sorted((n, s.options()) for n, s in SOLVERS.items()), ("refine=True", ElementwiseOptions())]:
            for option in option_names(options) - read:
                if getattr(self, option) != defaults[option]:
                    readers.setdefault(option, []).append(name)
        switched_off = {"embeddings=True": () if self.embeddings else _EMBEDDING_FIELDS,
                        "quantize": () if self.quantize else ("quantize_group_size",),
                        "quantized_residual": () if self.method == "quantized_residual" else ("residual_rank",)}
        for part, fields in switched_off.items():
            for option in fields:
                if getattr(self, option) != defaults[option] and part not in readers.get(option, []):
                    readers.setdefault(option, []).append(part)
        return readers

    @property
    def calibration(self) -> CalibrationConfig:
        """The calibration settings of this recipe."""
        return CalibrationConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CalibrationConfig)})

    @property
    def resolved_embedding_method(self) -> str:
        """The method applied to the embeddings (``embedding_method``, else ``method``)."""
        return self.embedding_method or self.method

    def to_dict(self) -> dict[str, Any]:
        """The recipe's fields (``WSVDConfig(**config.to_dict())`` rebuilds it)."""
        return dataclasses.asdict(self)

    def to_versioned_dict(self) -> dict[str, Any]:
        """The fields and the ``recipe_version``: what a checkpoint and a recipe file store."""
        return {**self.to_dict(), VERSION_KEY: RECIPE_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WSVDConfig":
        """The recipe of ``data`` (``to_versioned_dict``'s output, a checkpoint's ``"wsvd"``, or any subset
        of the fields). Keys unknown to this release are dropped with one warning naming them when
        ``data`` comes from a newer recipe version; otherwise (no version: an older release or a
        hand-written recipe) they are refused as mistakes."""
        if not isinstance(data, Mapping):
            raise TypeError(f"WSVDConfig.from_dict takes a mapping of recipe fields, not a {type(data).__name__}")
        data = dict(data)
        version = data.pop(VERSION_KEY, None)
        if version is not None and (not is_integer(version) or version < 1):
            raise ValueError(f"{VERSION_KEY}={version!r} must be a positive integer")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown and version is not None and version > RECIPE_VERSION:
            warnings.warn(f"this recipe (version {version}) comes from a newer hf_wsvd release than this one "
                          f"(recipe version {RECIPE_VERSION}): its keys {unknown} are ignored", stacklevel=2)
            data = {key: value for key, value in data.items() if key in known}
        elif unknown:
            raise ValueError(f"unknown WSVDConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_versioned_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "WSVDConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())


def check_refined(refined: Any, where: str) -> dict[str, list[float]]:
    """``refined`` (a recipe's per-block refinement errors, named ``where`` in the error) after
    checking it maps block indices to [error before, error after], two numbers >= 0."""
    if not isinstance(refined, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and len(v) == 2 and all(is_number(e) and 0 <= e < float("inf") for e in v)
            for k, v in refined.items()):
        raise ValueError(f"{where}={refined!r} must map block indices to [error before, error after], two finite numbers >= 0")
    return refined


def option_names(options: MethodOptions) -> set[str]:
    """The recipe fields ``options`` holds, through nested options (a refined method's)."""
    names = set()
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        names |= option_names(value) if isinstance(value, MethodOptions) else {f.name}
    return names


def _embeddable(method: str | None) -> bool:
    return method in SOLVERS and SOLVERS[method].embeddable


def _embeddable_methods() -> list[str]:
    return [name for name, solver in SOLVERS.items() if solver.embeddable]


# Names this module exported before the method lists moved to the solvers: name → (its value, where it is now).
_MOVED = {"METHODS": (lambda: tuple(SOLVERS), "hf_wsvd.solvers.SOLVERS"),
          "EMBEDDING_METHODS": (lambda: tuple(_embeddable_methods()), "the solvers' `embeddable` attribute")}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value, where = _MOVED[name]
    warnings.warn(f"hf_wsvd.config.{name} is deprecated: use {where}", DeprecationWarning, stacklevel=2)
    return value()


def _document_fields(cls: type) -> None:
    """Append every field's ``help`` metadata to the class docstring (``help(WSVDConfig)``)."""
    if cls.__doc__ is None:  # python -OO strips docstrings
        return
    lines = ["", "    Args:"]
    for f in dataclasses.fields(cls):
        lines.append(textwrap.fill(f"{f.name}: {f.metadata['help']}.", width=100, initial_indent=" " * 8,
                                   subsequent_indent=" " * 12))
    cls.__doc__ += "\n".join(lines) + "\n"


_document_fields(WSVDConfig)
_document_fields(CalibrationConfig)
# The number fields: stored as floats whatever number type was given.
_FLOAT_FIELDS = tuple(f.name for f in dataclasses.fields(WSVDConfig) if (f.metadata["cli"] or {}).get("type") is float)
