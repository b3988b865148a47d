"""Upload a compressed checkpoint folder (weights, config, code files, model card, plot) to the Hub."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from transformers import PreTrainedConfig

from ..data import TOKENIZER_FILES, TOKENIZER_VOCABULARY
from .card import PLOT_FILE, load_card
from .checkpoint import (ADAPTER_CONFIG, WEIGHTS_FILE, WEIGHTS_INDEX, check_checkpoint_folder, folder_model_type,
                         index_shards, json_object, load_factorized)
from ..runtime import modeling_wsvd
from ..runtime.modeling_wsvd import CLASS_PREFIX, MODEL_TYPE, stock_model_class

# files every pushed hf_wsvd checkpoint needs for both loading paths (hf_wsvd / trust_remote_code):
# every code file of the runtime package, which save_pretrained copies into the checkpoint
RUNTIME_DIR = os.path.dirname(modeling_wsvd.__file__)
RUNTIME_FILES = tuple(sorted(f for f in os.listdir(RUNTIME_DIR) if f.endswith(".py") and f != "__init__.py"))
REQUIRED_FILES = ("config.json", *RUNTIME_FILES, "README.md")
# A tokenizer's files (those every tokenizer has one of, and the rest it may save).
TOKENIZER_UPLOAD = (*TOKENIZER_FILES, "special_tokens_map.json", "added_tokens.json", "merges.txt",
                    "chat_template.jinja", "chat_template.json")
# transformers 5 saves a tokenizer's named chat templates besides the default one in this folder.
TEMPLATES_DIR = "additional_chat_templates"
# What a checkpoint folder may hold besides the runtime files and its weights (the one file
# save_pretrained writes, or the shards its index names): configs, tokenizer, card and rank plot.
# Nothing else is uploaded (no dotfiles such as .env, no stray notes, no other .safetensors file).
CHECKPOINT_FILES = ("config.json", "generation_config.json", "README.md", PLOT_FILE, *TOKENIZER_UPLOAD)
# Weight files transformers would read as a model's, at the top of a repository: an earlier upload's
# left there beside the new ones could be loaded instead (model.safetensors before an index).
REPO_WEIGHTS = re.compile(r"(pytorch_)?model(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")
# Files of an earlier upload that describe that model, not this one; its tokenizer files too where
# this upload has a tokenizer (an earlier added_tokens.json or chat template would change this one's).
MODEL_SPECIFIC = ("generation_config.json", PLOT_FILE)

logger = logging.getLogger(__name__)


def weight_files(folder: str) -> list[str]:
    """The weight files of a checkpoint folder: the shards its ``model.safetensors.index.json``
    names (and the index), else ``model.safetensors``. Raises if one is missing or is no plain
    file name of the folder."""
    index = os.path.join(folder, WEIGHTS_INDEX)
    if not os.path.lexists(index):
        if not os.path.lexists(os.path.join(folder, WEIGHTS_FILE)):
            raise ValueError(f"{folder} holds no {WEIGHTS_FILE} (nor a {WEIGHTS_INDEX} naming its shards)")
        return [WEIGHTS_FILE]
    if os.path.lexists(os.path.join(folder, WEIGHTS_FILE)):
        # transformers loads model.safetensors before an index: the weights checked would not be those uploaded
        raise ValueError(f"{folder} holds both {WEIGHTS_FILE} and {WEIGHTS_INDEX} (an unsharded and a sharded save "
                         "into one folder): remove the one that is not the checkpoint's, or save it again into an "
                         "empty folder")
    shards = index_shards(folder)
    for name in shards:
        if not os.path.lexists(os.path.join(folder, name)):
            raise ValueError(f"{index} names {name}, which {folder} lacks")
    return [*shards, WEIGHTS_INDEX]


def is_checkpoint_file(name: str) -> bool:
    """Whether ``name`` is a file every checkpoint folder may hold (config, tokenizer, card, plot,
    runtime code), its weights aside (see :func:`weight_files`); dotfiles never are."""
    return not name.startswith(".") and (name in RUNTIME_FILES or name in CHECKPOINT_FILES)


def checkpoint_files(folder: str) -> list[str]:
    """The entries of a checkpoint folder that belong to the checkpoint: its weights (see
    :func:`weight_files`; none when those are missing or misnamed), the files
    :func:`is_checkpoint_file` allows and the tokenizer's named chat templates (``TEMPLATES_DIR``)."""
    try:
        weights = weight_files(folder)
    except (ValueError, OSError):
        weights = []
    templates = os.path.join(folder, TEMPLATES_DIR)
    named = ([f"{TEMPLATES_DIR}/{f}" for f in os.listdir(templates) if f.endswith(".jinja")]
             if os.path.isdir(templates) and not os.path.islink(templates) else [])
    return sorted({*weights, *named, *(f for f in os.listdir(folder) if is_checkpoint_file(f))})


