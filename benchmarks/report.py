"""Shared benchmark reporting: JSON with the environment and the command, and markdown tables
spliced between markers into the benchmark's page under docs/ (never edited by hand)."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
# The page under docs/ of each results name that does not have its own docs/benchmarks/<name>.md:
# one page per benchmark script.
PAGES = {
    "glue_activation": "benchmarks/glue.md",
    "llm_64": "benchmarks/llm.md",
    "llm_healing": "benchmarks/llm.md",
    "llm_refine": "benchmarks/llm.md",
    "sibling_speed": "benchmarks/layer_speed.md",
    "speed_cpu": "benchmarks/speed.md",
    "speed_gpu": "benchmarks/speed.md",
    "speed_svd": "benchmarks/speed.md",
    "checkpoint_size": "benchmarks/speed.md",
    "compress_time": "benchmarks/speed.md",
    "solvers_gpu_small": "benchmarks/solvers_gpu.md",
}


# The script (and options) of each results name that is not its own benchmarks/<name>.py
SCRIPTS = {"glue_activation": "glue.py --suite activation"}


def page(name: str) -> Path:
    """The docs page that shows the table of results ``name``."""
    return ROOT / "docs" / PAGES.get(name, f"benchmarks/{name}.md")


def results_file(name: str, suffix: str = ".json") -> Path:
    """``benchmarks/results/<name>.json`` (``suffix``: a file beside it, such as the table's figure)."""
    return ROOT / "benchmarks" / "results" / f"{name}{suffix}"


def git_state() -> dict | None:
    """The commit of this checkout of hf_wsvd and whether its tracked files differ from it (``dirty``);
    None where ``ROOT`` is not the top of a git checkout (an unpacked copy) or git cannot say."""
    def git(*words: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *words], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        top, commit = git("rev-parse", "--show-toplevel", "HEAD").splitlines()
        if Path(top).resolve() != ROOT.resolve():  # a copy of benchmarks/ inside another repository
            return None
        return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git": git_state(),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
    }


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def splice(path: Path, name: str, text: str) -> None:
    """Replace the block between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    content = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    content = pattern.sub(lambda _: block, content) if pattern.search(content) else content.rstrip() + "\n\n" + block + "\n"
    path.write_text(content)


def republished(name: str) -> dict:
    """The environment of a table published from earlier runs (``--from-json``): this machine, and the
    command that gives the table again from ``benchmarks/results/<name>.json``, which then holds every run."""
    script = SCRIPTS.get(name, f"{name}.py")
    return {**environment(), "command": f"python benchmarks/{script} --from-json benchmarks/results/{name}.json"}


def publish(name: str, payload: dict, table: str) -> None:
    """Write ``benchmarks/results/<name>.json`` and the table between the ``name`` markers of its
    docs page (see :func:`page`).

    A payload with an environment of its own (measured on another machine, or :func:`republished`)
    keeps it; the table's Re-run line is its command."""
    payload = {"environment": environment(), **payload}
    out = results_file(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    text = f"{table}\n\nRe-run: `{payload['environment']['command']}` (results: `{out.relative_to(ROOT)}`)."
    splice(page(name), name, text)
    print(table)
