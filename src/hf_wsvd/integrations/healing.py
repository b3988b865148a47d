"""Healing: a short distillation of a compressed causal LM toward its dense teacher, with the stock
``transformers.Trainer``.

The student learns the teacher's next-token distribution (KL divergence on the logits, computed on
the fly from the teacher, optionally plus the mean squared error of the last hidden states). Only
the compressed layers train (the factors of the ``FactorizedLinear`` layers and the linears cut by
MLP pruning) — or, with ``lora_rank``, LoRA adapters on them, merged back exactly afterwards — so
the result is an ordinary compressed checkpoint with the same ranks and shapes. The held-out loss is
measured a few times during training and the weights of its lowest point are the ones returned:
distilling many epochs over a small text overfits it, and the last step is then not the best.
``teacher_samples`` adds healing text written by the teacher, for when the real text is small.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (PreTrainedConfig, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments,
                          default_data_collator)

from ..blocks import given_back, is_dispatched, kept_flags
from ..data import check_ids_and_mask, forked_streams, positions, seed_streams, vocabulary_size
from ..data import teacher_samples  # noqa: F401  (its home before calibration used it too)
from ..fields import check_count, is_integer, is_number, plain_numbers
from ..runtime.factorized_linear import FactorizedLinear
from .quantization import is_quantized_tensor

logger = logging.getLogger(__name__)


@dataclass
class HealConfig:
    """How to heal: optimizer ``steps`` of ``batch_size`` blocks (per process: under ``torchrun`` the
    Trainer's data-parallel step takes that many in each) at ``learning_rate`` (cosine decay
    after ``warmup_ratio`` of the steps); ``lora_rank``: train LoRA adapters of this rank on the
    factors instead of the factors themselves; ``temperature`` of the distillation; ``hidden_weight``:
    weight of the last-hidden-state MSE added to the KL (0: logits only); ``bf16``: mixed precision
    (None: on when CUDA is used); ``seed``; ``evaluations``: how many times, evenly spaced, the
    held-out loss is measured during training; the weights at its lowest are kept (0: the last step's)."""

    steps: int = 200
    learning_rate: float = 1e-4
    batch_size: int = 8
    warmup_ratio: float = 0.05
    lora_rank: int | None = None
    temperature: float = 1.0
    hidden_weight: float = 0.0
    bf16: bool | None = None
    seed: int = 0
    evaluations: int = 10

    def __post_init__(self) -> None:
        plain_numbers(self)
        for name in ("steps", "batch_size"):
            check_count(name, getattr(self, name), 1)
        check_count("evaluations", self.evaluations, 0)
        if self.lora_rank is not None and (not is_integer(self.lora_rank)
                                           or self.lora_rank < 1):
            raise ValueError(f"lora_rank={self.lora_rank!r} must be a positive integer or None")
        for name, low in (("learning_rate", 0.0), ("temperature", 0.0)):
            value = getattr(self, name)
            if not is_number(value) or not value > low or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number > {low}")
        if not is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio!r} must be a number in [0, 1)")
        if not is_number(self.hidden_weight) or not 0 <= self.hidden_weight or not math.isfinite(self.hidden_weight):
            raise ValueError(f"hidden_weight={self.hidden_weight!r} must be a finite number ≥ 0")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ValueError(f"bf16={self.bf16!r} must be True, False or None (on where CUDA is used)")
        if not is_integer(self.seed) or not 0 <= self.seed < 2**32:  # what every generator's seeding takes
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**32)")


@dataclass
class HealReport:
    """What healing did: the held-out distillation loss (mean token KL to the teacher, nats) before
    and after training (``kl_after``: the trained weights', also where they were undone), the steps
    taken, the trainable parameters and the seconds spent; ``kept``: whether the trained weights were
    kept (False: they raised the held-out loss, so the student was restored, its loss ``kl_before``);
    ``best_step``: the step whose weights the healed student has (0: none, the student was restored);
    ``losses``: the held-out loss measured during training, by step (in the training's precision)."""

    kl_before: float
    kl_after: float
    steps: int
    trainable_parameters: int
    seconds: float
    config: dict
    kept: bool = True
    best_step: int = 0
    losses: dict[int, float] = field(default_factory=dict)


