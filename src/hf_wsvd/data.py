"""Importance and evaluation data: a `datasets.Dataset`, a `save_to_disk` folder or a local file,
tokenized for the model's task."""

from __future__ import annotations

import contextlib
import copy
import csv
import glob
import json
import logging
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain, islice
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (BatchEncoding, DataCollatorForLanguageModeling, DataCollatorForSeq2Seq,
                          DataCollatorWithPadding, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase)

from .blocks import input_embeddings, kept_flags
from .runtime.modeling_wsvd import held_records, short_repr
from .tasks import CAUSAL_LM, CLASSIFICATION, REGRESSION, SEQ2SEQ_LM, labels_feed_decoder, task_of

if TYPE_CHECKING:  # datasets is imported where it is used, so text-only paths run without it
    from datasets import Dataset

logger = logging.getLogger(__name__)

# extension → (datasets builder, builder options)
_BUILDERS = {
    # GLUE-style TSVs: quotes are literal text, "null" is a word, files may start with a BOM.
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False, "encoding": "utf-8-sig"}),
    ".csv": ("csv", {"keep_default_na": False, "encoding": "utf-8-sig"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".txt": ("text", {}),
    ".raw": ("text", {}),
    ".tokens": ("text", {}),
    ".parquet": ("parquet", {}),
}


# A tokenizer's vocabulary (fast, sentencepiece, WordPiece, BPE): a folder with one has a tokenizer of its own.
TOKENIZER_VOCABULARY = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt",
                        "vocab.json")
# The files one of which every saved tokenizer has.
TOKENIZER_FILES = (*TOKENIZER_VOCABULARY, "tokenizer_config.json")


def load_table(source: str | os.PathLike | Dataset, split: str | None = None) -> Dataset:
    """A ``datasets.Dataset`` from a Dataset (returned as is), a ``save_to_disk`` folder (of a
    Dataset, or of a DatasetDict with ``split`` naming the split unless it has only one), or a
    TSV/CSV/JSON(L)/text/parquet file."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
    from datasets.exceptions import DatasetGenerationError

    if isinstance(source, Dataset):
        return source
    if not isinstance(source, (str, os.PathLike)):
        what = " (pick one split: data['train'])" if isinstance(source, DatasetDict) else ""
        raise ValueError(f"data of type {type(source).__name__}{what}: pass a datasets.Dataset, or the path of a "
                         "data file or save_to_disk folder")
    path = os.fspath(source)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")):
            raise ValueError(f"data folder {path!r} is not a dataset saved with save_to_disk (it has no state.json or "
                             "dataset_dict.json): name a data file, or such a folder")
        try:
            loaded = load_from_disk(path)
        except IndexError as error:  # datasets' own failure on a dataset of no rows
            raise ValueError(f"dataset folder {path!r} holds no rows (or no table)") from error
        if isinstance(loaded, DatasetDict):
            if split is None and len(loaded) == 1:
                split = next(iter(loaded))
            if split not in loaded:
                given = "no split is named" if split is None else f"split={split!r} is not one of them"
                raise ValueError(f"dataset folder {path!r} has splits {sorted(loaded)} and {given}: name one "
                                 "(split=..., --split)")
            loaded = loaded[split]
        elif split is not None:
            raise ValueError(f"split={split!r}: dataset folder {path!r} holds one dataset, not splits; leave split out")
        if len(loaded) == 0:
            raise ValueError(f"dataset folder {path!r} holds no rows")
        return loaded
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if split is not None:
        raise ValueError(f"split={split!r} names a split of a save_to_disk DatasetDict folder, but {path!r} is a file; "
                         "leave split out")
    extension = os.path.splitext(path)[1].lower()
    if extension not in _BUILDERS:
        raise ValueError(f"data file {path!r}: unsupported extension {extension!r}; use one of {sorted(_BUILDERS)}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"data file {path!r} is empty")
    builder, options = _BUILDERS[extension]
    problem = _first_json_value(path) if builder == "json" else None
    if problem:
        raise ValueError(f"data file {path!r} cannot be read as {extension[1:]}: {problem}")
    with held_records(f"datasets.packaged_modules.{builder}.{builder}") as logged:
        try:
            # escaped: datasets reads data_files as glob patterns, so 'dev?.tsv' would also read dev1.tsv
            table = load_dataset(builder, data_files={"data": glob.escape(path)}, split="data", **options)
        # DatasetGenerationError wraps the reader's own error (a binary file, bad JSON); a file with a
        # header and no rows is a ValueError.
        except (DatasetGenerationError, ValueError) as error:
            logged.clear()  # the reader logged its failure, which the one line below says
            if builder == "csv" and _lines_at_most(path, 1):
                raise ValueError(f"data file {path!r} holds no rows, only a header") from error
            cause = error.__cause__ or error
            detail = (str(cause).splitlines() or [type(cause).__name__])[0]
            if builder == "json":  # arrow's reader counts rows from 0 within a chunk: the line, counted from 1
                detail = _bad_json_line(path) or detail
            raise ValueError(f"data file {path!r} cannot be read as {extension[1:]}: {detail}") from error
    if len(table) == 0:
        raise ValueError(f"data file {path!r} holds no rows")
    return table


_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "true or false", type(None): "null", list: "list"}


def _not_rows(value: Any) -> str | None:
    """What the first JSON value of a file is, where it is no row nor list of rows; else None."""
    if isinstance(value, dict) or (isinstance(value, list) and value):
        return None
    kind = "an empty list" if value == [] else f"a JSON {_JSON_TYPES.get(type(value), type(value).__name__)}"
    return f"it holds {kind}, not rows (one object per line, or a list of objects)"


def _first_json_value(path: str) -> str | None:
    """``_not_rows`` of a JSON (lines) file's first line where that line is short and a whole value:
    asked before datasets reads the file, whose reader crashes the process on a first ``null``."""
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for line in iter(lambda: handle.readline(1 << 16), ""):
            if line.strip():
                try:
                    return _not_rows(json.loads(line))
                except ValueError:  # a longer value, or no JSON: the reader's error says which
                    return None
    return None


def _bad_json_line(path: str) -> str | None:
    """What is wrong with JSON (lines) ``path`` whose reader failed, where it can be said: no rows
    (blank lines, or objects without fields), a first value that is no table, or the first line
    after the first that is not a JSON object (numbered from 1); else None."""
    fields = False
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as error:
                return None if number == 1 else f"line {number} is not JSON ({error})"
            if number == 1 and (problem := _not_rows(value)):
                return problem
            if not isinstance(value, dict):
                return None if number == 1 else f"line {number} is a JSON {type(value).__name__}, not an object"
            fields = fields or bool(value)
    return None if fields else "it holds no rows (no object with a field)"


def _lines_at_most(path: str, count: int) -> bool:
    """Whether the file ``path`` has at most ``count`` non-blank lines (read until it has more)."""
    with open(path, "rb") as handle:
        lines = (line for line in iter(lambda: handle.readline(1 << 16), b"") if line.strip())
        return len(list(islice(lines, count + 1))) <= count


def read_texts(path: str, source: str, text_columns: list[str] | None = None, split: str | None = None) -> list[str]:
    """The texts a language model is trained on from the file or folder ``path``, as ``compress``
    reads them: the rows of a table's text column (TSV/CSV/JSON(L)/parquet or a ``save_to_disk``
    folder, ``split`` of a DatasetDict; ``text_columns``' one, else its first string column) or the
    lines of any other file, read as UTF-8 text. ``source`` names it in errors."""
    extension = os.path.splitext(path)[1].lower()
    if os.path.isdir(path) or _BUILDERS.get(extension, ("text",))[0] != "text":
        table = with_named_fields(load_table(path, split), list(text_columns or []), source)
        (column, *_), _ = resolve_columns(table, CAUSAL_LM, text_columns, source=source)
        return _texts(table, column, source)
    if split is not None or text_columns:
        raise ValueError(f"{source} is a plain text file: --split and --text-columns name parts of a table or dataset folder")
    try:
        with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark is no text (tables drop theirs too)
            return handle.read().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{source} cannot be read as UTF-8 text ({error})") from None
    except OSError as error:
        raise ValueError(f"{source} cannot be read: {error.strerror or error}") from None


def _check_text(column: str, source: str, values: list, missing: bool = False, option: str = "--text-columns") -> None:
    """Refuse a value of the text column ``column`` (named by ``option``) that is not a string (``None``
    where ``missing``)."""
    for index, value in enumerate(values):
        if not isinstance(value, str) and not (missing and value is None):
            shown = short_repr(value, 60)
            hint = ("; this one holds numbers" if isinstance(value, (int, float)) and not isinstance(value, bool) else
                    "; its cells are lists: write one object (row) per text, not one list per column"
                    if isinstance(value, list) else "")
            raise ValueError(f"column {column!r} of {source} is not text (row {index + 1}: {shown}): name a column "
                             f"of text ({option}){hint}")


def _texts(dataset: "Dataset", column: str, source: str) -> list[str]:
    """A language model's texts: the strings of ``column``, its missing values left out."""
    values = dataset[column]
    _check_text(column, source, values, missing=True)
    return [value for value in values if value is not None]


