"""Shared setup of the element-wise benchmarks: the shipped GLUE task models, their dev loaders,
and one Fisher per task (the same for every method, as benchmarks/glue.py does)."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_wsvd import WSVDConfig
from hf_wsvd.importance import FisherResult, compute_fisher
from hf_wsvd.targets import select_targets
from hf_wsvd.tasks import per_example_loss, task_of
from hf_wsvd.workflow import data_loader, load_model_and_tokenizer

from glue import SHARED, TASKS

RESULTS = Path(__file__).resolve().parent / "results"


def load_task(task: str, num_samples: int = 512, shared: Path = SHARED):
    """(dense model, dev loader, Fisher of every target linear from ``num_samples`` seeded train
    examples, target name → full module name)."""
    model_dir, glue_dir, text_columns, label_column = TASKS[task]
    dense, tokenizer = load_model_and_tokenizer(str(shared / "models" / model_dir), dtype=torch.float32)
    base = WSVDConfig(num_samples=num_samples, batch_size=8, max_length=128, seed=0)
    dev = data_loader(dense, tokenizer, str(shared / "data/glue" / glue_dir / "dev.tsv"), base,
                      text_columns, label_column, shuffle=False)
    train = data_loader(dense, tokenizer, str(shared / "data/glue" / glue_dir / "train.tsv"), base,
                        text_columns, label_column)
    targets = select_targets(dense)
    fisher: FisherResult = compute_fisher(
        dense, train, {n: dense.get_submodule(f) for n, f in targets.items()}, per_example_loss(task_of(dense)),
        show_progress=False,
    )
    return dense, dev, fisher, targets