# Logit elements per chunk of token_kl: its float32 intermediates (log-softmaxes, probabilities) are
# this size each, whatever the batch (one float32 copy of a 150k-vocabulary model's logits at batch
# 32 × 512 is 10 GB, and autograd through the whole batch at once kept about six).
KL_CHUNK_ELEMENTS = 2**26


def _kl_chunks(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float,
               chunk_elements: int, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over tokens of weight × KL(teacher ‖ student) at ``temperature``, ``chunk_elements`` logits
    at a time; ``grad``, when given, receives its gradient with respect to ``student``."""
    vocab = student.shape[-1]
    rows = max(1, chunk_elements // vocab)
    total = torch.zeros((), device=student.device, dtype=torch.float32)
    for start in range(0, student.shape[0], rows):
        part = slice(start, start + rows)
        log_student = F.log_softmax(student[part].float() / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher[part].float() / temperature, dim=-1)
        taught = log_teacher.exp()
        total += ((taught * (log_teacher - log_student)).sum(dim=-1) * weights[part]).sum()
        if grad is not None:
            grad[part] = (log_student.exp() - taught) * (weights[part] / temperature)[:, None]
    return total


class _TokenKL(torch.autograd.Function):
    """``_kl_chunks`` whose gradient is computed with it, chunk by chunk: backward then needs one
    tensor of the logits' size, not autograd's record of every chunk's intermediates. Backward
    scales that tensor in place and hands it on (a second backward through the same graph is
    refused by autograd's check of saved tensors; a gradient of the gradient, by
    ``once_differentiable``)."""

    @staticmethod
    def forward(ctx, student, teacher, weights, temperature, chunk_elements):
        # float16 would flush small gradients to zero before a loss scaler's factor reaches them
        grad = torch.empty_like(student, dtype=torch.float32 if student.dtype == torch.float16 else None)
        ctx.save_for_backward(grad)
        return _kl_chunks(student, teacher, weights, temperature, chunk_elements, grad)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output), None, None, None, None


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
             temperature: float = 1.0, chunk_elements: int = KL_CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean over real tokens of KL(teacher ‖ student) of the next-token distributions at
    ``temperature`` (scaled by T² so that gradients keep their size across temperatures), computed
    ``chunk_elements`` logits at a time so that its float32 intermediates do not grow with the batch
    (its gradient is one tensor of the logits' size). The teacher's logits are a fixed target: no
    gradient flows to them."""
    if not is_integer(chunk_elements) or chunk_elements < 1:
        raise ValueError(f"chunk_elements={chunk_elements!r} must be a whole number ≥ 1 (logits computed at a time)")
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
    weights = mask.reshape(-1).to(device=student.device, dtype=torch.float32)
    if torch.is_grad_enabled() and student.requires_grad:
        total = _TokenKL.apply(student, teacher, weights, temperature, chunk_elements)
    else:
        total = _kl_chunks(student, teacher, weights, temperature, chunk_elements)
    return total / weights.sum().clamp_min(1) * temperature**2


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss is the distillation loss toward ``teacher`` (run without gradients)."""

    def __init__(self, *args, teacher: PreTrainedModel, temperature: float, hidden_weight: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self.hidden_weight = hidden_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        hidden = self.hidden_weight > 0
        # accelerate's hooks move a dispatched (offloaded) teacher's weights and outputs; a plain one follows the inputs
        device = inputs["input_ids"].device
        if not is_dispatched(self.teacher) and next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            target = self.teacher(**inputs, output_hidden_states=hidden)
        output = model(**inputs, output_hidden_states=hidden)
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        loss = token_kl(output.logits, target.logits.to(output.logits.device), mask, self.temperature)
        if hidden:
            taught = target.hidden_states[-1].to(output.hidden_states[-1].device)
            error = (output.hidden_states[-1].float() - taught.float()).square().mean(dim=-1)
            loss = loss + self.hidden_weight * (error * mask).sum() / mask.sum().clamp_min(1)
        return (loss, output) if return_outputs else loss


@torch.no_grad()
def distillation_kl(student: nn.Module, teacher: nn.Module, blocks: Sequence[dict], batch_size: int,
                    show_progress: bool = False) -> float:
    """The mean token KL(teacher ‖ student) over ``blocks`` (dicts of ``input_ids``/``attention_mask``)."""
    student.eval()
    teacher.eval()
    device = next(student.parameters()).device
    total, tokens = 0.0, 0.0
    loader = DataLoader(list(blocks), batch_size=batch_size, collate_fn=default_data_collator)
    with given_back(teacher):  # computed beside the student, then back where it was
        if not is_dispatched(teacher):
            teacher.to(device)
        for batch in tqdm(loader, desc="distillation loss", disable=not show_progress):
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            count = float(batch["attention_mask"].sum())
            kl = token_kl(student(**batch).logits, teacher(**batch).logits.to(device), batch["attention_mask"])
            total += float(kl) * count
            tokens += count
    return total / max(tokens, 1.0)


# What a teacher shares with the model compressed from it (config attributes, with their names in errors).
_TEACHER_MATCH = {"vocab_size": "vocabulary size", "hidden_size": "hidden size", "num_hidden_layers": "layer count",
                  "num_attention_heads": "attention head count", "num_key_value_heads": "key/value head count",
                  "intermediate_size": "MLP width"}
# How far (relative, in norm) a tensor that compression leaves as it is may differ from the teacher's:
# bfloat16 rounding (one of the two stored or loaded in it) stays well below it.
_UNCHANGED_TOLERANCE = 1e-2
# How close a teacher's weights may come to the factorized layers' products before they are taken for
# the products themselves (an export): bfloat16 rounding again.
_EXPORT_TOLERANCE = 1e-2


def check_student(student: PreTrainedModel) -> None:
    """Raise unless ``student`` is a causal LM, the models healing distills, and not quantized (its
    quantized weights cannot be trained here)."""
    if not _causal_lm(student):
        raise ValueError(f"heal works on causal LMs; {type(student).__name__} is not one")
    if getattr(student.config, "quantization_config", None) is not None:
        raise ValueError("heal trains the compressed model's weights, which this checkpoint stores quantized: heal "
                         "the unquantized compressed checkpoint, then quantize it")


def check_teacher_config(student: PreTrainedConfig, teacher: PreTrainedConfig, name: str = "the teacher") -> None:
    """Raise unless the config ``teacher`` (called ``name`` in the error) is a dense model's of the
    base architecture of the compressed ``student`` config (its model type and sizes): what can be
    refused before the teacher's weights are loaded."""
    from ..runtime.modeling_wsvd import BASE_TYPE_KEY, MODEL_TYPE

    if teacher.model_type == MODEL_TYPE:
        raise ValueError(f"{name} is a compressed hf_wsvd checkpoint: the teacher must be the dense model it was "
                         "compressed from")

    def described(config) -> dict:
        return {"model type": getattr(config, BASE_TYPE_KEY, None) or config.model_type,
                **{label: getattr(config, key, None) for key, label in _TEACHER_MATCH.items()}}

    ours, theirs = described(student), described(teacher)
    for label, value in ours.items():
        if theirs[label] != value:
            raise ValueError(f"{name} has {label} {theirs[label]!r}, the compressed model {value!r}: the teacher "
                             "must be the dense model it was compressed from")


def check_teacher(student: PreTrainedModel, teacher: PreTrainedModel, name: str = "the teacher") -> None:
    """Raise unless ``teacher`` (called ``name`` in the error) is a dense causal LM of the base
    architecture of the compressed ``student`` (``check_teacher_config``) holding the student's
    weights where compression left them as they were (embeddings, norms, layers kept dense): another
    model of the same architecture would be distilled into the student without a word."""
    from ..runtime.modeling_wsvd import MODEL_TYPE

    if teacher.config.model_type != MODEL_TYPE and not _causal_lm(teacher):
        raise ValueError(f"{name} is a {type(teacher).__name__}, not a causal LM: the teacher must be the dense model "
                         "the student was compressed from")
    check_teacher_config(student.config, teacher.config, name)
    differs = _first_unchanged_tensor_that_differs(student, teacher)
    if differs is not None:
        tensor, distance = differs
        raise ValueError(f"{name} differs from the compressed model in {tensor!r} (relative difference {distance:.2g}), "
                         "a tensor compression leaves as it was: the teacher must be the dense model it was compressed "
                         "from, not another model of its architecture")
    exported = _factors_multiplied_out(student, teacher)
    if exported is not None:
        raise ValueError(f"{name} holds the compressed model's own factors multiplied out in every factorized layer "
                         f"(such as {exported!r}), so distilling it would change nothing: is it the compressed model's "
                         "`hf-wsvd export`? The teacher must be the dense model it was compressed from")


def _causal_lm(model: PreTrainedModel) -> bool:
    from ..tasks import CAUSAL_LM, task_of

    try:
        return task_of(model) == CAUSAL_LM
    except ValueError:  # a base model without a head, or another task hf_wsvd has no loss for
        return False


def is_causal_lm_config(config: PreTrainedConfig) -> bool:
    """Whether a class ``config.architectures`` names is a causal LM's."""
    from ..tasks import CAUSAL_LM, stored_tasks

    try:
        return CAUSAL_LM in stored_tasks(config)
    except ValueError:  # a regressor's config the regression loss refuses
        return False


@torch.no_grad()
def _factors_multiplied_out(student: PreTrainedModel, teacher: PreTrainedModel) -> str | None:
    """The name of ``student``'s first factorized layer where ``teacher`` holds, as in every one of
    them, the factors' product (to bf16 rounding) instead of a dense weight, where the student has no
    other compressed layer: the teacher computes what the student does, and distilling changes
    nothing. None otherwise (a genuine teacher differs at its first factorized layer: one product)."""
    if any(not name.endswith((".up", ".down")) for name in _compressed_modules(student)):
        return None  # pruned or cut layers differ from any teacher's
    theirs = dict(teacher.named_parameters())
    matched = []
    for name, module in student.named_modules():
        if isinstance(module, FactorizedLinear):
            weight = theirs.get(f"{name}.weight")
            if (weight is None or weight.is_meta or module.up.weight.is_meta or module.down.weight.is_meta
                    or is_quantized_tensor(weight)):
                return None
            product = module.up.weight.float() @ module.down.weight.float()
            # a dense weight is far from its low-rank factorization; an export differs by rounding only
            if product.shape != weight.shape or not _relative_distance(product, weight) <= _EXPORT_TOLERANCE:
                return None
            matched.append(name)
    return matched[0] if matched else None


@torch.no_grad()
def _first_unchanged_tensor_that_differs(student: PreTrainedModel, teacher: PreTrainedModel) -> tuple[str, float] | None:
    """The first tensor of ``student`` outside its compressed layers (which compression and healing
    train) that ``teacher`` holds at the same name and shape but with other values, and how far
    apart they are; None where there is none. Offloaded tensors (not loaded) and quantized ones
    (whose stored values are not the weights) are skipped."""
    trained = tuple(f"{name}." for name in _compressed_modules(student))
    theirs = dict(teacher.named_parameters())
    for name, ours in student.named_parameters():
        other = theirs.get(name)
        if (other is None or other.shape != ours.shape or ours.is_meta or other.is_meta or name.startswith(trained)
                or is_quantized_tensor(ours) or is_quantized_tensor(other)):
            continue
        distance = _relative_distance(ours, other)
        if not distance <= _UNCHANGED_TOLERANCE:
            return name, distance
    return None


def _relative_distance(ours: torch.Tensor, other: torch.Tensor, chunk: int = 1 << 24) -> float:
    """‖ours − other‖ / ‖other‖ in float64 sums, read ``chunk`` elements at a time (a large
    vocabulary's embedding would otherwise take several float32 copies of itself)."""
    ours, other = ours.detach().reshape(-1), other.detach().reshape(-1)
    error = energy = 0.0
    for start in range(0, ours.numel(), chunk):
        reference = other[start:start + chunk].to(ours.device, torch.float32)
        error += float((ours[start:start + chunk].float() - reference).square().sum(dtype=torch.float64))
        energy += float(reference.square().sum(dtype=torch.float64))
    return math.sqrt(error / max(energy, torch.finfo(torch.float64).tiny))


def _compressed_modules(model: PreTrainedModel) -> dict[str, nn.Module]:
    """The trainable weights' modules of the compressed layers: each ``FactorizedLinear``'s two
    factors, and the linears cut by MLP or attention pruning (full module names)."""
    from .checkpoint import recipe_of
    from ..runtime.modeling_wsvd import relative_module_name, reshaped_layers

    pruned = reshaped_layers(recipe_of(model.config) or {})
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear):
            found.update({f"{name}.up": module.up, f"{name}.down": module.down})
        elif relative_module_name(model, name) in pruned:
            found[name] = module
    return found