def _fields(dataset: "Dataset") -> list[str]:
    """The fields of ``dataset``'s columns of objects, named as ``column.field``."""
    return [f"{column}.{field}" for column, feature in dataset.features.items() if isinstance(feature, dict)
            for field in feature]


def with_named_fields(dataset: "Dataset", names: list[str | None], source: str = "the data") -> "Dataset":
    """``dataset`` with the fields of its columns of objects as columns of their own where ``names``
    name one (a translation pair ``{"translation": {"en": ..., "fr": ...}}``: ``translation.en``); else
    as it is, so that no field is taken for text unnamed."""
    fields = _fields(dataset)
    if not any(name in fields and name not in dataset.column_names for name in names):
        return dataset
    clash = next((field for field in fields if field in dataset.column_names), None)
    if clash is not None:
        raise ValueError(f"{source} has a column {clash!r} and a column of objects with a field of that name: "
                         "rename one")
    return dataset.flatten()


def resolve_columns(
    dataset: "Dataset", task: str, text_columns: list[str] | None = None, label_column: str | None = None,
    source: str = "the data",
) -> tuple[list[str], str | None]:
    """Check the requested columns exist; default the label column to ``label`` (a sequence-to-sequence
    LM's, its target text, to ``target``) and the text columns to the string columns: for
    classifiers/regressors two of them (and no third) are a sentence pair (``sentence1``/``sentence2``,
    MRPC's ``#1 String``/``#2 String``), else the first one. A notice names the columns chosen when
    there was a choice. Causal LMs take no label column. ``source`` names the data in errors."""
    columns = dataset.column_names
    fields = _fields(dataset)
    # a column of objects' fields are named to be read (with_named_fields)
    shown = f"columns {columns}" + (f"; fields {fields}" if fields else "")
    repeated = sorted({c for c in text_columns or [] if text_columns.count(c) > 1})
    if repeated:
        raise ValueError(f"text_columns={text_columns} names {repeated[0]!r} twice: a sentence pair is two columns")
    if task == CAUSAL_LM and label_column is not None:  # before the columns: no column of the data would do
        raise ValueError(f"label column {label_column!r} given for a causal LM, which is trained on the text alone")
    for column in [*(text_columns or []), *([label_column] if label_column else [])]:
        if column not in columns:
            raise ValueError(f"unknown column {column!r}: {source} has {shown}")
    if task != CAUSAL_LM and label_column is None:
        default, what = ("target", "column of target text") if task == SEQ2SEQ_LM else ("label", "label column")
        if default not in columns:
            raise ValueError(f"no {default!r} column in {source} ({shown}): name the {what} (--label-column)")
        label_column = default
    if label_column is not None and label_column in (text_columns or []):
        raise ValueError(f"column {label_column!r} is named both the label column and a text column: name each once")
    if not text_columns:
        strings = [c for c in columns if c != label_column
                   and getattr(dataset.features[c], "dtype", None) in ("string", "large_string")]
        if not strings:
            # A column of strings and other values (datasets 5's Json feature; named, since older releases
            # lack the class) was meant as text: its first odd value is named.
            for column in columns:
                if column != label_column and type(dataset.features[column]).__name__ == "Json":
                    values = dataset[column]
                    if any(isinstance(value, str) for value in values):
                        _check_text(column, source, values, missing=True)
            kind = "target text column" if task == SEQ2SEQ_LM else "label column"
            besides = f" besides the {kind} {label_column!r}" if label_column in columns else ""
            raise ValueError(f"no text column in {source} ({shown}){besides}: name one (--text-columns)")
        pairs = task not in (CAUSAL_LM, SEQ2SEQ_LM)  # a language model reads one text
        text_columns = strings[:2] if pairs and len(strings) == 2 else strings[:1]
        if len(text_columns) == 2:
            logger.warning("using the text columns %r and %r as a sentence pair (--text-columns to choose)",
                           *text_columns)
        elif len(strings) > 1:
            logger.warning("using the text column %r; not using %s (--text-columns to choose%s)",
                           text_columns[0], ", ".join(map(repr, strings[1:])), ", two for a pair" if pairs else "")
    if len(text_columns) > 2:
        raise ValueError(f"text_columns={text_columns}: at most two (a sentence pair) are supported")
    if task == SEQ2SEQ_LM and len(text_columns) > 1:
        raise ValueError(f"text_columns={text_columns}: a sequence-to-sequence LM reads one source text; name one "
                         "column (its target text is --label-column)")
    if task == CAUSAL_LM and len(text_columns) > 1:
        raise ValueError(f"text_columns={text_columns}: a causal LM reads one text column; name one")
    return list(text_columns), label_column


