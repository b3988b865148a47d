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
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → the submodule defining it
_EXPORTS = {
    "CompressionReport": "compressor",
    "compress": "compressor",
    "WSVDConfig": "config",
    "FactorizedEmbedding": "runtime.factorized_embedding",
    "FactorizedLinear": "runtime.factorized_linear",
    "overlap_sibling_products": "runtime.factorized_linear",
    "share_input_factors": "runtime.factorized_linear",
    "unshare_input_factors": "runtime.factorized_linear",
    "parameter_counts": "integrations.checkpoint",
    "summarize": "integrations.checkpoint",
    "register_with_transformers": "integrations.autoconfig",
}
__all__ = sorted(_EXPORTS)

# Modules that moved into the subpackages (before the redesign most were at the top level): old name
# → new name, relative to this package. The old names still import, with a DeprecationWarning (``_MovedModules``).
MOVED_MODULES = {
    "commands": "cli.commands", "output": "cli.output", "workflow": "cli.workflow",
    "autoconfig": "integrations.autoconfig", "card": "integrations.card", "checkpoint": "integrations.checkpoint",
    "export": "integrations.export", "healing": "integrations.healing", "hub": "integrations.hub",
    "peft_lora": "integrations.peft_lora", "quantization": "integrations.quantization",
    "attention_pruning": "methods.attention_pruning", "embeddings": "methods.embeddings",
    "mlp_pruning": "methods.mlp_pruning",
    # Moved when compensation and refinement became modifiers.
    "pipelines.compensation": "pipelines.modifiers.compensation", "pipelines.refinement": "pipelines.modifiers.refinement",
}

if TYPE_CHECKING:
    from .integrations.autoconfig import register_with_transformers
    from .integrations.checkpoint import parameter_counts, summarize
    from .compressor import CompressionReport, compress
    from .config import WSVDConfig
    from .runtime.factorized_embedding import FactorizedEmbedding
    from .runtime.factorized_linear import (FactorizedLinear, overlap_sibling_products, share_input_factors,
                                            unshare_input_factors)


def __getattr__(name: str) -> Any:
    if name in MOVED_MODULES:  # ``from hf_wsvd import workflow``
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``hf_wsvd.<old name>`` of a moved module as the module at its new place (the same
    module object, so patching either name patches both), warning once per import."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if not name.startswith(f"{__name__}.") or name[len(__name__) + 1:] not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: Any) -> Any:
        old = spec.name[len(__name__) + 1:]
        new = f"{__name__}.{MOVED_MODULES[old]}"
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old name will be removed)",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: Any) -> None:
        pass  # the module at its new place is already executed


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Imports ``hf_wsvd.integrations.autoconfig`` (which registers the model type) right after transformers."""

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
            importlib.import_module(".integrations.autoconfig", __name__)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    # First: another installation's finder (an editable install of an older checkout) must not
    # answer for the old names.
    sys.meta_path.insert(0, _MovedModules())
if "transformers" in sys.modules:
    importlib.import_module(".integrations.autoconfig", __name__)
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