class _KeepLowest(TrainerCallback):
    """At ``evaluations`` steps of ``steps``, evenly spaced and the last among them, ``measure()``
    (the held-out loss); a CPU copy of ``params`` at the lowest is kept for ``restore``."""

    def __init__(self, measure: Callable[[], float], params: list[nn.Parameter], steps: int, evaluations: int) -> None:
        self.measure, self.params = measure, params
        count = min(evaluations, steps)
        self.at = {round(k * steps / count) for k in range(1, count + 1)}
        self.losses: dict[int, float] = {}
        self.loss, self.step = math.inf, 0
        # One buffer per parameter, filled at each new lowest: no second copy while the first is held.
        self.weights = [torch.empty(p.shape, dtype=p.dtype, pin_memory=p.is_cuda) for p in params]

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step not in self.at:
            return
        loss = self.losses[state.global_step] = self.measure()
        if loss < self.loss:  # a NaN loss is never the lowest
            self.loss, self.step = loss, state.global_step
            with torch.no_grad():
                for weight, param in zip(self.weights, self.params):
                    weight.copy_(param)

    @torch.no_grad()
    def restore(self) -> None:
        for param, weight in zip(self.params, self.weights):
            param.copy_(weight)


def _trainable_factors(model: PreTrainedModel, lora_rank: int | None) -> PreTrainedModel:
    """Freeze everything but the compressed layers' weights (or put LoRA adapters on them); returns
    the model to train."""
    modules = _compressed_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no factorized or pruned layers: heal a model compressed by hf_wsvd")
    model.requires_grad_(False)
    if lora_rank is None:
        for module in modules.values():
            module.weight.requires_grad_(True)
        return model
    largest = max(min(module.weight.shape) for module in modules.values())
    if lora_rank > largest:  # the adapter of a layer can hold at most min(in, out) directions
        raise ValueError(f"lora_rank={lora_rank} (--lora-rank) exceeds every compressed layer's smaller side (at most "
                         f"{largest}): lower it, or train the layers themselves (leave it unset)")
    from peft import LoraConfig, get_peft_model

    from .peft_lora import peft_wrapping

    # Adapters on the factors and the pruned linears: merging adds B·A to each weight, so every
    # rank and shape is kept.
    with peft_wrapping():
        return get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=sorted(modules),
                                                lora_dropout=0.0))


