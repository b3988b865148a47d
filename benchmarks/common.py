"""Shared setup of the GLUE benchmarks: the shipped task models, their dev loaders, and one set of
statistics per task (Fisher, and activations when asked), reused by every method and cached on
disk so that the GLUE benchmarks compute them once per machine; the MiniLM SST-2 classifier and
its ``svd`` compressions for the CPU speed and size benchmarks."""

from __future__ import annotations

import copy
import functools
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch

from hf_wsvd import WSVDConfig, compress
from hf_wsvd.evaluation import classification_metrics, predict
from hf_wsvd.statistics import FISHER, GRAM, MEAN_ABS, Statistics, gradient_statistics, input_statistics
from hf_wsvd.targets import select_targets
from hf_wsvd.tasks import per_example_loss, task_of
from hf_wsvd.cli.workflow import data_loader, load_model_and_tokenizer

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
SHARED = BENCHMARKS.parent.parent / "shared"
# Statistics depend only on the model, the seeded train sample and the code: delete to recompute.
CACHE = BENCHMARKS.parent / ".cache" / "benchmark_statistics"
MINILM = SHARED / "models" / "minilm-l6-sst2"
SST2_TRAIN = SHARED / "data" / "glue" / "SST-2" / "train.tsv"
TASKS = {
    "sst2": ("minilm-l6-sst2", "SST-2", ["sentence"], "label"),
    "mrpc": ("minilm-l6-mrpc", "MRPC", ["#1 String", "#2 String"], "Quality"),
}


def load_task(task: str, num_samples: int = 512, activations: bool = False):
    """(dense model, dev loader, statistics of every target linear from ``num_samples`` seeded
    train examples — the per-entry Fisher, and with ``activations`` the input Gram and mean |x| —,
    target name → full module name)."""
    model_dir, glue_dir, text_columns, label_column = TASKS[task]
    dense, tokenizer = load_model_and_tokenizer(str(SHARED / "models" / model_dir), dtype=torch.float32)
    base = WSVDConfig(num_samples=num_samples, batch_size=8, max_length=128, seed=0)
    dev = data_loader(dense, tokenizer, str(SHARED / "data/glue" / glue_dir / "dev.tsv"), base,
                      text_columns, label_column, shuffle=False)
    # tokenized only when a statistic is not cached yet
    train = functools.cache(lambda: data_loader(dense, tokenizer, str(SHARED / "data/glue" / glue_dir / "train.tsv"),
                                                base, text_columns, label_column))
    targets = select_targets(dense)
    modules = {n: dense.get_submodule(f) for n, f in targets.items()}
    stats = Statistics(**_cached(f"{task}-{num_samples}-fisher", lambda: asdict(gradient_statistics(
        dense, train(), modules, {FISHER}, per_example_loss(task_of(dense)), show_progress=False))))
    if activations:
        stats = stats.merged(Statistics(**_cached(f"{task}-{num_samples}-activations", lambda: asdict(input_statistics(
            dense, train(), modules, {GRAM, MEAN_ABS}, show_progress=False)))))
    return dense, dev, stats, targets


def compare_methods(
    task: str, runs: Iterable[tuple[str, float, dict]], num_samples: int = 512, activations: bool = False,
    measure: Callable[..., dict] | None = None,
) -> list[dict]:
    """Dev scores of the task's dense model, then of it compressed by each run ``(variant, kept
    ratio, WSVDConfig settings)`` from the task's shared statistics (``load_task``); ``measure(model,
    dense, statistics, targets)`` adds its entries to a run's row."""
    dense, dev, stats, targets = load_task(task, num_samples, activations)
    rows = [{"task": task, "method": "dense", "param_ratio": 1.0, **classification_metrics(*predict(dense, dev))}]
    for variant, ratio, settings in runs:
        # uniform unless the variant says otherwise (given statistics again, the recipe's default is greedy)
        config = WSVDConfig(param_ratio=ratio, num_samples=num_samples, seed=0, **{"allocation": "uniform", **settings})
        model, report = compress(copy.deepcopy(dense), config, statistics=stats, show_progress=False)
        rows.append({"task": task, "method": variant, "param_ratio": ratio, "options": settings,
                     **classification_metrics(*predict(model, dev)),
                     **(measure(model, dense, stats, targets) if measure else {}),
                     "params_after": report.params_after, "params_before": report.params_before,
                     "factorize_seconds": report.seconds["factorize"]})
        print(rows[-1], flush=True)
    return rows


def ratio_label(ratio: float) -> str:
    return "dense" if ratio == 1 else f"svd {ratio:g}"


def svd_variants(model_dir: Path, ratios: list[float]) -> dict[float, torch.nn.Module]:
    """The float32 classifier in ``model_dir`` (under 1.0) and its ``svd`` compressions at each
    kept ratio: speed and size depend on the ranks only, not on the method."""
    from transformers import AutoModelForSequenceClassification

    dense = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    models = {1.0: dense}
    for ratio in ratios:
        models[ratio], _ = compress(copy.deepcopy(dense), WSVDConfig(method="svd", param_ratio=ratio),
                                    show_progress=False)
    return models


def _cached(key: str, compute) -> dict:
    path = CACHE / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return value