def _label_ids(values: list, indices: list[int], label2id: dict[str, int], num_labels: int, task: str,
               source: str, class_indices: bool = False) -> list:
    """The task's labels of rows ``indices`` (class indices, or finite numbers for a regressor);
    ``class_indices``: the values are indices whatever the class names (a ``ClassLabel`` column)."""
    ids = []
    for index, value in zip(indices, values):
        where = f"label {value!r} (row {index + 1} of {source})"
        if task != CLASSIFICATION:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where} is not a number, which a regressor's labels are") from None
            if not math.isfinite(number):
                raise ValueError(f"{where} is not a finite number: fix or remove the row")
            ids.append(number)
            continue
        number = (value if isinstance(value, int) and not isinstance(value, bool) else
                  int(value) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else None)
        if isinstance(value, str) and value in label2id:
            label = label2id[value]
        elif number is not None:
            label = number
        else:
            raise ValueError(f"{where} is neither a class index nor one of the model's labels {sorted(label2id)}")
        if (not class_indices and number is not None and 0 <= number < num_labels
                and label2id.get(str(number), number) != number):
            # A file's column of numbers reads as ints, a JSON string as a name: neither reading is safe.
            named = short_repr(dict(sorted(label2id.items(), key=lambda item: item[1])))
            raise ValueError(f"{where} is ambiguous: the model names its classes by numbers that are not their indices "
                             f"(label2id {named}), so it is both class {number} and the class named {str(number)!r}; "
                             "rename the classes in the model's config (label2id, id2label), e.g. to 'class_1', and "
                             "label the data with those names or with the class indices")
        if not 0 <= label < num_labels:
            raise ValueError(f"{where} is outside the model's {num_labels} classes")
        ids.append(label)
    return ids


def _model_class_ids(dataset: "Dataset", label_column: str | None, label2id: dict[str, int] | None,
                     source: str) -> "Dataset":
    """``dataset`` with the class indices of a ``ClassLabel`` label column renumbered to the model's
    classes of the same names (case aside, as datasets' ``align_labels_with_mapping``) where both
    name their classes: the data's order of classes need not be the model's. A class the model does
    not name is a one-line error. Where either side's names are only numbers (transformers' default
    LABEL_0, ..., or a ClassLabel of num_classes alone) the indices are taken as they are."""
    from datasets import ClassLabel, Value

    feature = dataset.features.get(label_column) if label_column is not None else None
    named = {str(name).lower(): index for name, index in (label2id or {}).items()}
    if (not isinstance(feature, ClassLabel) or all(name in (f"label_{i}", str(i)) for name, i in named.items())
            or feature.names == [str(i) for i in range(feature.num_classes)]):
        return dataset
    unknown = [name for name in feature.names if name.lower() not in named]
    if unknown:
        raise ValueError(f"{source} names its classes {feature.names} (its {label_column!r} column), and {unknown[0]!r} "
                         f"is none of the model's labels {sorted(label2id)}: name the data's classes as the model does "
                         "(dataset.cast_column with a ClassLabel of its names) or the model's as the data does "
                         "(config.id2label and label2id)")
    ids = [named[name.lower()] for name in feature.names]
    if ids == list(range(len(ids))):
        return dataset
    features = dataset.features.copy()
    features[label_column] = Value("int64")

    def renumber(rows: dict) -> dict:  # an index outside the data's classes (-1: unlabelled) stays, to be refused
        return {label_column: [ids[i] if i is not None and 0 <= i < len(ids) else i for i in rows[label_column]]}

    # In memory: a dataset read from a save_to_disk folder would otherwise get cache files written there.
    return dataset.map(renumber, batched=True, features=features, keep_in_memory=True)