@contextlib.contextmanager
def _kept_random_state() -> Iterator[None]:
    """Python's, NumPy's and torch's global random streams (the CPU's and every GPU's) come back as
    they were: the ``Trainer`` seeds all of them."""
    python, numpys = random.getstate(), numpy.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python)
            numpy.random.set_state(numpys)


def _check_blocks(model: PreTrainedModel, blocks: Sequence[dict], name: str) -> None:
    """Raise a one-line error naming the value unless ``blocks`` (the argument ``name``) are dicts
    of one sequence of ``input_ids`` each, all of one length, inside ``model``'s token embeddings and
    position table, with an ``attention_mask`` of 0s and 1s (if any) and at least one real token."""
    vocabulary, lengths, real = vocabulary_size(model), set(), 0
    for index, block in enumerate(blocks):
        where = f"{name}[{index}]"
        if not isinstance(block, Mapping) or "input_ids" not in block:
            raise TypeError(f"{where} is a {type(block).__name__}: each block must be a dict of input_ids and "
                            "attention_mask (hf_wsvd.data.text_blocks makes them from text)")
        ids = torch.as_tensor(block["input_ids"])
        if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool or not ids.numel():
            raise ValueError(f"{where}: input_ids must be one non-empty sequence of integer token ids, not "
                             f"{ids.dtype} of shape {tuple(ids.shape)}")
        mask = torch.as_tensor(block["attention_mask"]) if block.get("attention_mask") is not None else None
        check_ids_and_mask(ids, mask, vocabulary, where)
        lengths.add(ids.numel())
        real += ids.numel() if mask is None else int(mask.sum())
    if len(lengths) > 1:
        raise ValueError(f"{name} hold blocks of {sorted(lengths)} tokens: every block must have the same length "
                         "(text_blocks cuts text so)")
    bound = positions(model)
    if bound is not None and max(lengths) > bound.longest:
        raise ValueError(f"{name} hold blocks of {max(lengths)} tokens, more than the model's {bound.longest} positions "
                         f"({bound.field}): cut shorter blocks")
    if not real:
        raise ValueError(f"{name} hold no real token (every attention_mask is 0): there is nothing to distill")


