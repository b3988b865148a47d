"""File-level steps shared by the CLI, the examples and the benchmarks: load a model and its
tokenizer from a path, and turn a data file into an importance data loader."""

from __future__ import annotations

import numbers
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..config import CalibrationConfig, WSVDConfig
from ..integrations.checkpoint import check_model_files, check_no_adapter, check_tokenizer_files, damaged_files_named
from ..blocks import given_back, is_dispatched
from ..data import (TOKENIZER_FILES, check_fits, check_rows, load_table, make_dataloader, resolve_columns, subset,
                    teacher_samples, tokenize, vocabulary_size, with_named_fields)
from ..statistics.passes import OtherProcessFailed
from ..tasks import CAUSAL_LM, SEQ2SEQ_LM, load_task_model, task_of

if TYPE_CHECKING:
    from datasets import Dataset


def is_local_path(path: str) -> bool:
    """Whether ``path`` can only mean a local folder, not a Hub id (``user/name``): it starts with
    ``/``, ``.`` or ``~``, has more than one separator, or its first part is a local folder."""
    separators = path.count(os.sep) + (path.count(os.altsep) if os.altsep else 0)
    return path.startswith((os.sep, ".", "~")) or separators > 1 or (separators == 1 and os.path.isdir(os.path.dirname(path)))


def model_source(path: str, what: str = "model") -> tuple[str, dict]:
    """``from_pretrained`` arguments for a folder, a Hub id, or a ``.gguf`` file (of a ``what``: a
    model or a tokenizer). A local path that does not exist, or a name that cannot be a Hub id,
    fails at once (rather than after a Hub lookup)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} file {path!r} does not exist")
        if not os.path.getsize(path):
            raise ValueError(f"{what} file {path!r} is empty: download or convert it again")
        folder = os.path.dirname(os.path.abspath(path))
        if what != "tokenizer":
            check_no_adapter(folder)  # transformers would look for one beside the file
        return folder, {"gguf_file": os.path.basename(path)}
    if os.path.isdir(path):
        if what != "tokenizer":  # only its tokenizer files are read
            check_no_adapter(path)
            if not os.path.isfile(os.path.join(path, "config.json")):  # transformers would ask for a model_type key
                raise FileNotFoundError(f"{what} folder {path!r} holds no config.json: name a saved model's folder")
        check_model_files(path)
        return path, {}
    if os.path.exists(path) and not os.path.isfile(path):  # a device or a pipe
        raise FileNotFoundError(f"{what} {path!r} is no folder: name the {what}'s folder (or a .gguf file)")
    if os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} is a file: name the {what}'s folder (or a .gguf file)")
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(f"{what} folder {path!r} does not exist") from None
    if is_local_path(path):
        raise FileNotFoundError(f"{what} folder {path!r} does not exist")
    return path, {}


@contextmanager
def load_errors(path: str, what: str = "model") -> Iterator[None]:
    """Name both readings of a path that is not a local folder when loading it fails: no such
    folder, and a Hub id that could not be loaded (offline, private, or no such repository). What a
    hand-edited config or a cut file makes transformers raise is one line naming the path
    (``damaged_files_named``), as is a model that needs its own code; anything else (a missing
    package, out of memory) passes as it is."""
    try:
        with damaged_files_named(path, what):
            yield
    except ValueError as error:  # transformers' refusal under trust_remote_code=False, made actionable
        if "trust_remote_code=True" not in str(error):
            raise
        raise ValueError(f"{what} {path!r} needs code of its own to load (its auto_map), which hf-wsvd never runs: "
                         "load it in Python with trust_remote_code=True and pass it to hf_wsvd's functions "
                         "(hf_wsvd.compress, ...)") from None
    except OSError as error:
        if os.path.exists(path):
            raise
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise OSError(f"model folder {path!r} does not exist, and as a Hub id it could not be loaded: {detail}") from error


def stored_config(path: str) -> PreTrainedConfig:
    """The config of a model folder, Hub id or ``.gguf`` file."""
    location, extra = model_source(path)
    with load_errors(path):
        return AutoConfig.from_pretrained(location, trust_remote_code=False, **extra)


def stored_dtype(path: str) -> torch.dtype | None:
    """The dtype a checkpoint's config records (None when it records none)."""
    return stored_config(path).dtype


