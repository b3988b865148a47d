"""hf_wsvd: importance-weighted low-rank compression of transformers models.

Importing the package registers factorized checkpoints (``model_type: "hf_wsvd"``) with the
transformers Auto classes.
"""

from .checkpoint import parameter_counts, register_with_transformers, summarize
from .compressor import CompressionReport, compress
from .config import WSVDConfig
from .runtime.factorized_embedding import FactorizedEmbedding
from .runtime.factorized_linear import FactorizedLinear

__version__ = "0.1.0"

register_with_transformers()

__all__ = [
    "CompressionReport",
    "FactorizedEmbedding",
    "FactorizedLinear",
    "WSVDConfig",
    "compress",
    "parameter_counts",
    "register_with_transformers",
    "summarize",
]