def check_rows(dataset: "Dataset", task: str, text_columns: list[str], label_column: str | None,
               label2id: dict[str, int] | None = None, num_labels: int = 2, source: str = "the data",
               class_indices: bool | None = None) -> None:
    """Refuse, naming its row, a classifier's or regressor's text that is not a string or label the
    model cannot take, and text columns that are blank in every row (``data_loader`` checks the whole
    table before sampling, so that the row named is the file's). ``class_indices``: whether the labels
    are class indices (None: where the column is a ``ClassLabel``)."""
    texts = [dataset[column] for column in text_columns]
    for column, values in zip(text_columns, texts):
        _check_text(column, source, values)
    # A blank row is an example of the special tokens alone, as the tokenizer makes it; data that is
    # all blank would calibrate or score on nothing else.
    if not any(text.strip() for values in texts for text in values):
        raise ValueError(f"{source} holds no text in {', '.join(map(repr, text_columns))}: every row is empty or blank")
    if label_column is not None and task == SEQ2SEQ_LM:  # its target text: a blank one would teach the end alone
        if _class_label(dataset, label_column):
            names = dataset.features[label_column].names
            raise ValueError(f"column {label_column!r} of {source} is a ClassLabel (class indices of "
                             f"{short_repr(names, 60)}), not text: a sequence-to-sequence LM's target is text; "
                             "name a column of text (--label-column), or write the class names out as text")
        targets = dataset[label_column]
        _check_text(label_column, source, targets, option="--label-column")
        blank = next((i for i, text in enumerate(targets) if not text.strip()), None)
        if blank is not None:
            raise ValueError(f"row {blank + 1} of {source} has no target text in {label_column!r}: remove the empty rows")
    elif label_column is not None:
        values = dataset[label_column]
        _label_ids(values, range(len(values)), label2id or {}, num_labels, task, source,
                   _class_label(dataset, label_column) if class_indices is None else class_indices)


def _class_label(dataset: "Dataset", column: str | None) -> bool:
    """Whether ``column`` is a ``ClassLabel`` column (its values are class indices)."""
    from datasets import ClassLabel

    return column is not None and isinstance(dataset.features.get(column), ClassLabel)


def tokenize(
    dataset: "Dataset",
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    text_columns: list[str],
    label_column: str | None,
    max_length: int,
    label2id: dict[str, int] | None = None,
    num_labels: int = 2,
    source: str = "the text",
) -> "Dataset":
    """Tokenize for the task. Classification/regression: one example per row (pairs supported; a
    ClassLabel column's indices follow the model's class names, ``label2id``). Sequence-to-sequence
    LM: one example per row, its labels the target text's ids (``label_column``). Causal LM: rows are
    joined with EOS and cut into blocks of ``max_length`` tokens (no chat template), the standard
    language-modeling layout; ``source`` names the data in errors."""
    from datasets import Dataset

    if task == CAUSAL_LM:
        return Dataset.from_list(text_blocks(_texts(dataset, text_columns[0], source), tokenizer, max_length, source))

    # The tokenizer skips truncation, without a word, where its special tokens leave no room for text.
    special = tokenizer.num_special_tokens_to_add(pair=len(text_columns) == 2)
    if max_length <= special:
        raise ValueError(f"max_length={max_length} (--max-length) leaves no room for text: the tokenizer adds {special} "
                         f"special tokens to each example; use at least {special + 1}")

    class_indices = _class_label(dataset, label_column)  # before _model_class_ids renumbers it into plain ints
    dataset = _model_class_ids(dataset, label_column, label2id, source)
    check_rows(dataset, task, text_columns, label_column, label2id, num_labels, source, class_indices)
    named = ", ".join(map(repr, text_columns))

    def cut(texts: list[list[str]], **target) -> tuple[BatchEncoding, list[bool]]:
        """``texts`` (or the target text) tokenized and cut at max_length, and which rows were cut."""
        encoded = tokenizer(*texts, truncation=True, max_length=max_length, **target)
        # A row shorter than the limit was not cut; one at it was where a limit one higher keeps one more
        # token (a fast tokenizer's ``overflowing`` would say so in one pass, but transformers 5.17 leaves
        # it empty).
        full = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) >= max_length]
        cut_rows = [False] * len(encoded["input_ids"])
        if full:
            longer = tokenizer(*([column[i] for i in full] for column in texts), truncation=True,
                               max_length=max_length + 1, **{k: [v[i] for i in full] for k, v in target.items()})
            for i, ids in zip(full, longer["input_ids"]):
                cut_rows[i] = len(ids) > max_length
        return encoded, cut_rows

    def encode(rows, indices):
        encoded, cut_text = cut([rows[c] for c in text_columns])
        encoded["cut_text"] = cut_text
        for index, ids in zip(indices, encoded["input_ids"]):
            if not ids:  # a tokenizer that adds no special tokens gives an empty text no token to run on
                raise ValueError(f"row {index + 1} of {source} has no text in {named}: remove the empty rows")
        if task == SEQ2SEQ_LM:  # its target text, tokenized as the labels
            targets, cut_target = cut([], text_target=rows[label_column])
            encoded["labels"], encoded["cut_target"] = targets["input_ids"], cut_target
        else:
            encoded["cut_target"] = [False] * len(indices)
            encoded["labels"] = _label_ids(rows[label_column], indices, label2id or {}, num_labels, task, source,
                                           class_indices)
        return encoded

    # In memory: a dataset read from a save_to_disk folder would otherwise get cache files written
    # into that folder, which is the user's.
    encoded = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                          keep_in_memory=True)
    counted = {what: sum(encoded[column]) for what, column in (("text", "cut_text"), ("target text", "cut_target"))}
    if any(counted.values()):
        counts = " and ".join(f"the {what} of {count}" for what, count in counted.items() if count)
        logger.warning("max_length=%d (--max-length) cut %s of the %d rows of %s", max_length, counts, len(encoded),
                       source)
    return encoded.remove_columns(["cut_text", "cut_target"])