@dataclass
class UploadPlan:
    """The files :func:`push` uploads from a folder, and the ones it leaves out."""

    files: list[str]
    skipped: list[str]


def _refuse_links(folder: str, names: list[str]) -> None:
    """Refuse to upload a symbolic link: its target may lie anywhere (a system file, another folder)."""
    for name in names:
        path = os.path.join(folder, name)
        if os.path.islink(path):
            raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}): push uploads plain files only; "
                             "replace it with the file itself (save_pretrained writes one)")


def check_runtime_files(folder: str) -> None:
    """Refuse code files that differ from the installed package's ``hf_wsvd/runtime`` (edited after
    saving, or written by another version): a pushed checkpoint runs that code."""
    for name in RUNTIME_FILES:
        with open(os.path.join(folder, name), "rb") as saved, open(os.path.join(RUNTIME_DIR, name), "rb") as installed:
            if saved.read() != installed.read():
                raise ValueError(
                    f"{os.path.join(folder, name)} differs from the installed hf_wsvd/runtime/{name}: re-save the "
                    "checkpoint with this hf_wsvd (from_pretrained + save_pretrained) before pushing")


def check_folder(folder: str | os.PathLike) -> UploadPlan:
    """What :func:`push` uploads from a checkpoint folder (an allow-list: its weights as the index
    names them, configs, tokenizer, card, plot, runtime code; never a symbolic link); raises if a
    file it needs is missing or a link, or a code file is not the installed runtime's."""
    folder = os.fspath(folder)
    check_checkpoint_folder(folder)
    entries = sorted(os.listdir(folder))
    missing = [f for f in REQUIRED_FILES if f not in entries or not os.path.isfile(os.path.join(folder, f))]
    if "config.json" not in missing:  # its model type is said first: a dense folder lacks the runtime files too
        model_type = folder_model_type(folder)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{folder}/config.json has model_type={model_type!r}, not an hf_wsvd checkpoint")
    if missing:
        hint = " (write the card with hf-wsvd compress, or hf_wsvd.integrations.card.write_card)" if "README.md" in missing else ""
        raise ValueError(f"{folder} lacks {', '.join(missing)}: not a complete hf_wsvd checkpoint{hint}")
    weight_files(folder)  # raises if the weights are missing
    files = checkpoint_files(folder)
    _refuse_links(folder, files)
    files = [f for f in files if os.path.isfile(os.path.join(folder, f))]
    check_runtime_files(folder)
    return UploadPlan(files, [f for f in entries if f not in files and not any(n.startswith(f"{f}/") for n in files)])


def check_auto_map(folder: str, config: PreTrainedConfig) -> None:
    """Refuse a ``config.json`` whose ``auto_map`` is not what its classes write (``config``: the
    loaded one): with ``trust_remote_code=True`` and without hf_wsvd, the pushed checkpoint would not
    load (an entry missing), or would run code other than its verified files (an entry edited to
    another module, or to another repository's code). The entries of the config and of the saved
    model class must be there, each the class's own; another transformers version may have written
    one Auto class more or less, each naming a class of the saved code."""
    recorded = (json_object(os.path.join(folder, "config.json")) or {}).get("auto_map")
    expected = config.to_dict()["auto_map"]
    module = expected["AutoConfig"].split(".")[0]
    saved = next((auto for auto, target in expected.items() if target.endswith(f".{config.architectures[0]}")), None)
    needed = {"AutoConfig", *([saved] if saved else [])}

    def own(auto: str, target: object) -> bool:
        if auto in expected:
            return expected[auto] == target
        # a model class the saved code resolves by name (WsvdLlamaForCausalLM)
        name = target.removeprefix(f"{module}.") if isinstance(target, str) else ""
        return name != target and name.startswith(CLASS_PREFIX) and stock_model_class(name) is not None

    if not isinstance(recorded, dict) or not needed <= set(recorded) \
            or not all(own(auto, target) for auto, target in recorded.items()):
        raise ValueError(f"{folder}/config.json has auto_map={recorded!r}, not the classes' own "
                         f"({', '.join(f'{a}: {t}' for a, t in expected.items() if a in needed)}, ...): loaded with "
                         "trust_remote_code=True without hf_wsvd, the pushed checkpoint would fail or run other "
                         "code; restore it (load the checkpoint and save it again with save_pretrained)")


