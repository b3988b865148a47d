"""Test helpers: output extraction, a Python subprocess in which hf_wsvd cannot be imported, and a
Hub API that writes commits into a folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch
from huggingface_hub import CommitOperationDelete

HIDE_HF_WSVD = """
import importlib.abc, sys
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_wsvd" or name.startswith("hf_wsvd."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
sys.meta_path.insert(0, _Hide())
"""


def main_output(output) -> torch.Tensor:
    """The logits of a head model, else the last hidden state."""
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def run_without_hf_wsvd(code: str, cwd) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import hf_wsvd`` fails."""
    script = HIDE_HF_WSVD + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=600)


class FolderHub:
    """Stands in for HfApi: each commit's files are written into ``root/<repo_id>``; ``repos`` and
    ``commits`` record the calls (repo id and options; paths, commit message and parent commit),
    ``deleted`` the files commits removed, ``private`` each repository's visibility."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos: list[tuple[str, dict]] = []
        self.commits: list[list[str]] = []
        self.messages: list[str | None] = []
        self.private: dict[str, bool] = {}  # each repository's visibility, set when created
        self.deleted: list[str] = []
        self.parents: list[str | None] = []  # each commit's parent_commit (None: the repository's first)

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))
        if not (self.root / repo_id).exists():
            self.private[repo_id] = bool(kwargs.get("private"))
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def repo_exists(self, repo_id, **kwargs):
        return (self.root / repo_id).is_dir()

    def repo_info(self, repo_id, **kwargs):
        repo = self.root / repo_id
        files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
        return SimpleNamespace(id=repo_id, private=self.private.get(repo_id, False), sha=f"commit-{len(self.commits)}",
                               siblings=[SimpleNamespace(rfilename=name) for name in files])

    def create_commit(self, repo_id, operations, **kwargs):
        paths = []
        for op in operations:
            target = self.root / repo_id / op.path_in_repo
            if isinstance(op, CommitOperationDelete):
                target.unlink()
                self.deleted.append(op.path_in_repo)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(op.path_or_fileobj, bytes):
                target.write_bytes(op.path_or_fileobj)
            else:
                shutil.copyfile(op.path_or_fileobj, target)
            paths.append(op.path_in_repo)
        self.commits.append(paths)
        self.messages.append(kwargs.get("commit_message"))
        self.parents.append(kwargs.get("parent_commit"))
        return SimpleNamespace(commit_url=f"folder://{repo_id}")


# Labelled sentences: the classifier data of the command-line tests (the `tsv` fixture).
ROWS = [
    ("the movie was great", 1), ('"not" a good film', 1), ("awful plot", 0), ("null", 0),
    ("the actor was very good", 1), ("really bad story", 0), ("fine film", 1), ("not great", 0),
]


def run_cli(argv: list[str]) -> int:
    """The exit code of ``hf-wsvd argv``, whether argparse exits or main returns."""
    from hf_wsvd.cli import main

    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code

