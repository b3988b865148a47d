"""Task metrics of a model on a data loader: classification accuracy/F1/MCC, regression correlations,
perplexity."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import metrics
from .tasks import (CAUSAL_LM, REGRESSION, SEQ2SEQ_LM, causal_lm_nll, labels_feed_decoder, scoring_inputs, target_nll,
                    task_of)


@torch.no_grad()
def _logits(model: nn.Module, loader: DataLoader, show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, labels) of a sequence classifier/regressor over ``loader``."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for batch in tqdm(loader, desc="eval", disable=not show_progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        target = batch.pop("labels")
        logits.append(model(**batch).logits.float().cpu())
        labels.append(target.cpu())
    return torch.cat(logits), torch.cat(labels)


def predict(model: nn.Module, loader: DataLoader, show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class ids, labels) of a sequence classifier over ``loader``."""
    logits, labels = _logits(model, loader, show_progress)
    return logits.argmax(dim=-1), labels


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, binary F1 of class 1 (for two classes), and the share of the most predicted
    class (1.0 means the model collapsed to one class)."""
    found = {"accuracy": metrics.accuracy(predictions.numpy(), labels.numpy())}
    if int(labels.max()) <= 1:
        found["f1"] = metrics.f1(predictions.numpy(), labels.numpy())
    found["majority_share"] = predictions.bincount().max().item() / len(predictions)
    return found


@torch.no_grad()
def perplexity(model: nn.Module, loader: DataLoader, show_progress: bool = False) -> float:
    """Token-level perplexity of a causal LM over ``loader`` (batches with ``labels``), or of a
    sequence-to-sequence LM's target text (its ``labels``)."""
    model.eval()
    device = next(model.parameters()).device
    seq2seq = labels_feed_decoder(model)
    nll, tokens = [], []
    for batch in tqdm(loader, desc="perplexity", disable=not show_progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**scoring_inputs(model, batch)).logits.float()
        # causal: position i predicts label i + 1; seq2seq: decoder position i, fed the labels shifted, label i
        sequence_nll, sequence_tokens = (target_nll if seq2seq else causal_lm_nll)(logits, batch["labels"])
        nll += sequence_nll.tolist()
        tokens += sequence_tokens.tolist()
    return metrics.perplexity(nll, tokens)


def _not_finite(model: nn.Module) -> ValueError:
    dtype = next(model.parameters()).dtype
    return ValueError(f"the model's outputs hold NaN or infinite values (a damaged weight, or an overflow in {dtype}): "
                      "its metrics would mean nothing")


def evaluate_model(model: nn.Module, loader: DataLoader, show_progress: bool = False) -> dict[str, float]:
    """The metrics of the model's task over ``loader``: accuracy, F1 (binary for two classes, else
    macro) and Matthews correlation for classifiers; Pearson and Spearman correlation for
    regressors; perplexity for causal LMs and of the target text for sequence-to-sequence LMs."""
    task = task_of(model)
    if len(loader) == 0:
        raise ValueError("no examples to evaluate: the data holds no rows (or no full block of max_length tokens)")
    if task in (CAUSAL_LM, SEQ2SEQ_LM):
        value = perplexity(model, loader, show_progress)
        if not math.isfinite(value):  # float32 log-softmax of finite logits is finite
            raise _not_finite(model)
        return {"perplexity": value}
    logits, labels = _logits(model, loader, show_progress)
    if not torch.isfinite(logits).all():  # argmax would still pick a class, and the metrics look real
        raise _not_finite(model)
    if task == REGRESSION:
        scores = logits.squeeze(-1).numpy()
        return {"pearsonr": metrics.pearsonr(scores, labels.numpy()), "spearmanr": metrics.spearmanr(scores, labels.numpy())}
    predictions, labels = logits.argmax(dim=-1).numpy(), labels.numpy()
    average = "binary" if logits.shape[-1] == 2 else "macro"
    return {
        "accuracy": metrics.accuracy(predictions, labels),
        "f1": metrics.f1(predictions, labels, average=average),
        "matthews_correlation": metrics.matthews_correlation(predictions, labels),
    }
