"""Test helpers: output extraction and a Python subprocess in which hf_wsvd cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

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
