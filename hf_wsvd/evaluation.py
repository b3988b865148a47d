"""Task metrics of a model on a data loader: classification accuracy/F1, perplexity."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class ids, labels) of a sequence classifier over ``loader``."""
    model.eval()
    device = next(model.parameters()).device
    predictions, labels = [], []
    for batch in tqdm(loader, desc="eval", disable=not show_progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        target = batch.pop("labels")
        predictions.append(model(**batch).logits.argmax(dim=-1).cpu())
        labels.append(target.cpu())
    return torch.cat(predictions), torch.cat(labels)


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, binary F1 of class 1 (for two classes), and the share of the most predicted
    class (1.0 means the model collapsed to one class)."""
    metrics = {"accuracy": (predictions == labels).float().mean().item()}
    if int(labels.max()) <= 1:
        tp = ((predictions == 1) & (labels == 1)).sum().item()
        fp = ((predictions == 1) & (labels == 0)).sum().item()
        fn = ((predictions == 0) & (labels == 1)).sum().item()
        metrics["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    metrics["majority_share"] = predictions.bincount().max().item() / len(predictions)
    return metrics


@torch.no_grad()
def perplexity(model: nn.Module, loader: DataLoader, show_progress: bool = False) -> float:
    """Token-level perplexity of a causal LM over ``loader`` (batches with ``labels``)."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for batch in tqdm(loader, desc="perplexity", disable=not show_progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total_loss += loss.item()
        total_tokens += (targets != -100).sum().item()
    return math.exp(total_loss / total_tokens)
