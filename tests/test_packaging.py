"""Packaging: a src layout whose every subpackage is listed in pyproject.toml, the model-card
template shipped as ``hf_wsvd.model_cards`` package data, and the installed package winning over a
folder named hf_wsvd in the working directory."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import hf_wsvd
from hf_wsvd import MOVED_MODULES
from hf_wsvd.integrations.card import template_path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    found = {".".join(p.parent.relative_to(SRC).parts) for p in (SRC / "hf_wsvd").rglob("*.py")
             if "__pycache__" not in p.parts and p.parent.parent.name != "metrics"}  # metrics/*/: evaluate scripts
    assert found - set(PYPROJECT["packages"]) == set()


def test_the_layout_is_src_only_so_an_editable_install_is_a_path_entry():
    # One mapping, "" -> src: setuptools then installs editable checkouts as a plain sys.path
    # entry, on which the regular package beats a namespace folder named hf_wsvd (below).
    assert PYPROJECT["package-dir"] == {"": "src"}
    assert not (ROOT / "hf_wsvd").exists() and not (ROOT / "model_cards").exists()


def test_the_installed_package_wins_over_a_folder_named_hf_wsvd_in_the_working_directory(tmp_path):
    clone = tmp_path / "hf_wsvd"  # e.g. a clone of this repository, seen from its parent folder
    (clone / "docs").mkdir(parents=True)
    script = "import hf_wsvd; print(hf_wsvd.__file__); print(hf_wsvd.WSVDConfig.__name__)"
    env = {**os.environ, "PYTHONPATH": str(SRC)}  # what the editable install's path entry adds
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(SRC / "hf_wsvd" / "__init__.py"), "WSVDConfig"]


def test_the_template_is_package_data():
    assert "*.md" in PYPROJECT["package-data"]["hf_wsvd.model_cards"]
    assert "hf_wsvd.model_cards" in PYPROJECT["packages"]
    assert template_path() == SRC / "hf_wsvd" / "model_cards" / "template.md"
    assert "{{ card_data }}" in template_path().read_text()


def test_the_wheel_carries_the_template(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip("needs setuptools >= 68 to build without isolation")
    source = tmp_path / "src"  # a copy, so that the build leaves no build/ folder in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(SRC, source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             str(source), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "No module named pip" in result.stderr:
        pytest.skip("pip not available")
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("hf_wsvd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_wsvd/model_cards/template.md" in names
    assert zipfile.ZipFile(wheel).read("hf_wsvd/model_cards/template.md") == template_path().read_bytes()
    assert {"hf_wsvd/metrics/accuracy/accuracy.py", "hf_wsvd/runtime/modeling_wsvd.py", "hf_wsvd/py.typed",
            "hf_wsvd/cli/app.py", "hf_wsvd/integrations/autoconfig.py", "hf_wsvd/methods/mlp_pruning.py"} <= set(names)


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_a_moved_module_still_imports_under_its_old_name_with_a_warning(old, monkeypatch):
    monkeypatch.delitem(sys.modules, f"hf_wsvd.{old}", raising=False)
    with pytest.warns(DeprecationWarning, match=rf"hf_wsvd\.{old} moved to hf_wsvd\.{MOVED_MODULES[old]}"):
        module = importlib.import_module(f"hf_wsvd.{old}")
    assert module is importlib.import_module(f"hf_wsvd.{MOVED_MODULES[old]}")
    parent, _, name = f"hf_wsvd.{old}".rpartition(".")
    assert getattr(importlib.import_module(parent), name) is module  # from hf_wsvd[.parent] import <name>
