"""`FactorizedEmbedding` (a vocab × hidden embedding stored as a vocab × r lookup table and an
r → hidden projection) and `FactorizedTiedHead` (an output head tied to it).

Dense ``W ≈ weight @ proj.weight.T``: ``weight`` (vocab × r) is the lookup table and ``proj`` the
r → hidden projection (``proj.weight`` hidden × r). The table keeps the name ``weight`` on purpose: a
tied output head declares its tie as ``"<head>.weight" → "<embedding>.weight"``, and with the same name the
stock transformers tying keeps working on the factors (the tied head's logits are
``(x @ proj.weight) @ weight.T``, both factors shared). ``proj`` is an ``EmbeddingProjection``, not
an ``nn.Linear``: a dense embedding is no linear layer to peft's ``"all-linear"`` or to a quantizer,
and its factorization is none either (LoRA on the projection of an embedding tied to the head would
reach the head only when merged).

This file ships inside every compressed checkpoint (``modeling_wsvd.py`` imports it relatively, so
``save_pretrained`` copies it), so it may import only torch and transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _check_rank(rank: int, vocab: int, hidden: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank < hidden or rank > vocab:
        raise ValueError(
            f"rank={rank} is invalid for a {vocab}x{hidden} embedding: it must be between 1 and "
            f"{min(hidden - 1, vocab)} (rank ≥ the hidden size {hidden} compresses nothing)"
        )


def output_scale(embedding: nn.Module) -> tuple[float | None, bool]:
    """The factor an embedding module multiplies its output by (transformers' ``*ScaledWordEmbedding``
    classes of BART, mBART, Gemma 3, ...: ``embed_scale``) and whether it rounds that factor to the
    weights' dtype first (held as a tensor); ``(None, False)`` for a plain embedding."""
    if isinstance(embedding, FactorizedEmbedding):
        return embedding.embed_scale, embedding.scale_in_dtype
    scale = getattr(embedding, "embed_scale", None)
    if scale is None:
        return None, False
    if isinstance(scale, torch.Tensor):
        # Built on the meta device (an empty model about to load), the tensor holds no value; the
        # classes that hold one keep the number beside it.
        value = getattr(embedding, "scalar_embed_scale", None)
        return float(value if value is not None else scale), True
    return float(scale), False


