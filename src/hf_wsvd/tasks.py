"""The training objective of a model, read from its class and config: per-example losses for
importance estimation, and which Auto class loads a checkpoint."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          PreTrainedConfig, PreTrainedModel)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from .runtime.modeling_wsvd import (CLASS_PREFIX, MODEL_TYPE, RECIPE_KEY, random_weights_error, readable_weights,
                                    unloaded)

CAUSAL_LM = "causal_lm"
SEQ2SEQ_LM = "seq2seq_lm"  # an encoder-decoder LM: its labels are the target text its decoder reads
CLASSIFICATION = "classification"
REGRESSION = "regression"

LossFn = Callable[[nn.Module, dict], torch.Tensor]


def _class_names(mapping: dict) -> set[str]:
    names = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


_CAUSAL_CLASSES = _class_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
_CLASSIFIER_CLASSES = _class_names(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
_SEQ2SEQ_CLASSES = _class_names(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)


def labels_feed_decoder(model: nn.Module) -> bool:
    """Whether ``model``'s labels are the target text of its decoder (a sequence-to-sequence LM, which
    builds its decoder's inputs from them), not a task's labels (BART's classifier reads one class
    per example and builds its decoder's inputs from the input ids)."""
    return getattr(getattr(model, "config", None), "is_encoder_decoder", False) \
        and type(model).__name__.removeprefix(CLASS_PREFIX) in _SEQ2SEQ_CLASSES


def scoring_inputs(model: nn.Module, batch: dict) -> dict:
    """What ``model`` is called with to score ``batch``: the batch without its labels, and a
    sequence-to-sequence LM's decoder inputs built from them where the batch has none, by the model's
    own method (FSMT's forward would shift the source ids into its decoder), else as every such
    model's forward shifts them (M2M100, Blenderbot; FSMT in older transformers), else by its forward;
    without a cache, which scoring does not use."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch.get("labels")
    if labels is None or not labels_feed_decoder(model):
        return inputs
    if getattr(model.config, "use_cache", None) is not None:
        # FSMT before transformers 5.25 decodes only the last decoder input when it keeps a cache
        inputs.setdefault("use_cache", False)
    if "decoder_input_ids" in inputs or "decoder_inputs_embeds" in inputs:
        return inputs
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    start = model.config.decoder_start_token_id
    if prepare is not None:
        inputs["decoder_input_ids"] = prepare(labels=labels.clone())  # FSMT's fills the -100 in place
    elif start is not None:
        inputs["decoder_input_ids"] = shifted_right(labels, start, model.config.pad_token_id)
    else:
        inputs["labels"] = labels
    return inputs


def shifted_right(ids: torch.Tensor, start: int, pad: int | None) -> torch.Tensor:
    """``ids`` one place right behind the ``start`` token, as a sequence-to-sequence LM's decoder reads
    its targets; a -100 (a label not predicted) read as ``pad`` (else ``start``)."""
    shifted = torch.cat([ids.new_full((ids.shape[0], 1), start), ids[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == -100, start if pad is None else pad)


def _architecture_task(architecture: str, config) -> str | None:
    architecture = architecture.removeprefix(CLASS_PREFIX)
    if architecture in _CAUSAL_CLASSES:
        return CAUSAL_LM
    if architecture in _SEQ2SEQ_CLASSES and getattr(config, "is_encoder_decoder", False):
        return SEQ2SEQ_LM
    if architecture in _CLASSIFIER_CLASSES:
        regression = config.problem_type == "regression" or (config.problem_type is None and config.num_labels == 1)
        if config.problem_type == "multi_label_classification":
            return None
        if regression and config.num_labels != 1:
            raise ValueError(f"config problem_type='regression' with num_labels={config.num_labels}: hf_wsvd's regression "
                             "loss (and the command line's labels) take one number per example; pass a loss_fn of your "
                             "own for several outputs, or set num_labels to 1 (or problem_type to "
                             "'single_label_classification' if config.json was edited)")
        return REGRESSION if regression else CLASSIFICATION
    return None


def task_of(model: PreTrainedModel) -> str:
    """``"causal_lm"``, ``"seq2seq_lm"``, ``"classification"`` or ``"regression"`` for a loaded model."""
    task = _architecture_task(type(model).__name__, model.config)
    if task is None:
        raise ValueError(
            f"cannot derive a task loss for {type(model).__name__} (problem_type="
            f"{model.config.problem_type!r}): hf_wsvd estimates importance for causal and sequence-to-sequence "
            "LMs and single-label sequence classifiers/regressors; pass your own loss_fn"
        )
    return task


def stored_tasks(config: PreTrainedConfig) -> set[str]:
    """The tasks of the classes ``config.architectures`` names (empty where none is one of them)."""
    return {_architecture_task(a, config) for a in config.architectures or []} - {None}


def load_task_model(path: str, task: str | None = None, **kwargs) -> PreTrainedModel:
    """Load a checkpoint with the Auto class of its task (causal LM, sequence-to-sequence LM or sequence
    classifier),
    read from ``config.architectures`` unless ``task`` is given. A folder's own code runs only under
    ``trust_remote_code=True`` (transformers would otherwise ask on a terminal)."""
    kwargs.setdefault("trust_remote_code", False)
    config = AutoConfig.from_pretrained(path, **kwargs)
    if getattr(config, RECIPE_KEY, None) is not None and config.model_type != MODEL_TYPE:
        # A factorized checkpoint whose model_type was edited back: the stock class would load it
        # with random weights where the factors are (transformers only warns).
        raise ValueError(f"{path}: config.json records an hf_wsvd recipe but model_type={config.model_type!r}; "
                         f"restore \"model_type\": \"{MODEL_TYPE}\"")
    architectures = config.architectures or []
    tasks = {task} if task else stored_tasks(config)
    if not tasks:
        what = (f"problem_type={config.problem_type!r}" if config.problem_type == "multi_label_classification"
                else f"architectures={architectures}")
        raise ValueError(f"{path}: {what} is neither a causal LM, a sequence-to-sequence LM nor a single-label "
                         "sequence classifier, the tasks the CLI can compute a loss for")
    auto = (AutoModelForCausalLM if CAUSAL_LM in tasks else AutoModelForSeq2SeqLM if SEQ2SEQ_LM in tasks
            else AutoModelForSequenceClassification)
    dense = config.model_type != MODEL_TYPE  # a compressed checkpoint's load checks its own shapes and tensors
    # A dense tensor of another shape than config.json says: named below, not transformers' RuntimeError.
    allowed = kwargs.pop("ignore_mismatched_sizes", False)
    with readable_weights(path):
        model, info = auto.from_pretrained(path, config=config, output_loading_info=True,
                                           ignore_mismatched_sizes=allowed or dense, **kwargs)
    if dense and not allowed and info["mismatched_keys"]:
        key, *shapes = sorted(info["mismatched_keys"], key=lambda k: k[0])[0]
        found = f": {tuple(shapes[0])} in the file, {tuple(shapes[1])} in the model" if len(shapes) == 2 else ""
        raise ValueError(f"{path}: the tensor {key!r} has another shape in the weights than config.json gives it{found} "
                         f"({len(info['mismatched_keys'])} tensors affected): config.json was edited or belongs to "
                         "another model")
    random = unloaded(model, info["missing_keys"])  # a compressed checkpoint's load checked its own
    if random:
        raise random_weights_error(random, f"{path}: ")
    return model


def per_example_loss(task: str) -> LossFn:
    """``loss(model, batch) -> Tensor[batch]``: the loss of each example, so that their sum's
    gradient holds one per-example gradient per row of the batch."""

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        if "labels" not in batch:
            raise ValueError(f"importance batches need 'labels' (the task loss reads them); this batch has "
                             f"{sorted(batch)}: build it with hf_wsvd.cli.workflow.data_loader or add labels")
        labels = batch["labels"]
        logits = model(**scoring_inputs(model, batch)).logits.float()
        if task == SEQ2SEQ_LM:  # its decoder read the labels, shifted right: position i predicts label i
            nll, tokens = target_nll(logits, labels)
            return nll / tokens.clamp_min(1)
        if task == CLASSIFICATION:  # one label per example, a row or a column of them
            return F.cross_entropy(logits, labels.long().reshape(-1), reduction="none")
        if task == REGRESSION:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(-1), reduction="none")
        nll, tokens = causal_lm_nll(logits, labels)  # causal LM: mean token loss of each sequence
        return nll / tokens.clamp_min(1)

    return loss


def causal_lm_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token negative log-likelihood, number of predicted tokens) of each sequence of a
    causal LM batch; labels of -100 are not predicted."""
    return target_nll(logits[:, :-1], labels[:, 1:])


def target_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed negative log-likelihood of ``targets``, number of them) of each sequence, position by
    position (a sequence-to-sequence LM's logits and labels; -100 is not predicted)."""
    targets = targets.long()  # any integer dtype (numpy's default is int32 on Windows)
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return token_loss.sum(dim=1), (targets != -100).sum(dim=1)