def _distill(trained: nn.Module, teacher: PreTrainedModel, train_blocks: Sequence[dict],
            heldout_blocks: Sequence[dict], config: HealConfig, use_cuda: bool,
            show_progress: bool) -> tuple[_KeepLowest | None, int]:
    """Train ``trained`` (the student, or its LoRA wrapping) toward ``teacher`` with the stock
    ``Trainer``; returns the callback that kept the lowest held-out loss (None without evaluations)
    and the step whose weights ``trained`` now has."""
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer's output_dir: nothing is saved there
        arguments = TrainingArguments(
            output_dir=scratch, max_steps=config.steps, per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate, lr_scheduler_type="cosine", warmup_steps=config.warmup_ratio,
            weight_decay=0.0, bf16=use_cuda if config.bf16 is None else config.bf16, save_strategy="no",
            report_to=[], logging_steps=max(1, config.steps // 10), disable_tqdm=not show_progress,
            remove_unused_columns=False, seed=config.seed, data_seed=config.seed, use_cpu=not use_cuda,
            dataloader_pin_memory=use_cuda,
        )
        trainer = DistillationTrainer(model=trained, args=arguments, train_dataset=list(train_blocks),
                                      data_collator=default_data_collator, teacher=teacher,
                                      temperature=config.temperature, hidden_weight=config.hidden_weight)
        lowest = None
        if config.evaluations:
            def measured() -> float:  # in the training's precision, like every other measurement of the run
                loss = distillation_kl(trained, teacher, heldout_blocks, config.batch_size)
                trained.train()
                return loss

            lowest = _KeepLowest(measured, [p for p in trained.parameters() if p.requires_grad],
                                 config.steps, config.evaluations)
            trainer.add_callback(lowest)
        try:
            trainer.train()
        finally:
            # accelerate wrapped the model's forward in the bf16 autocast of training; unwrapped, the
            # model computes in its own precision again (evaluation, saving, later use; also after an error).
            trainer.accelerator.unwrap_model(trained, keep_fp32_wrapper=False)
    best_step = config.steps if lowest is None or not lowest.step else lowest.step
    if best_step < config.steps:
        lowest.restore()
    return lowest, best_step


def _restore(student: PreTrainedModel, trained: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    """After a failed heal: the student without adapters, with its weights as they were (each step
    tried on its own; the run's own error is the one raised)."""
    steps = ([("remove the LoRA adapters", trained.unload)] if trained is not student else []) + [
        ("restore the weights", lambda: student.load_state_dict(initial))]
    for what, step in steps:
        try:
            step()
        except Exception as error:
            logger.warning(f"healing failed, and so did the attempt to {what} ({error}): load the student again")


def heal(student: PreTrainedModel, teacher: PreTrainedModel, train_blocks: Sequence[dict],
         heldout_blocks: Sequence[dict], config: HealConfig | None = None,
         show_progress: bool = True) -> tuple[PreTrainedModel, HealReport]:
    """Distill ``teacher`` into the compressed ``student`` on ``train_blocks`` (dicts of equal-length
    ``input_ids`` and ``attention_mask``, e.g. from ``hf_wsvd.data.text_blocks``); the distillation
    loss is measured on ``heldout_blocks`` before and after. Returns the healed student (LoRA
    merged) and a report. Both models train on the GPU where there is one; a model on one device
    ends on it again (one placed by accelerate keeps its placement)."""
    config = config or HealConfig()
    if torch.is_inference_mode_enabled():  # no tensor made there ever takes a gradient
        raise RuntimeError("heal was called under torch.inference_mode(), where nothing can be trained; call it outside")
    check_student(student)
    check_teacher(student, teacher)
    offloaded = next((name for name, p in student.named_parameters() if p.device.type == "meta"), None)
    if offloaded is not None:
        raise ValueError(f"the student's weight {offloaded!r} is offloaded (on the meta device): heal trains weights "
                         "held in memory; load the student without CPU or disk offload (the teacher may be offloaded)")
    for name, blocks in (("train_blocks", train_blocks), ("heldout_blocks", heldout_blocks)):
        # read more than once (a generator would be spent by the checks)
        sequence = hasattr(blocks, "__len__") and hasattr(blocks, "__getitem__")
        if isinstance(blocks, (str, bytes, Mapping)) or not sequence:
            raise TypeError(f"{name} must be a sequence of blocks (a list of dicts, or a Dataset), not a "
                            f"{type(blocks).__name__}: pass list(...) of it")
    if not train_blocks or not heldout_blocks:
        raise ValueError(f"healing needs training blocks and held-out blocks, got {len(train_blocks)} and "
                         f"{len(heldout_blocks)}: the data holds too few tokens for its blocks")
    for name, blocks in (("train_blocks", train_blocks), ("heldout_blocks", heldout_blocks)):
        _check_blocks(student, blocks, name)
    use_cuda = torch.cuda.is_available()
    # Both train on the GPU where there is one, and come back where they were, in the modes and with
    # the trainable weights they had; the Trainer seeds every global random stream, the caller's
    # come back too. A caller's no_grad would leave the training without gradients.
    with given_back(student), given_back(teacher), kept_flags(student), kept_flags(teacher), _kept_random_state(), \
            torch.enable_grad():
        for model in (student, teacher) if use_cuda else ():
            if not is_dispatched(model):  # accelerate's placement moves what it placed
                model.to("cuda")
        before = distillation_kl(student, teacher, heldout_blocks, config.batch_size, show_progress)
        # Kept aside (on the CPU) so that a run that makes the model worse, or fails, never replaces it.
        initial = {name: value.detach().to("cpu", copy=True) for name, value in student.state_dict().items()}
        start, trained = time.perf_counter(), student
        try:
            cpu = torch.device("cpu")  # peft draws LoRA's initial weights from the CPU's global stream
            with forked_streams(cpu):
                seed_streams(config.seed, cpu)
                trained = _trainable_factors(student, config.lora_rank)
            trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
            lowest, best_step = _distill(trained, teacher, train_blocks, heldout_blocks, config, use_cuda,
                                         show_progress)
        except BaseException:
            _restore(student, trained, initial)
            raise
        seconds = time.perf_counter() - start
        if config.lora_rank is not None:
            student = trained.merge_and_unload()
        after = distillation_kl(student, teacher, heldout_blocks, config.batch_size, show_progress)
        kept = after <= before
        if not kept:
            # Measured: a block-refined model starts close to its teacher and needed a third of the
            # step size (Qwen2.5-0.5B at -40%: undone at 1e-4, healed at 3e-5; docs/training.md).
            logger.warning(f"healing raised the held-out distillation loss ({before:.4f} -> {after:.4f}): the "
                           f"compressed weights are kept; heal with a lower learning rate (this run: "
                           f"{config.learning_rate:g}; try {config.learning_rate / 3:.2g}) or on more text")
            student.load_state_dict(initial)
        elif best_step < config.steps:
            logger.info(f"the held-out distillation loss was lowest at step {best_step} of {config.steps}: its "
                        "weights are kept (later steps overfit the healing text)")
        return student, HealReport(before, after, config.steps, trainable, seconds, asdict(config), kept,
                                   best_step if kept else 0, lowest.losses if lowest else {})