class EmbeddingProjection(nn.Module):
    """The r → hidden projection of a factorized embedding (``forward(x) = x @ weight.T``,
    ``weight`` hidden × r), shared with a tied head."""

    def __init__(self, rank: int, hidden: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden, rank, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"rank={self.weight.shape[1]}, hidden={self.weight.shape[0]}"


class FactorizedEmbedding(nn.Module):
    """A drop-in replacement for ``nn.Embedding(num_embeddings, embedding_dim)`` of rank ``rank``:
    ``forward(ids) = proj(weight[ids])``.

    ``padding_idx`` keeps its ``nn.Embedding`` meaning (no gradient to that row of the table).
    ``weight`` is the vocab × rank table (not vocab × hidden); the dense table is ``to_dense()``.
    ``embed_scale``: the output is multiplied by it, as the scaled embedding it replaces did
    (``scale_in_dtype``: rounded to the output's dtype first, as one holding it as a tensor does).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        embed_scale: float | None = None,
        scale_in_dtype: bool = False,
    ) -> None:
        super().__init__()
        _check_rank(rank, num_embeddings, embedding_dim)
        if padding_idx is not None:  # as nn.Embedding takes it: within the table, a negative one from its end
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx={padding_idx} is outside the {num_embeddings} embeddings")
            padding_idx %= num_embeddings
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.embed_scale, self.scale_in_dtype = embed_scale, scale_in_dtype
        # The factor rounded to each floating dtype (a product by it equals one by the rounded tensor),
        # found once here: no tensor is made in forward (CUDA graphs, torch.compile).
        self._scales = {} if embed_scale is None or not scale_in_dtype else {
            dtype: torch.tensor(embed_scale, dtype=dtype, device="cpu").item()
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
        self.weight = nn.Parameter(torch.empty(num_embeddings, rank, device=device, dtype=dtype))
        # Not named like model projections ("*_proj"): peft matches name suffixes.
        self.proj = EmbeddingProjection(rank, embedding_dim, device, dtype)

    @classmethod
    def like(cls, embedding: nn.Module, rank: int, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> "FactorizedEmbedding":
        """An uninitialised one at ``rank`` standing in for ``embedding`` (an ``nn.Embedding``, scaled
        or not, or a factorized one): its sizes, padding index and output scale."""
        embed_scale, scale_in_dtype = output_scale(embedding)
        return cls(embedding.num_embeddings, embedding.embedding_dim, rank, embedding.padding_idx, device=device,
                   dtype=dtype, embed_scale=embed_scale, scale_in_dtype=scale_in_dtype)

    @classmethod
    def from_factors(
        cls, table: torch.Tensor, projection: torch.Tensor, padding_idx: int | None = None,
        embed_scale: float | None = None, scale_in_dtype: bool = False,
    ) -> "FactorizedEmbedding":
        """Build from ``table`` (vocab × r) and ``projection`` (hidden × r): ``W ≈ table @ projection.T``."""
        if table.dim() != 2 or projection.dim() != 2 or table.shape[1] != projection.shape[1]:
            raise ValueError(
                f"factor shapes do not chain: table {tuple(table.shape)} and projection {tuple(projection.shape)}"
            )
        layer = cls(table.shape[0], projection.shape[0], table.shape[1], padding_idx,
                    device=table.device, dtype=table.dtype, embed_scale=embed_scale, scale_in_dtype=scale_in_dtype)
        with torch.no_grad():
            layer.weight.copy_(table)
            layer.proj.weight.copy_(projection.to(table.dtype))
        return layer

    @property
    def rank(self) -> int:
        return self.weight.shape[1]

    def num_parameters(self) -> int:
        """Number of stored parameters (table and projection)."""
        return self.weight.numel() + self.proj.weight.numel()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        output = self.proj(F.embedding(input_ids, self.weight, self.padding_idx))
        if self.embed_scale is None:
            return output
        return output * self._scales.get(output.dtype, self.embed_scale)

    @torch.no_grad()
    def to_dense(self) -> nn.Embedding:
        """An ``nn.Embedding`` holding the product of the factors (without ``embed_scale``)."""
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                             device=self.weight.device, dtype=self.weight.dtype)
        dense.weight.copy_(self.weight @ self.proj.weight.T)
        return dense

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        scale = f", embed_scale={self.embed_scale:g}" if self.embed_scale is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}{pad}{scale}"


class FactorizedTiedHead(nn.Module):
    """An output head (``nn.Linear(hidden, vocab)``) whose weight is tied to a
    ``FactorizedEmbedding``: ``logits = (x @ proj.weight) @ weight.T + bias``.

    ``weight`` (vocab × r) and ``proj.weight`` (hidden × r) are the embedding's own parameters once
    the model ties them (the checkpoint stores them once, under the embedding's names); the
    projection is used transposed, hidden → r.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_rank(rank, out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.proj = EmbeddingProjection(rank, in_features, device, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @property
    def rank(self) -> int:
        return self.weight.shape[1]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # proj is used transposed, so its own forward never runs: an offload hook on it (accelerate,
        # under a device_map with offload) is run here around the read of its weight.
        hook = getattr(self.proj, "_hf_hook", None)
        if hook is not None:
            hook.pre_forward(self.proj)
        try:
            projected = hidden_states @ self.proj.weight
        finally:
            if hook is not None:
                hook.post_forward(self.proj, None)
        return F.linear(projected, self.weight, self.bias)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear(hidden, vocab)`` holding the product of the (shared) factors."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        dense.weight.copy_(self.weight @ self.proj.weight.T)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, tied"