def push(
    folder: str | os.PathLike,
    repo_id: str,
    api: HfApi | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload the checkpoint files of ``folder`` (weights, config,
    verified code, tokenizer, card, plot; see :func:`check_folder`) in one commit, which also removes
    the weights, generation config and plot of an earlier upload that the new files do not replace,
    and its tokenizer files where the folder has a tokenizer vocabulary (the repository's history
    keeps them; its other files stay); returns the commit URL. ``private`` applies to a new
    repository: an existing public one is refused. ``api`` defaults to ``HfApi(token=token)``; only
    its ``repo_exists``, ``repo_info``, ``create_repo`` and ``create_commit`` are used, so tests can
    substitute them."""
    folder = os.fspath(folder)
    plan = check_folder(folder)
    checked = _stamps(folder, plan.files)
    load_card(os.path.join(folder, "README.md"))  # a card whose metadata does not parse fails here, offline
    # Nothing reaches the Hub that would not load: the load-time integrity checks (every tensor there,
    # at its shape, finite; the recipe readable), offline, before the repository is created.
    check_auto_map(folder, load_factorized(folder).config)
    api = api or HfApi(token=token)
    existing, head = _repository(api, repo_id, private)
    tokenizer = any(name in TOKENIZER_VOCABULARY for name in plan.files)
    stale = [name for name in existing if name not in plan.files
             and (REPO_WEIGHTS.fullmatch(name) or name in MODEL_SPECIFIC
                  or tokenizer and (name in TOKENIZER_UPLOAD or name.startswith(f"{TEMPLATES_DIR}/")))]
    # What is uploaded is what was checked: the small files as read now, the weights by path (hashed
    # now; the Hub refuses an upload whose bytes do not match) — if nothing changed since the check
    # (a run writing the folder meanwhile would otherwise mix two versions in one commit).
    operations = [*(CommitOperationAdd(path_in_repo=name, path_or_fileobj=_content(os.path.join(folder, name)))
                    for name in plan.files), *(CommitOperationDelete(path_in_repo=name) for name in stale)]
    if _stamps(folder, plan.files) != checked:
        raise ValueError(f"{folder} changed while push checked it (is a run writing it?): push again once nothing "
                         "writes it")
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    # parent_commit: a push that landed since the listing fails this commit instead of mixing with it
    info = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model", parent_commit=head,
                             commit_message=commit_message or "Upload hf_wsvd compressed checkpoint")
    if stale:
        logger.warning("%s: removed the files of an earlier upload that this one does not replace (the "
                       "repository's history keeps them): %s", repo_id, ", ".join(stale))
    if not tokenizer and not any(name in TOKENIZER_VOCABULARY for name in existing):
        logger.warning("%s has no tokenizer (%s held none): AutoTokenizer and pipeline() cannot load the model from "
                       "it; save one into the folder (tokenizer.save_pretrained) and push again", repo_id, folder)
    return getattr(info, "commit_url", str(info))


def _stamps(folder: str, files: list[str]) -> list[tuple[int, int, int]]:
    """Each file's size, modification time and inode: what tells that it was written since."""
    return [(info.st_size, info.st_mtime_ns, info.st_ino) for info in (os.stat(os.path.join(folder, f)) for f in files)]


def _content(path: str) -> str | bytes:
    """What an upload of ``path`` takes: a weights file by its path, anything else (small) read now."""
    if path.endswith((".safetensors", ".bin")):
        return path
    with open(path, "rb") as handle:
        return handle.read()


def _repository(api: HfApi, repo_id: str, private: bool | None) -> tuple[list[str], str | None]:
    """The files ``repo_id`` holds and its head commit (none, None where it does not exist yet).
    Refuses ``private`` for an existing public repository (``create_repo`` would leave it public)
    and a repository holding a peft adapter (transformers would load that in place of the model)."""
    if not api.repo_exists(repo_id, repo_type="model"):
        return [], None
    info = api.repo_info(repo_id, repo_type="model")
    if private and not info.private:
        raise ValueError(f"{repo_id} exists and is public: private=True (--private) does not make an existing "
                         "repository private; change its visibility on the Hub first, or push without it")
    files = [sibling.rfilename for sibling in info.siblings or []]
    if ADAPTER_CONFIG in files:
        raise ValueError(f"{repo_id} holds {ADAPTER_CONFIG} (a peft adapter): with peft installed, transformers "
                         "would load that adapter and its base model from this repository instead of the pushed "
                         "checkpoint; push to another repository, or delete the adapter's files there first")
    return files, info.sha
