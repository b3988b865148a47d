"""The ``hf-wsvd`` command line: the parser and the compress/inspect commands (``app.py``), the
other commands (``commands.py``), what compress prints (``output.py``) and loading models and data
from paths (``workflow.py``). Importing this package imports neither torch nor transformers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import add_recipe_arguments, build_parser, console, main, recipe_from_args

__all__ = ["add_recipe_arguments", "build_parser", "console", "main", "recipe_from_args"]


def __getattr__(name: str) -> Any:
    # Loaded on first use, so that ``hf_wsvd.cli.workflow`` can be imported without the parser.
    if name in __all__:
        return getattr(importlib.import_module(".app", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
