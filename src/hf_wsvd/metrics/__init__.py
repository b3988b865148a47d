"""Task metrics as plain numpy functions and as local ``evaluate`` modules.

The ``evaluate`` pip package ships no metric scripts (they live on the Hub), so
``evaluate.load("accuracy")`` fails offline. Each metric here also has a module folder next to this
file that ``evaluate.load`` reads by path, with no network::

    import evaluate
    from hf_wsvd.metrics import metric_path
    accuracy = evaluate.load(metric_path("accuracy"))
    accuracy.compute(predictions=[1, 0], references=[1, 1])     # {"accuracy": 0.5}

Modules: accuracy, f1, matthews_correlation, pearsonr, spearmanr (``predictions`` and
``references``) and perplexity (``nll``: summed negative log-likelihood of each sequence,
``tokens``: its number of predicted tokens).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent


def accuracy(predictions, references) -> float:
    """Share of exact matches."""
    return float(np.mean(np.asarray(predictions) == np.asarray(references)))


def f1(predictions, references, pos_label: int = 1, average: str = "binary") -> float:
    """F1 of class ``pos_label`` (``average="binary"``) or the unweighted mean over classes
    (``"macro"``)."""
    p, r = np.asarray(predictions), np.asarray(references)

    def one(label) -> float:
        tp = np.sum((p == label) & (r == label))
        denominator = np.sum(p == label) + np.sum(r == label)
        return float(2 * tp / denominator) if denominator else 0.0

    if average == "binary":
        return one(pos_label)
    if average == "macro":
        return float(np.mean([one(label) for label in np.union1d(p, r)]))
    raise ValueError(f"average={average!r}: use 'binary' or 'macro'")


def matthews_correlation(predictions, references) -> float:
    """Matthews correlation coefficient (multi-class form; 0 when undefined)."""
    p, r = np.asarray(predictions), np.asarray(references)
    labels = np.union1d(p, r)
    confusion = np.array([[np.sum((r == a) & (p == b)) for b in labels] for a in labels], dtype=np.float64)
    n, correct = confusion.sum(), np.trace(confusion)
    predicted, true = confusion.sum(axis=0), confusion.sum(axis=1)
    denominator = math.sqrt((n * n - predicted @ predicted) * (n * n - true @ true))
    return float((correct * n - predicted @ true) / denominator) if denominator else 0.0


def pearsonr(predictions, references) -> float:
    """Pearson correlation (0 when either side is constant)."""
    x = np.asarray(predictions, dtype=np.float64) - np.mean(predictions)
    y = np.asarray(references, dtype=np.float64) - np.mean(references)
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y / denominator) if denominator else 0.0


def _ranks(values) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse = np.unique(values, return_inverse=True)
    sums, counts = np.bincount(inverse, weights=ranks), np.bincount(inverse)
    return (sums / counts)[inverse]


def spearmanr(predictions, references) -> float:
    """Spearman rank correlation (ties get average ranks; 0 when either side is constant, as
    :func:`pearsonr`: a collapsed model's constant scores rank as uncorrelated, not as a NaN row)."""
    return pearsonr(_ranks(predictions), _ranks(references))


def perplexity(nll, tokens) -> float:
    """``exp(Σ nll / Σ tokens)`` over sequences."""
    total = float(np.sum(tokens))
    if total <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    return math.exp(float(np.sum(nll)) / total)


# name → (function, input names and value types)
METRICS: dict[str, tuple[Callable[..., float], dict[str, str]]] = {
    "accuracy": (accuracy, {"predictions": "int64", "references": "int64"}),
    "f1": (f1, {"predictions": "int64", "references": "int64"}),
    "matthews_correlation": (matthews_correlation, {"predictions": "int64", "references": "int64"}),
    "pearsonr": (pearsonr, {"predictions": "float64", "references": "float64"}),
    "spearmanr": (spearmanr, {"predictions": "float64", "references": "float64"}),
    "perplexity": (perplexity, {"nll": "float64", "tokens": "int64"}),
}


def metric_path(name: str) -> str:
    """The folder of the local ``evaluate`` module ``name``, for ``evaluate.load``."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {sorted(METRICS)}")
    return str(HERE / name)


def metric_class(name: str) -> type:
    """An ``evaluate.Metric`` subclass computing ``METRICS[name]`` (used by the module scripts)."""
    import datasets
    import evaluate

    function, inputs = METRICS[name]

    class _Metric(evaluate.Metric):
        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description=(function.__doc__ or name).strip(), citation="", inputs_description=", ".join(inputs),
                features=datasets.Features({key: datasets.Value(kind) for key, kind in inputs.items()}),
            )

        def _compute(self, **kwargs) -> dict[str, float]:
            return {name: function(**kwargs)}

    _Metric.__name__ = _Metric.__qualname__ = "".join(part.title() for part in name.split("_"))
    return _Metric
