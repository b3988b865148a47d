"""Shared setup of the GLUE benchmarks: the shipped task models, their dev loaders, and one set of
statistics per task (Fisher, and activations when asked), reused by every method and cached on
disk so that the GLUE benchmarks compute them once per machine."""

from __future__ import annotations

import functools
from dataclasses import asdict
from pathlib import Path

import torch

from hf_wsvd import WSVDConfig
from hf_wsvd.importance import FisherResult, collect_activation_stats, compute_fisher
from hf_wsvd.importance.activations import ActivationStats
from hf_wsvd.targets import select_targets
from hf_wsvd.tasks import per_example_loss, task_of
from hf_wsvd.workflow import data_loader, load_model_and_tokenizer

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
SHARED = BENCHMARKS.parent.parent / "shared"
# Statistics depend only on the model, the seeded train sample and the code: delete to recompute.
CACHE = BENCHMARKS.parent / ".cache" / "benchmark_statistics"
TASKS = {
    "sst2": ("minilm-l6-sst2", "SST-2", ["sentence"], "label"),
    "mrpc": ("minilm-l6-mrpc", "MRPC", ["#1 String", "#2 String"], "Quality"),
}


def load_task(task: str, num_samples: int = 512, activations: bool = False):
    """(dense model, dev loader, Fisher of every target linear from ``num_samples`` seeded train
    examples, target name → full module name[, activation statistics of the same examples])."""
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
    fisher = _cached(f"{task}-{num_samples}-fisher", lambda: asdict(compute_fisher(
        dense, train(), modules, per_example_loss(task_of(dense)), show_progress=False)))
    result = (dense, dev, FisherResult(**fisher), targets)
    if activations:
        stats = _cached(f"{task}-{num_samples}-activations", lambda: asdict(collect_activation_stats(
            dense, train(), modules, show_progress=False)))
        result += (ActivationStats(**stats),)
    return result


def _cached(key: str, compute) -> dict:
    path = CACHE / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return value