def check_block_length(max_length: int) -> None:
    """Refuse blocks of fewer than two tokens: each token predicts the next, so a causal LM's block
    of one predicts nothing (no loss, no perplexity)."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} (--max-length) leaves a causal LM no token to predict in a block; "
                         "use at least 2")


def text_blocks(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int,
                source: str = "the text") -> list[dict[str, list[int]]]:
    """Language-modeling examples: non-empty texts joined with EOS, cut into full blocks of
    ``max_length`` tokens (no chat template; the remainder is dropped). ``source`` names the text in
    errors (``"data file 'x.txt'"``)."""
    check_block_length(max_length)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(f"{source} holds no text: its lines are empty or blank")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = list(chain.from_iterable(row + eos for row in tokenizer(texts, add_special_tokens=False)["input_ids"]))
    blocks = [ids[i : i + max_length] for i in range(0, len(ids) - max_length + 1, max_length)]
    if not blocks:
        raise ValueError(f"{source} has {len(ids)} tokens, fewer than one block of max_length={max_length}")
    return [{"input_ids": block, "attention_mask": [1] * max_length} for block in blocks]


def forked_streams(device: torch.device) -> contextlib.AbstractContextManager:
    """A fork of torch's random streams that ``seed_streams`` seeds (the CPU's and, on CUDA,
    ``device``'s): the caller's come back as they were when it ends; no other device's is touched."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def seed_streams(seed: int, device: torch.device) -> None:
    """Seed torch's CPU random stream and, on CUDA, ``device``'s."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


@torch.no_grad()
def teacher_samples(teacher: PreTrainedModel, blocks: Sequence[dict], count: int, prompt_length: int | None = None,
                    batch_size: int = 64, seed: int = 0, show_progress: bool = True,
                    share: tuple[int, int] = (0, 1)) -> list[dict]:
    """``count`` blocks written by ``teacher``: each continues the first ``prompt_length`` tokens
    (None: a quarter of the block, at most 32) of a block drawn (seeded) from ``blocks``, sampled at
    temperature 1 up to the blocks' length without ending the text, ``batch_size`` at a time, in the
    blocks' format (lists or tensors). Added to calibration or healing data, they give text the real
    data does not hold when it is small. The same for the same seed, ``batch_size`` and device type:
    each batch is sampled from a seed of its own, so ``share=(p, P)`` writes batches p, p + P, ...
    alone (a process's share), as one process writing all of them would."""
    if count < 1:
        return []
    if not blocks:
        raise ValueError("teacher_samples needs blocks to take its prompts from: none were given")
    length = len(blocks[0]["input_ids"])
    if any(len(block["input_ids"]) != length for block in blocks):
        raise ValueError(f"teacher_samples needs blocks of one length: the first holds {length} tokens, others differ")
    if length < 2:
        raise ValueError(f"blocks of {length} token leave nothing to write after a prompt: they need at least 2 "
                         "(raise max_length)")
    prompt_length = max(1, min(32, length // 4)) if prompt_length is None else prompt_length
    if not 0 < prompt_length < length:
        raise ValueError(f"prompt_length={prompt_length} must be between 1 and {length - 1} (the blocks hold "
                         f"{length} tokens)")
    index, processes = share
    if not 0 <= index < processes:
        raise ValueError(f"share={share!r} must be (index, processes) with 0 <= index < processes")
    generator = random.Random(seed)
    prompts = torch.stack([torch.as_tensor(generator.choice(blocks)["input_ids"][:prompt_length])
                           for _ in range(count)])
    as_tensors = torch.is_tensor(blocks[0]["input_ids"])
    device = next(teacher.parameters()).device
    eos = getattr(teacher.generation_config, "eos_token_id", None) or getattr(teacher.config, "eos_token_id", None)
    # The checkpoint's generation_config is swapped out for the call: generate() fills every field
    # left unset from it, and its settings (top_p, beams, banned words…) would bend the samples away
    # from the teacher's own distribution.
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                max_new_tokens=length - prompt_length, min_new_tokens=length - prompt_length,
                                eos_token_id=eos, pad_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos)
    saved, teacher.generation_config = teacher.generation_config, settings
    written = []
    try:
        with kept_flags(teacher), forked_streams(device):  # written in eval mode
            teacher.eval()
            starts = range(index * batch_size, count, processes * batch_size)
            for start in tqdm(starts, desc="writing blocks", disable=not show_progress):
                seed_streams(random.Random(f"{seed}/{start // batch_size}").getrandbits(63), device)
                ids = prompts[start : start + batch_size].to(device)
                output = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
                if output.shape[1] < length:
                    raise RuntimeError(f"the model wrote {output.shape[1]} of {length} tokens: its generate() "
                                       "stopped early")
                for row in output[:, :length].cpu():
                    written.append({"input_ids": row if as_tensors else row.tolist(),
                                    "attention_mask": torch.ones_like(row) if as_tensors else [1] * length})
    finally:
        teacher.generation_config = saved
    return written


@dataclass(frozen=True)
class Positions:
    """What bounds the sequences of a model (or of an encoder-decoder model's decoder): the longest
    one it takes and the config field that says so, and the ids its ``position_ids`` may take
    (``low`` to ``high``, exclusive): the rows of its learned table past the offset the forward adds
    (BART's and OPT's tables hold that many more rows than ``max_position_embeddings``), or 0 to the
    longest where the limit is no learned table (MPT's ALiBi bias, CTRL's sinusoidal table)."""

    longest: int
    field: str
    low: int
    high: int


# Models whose forward takes no longer sequence than a config field, though they have no learned
# position table: MPT builds its ALiBi bias that long, CTRL its sinusoidal table.
_FIXED_LENGTH = {"mpt": "max_seq_len", "ctrl": "n_positions"}
# Models whose learned table holds more rows than the positions their forward takes (their default
# position ids start at 2): as many more.
_EXTRA_ROWS = {"nystromformer": 2, "yoso": 2, "mra": 2}


def positions(model: nn.Module, decoder: bool = False) -> Positions | None:
    """What bounds the sequences ``model`` takes (``decoder``: those of an encoder-decoder model's
    decoder, which may have a table of its own: LED, bert2bert); None without a bound (rotary or
    relative positions). A table of relative positions (DeBERTa's ``rel_embeddings``, read by
    attention, as many rows as positions in DeBERTa-v3) is none: it limits neither the length nor
    the position ids."""
    part = model
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        try:
            part = model.get_decoder() if decoder else model.get_encoder()
        except Exception:  # noqa: BLE001 (a model, remote code included, that names neither: searched whole)
            pass
        part = part if isinstance(part, nn.Module) else model
    config = getattr(part, "config", None) or getattr(model, "config", None)
    fixed = _FIXED_LENGTH.get(getattr(config, "model_type", None))
    if fixed is not None and isinstance(getattr(config, fixed, None), int):
        return Positions(getattr(config, fixed), fixed, 0, getattr(config, fixed))
    if getattr(config, "position_biased_input", True) is False:  # DeBERTa: relative positions alone
        return None
    side = "max_decoder_position_embeddings" if decoder else "max_encoder_position_embeddings"  # LED's
    field = next((f for f in ("max_position_embeddings", side) if isinstance(getattr(config, f, None), int)), None)
    if field is None:
        return None
    count, extra = getattr(config, field), _EXTRA_ROWS.get(getattr(config, "model_type", None), 0)
    # never a word table (one as long as the positions): the part's own, or the model's where the part names none
    words = {id(getattr(table, "weight", table)) for table in (input_embeddings(part), input_embeddings(model))}
    for name, module in part.named_modules():
        offset = getattr(module, "offset", 0)
        if (isinstance(module, nn.Embedding) and isinstance(offset, int)
                and module.num_embeddings - offset - extra == count and id(module.weight) not in words
                and not name.rpartition(".")[2].startswith("rel")):
            # RoBERTa's positions start past its padding index
            longest = count - (0 if module.padding_idx is None else module.padding_idx + 1)
            return Positions(longest, field, -offset, count + extra)
    return None


def table_rows(table: Any) -> int | None:
    """The rows of a token table (an ``nn.Embedding``, hf_wsvd's factorized one, or a module of one
    2-D ``weight`` such as I-BERT's ``QuantEmbedding``); None for anything else."""
    rows = getattr(table, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    weight = getattr(table, "weight", None)
    return weight.shape[0] if isinstance(table, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
        else None


def vocabulary_size(model: nn.Module) -> int | None:
    """The rows of ``model``'s input token table; None where it has none hf_wsvd can read (Canine
    hashes code points, Perceiver's input embeddings are its latents): its ids go unchecked."""
    return table_rows(input_embeddings(model))


def target_vocabulary(model: nn.Module) -> int | None:
    """The tokens an encoder-decoder model's target ids may take: the fewer of its decoder's input
    table's rows and its output layer's scores (FSMT and Marian without shared tables have a target
    vocabulary of their own); the input table's rows where it has neither."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    sizes = [vocabulary_size(decoder) if hasattr(decoder, "get_input_embeddings")
             else table_rows(getattr(decoder, "embed_tokens", None)),  # FSMT's decoder names no table
             getattr(output, "out_features", None) or table_rows(output)]  # FSMT's: the embedding it ties to
    sizes = [size for size in sizes if isinstance(size, int)]
    return min(sizes) if sizes else vocabulary_size(model)


def check_fits(model: nn.Module, input_ids: Iterable[Sequence[int]], max_length: int,
               extra_ids: Iterable[int | None] = (), target_ids: Iterable[Sequence[int]] = ()) -> None:
    """Raise unless every token id (of ``input_ids`` and ``extra_ids``, e.g. the padding id) has a
    row in the model's token embeddings, every target id of an encoder-decoder model (``target_ids``)
    one among its target tokens, and every sequence fits its position table: a one-line error naming
    the value rather than an IndexError deep in the forward pass."""
    rows, targets = [list(ids) for ids in input_ids], [list(ids) for ids in target_ids]
    extra = [i for i in extra_ids if i is not None]
    for sequences, vocabulary in ((rows, vocabulary_size(model)), (targets, target_vocabulary(model) if targets else None)):
        largest = max([*(max(ids) for ids in sequences if ids), *extra], default=-1)
        if vocabulary and largest >= vocabulary:
            raise ValueError(f"the tokenizer's ids go up to {largest} but the model has {vocabulary} "
                             f"{'target tokens' if sequences is targets else 'token embeddings'}: use the model's own "
                             "tokenizer")
    for sequences, bound in ((rows, positions(model)), (targets, positions(model, decoder=True) if targets else None)):
        longest = max(map(len, sequences), default=0)
        if bound is not None and longest > bound.longest:
            raise ValueError(f"--max-length {max_length} exceeds the model's {bound.longest} "
                             f"{'target ' if sequences is targets else ''}positions ({bound.field}): the data holds "
                             f"sequences of {longest} tokens; lower it to {bound.longest} or less")


def check_ids_and_mask(ids: torch.Tensor, mask: Any, vocabulary: int | None, where: str,
                       names: tuple[str, str] = ("input_ids", "attention_mask")) -> None:
    """Raise a one-line error naming the value (``where``: what holds them; ``names``: theirs) unless
    the token ``ids`` have rows among ``vocabulary`` token embeddings (None: any id from 0) and
    ``mask``, if any, is a tensor of their shape marking each token 1 (real) or 0 (padding)."""
    if not 0 <= int(ids.min()) or vocabulary is not None and int(ids.max()) >= vocabulary:
        raise ValueError(f"{where}: {names[0]} go from {int(ids.min())} to {int(ids.max())}, outside the model's "
                         + (f"{vocabulary} token embeddings" if vocabulary is not None else "token ids (from 0)")
                         + ": tokenize with the model's own tokenizer")
    _check_mask(mask, ids, where, names)


def _check_mask(mask: Any, ids: torch.Tensor, where: str, names: tuple[str, str]) -> None:
    if mask is None:
        return
    if not (isinstance(mask, torch.Tensor) and mask.shape == ids.shape):
        # one 0/1 per token (not a 4-D attention mask): the losses weigh each token by it
        raise ValueError(f"{where}: {names[1]} is {_shown(mask)}, {names[0]} {tuple(ids.shape)}: they must match "
                         "(one 1 or 0 per token)")
    odd = mask[(mask != 0) & (mask != 1)]
    if odd.numel():  # block refinement and healing weigh each token's loss by it
        raise ValueError(f"{where}: {names[1]} holds {odd[0].item()!r}; it marks each token 1 (real) or 0 "
                         "(padding)")


def check_batch(model: nn.Module, batch: Any, index: int, task_labels: bool = True) -> None:
    """Raise a one-line error naming the value unless ``batch`` (the ``index``-th calibration batch,
    from 0) is what the passes feed ``model``: a dict; its ``input_ids``, if any, 2-D integers inside
    the vocabulary and position table, with a matching ``attention_mask`` (and ``token_type_ids`` and
    ``position_ids``, if given, inside their tables); where ``task_labels`` (the
    task's own loss reads them), ``labels`` of the model's task (a causal LM: the ids' shape; a
    classifier: one class index or -100 per example)."""
    where = f"calibration batch {index}"
    if not isinstance(batch, Mapping):
        raise TypeError(f"{where} is a {type(batch).__name__}: each batch must be a dict of tensors "
                        "(input_ids, attention_mask, labels)")
    if not batch:
        raise ValueError(f"{where} is an empty dict: each batch must hold the model's inputs (input_ids, "
                         "attention_mask, labels)")
    if "input_ids" not in batch:  # a model of other inputs (pixel_values, ...): the forward pass names them
        return
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{where}: input_ids must be a 2-D integer tensor (examples × tokens), not {_shown(ids)}")
    if not ids.numel():
        raise ValueError(f"{where} holds no tokens (input_ids of shape {tuple(ids.shape)}): leave empty batches out")
    if ids.is_meta:
        raise ValueError(f"{where}: input_ids are on the meta device (shapes without values): give the token ids")
    vocabulary = vocabulary_size(model)
    check_ids_and_mask(ids, batch.get("attention_mask"), vocabulary, where)
    if batch.get("attention_mask") is not None and not batch["attention_mask"].any():
        raise ValueError(f"{where}: attention_mask marks no token as real (all 0): leave the batch out")
    bound = positions(model)  # one walk of the model's modules for both checks
    # Given position_ids (packed sequences restart them), only their range is the table's to check.
    if bound is not None and ids.shape[1] > bound.longest and batch.get("position_ids") is None:
        raise ValueError(f"{where} holds sequences of {ids.shape[1]} tokens, more than the model's {bound.longest} "
                         f"positions ({bound.field}): cut them shorter")
    types = getattr(model.config, "type_vocab_size", None)
    if isinstance(types, int) and types > 0:  # DeBERTa's 0: no table, its token_type_ids go unread
        _check_table_ids(batch.get("token_type_ids"), "token_type_ids", 0, types, f"{types} token types (type_vocab_size)",
                         where)
    elif types is None and vocabulary is not None:  # no table of their own: GPT-2 looks them up in its word table
        _check_table_ids(batch.get("token_type_ids"), "token_type_ids", 0, vocabulary, f"{vocabulary} tokens "
                         "(a model without type_vocab_size reads token types as tokens)", where)
    if bound is not None:  # ids index the table past the offset the forward adds (OPT's padding: -1)
        _check_table_ids(batch.get("position_ids"), "position_ids", bound.low, bound.high,
                         f"{bound.high} positions ({bound.field})", where)
    labels = batch.get("labels")
    if getattr(model.config, "is_encoder_decoder", False):  # its decoder reads them, whatever the loss
        _check_decoder_targets(batch, ids, target_vocabulary(model), positions(model, decoder=True), where,
                               labels_feed_decoder(model))
    if labels is None or not task_labels:
        return
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{where}: labels must be a tensor, not {_shown(labels)}")
    try:
        task = task_of(model)
    except ValueError:  # a model of no task hf_wsvd knows: its loss_fn reads the labels
        return
    if task == CAUSAL_LM and (labels.shape != ids.shape or labels.is_floating_point() or labels.dtype == torch.bool):
        raise ValueError(f"{where}: a causal LM's labels are its input ids ({tuple(ids.shape)} integers, -100 where "
                         f"not predicted), not {_shown(labels)}")
    if task == CAUSAL_LM:
        scores = getattr(model.get_output_embeddings(), "out_features", None) or vocabulary  # what the loss reads
        wrong = labels[(labels != -100) & ((labels < 0) | (labels >= (scores or torch.iinfo(torch.int64).max)))]
        if wrong.numel():
            raise ValueError(f"{where}: label {int(wrong[0])} is outside the model's {scores} output tokens (a causal "
                             "LM's labels are its input ids, -100 where not predicted)")
    # One label per example, as a row or a column (transformers' losses flatten them too).
    per_example = labels.shape in (ids.shape[:1], (ids.shape[0], 1))
    if task == REGRESSION and (not per_example or labels.dtype == torch.bool):
        raise ValueError(f"{where}: a regressor's labels are one number per example ({ids.shape[0]} numbers), not "
                         f"{_shown(labels)}")
    if task == CLASSIFICATION:
        classes = model.config.num_labels
        if not per_example or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"{where}: a classifier's labels are one class index per example ({ids.shape[0]} "
                             f"integers), not {_shown(labels)}")
        wrong = labels[(labels != -100) & ((labels < 0) | (labels >= classes))]
        if wrong.numel():
            raise ValueError(f"{where}: label {int(wrong[0])} is outside the model's {classes} classes")


def _check_table_ids(value: Any, name: str, low: int, high: int, what: str, where: str) -> None:
    """A batch's ``name`` (token types, positions), if given: integers in [``low``, ``high``), the ids of
    the rows of the model's table of ``what``."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dtype == torch.bool:
        raise ValueError(f"{where}: {name} must be an integer tensor, not {_shown(value)}")
    if value.numel() and not low <= int(value.min()) <= int(value.max()) < high:
        raise ValueError(f"{where}: {name} go from {int(value.min())} to {int(value.max())}, outside the model's "
                         f"{what}")


def _check_decoder_targets(batch: Mapping, ids: torch.Tensor, vocabulary: int | None, bound: Positions | None,
                           where: str, labels_are_targets: bool) -> None:
    """An encoder-decoder model's ``decoder_input_ids`` and, where ``labels_are_targets`` (its decoder's
    inputs are built from them where the batch has none), ``labels``: 2-D integers, one row per
    example, inside the target ``vocabulary`` (labels: or -100) and the position table, with a
    ``decoder_attention_mask`` of their shape."""
    labels = batch.get("labels") if labels_are_targets else None
    decoder_ids = batch.get("decoder_input_ids")
    for name, value in (("labels", labels), ("decoder_input_ids", decoder_ids)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.is_floating_point() \
                or value.dtype == torch.bool or value.shape[0] != ids.shape[0]:
            raise ValueError(f"{where}: an encoder-decoder model's {name} are the target text's ids ({ids.shape[0]} "
                             f"rows of integers, -100 where not predicted), not {_shown(value)}")
        if bound is not None and value.shape[1] > bound.longest:
            raise ValueError(f"{where}: {name} hold sequences of {value.shape[1]} tokens, more than the model's "
                             f"{bound.longest} target positions ({bound.field}): cut them shorter")
    if labels is not None:
        wrong = labels[(labels != -100) & ((labels < 0) | (labels >= (vocabulary or torch.iinfo(torch.int64).max)))]
        if wrong.numel():
            raise ValueError(f"{where}: label {int(wrong[0])} is outside the model's {vocabulary} target tokens (-100 "
                             "marks a label not predicted)")
        if decoder_ids is not None and decoder_ids.shape[:2] != labels.shape:
            raise ValueError(f"{where}: labels of shape {tuple(labels.shape)} and decoder_input_ids of shape "
                             f"{tuple(decoder_ids.shape[:2])}: the decoder predicts one label at each of its positions")
    names = ("decoder_input_ids", "decoder_attention_mask")
    if decoder_ids is not None:
        check_ids_and_mask(decoder_ids, batch.get("decoder_attention_mask"), vocabulary, where, names)
    elif labels is not None:
        _check_mask(batch.get("decoder_attention_mask"), labels, where, ("labels", names[1]))


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def sample(dataset: "Dataset", num_samples: int, seed: int) -> "Dataset":
    """A seeded random subset of at most ``num_samples`` rows."""
    if num_samples >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed, keep_in_memory=True).select(range(num_samples))  # no file (tokenize)


def subset(dataset: "Dataset", num_samples: int | None, seed: int, shuffle: bool) -> "Dataset":
    """``sample`` of ``num_samples`` rows when ``shuffle``, else the first ``num_samples`` rows in
    order (all rows when None)."""
    if shuffle:
        return sample(dataset, num_samples or len(dataset), seed)
    return dataset if num_samples is None else dataset.select(range(min(num_samples, len(dataset))))


def make_dataloader(dataset: "Dataset | list[dict]", tokenizer: PreTrainedTokenizerBase, task: str, batch_size: int) -> DataLoader:
    """Batches padded per batch; causal LM batches get ``labels`` = input ids, a sequence-to-sequence
    LM's its target text's (padding → -100)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == CAUSAL_LM:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    elif task == SEQ2SEQ_LM:  # the model builds its decoder's inputs from the labels, read from the left
        tokenizer = copy.copy(tokenizer)  # the collator pads the labels on its tokenizer's side, read at each batch
        tokenizer.padding_side = "right"
        collator = DataCollatorForSeq2Seq(tokenizer)
    else:
        collator = DataCollatorWithPadding(tokenizer)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