def load_dtype(path: str) -> torch.dtype:
    """The dtype to load ``path`` in for statistics and metrics: float32, but a quantized
    checkpoint's stored dtype (its scales are stored in it, and its kernels compute in it; a
    ``.gguf`` file is dequantized at load)."""
    config = stored_config(path)
    if model_source(path)[1] or getattr(config, "quantization_config", None) is None:
        return torch.float32
    return config.dtype or torch.float32


def load_tokenizer(path: str, option: str | None = None, what: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, Hub id or ``.gguf`` file. A folder without one is a
    one-line error naming it as a ``what`` folder (``AutoTokenizer``'s own message lists every
    class it tried) and ``option``, the command's option that names another tokenizer, where it has one."""
    location, extra = model_source(path, what)
    if not extra and os.path.isdir(location):
        if not any(os.path.isfile(os.path.join(location, f)) for f in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{what} folder {path!r} has no tokenizer: save one there with tokenizer.save_pretrained({path!r})"
                + (f", or name a folder that has one ({option} PATH)" if option else ""))
        check_tokenizer_files(location)
    with load_errors(path, "tokenizer"):
        return AutoTokenizer.from_pretrained(location, trust_remote_code=False, **extra)


def load_model(path: str, **kwargs) -> PreTrainedModel:
    """A causal LM, sequence-to-sequence LM or sequence classifier (its Auto class read from the config) from a folder, a
    Hub id or a ``.gguf`` file (dequantized to a dense model); ``kwargs`` go to ``from_pretrained``."""
    location, extra = model_source(path)
    with load_errors(path):
        if not extra:
            return load_task_model(location, **kwargs)
        # transformers reads only decoder LMs from GGUF and records no architectures for them.
        model = load_task_model(location, task=CAUSAL_LM, **extra, **kwargs)
    # GGUF tensors are dequantized to dense ones at load; the leftover quantizer flags would only
    # forbid save_pretrained, .float() and .half().
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model


def load_model_and_tokenizer(path: str, tokenizer: str | None = None, option: str | None = None, **kwargs
                             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``load_model(path, **kwargs)`` and the tokenizer of ``tokenizer`` (default: ``path``);
    ``option`` is the command's option that names the tokenizer, for the errors' hints."""
    # First: a missing tokenizer fails before a long load. The option is a hint only where it was not given.
    loaded_tokenizer = (load_tokenizer(tokenizer, what="tokenizer") if tokenizer else load_tokenizer(path, option))
    model = load_model(path, **kwargs)
    rows = vocabulary_size(model)
    # Fewer tokens than the table is common (tables padded to a round size), but not a quarter: a
    # tokenizer whose vocabulary files are gone loads with its few special tokens, and every word
    # would become the unknown token.
    if rows and 4 * len(loaded_tokenizer) < rows:
        raise ValueError(f"the tokenizer of {tokenizer or path!r} knows {len(loaded_tokenizer)} tokens, the model "
                         f"{rows} token embeddings: its vocabulary files (tokenizer.json, vocab.txt, ...) are missing "
                         "or belong to another model: "
                         + ("name the model's own tokenizer" if tokenizer else "restore them")
                         + (f", or name the model's own tokenizer ({option} PATH)" if option and not tokenizer else ""))
    return model, loaded_tokenizer


def data_loader(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data_path: "str | Dataset",
    config: CalibrationConfig | WSVDConfig,
    text_columns: list[str] | str | None = None,
    label_column: str | None = None,
    num_samples: int | None = None,
    shuffle: bool = True,
    split: str | None = None,
) -> DataLoader:
    """Batches of the model's task from a data file, a ``save_to_disk`` folder (``split`` picks a
    DatasetDict's split) or a ``datasets.Dataset``, sampled and batched as the calibration settings
    ``config`` say (a recipe's will do): ``config.num_samples`` seeded random examples
    (the first ``num_samples``, or all, when ``shuffle`` is False), tokenized to
    ``config.max_length``. A classifier's examples are rows, sampled before tokenizing; a causal
    LM's are blocks of the whole text, sampled after, followed by ``config.generated_samples``
    blocks the model writes itself (``written_blocks``)."""
    if not isinstance(config, (CalibrationConfig, WSVDConfig)):
        raise ValueError(f"config={config!r}: pass a WSVDConfig or a CalibrationConfig (its sampling settings)")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ValueError(f"tokenizer={tokenizer!r}: pass the model's tokenizer (AutoTokenizer.from_pretrained)")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral)
                                    or num_samples < 1):
        raise ValueError(f"num_samples={num_samples!r} must be a positive integer, or None (the config's; all "
                         "without shuffle)")
    num_samples = None if num_samples is None else int(num_samples)
    if isinstance(text_columns, str):
        text_columns = [text_columns]  # one column, named alone
    task = task_of(model)
    generated = config.generated_samples if shuffle else 0  # calibration only: never in held-out data
    if generated and task != CAUSAL_LM:
        raise ValueError(f"generated_samples={generated} (--generated-samples): only a causal LM writes calibration "
                         f"text; {type(model).__name__} is not one (set it to 0)")
    source = "the data" if not isinstance(data_path, (str, os.PathLike)) else (
        f"{'dataset folder' if os.path.isdir(data_path) else 'data file'} {os.fspath(data_path)!r}")
    table = with_named_fields(load_table(data_path, split), [*(text_columns or []), label_column], source)
    text_columns, label_column = resolve_columns(table, task, text_columns, label_column, source)
    count = num_samples or config.num_samples if shuffle else num_samples
    if task != CAUSAL_LM:
        check_rows(table, task, text_columns, label_column, model.config.label2id, model.config.num_labels, source)
        table = subset(table, count, config.seed, shuffle)
    encoded = tokenize(
        table, tokenizer, task, text_columns, label_column, config.max_length,
        label2id=model.config.label2id, num_labels=model.config.num_labels, source=source,
    )
    if task == CAUSAL_LM:
        encoded = subset(encoded, count, config.seed, shuffle)
    sampled = len(encoded)  # fewer than num_samples where the data holds fewer: what compress records
    written = []
    if generated:  # a causal LM's (refused above for other tasks)
        from datasets import Dataset, concatenate_datasets

        check_fits(model, encoded["input_ids"], config.max_length)  # before the model runs on them
        written = written_blocks(model, encoded, generated, config.batch_size, config.seed)
        encoded = concatenate_datasets([encoded, Dataset.from_list(written)])
    loader = make_dataloader(encoded, tokenizer, task, config.batch_size)  # sets the padding token if missing
    targets = list(encoded["labels"]) if task == SEQ2SEQ_LM else []  # its decoder's embeddings read them too
    check_fits(model, encoded["input_ids"], config.max_length, [] if task == CAUSAL_LM else [tokenizer.pad_token_id],
               targets)
    loader.num_samples, loader.generated_samples = sampled, len(written)
    return loader


def written_blocks(model: PreTrainedModel, blocks: "Dataset | list[dict]", count: int, batch_size: int,
                   seed: int) -> list[dict]:
    """``count`` blocks written by the causal LM ``model`` (``hf_wsvd.data.teacher_samples``:
    continuations of prompts drawn from ``blocks``, seeded), ``batch_size`` at a time on the
    accelerator where there is one (the model goes back where it was). Under several processes
    each writes its share of the batches and all end with the same blocks, those one process writes."""
    from accelerate.utils import gather_object

    from ..statistics import default_accelerator

    accelerator = default_accelerator()
    processes = accelerator.num_processes
    try:
        with given_back(model):
            if not is_dispatched(model):
                model.to(accelerator.device)
            mine, failure = teacher_samples(model, blocks, count, batch_size=batch_size, seed=seed,
                                            show_progress=accelerator.is_local_main_process,
                                            share=(accelerator.process_index, processes)), None
    except torch.OutOfMemoryError:
        mine, failure = [], ValueError(
            f"writing generated_samples={count} calibration blocks ran out of memory on {accelerator.device}: lower "
            "batch_size (the blocks written at once) or load the model dispatched (--device-map auto)")
    except Exception as error:
        if processes == 1:
            raise
        mine, failure = [], error
    if processes == 1:
        if failure is not None:
            raise failure from None
        return mine
    # Every process waits for the others' blocks, or learns that one of them failed.
    shares = gather_object([(mine, None if failure is None else f"{type(failure).__name__}: {failure}")])
    if failure is not None:
        raise failure
    for rank, (_, message) in enumerate(shares):
        if message is not None:
            raise OtherProcessFailed(f"process {rank} failed to write its calibration blocks ({message})")
    # Batch b is the (b // P)-th that process b % P wrote.
    return [row for b in range(-(-count // batch_size))
            for row in shares[b % processes][0][b // processes * batch_size : (b // processes + 1) * batch_size]]
