"""`WSVDConfig`: the compression recipe and, once compressed, the per-module ranks it produced."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .solvers import SOLVERS, MethodOptions, solver_for
from .statistics.names import GRAM

COMPUTE_DTYPES = ("float32", "float64")
# Embedding rows have no Fisher information from the importance pass: the methods usable on them.
EMBEDDING_METHODS = ("svd", "lp")
EMBEDDING_WEIGHTINGS = ("uniform", "frequency")
ALLOCATIONS = ("uniform", "greedy")
# Method options that are numbers: stored as floats whatever number type was given.
FLOAT_FIELDS = ("compensation_ridge", "asvd_alpha", "p", "tolerance", "time_budget", "importance_power", "risk_threshold")


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
        asvd_alpha: exponent of the activation scaling of ``asvd`` (0 is plain SVD).
        allocation: how the parameter budget is spread over the layers: ``"uniform"`` (every layer
            keeps ``param_ratio``) or ``"greedy"`` (one global budget of ``param_ratio`` of all target
            parameters; ranks go where the method's weighted truncation loss falls most per
            parameter, read from its spectrum: the Fisher-predicted loss increase for the Fisher
            methods, comparable across layers; the share of each layer's own loss otherwise).
        sequential: compress a causal LM block by block, each block's statistics taken on the
            inputs produced by the already compressed blocks before it (large decoders). With
            ``allocation="greedy"`` the ranks are allocated first on the dense model's statistics
            of all layers at once (memory: every target layer's in × in Gram together).
        compensate: sequential mode: factorize each layer so that its outputs on the compressed
            model's inputs match the dense layer's outputs on the dense model's inputs (absorbing
            the error of the layers before it), layer group by layer group within each block; for
            the methods that read the activation Gram (``whiten``, ``fisher_whiten``).
        compensation_ridge: ``compensate``'s pull toward the dense weight, λ = this × the mean
            diagonal of the layer's input Gram, > 0 (larger: closer to the uncompensated fit).
        seed: seed for data sampling and any randomized step.
        p: the exponent of the ``lp`` method, in [1, 2]: it minimizes Σ_rows dist(row, subspace)^p,
            robust to outlying rows for p < 2; p = 2 is the SVD subspace.
        embeddings: also factorize the input embeddings (``model.get_input_embeddings()``, a
            vocab × hidden ``nn.Embedding``) into a vocab × r lookup and an r → hidden projection.
            An output head tied to them computes its logits from the same factors, so the tie
            survives save/load. With ``param_ratio=1`` only the embeddings are compressed.
        embedding_ratio: the fraction of the embedding matrix's parameters that is kept, in (0, 1).
        embedding_method: ``"svd"`` or ``"lp"`` (the robust ℓp subspace, with ``p``); None: the
            same as ``method``, which then must be one of these two.
        embedding_weighting: per-row importance of the embedding for ``lp``: ``"uniform"`` or
            ``"frequency"`` (weight 1 + the token's count in the importance data).
        solver: the element-wise solver of ``tfwsvd`` and ``rescue``: ``"als"`` (alternating weighted
            least squares), ``"adam"`` (first order), ``"em"`` (Srebro & Jaakkola's EM) or
            ``"hybrid"`` (Adam until it beats the FWSVD loss, then ALS). All start from FWSVD.
        refine: after ``method``, run the element-wise solver (``solver``) from its factors on the
            per-entry Fisher objective Σ F_ij (W − AB)²_ij; needs importance data. For the
            element-wise methods themselves (``tfwsvd``, ``rescue``) it adds nothing: not allowed.
        max_iterations: iteration budget per matrix of the element-wise solvers (an Adam
            iteration is 20 steps), ≥ 0 (0 returns the FWSVD factors).
        tolerance: the element-wise solvers stop once one iteration changes the weighted loss by
            less than this fraction, ≥ 0.
        time_budget: seconds per matrix after which the element-wise solvers stop, or None.
        importance_power: the element-wise solvers weight entry (i, j) by F_ij ** importance_power,
            in (0, 1]: 1 is the Fisher itself, smaller values temper its dynamic range.
        risk_threshold: ``rescue`` refines with the element-wise solver only the matrices whose
            risk, the Fisher-predicted loss increase of the FWSVD factors
            (``hf_wsvd.solvers.risk.predicted_loss``, ½ΣF(W − AB)², in nats), exceeds this, ≥ 0.
        max_kept_ratio_for_speed: a target layer whose allocated rank keeps more than this
            fraction of its weights (r·(in+out) / (in·out)) stays dense: factorized at that ratio it
            runs no faster than dense (two thin matrix products instead of one). The crossing depends
            on the device, dtype and shapes: ``benchmarks/layer_speed.py`` measures it and prints
            both the ``threshold`` (one number, the smallest crossing) and ``by_shape`` (a dict of
            ``"INxOUT"`` → crossing; shapes not in it have no limit, 0 keeps a shape dense). In
            (0, 1], such a dict, or None (default): every layer whose rank saves parameters is
            factorized. With ``allocation="greedy"`` the layers kept dense are not
            re-budgeted, so the model then keeps more than ``param_ratio``.
        rank_multiple: every rank is a multiple of this, ≥ 1 (uniform: rounded down; greedy: allocated
            in steps of it); a layer that cannot get one stays dense.
            Default 8: GPU matrix kernels want aligned inner dimensions, and an unaligned rank can
            run slower than the dense layer (measured on an H100, bf16, 4096 → r → 4096: r = 1228
            1.49 ms, r = 1232 0.46 ms, dense 0.72 ms). 1 keeps the exact ranks of ``param_ratio``.
        ranks: filled by the compressor: base-model-relative module name → rank (the input
            embeddings, when compressed, are listed under their name too).
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
    asvd_alpha: float = 0.5
    allocation: str = "uniform"
    sequential: bool = False
    compensate: bool = False
    compensation_ridge: float = 1e-2
    seed: int = 0
    p: float = 1.0
    embeddings: bool = False
    embedding_ratio: float = 0.5
    embedding_method: str | None = None
    embedding_weighting: str = "uniform"
    solver: str = "hybrid"
    refine: bool = False
    max_iterations: int = 8
    tolerance: float = 1e-4
    time_budget: float | None = None
    importance_power: float = 1.0
    risk_threshold: float = 1e-3
    max_kept_ratio_for_speed: float | dict[str, float] | None = None
    rank_multiple: int = 8
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={self.allocation!r} is not one of {ALLOCATIONS}")
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential={self.sequential!r} must be True or False")
        self._validate_compensation()
        if not isinstance(self.refine, bool):
            raise ValueError(f"refine={self.refine!r} must be True or False")
        if self.refine and self.method in ("tfwsvd", "rescue"):
            raise ValueError(f"refine=True refines another method with the element-wise solver; "
                             f"method={self.method!r} already is one")
        for name in ("num_samples", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        if not isinstance(self.embeddings, bool):
            raise ValueError(f"embeddings={self.embeddings!r} must be True or False")
        ratio = self.embedding_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ValueError(
                f"embedding_ratio={ratio!r} must be in (0, 1): it is the fraction of the embedding "
                "matrix's parameters that is kept"
            )
        self.embedding_ratio = float(ratio)
        if self.embedding_method is not None and self.embedding_method not in EMBEDDING_METHODS:
            raise ValueError(f"embedding_method={self.embedding_method!r} is not one of {EMBEDDING_METHODS} or None")
        if self.embeddings and self.embedding_method is None and self.method not in EMBEDDING_METHODS:
            raise ValueError(
                f"embeddings=True with method={self.method!r}: embedding rows have no Fisher information; "
                f"set embedding_method to one of {EMBEDDING_METHODS}"
            )
        if self.embedding_weighting not in EMBEDDING_WEIGHTINGS:
            raise ValueError(f"embedding_weighting={self.embedding_weighting!r} is not one of {EMBEDDING_WEIGHTINGS}")
        self._validate_method_options()
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise ValueError(f"rank_multiple={self.rank_multiple!r} must be a positive integer (8 aligns GPU kernels)")
        self._validate_speed_limit()
        for module, rank in self.ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"ranks[{module!r}]={rank!r} must be a positive integer")

    def _validate_compensation(self) -> None:
        if not isinstance(self.compensate, bool):
            raise ValueError(f"compensate={self.compensate!r} must be True or False")
        ridge = self.compensation_ridge
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
            raise ValueError(f"compensation_ridge={ridge!r} must be a number > 0")
        if self.compensate and not self.sequential:
            raise ValueError("compensate=True refits layers on the compressed model's inputs block by block: "
                             "it needs sequential=True")
        if self.compensate and GRAM not in solver_for(self).needs_for(self.method_options()):
            raise ValueError(f"compensate=True needs a method that reads the activation Gram (whiten, fisher_whiten); "
                             f"method={self.method!r} does not")

    def _validate_speed_limit(self) -> None:
        speed = self.max_kept_ratio_for_speed
        if speed is None:
            return
        if isinstance(speed, dict):
            for shape, limit in speed.items():
                if not isinstance(shape, str) or not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", shape):
                    raise ValueError(f"max_kept_ratio_for_speed key {shape!r} is not an 'INxOUT' layer shape "
                                     "such as '4096x11008'")
                if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit <= 1:
                    raise ValueError(f"max_kept_ratio_for_speed[{shape!r}]={limit!r} must be in [0, 1] "
                                     "(0: layers of that shape always stay dense)")
            self.max_kept_ratio_for_speed = {shape: float(limit) for shape, limit in speed.items()}
            return
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 < speed <= 1:
            raise ValueError(
                f"max_kept_ratio_for_speed={speed!r} must be None, in (0, 1], or a dict of 'INxOUT' shape -> "
                "limit in [0, 1]: layers whose rank keeps more than this fraction of their weights stay dense"
            )
        self.max_kept_ratio_for_speed = float(speed)

    def _validate_method_options(self) -> None:
        """Every method's options as read from this recipe (each options class validates its own
        fields), so a bad value is refused whichever method is chosen."""
        for options in {solver.options for solver in SOLVERS.values()}:
            options.from_recipe(self)
        for name in FLOAT_FIELDS:
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))

    def method_options(self) -> MethodOptions:
        """The options of ``method`` (with ``refine``: the refined method's) from this recipe."""
        return solver_for(self).options.from_recipe(self)

    @property
    def resolved_embedding_method(self) -> str:
        """The method applied to the embeddings (``embedding_method``, else ``method``)."""
        return self.embedding_method or self.method

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
