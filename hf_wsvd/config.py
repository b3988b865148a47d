"""`WSVDConfig`: the compression recipe and, once compressed, the per-module ranks it produced."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

FISHER_AXES = ("output", "input")
COMPUTE_DTYPES = ("float32", "float64")


@dataclass
class WSVDConfig:
    """How to compress a model, serialized into the checkpoint's ``config.json`` under ``"wsvd"``.

    Args:
        method: factorization method, a name registered in ``hf_wsvd.solvers`` (``"svd"``,
            ``"fwsvd"``, ...).
        param_ratio: the fraction of each target layer's parameters that is *kept*, in (0, 1].
            0.3 keeps 30% of a layer's weights (rank ``r = ⌊0.3·in·out/(in+out)⌋``). A layer whose
            rank would not save parameters stays dense.
        target_modules: modules to factorize, by name relative to the base model: a list of names
            or name suffixes (``["query", "value"]``), or one regular expression matched against the
            whole name. Default: every ``nn.Linear`` (and GPT-2 ``Conv1D``) inside the transformer
            blocks; tied modules and heads outside the blocks are never selected by default.
        exclude_modules: names, suffixes or a regular expression removed from the targets.
        fisher_axis: how ``fwsvd`` collapses the Fisher information into one weight per row:
            ``"output"`` sums over inputs (one weight per output row of ``nn.Linear.weight``),
            ``"input"`` sums over outputs (one weight per input column).
        num_samples: examples used to estimate importance.
        batch_size: batch size of the importance pass.
        max_length: token truncation length of the importance data.
        compute_dtype: dtype of the decompositions (``"float32"`` or ``"float64"``).
        seed: seed for data sampling and any randomized step.
        ranks: filled by the compressor: base-model-relative module name → rank.
    """

    method: str = "fwsvd"
    param_ratio: float = 0.5
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fisher_axis: str = "output"
    num_samples: int = 512
    batch_size: int = 8
    max_length: int = 128
    compute_dtype: str = "float32"
    seed: int = 0
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .solvers import SOLVERS  # solvers register themselves on import

        if self.method not in SOLVERS:
            raise ValueError(f"method={self.method!r} is not one of {sorted(SOLVERS)}")
        ratio = self.param_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(
                f"param_ratio={ratio!r} must be in (0, 1]: it is the fraction of each layer's "
                "parameters that is kept"
            )
        self.param_ratio = float(ratio)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
            ):
                raise ValueError(f"{name}={value!r} must be None, a regex string or a non-empty list of names")
        if self.fisher_axis not in FISHER_AXES:
            raise ValueError(f"fisher_axis={self.fisher_axis!r} is not one of {FISHER_AXES}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
        for name in ("num_samples", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        for module, rank in self.ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"ranks[{module!r}]={rank!r} must be a positive integer")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WSVDConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WSVDConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "WSVDConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
