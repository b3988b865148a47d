"""Upload a compressed checkpoint folder (weights, config, code files, model card, plot) to the Hub."""

from __future__ import annotations

import json
import os

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

from .runtime import modeling_wsvd
from .runtime.modeling_wsvd import MODEL_TYPE

# files every pushed hf_wsvd checkpoint needs for both loading paths (hf_wsvd / trust_remote_code):
# every code file of the runtime package, which save_pretrained copies into the checkpoint
RUNTIME_FILES = tuple(sorted(f for f in os.listdir(os.path.dirname(modeling_wsvd.__file__))
                             if f.endswith(".py") and f != "__init__.py"))
REQUIRED_FILES = ("config.json", *RUNTIME_FILES, "README.md")


def check_folder(folder: str | os.PathLike) -> list[str]:
    """The files of a checkpoint folder that :func:`push` uploads; raises if one it needs is missing."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
    files = sorted(os.listdir(folder))
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        hint = " (write the card with hf-wsvd compress, or hf_wsvd.card.write_card)" if "README.md" in missing else ""
        raise ValueError(f"{folder} lacks {', '.join(missing)}: not a complete hf_wsvd checkpoint{hint}")
    with open(os.path.join(folder, "config.json")) as handle:
        model_type = json.load(handle).get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(f"{folder}/config.json has model_type={model_type!r}, not an hf_wsvd checkpoint")
    if not any(f.endswith(".safetensors") for f in files):
        raise ValueError(f"{folder} holds no .safetensors weights")
    return files


def push(
    folder: str | os.PathLike,
    repo_id: str,
    api: HfApi | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload every file of the checkpoint ``folder`` (weights,
    config, code, tokenizer, card, plot) in one commit; returns the commit URL. ``api`` defaults to
    ``HfApi(token=token)``; only its ``create_repo`` and ``create_commit`` are used, so tests can
    substitute them."""
    folder = os.fspath(folder)
    files = check_folder(folder)
    ModelCard.load(os.path.join(folder, "README.md"))  # a card whose metadata does not parse fails here, offline
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
                  for name in files if os.path.isfile(os.path.join(folder, name))]
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model",
                             commit_message=commit_message or "Upload hf_wsvd compressed checkpoint")
    return getattr(info, "commit_url", str(info))
