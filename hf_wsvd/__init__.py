"""hf_wsvd: importance-weighted low-rank compression of transformers models.

Importing the package registers factorized checkpoints (``model_type: "hf_wsvd"``) with the
transformers Auto classes: at once if transformers is already imported, else as soon as it is.
The package's names load on first use (PEP 562), so ``import hf_wsvd`` and the ``hf-wsvd`` parser
import neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → the submodule defining it
_EXPORTS = {
    "CompressionReport": "compressor",
    "compress": "compressor",
    "WSVDConfig": "config",
    "FactorizedEmbedding": "runtime.factorized_embedding",
    "FactorizedLinear": "runtime.factorized_linear",
    "parameter_counts": "checkpoint",
    "summarize": "checkpoint",
    "register_with_transformers": "autoconfig",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .autoconfig import register_with_transformers
    from .checkpoint import parameter_counts, summarize
    from .compressor import CompressionReport, compress
    from .config import WSVDConfig
    from .runtime.factorized_embedding import FactorizedEmbedding
    from .runtime.factorized_linear import FactorizedLinear


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Imports ``hf_wsvd.autoconfig`` (which registers the model type) right after transformers."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            # Half-imported when its own "import transformers" got here: it registers as it ends.
            importlib.import_module(".autoconfig", __name__)

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    importlib.import_module(".autoconfig", __name__)
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
