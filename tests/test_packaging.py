"""Packaging: every subpackage is listed in pyproject.toml, and the model-card template (top-level
``model_cards/``) ships inside the installed package as ``hf_wsvd.model_cards``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from hf_wsvd.card import template_path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_wsvd").rglob("*.py")
             if "__pycache__" not in p.parts and p.parent.parent.name != "metrics"}  # metrics/*/: evaluate scripts
    assert found - set(PYPROJECT["packages"]) == set()


def test_the_template_has_one_source_and_is_package_data():
    assert PYPROJECT["package-dir"]["hf_wsvd.model_cards"] == "model_cards"
    assert "*.md" in PYPROJECT["package-data"]["hf_wsvd.model_cards"]
    assert "hf_wsvd.model_cards" in PYPROJECT["packages"]
    assert not (ROOT / "hf_wsvd" / "model_cards").exists()
    assert template_path().read_text() == (ROOT / "model_cards" / "template.md").read_text()
    assert "{{ card_data }}" in template_path().read_text()


def test_the_wheel_carries_the_template(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip("needs setuptools >= 68 to build without isolation")
    source = tmp_path / "src"  # a copy, so that the build leaves no build/ folder in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("hf_wsvd", "model_cards"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             str(source), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "No module named pip" in result.stderr:
        pytest.skip("pip not available")
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("hf_wsvd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_wsvd/model_cards/template.md" in names
    assert zipfile.ZipFile(wheel).read("hf_wsvd/model_cards/template.md") == (ROOT / "model_cards" / "template.md").read_bytes()
    assert {"hf_wsvd/metrics/accuracy/accuracy.py", "hf_wsvd/runtime/modeling_wsvd.py", "hf_wsvd/py.typed"} <= set(names)
