"""File-level steps shared by the CLI, the examples and the benchmarks: load a model and its
tokenizer from a path, and turn a data file into an importance data loader."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import WSVDConfig
from .data import load_table, make_dataloader, resolve_columns, subset, tokenize
from .tasks import CAUSAL_LM, load_task_model, task_of

if TYPE_CHECKING:
    from datasets import Dataset


def is_local_path(path: str) -> bool:
    """Whether ``path`` can only mean a local folder, not a Hub id (``user/name``): it starts with
    ``/``, ``.`` or ``~``, has more than one separator, or its first part is a local folder."""
    separators = path.count(os.sep) + (path.count(os.altsep) if os.altsep else 0)
    return path.startswith((os.sep, ".", "~")) or separators > 1 or (separators == 1 and os.path.isdir(os.path.dirname(path)))


def _source(path: str) -> tuple[str, dict]:
    """``from_pretrained`` arguments for a folder, a Hub id, or a ``.gguf`` file. A local path that
    does not exist fails at once (rather than after a Hub lookup)."""
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {path!r} does not exist")
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    if not os.path.isdir(path) and is_local_path(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    return path, {}


def stored_dtype(path: str) -> torch.dtype | None:
    """The dtype a checkpoint's config records (None when it records none)."""
    location, extra = _source(path)
    return AutoConfig.from_pretrained(location, **extra).dtype


def load_model_and_tokenizer(path: str, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM or sequence classifier (its Auto class read from the config) and its
    tokenizer, from a folder, a Hub id or a ``.gguf`` file."""
    location, extra = _source(path)
    if extra:
        # transformers reads only decoder LMs from GGUF and records no architectures for them.
        model = load_task_model(location, task=CAUSAL_LM, **extra, **kwargs)
        # GGUF tensors are dequantized to dense ones at load; the leftover quantizer flag would
        # only forbid save_pretrained.
        model.hf_quantizer = None
        del model.config.quantization_config
    else:
        model = load_task_model(location, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    return model, tokenizer


def data_loader(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data_path: "str | Dataset",
    config: WSVDConfig,
    text_columns: list[str] | None = None,
    label_column: str | None = None,
    num_samples: int | None = None,
    shuffle: bool = True,
    split: str | None = None,
) -> DataLoader:
    """Batches of the model's task from a data file, a ``save_to_disk`` folder (``split`` picks a
    DatasetDict's split) or a ``datasets.Dataset``: ``config.num_samples`` seeded random examples
    (the first ``num_samples``, or all, when ``shuffle`` is False), tokenized to
    ``config.max_length``. A classifier's examples are rows, sampled before tokenizing; a causal
    LM's are blocks of the whole text, sampled after."""
    task = task_of(model)
    table = load_table(data_path, split)
    text_columns, label_column = resolve_columns(table, task, text_columns, label_column)
    count = num_samples or config.num_samples if shuffle else num_samples
    if task != CAUSAL_LM:
        table = subset(table, count, config.seed, shuffle)
    encoded = tokenize(
        table, tokenizer, task, text_columns, label_column, config.max_length,
        label2id=model.config.label2id, num_labels=model.config.num_labels,
    )
    if task == CAUSAL_LM:
        encoded = subset(encoded, count, config.seed, shuffle)
    return make_dataloader(encoded, tokenizer, task, config.batch_size)
