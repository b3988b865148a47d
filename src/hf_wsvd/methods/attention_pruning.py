"""Attention pruning (``WSVDConfig.attention_pruning``): shrink each attention's head dimension
instead of factorizing its projections, so that q/k/v/o stay four ordinary (smaller) matrix
products that any runtime executes at full speed, and the KV cache and the attention itself shrink
with them. A factorized projection is two thin products whose time at decode is mostly kernel
latency (``docs/benchmarks/layer_speed.md``); a narrower dense one reads fewer bytes in one launch.

Every head of a layer keeps the same d' of its d dimensions (the stock attention forward reshapes
with one ``head_dim``, which is all that changes in the module, so its own forward, cache and
attention kernels run unchanged):

- Queries and keys keep d'/2 of the d/2 rotary pairs: RoPE rotates each pair (i, i + d/2) by its
  own frequency, so only whole pairs can go, and the same ones in every head (the rotary tables
  are shared; the module's rotary inputs are cut to the kept pairs by a forward pre-hook). A pair's
  cost is its share of the attention logits, 2·√(L_q·L_k) summed over the heads, with L the
  predicted loss of zeroing that pair's query/key outputs (Fisher-weighted when the method has
  Fisher rows); the pairs of least cost go. The logits keep the dense scale 1/√d.
- Values and outputs keep a d'-dimensional subspace of each key/value head, chosen on the output
  projection: with Σ_h W_o,hᵀ·D²·W_o,h = L·Lᵀ over the query heads h of the group (D² the output
  rows' Fisher) and S a square root of the heads' mean output Gram, the best rank-d' M in
  ‖Lᵀ·(I − M)·S‖ is M = L⁻ᵀ·U·Uᵀ·Lᵀ, U the d' leading left singular vectors of Lᵀ·S. The values
  become Uᵀ·Lᵀ·W_v (d' rows per key/value head), each head's output columns W_o,h·L⁻ᵀ·U. The
  attention weights mix tokens and M mixes features, so a head's output is exactly M applied to
  the dense one.

Compensated (sequential mode), the query/key/value weights are the compensated W* (what the dense
layer outputs on the dense model's inputs, from the compressed model's inputs) before they are cut,
and the output projection is refitted to the dense block's outputs in its own stage, as an MLP's
consumer is. Greedy allocation prices one head dimension at a time: its spectrum is √ of each
dimension's loss (half a pair's cost per query/key dimension plus the σ² of the value/output
dimension at that index, summed over the key/value heads).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..linalg import gram_square_root
from ..runtime.modeling_wsvd import attention_layout
from ..solvers import LayerProblem
from ..solvers.fwsvd import axis_weights

@dataclass(frozen=True)
class AttentionGroup:
    """One attention (base-model-relative ``name`` of the module whose head size changes) whose
    four projections (``q``, ``k``, ``v``, ``o``: base-model-relative names) are targets, with its
    head geometry; ``rotary``: its queries and keys are rotated by position (RoPE)."""

    name: str
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int
    rotary: bool

    @property
    def members(self) -> tuple[str, ...]:
        return self.q, self.k, self.v, self.o

    @property
    def channels(self) -> int:
        """The units greedy allocation counts: head dimensions."""
        return self.head_dim

    @property
    def key(self) -> str:
        """Its name in the allocation: the attention's."""
        return self.name

    @property
    def anchor(self) -> str:
        """The layer whose block prices it and whose cost places its cut on a process: the output projection."""
        return self.o

    @property
    def observed(self) -> tuple[str, ...]:
        return self.members


def unsupported(module: nn.Module) -> str | None:
    """Why the head size of ``module`` cannot be cut (None when it can): it needs a layout of
    ``ATTENTION_LAYOUTS``, no normalization over the head dimension, and for a rotary attention an
    even head size, rotary tables passed as ``position_embeddings`` over the whole head, and
    rotary pairs (i, i + d/2), the ones the kept pairs are cut by."""
    layout = attention_layout(module)
    if layout is None:
        return "its projections and head size attribute follow no known layout"
    if any(hasattr(module, norm) for norm in ("q_norm", "k_norm")):
        return "it normalizes queries/keys over the head dimension"
    inside = [layout[1].format("").lstrip(".")] if layout[1].startswith("{}") else []  # the output, where a child
    projections = {f"{name}." for name in (*layout[0], *inside)}
    sizes = {getattr(module, layout[2]), getattr(module, layout[0][0]).out_features}  # a head, all heads
    other = next((name for name, p in module.named_parameters()
                  if not any(name.startswith(prefix) for prefix in projections) and sizes & set(p.shape)), None)
    if other is not None:  # StableLM's q_layernorm, DiffLlama's lambdas, BitNet's attn_sub_norm: left whole by a cut
        return f"it holds a weight over the heads' features besides its projections ({other})"
    if not _is_rotary(module):
        return None
    if getattr(module, layout[2]) % 2:
        return "its rotary head size is odd"
    if _partial_rotary(module, getattr(module, layout[2])):
        return "it rotates part of each head only (partial_rotary_factor)"
    if not _rotates_halves(module):
        return "its rotary pairs are not (i, i + d/2) (interleaved, or a rotate_half of its own)"
    return None


def _partial_rotary(module: nn.Module, head_dim: int) -> bool:
    """Whether ``module`` rotates fewer features than its ``head_dim``: its ``rotary_ndims``, or a
    ``partial_rotary_factor`` of its config (transformers 5 keeps it in ``rope_parameters``, per
    attention type in some models)."""
    if getattr(module, "rotary_ndims", head_dim) != head_dim:
        return True
    config = getattr(module, "config", None)
    rope = getattr(config, "rope_parameters", None)
    places = [config, rope, *(rope.values() if isinstance(rope, dict) else [])]
    factors = [p.get("partial_rotary_factor") if isinstance(p, dict) else getattr(p, "partial_rotary_factor", None)
               for p in places]
    return any(f not in (None, 1, 1.0) for f in factors)


def _rotates_halves(module: nn.Module) -> bool:
    """Whether the modeling file of ``module`` rotates the two halves of a head (``rotate_half`` of
    Llama and its copies), not interleaved pairs (Cohere) or an unknown scheme."""
    rotate = getattr(sys.modules.get(type(module).__module__), "rotate_half", None)
    if not callable(rotate):
        return False
    return torch.equal(rotate(torch.arange(1.0, 5.0)), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


def _is_rotary(module: nn.Module) -> bool:
    return "position_embeddings" in inspect.signature(module.forward).parameters


def attention_groups(model: nn.Module, targets: dict[str, str]) -> list[AttentionGroup]:
    """The attentions of ``model`` whose four projections are all among ``targets``
    (base-model-relative name → full module name) and which ``unsupported`` accepts, in name order."""
    full_to_key = {full: key for key, full in targets.items()}
    groups = []
    for full, module in model.named_modules():
        layout = attention_layout(module)
        if layout is None or unsupported(module) is not None:
            continue
        (q, k, v), output, attribute = layout
        parent, _, own = full.rpartition(".")
        paths = [f"{full}.{p}" for p in (q, k, v)] + [(f"{parent}." if parent else "") + output.format(own)]
        if not all(path in full_to_key for path in paths):
            continue
        head_dim = getattr(module, attribute)
        linears = [model.get_submodule(path) for path in paths]
        heads, kv_heads = linears[0].out_features // head_dim, linears[1].out_features // head_dim
        if (linears[0].out_features != heads * head_dim or linears[1].out_features != kv_heads * head_dim
                or linears[2].out_features != linears[1].out_features or linears[3].in_features != heads * head_dim
                or heads % kv_heads):
            continue
        key = full_to_key[paths[0]].rpartition(".")[0]
        groups.append(AttentionGroup(key, *(full_to_key[path] for path in paths), heads, kv_heads, head_dim,
                                     _is_rotary(module)))
    return sorted(groups, key=lambda group: group.name)


def _row_importance(problem: LayerProblem) -> torch.Tensor:
    """D² of the module: the Fisher summed per output row (floored), or ones without Fisher."""
    if problem.fisher_rows is None and problem.fisher is None:
        return torch.ones(problem.weight.shape[0], dtype=torch.float64, device=problem.weight.device)
    return axis_weights(problem, "output").double().square()


def _row_losses(problem: LayerProblem, scale: float) -> torch.Tensor:
    """The predicted loss of zeroing each output row: scale · D²_i · W_i·C·W_iᵀ."""
    weight = problem.weight.double()
    energy = ((weight @ problem.gram.double().to(weight.device)) * weight).sum(dim=1).clamp_min(0)
    return scale * _row_importance(problem) * energy


def pair_costs(group: AttentionGroup, q: LayerProblem, k: LayerProblem, scales: tuple[float, float]) -> torch.Tensor:
    """The cost of dropping each rotary pair (d/2 values, float64): Σ_h 2·√(L_q,h·L_k,g(h))."""
    half = group.head_dim // 2

    def per_pair(problem: LayerProblem, scale: float, heads: int) -> torch.Tensor:
        rows = _row_losses(problem, scale).view(heads, 2, half)  # (head, first/second half, pair)
        return rows.sum(dim=1)

    lq = per_pair(q, scales[0], group.heads)
    lk = per_pair(k, scales[1], group.kv_heads).repeat_interleave(group.heads // group.kv_heads, dim=0)
    return 2 * (lq * lk).sqrt().sum(dim=0)


def _head_blocks(gram: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The diagonal head_dim × head_dim blocks of ``gram`` (heads × d × d)."""
    blocks = gram.double().view(heads, head_dim, heads, head_dim)
    return blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def value_subspaces(group: AttentionGroup, o: LayerProblem,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(σ, U, L) per key/value head: the singular values (kv_heads × d, descending), left singular
    vectors (kv_heads × d × d) of Lᵀ·S and the factor L (kv_heads × d × d) (see the module)."""
    d, size = group.head_dim, group.heads // group.kv_heads
    weight = o.weight.double().view(o.weight.shape[0], group.heads, d)  # hidden × head × d
    rows = _row_importance(o)
    blocks = _head_blocks(o.gram, group.heads, d)
    sigmas, bases, factors = [], [], []
    for g in range(group.kv_heads):
        heads = range(g * size, (g + 1) * size)
        outer = sum(weight[:, h].T @ (rows[:, None] * weight[:, h]) for h in heads)
        lower = gram_square_root(outer)[0]
        root = gram_square_root(sum(blocks[h] for h in heads) / size)[0]
        u, s, _ = torch.linalg.svd(lower.T @ root)
        sigmas.append(s * scale ** 0.5)
        bases.append(u)
        factors.append(lower)
    return torch.stack(sigmas), torch.stack(bases), torch.stack(factors)


def _whitened_query_keys(group: AttentionGroup, q: LayerProblem, k: LayerProblem, scales: tuple[float, float]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A non-rotary attention's logits per key/value head: with S_q, S_k square roots of the
    (group-mean) query and key covariances, the SVD U·Σ·Vᵀ of S_qᵀ·S_k; the kept dimensions are its
    leading ones. A dimension's cost is priced as a rotary pair's, 2·√(L_q·L_k), with L the
    predicted loss of the query (key) part it carries, scale·D̄²·‖S_q·u_i‖² (‖S_k·v_i‖²).
    Returns the costs (kv × d) and S_q, S_k, U, Σ, V stacked over the key/value heads."""
    d, size = group.head_dim, group.heads // group.kv_heads

    def covariance(problem: LayerProblem, heads: range) -> tuple[torch.Tensor, float]:
        weight = problem.weight.double().view(-1, d, problem.weight.shape[1])
        gram = problem.gram.double().to(weight.device)
        importance = _row_importance(problem).view(-1, d)
        covariances = [weight[h] @ gram @ weight[h].T for h in heads]
        return sum(covariances) / len(covariances), float(importance[list(heads)].mean())

    roots_q, roots_k, lefts, sigmas, rights, costs = [], [], [], [], [], []
    for g in range(group.kv_heads):
        cq, fq = covariance(q, range(g * size, (g + 1) * size))
        ck, fk = covariance(k, range(g, g + 1))
        sq, sk = gram_square_root(cq)[0], gram_square_root(ck)[0]
        u, sigma, vh = torch.linalg.svd(sq.T @ sk)
        query = scales[0] * fq * (sq @ u).square().sum(dim=0)
        key = scales[1] * fk * (sk @ vh.T).square().sum(dim=0)
        roots_q.append(sq), roots_k.append(sk), lefts.append(u), sigmas.append(sigma), rights.append(vh.T)
        costs.append(2 * (query * key).sqrt())
    return (torch.stack(costs), torch.stack(roots_q), torch.stack(roots_k), torch.stack(lefts),
            torch.stack(sigmas), torch.stack(rights))


def head_spectrum(group: AttentionGroup, q: LayerProblem, k: LayerProblem, o: LayerProblem,
                  scales: tuple[float, float, float]) -> torch.Tensor:
    """√ of the loss each head dimension removes when kept, largest first (what greedy allocation
    reads, as it reads a layer's singular values): the query/key cost of that dimension (half the
    cost of its rotary pair, in the order pairs are kept) plus the value/output σ² at that index,
    summed over the key/value heads."""
    if group.rotary:
        logits = (pair_costs(group, q, k, scales[:2]).sort(descending=True).values / 2).repeat_interleave(2)
    else:
        logits = _whitened_query_keys(group, q, k, scales[:2])[0].sum(dim=0)
    sigma, _, _ = value_subspaces(group, o, scales[2])
    losses = logits + sigma.square().sum(dim=0)
    return losses.cummin(dim=0).values.clamp_min(0).sqrt()


@dataclass
class CutAttention:
    """An attention cut to ``head_dim``: its new projection weights (out × in, float64), the maps
    each key/value head's query, key and value features go through (kv_heads × d' × d: applied to
    the q/k/v rows and biases of the heads of that group) and, for a rotary attention, the kept
    pairs (ascending)."""

    head_dim: int
    rotary: list[int] | None
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    maps: dict[str, torch.Tensor]


def rotary_index(rotary: list[int], dense_head_dim: int) -> torch.Tensor:
    """The kept features of a rotary head: the kept pairs' first halves, then their second halves
    (the ``rotate_half`` layout)."""
    kept = torch.tensor(rotary)
    return torch.cat([kept, kept + dense_head_dim // 2])


def _mapped(weight: torch.Tensor, maps: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows of ``weight`` (or entries of a bias) through its group's map."""
    groups, keep, d = maps.shape
    rows = weight.double().reshape(heads, d, -1)
    per_head = maps.to(rows.device).repeat_interleave(heads // groups, dim=0)
    return (per_head @ rows).reshape(heads * keep, *weight.shape[1:])


def cut_attention(group: AttentionGroup, q: LayerProblem, k: LayerProblem, v: LayerProblem, o: LayerProblem,
                  keep: int, scales: tuple[float, float, float]) -> CutAttention:
    """The attention of ``group`` cut to ``keep`` head dimensions (≤ d, even if rotary), see the module."""
    d, size = group.head_dim, group.heads // group.kv_heads
    if not 0 < keep <= d or (group.rotary and keep % 2):
        raise ValueError(f"{group.name}: cannot keep {keep} of {d} head dimensions"
                         + (" (a rotary attention keeps whole pairs: an even number)" if group.rotary else ""))
    device = q.weight.device
    rotary = None
    if group.rotary:
        costs = pair_costs(group, q, k, scales[:2])
        rotary = sorted(torch.sort(costs, descending=True, stable=True).indices[: keep // 2].tolist())
        select = torch.eye(d, dtype=torch.float64, device=device)[rotary_index(rotary, d).to(device)]
        query_map = key_map = select.expand(group.kv_heads, keep, d)
    else:
        _, root_q, root_k, left, sigma, right = _whitened_query_keys(group, q, k, scales[:2])
        half = sigma[:, None, :keep].sqrt()
        # q' = Aᵀ·q, k' = Bᵀ·k with A = S_q⁻ᵀ·U·√Σ, B = S_k⁻ᵀ·V·√Σ: q'ᵀ·k' = qᵀ·S_q⁻ᵀ·U·Σ·Vᵀ·S_k⁻¹·k.
        query_map = torch.linalg.solve(root_q.transpose(1, 2), left[:, :, :keep] * half).transpose(1, 2)
        key_map = torch.linalg.solve(root_k.transpose(1, 2), right[:, :, :keep] * half).transpose(1, 2)
    _, bases, factors = value_subspaces(group, o, scales[2])
    value_map = bases[:, :, :keep].transpose(1, 2) @ factors.transpose(1, 2)  # Uᵀ·Lᵀ: kv × d' × d
    up = torch.linalg.solve(factors.transpose(1, 2), bases[:, :, :keep])  # L⁻ᵀ·U: kv × d × d'
    output = o.weight.double().view(o.weight.shape[0], group.heads, d)
    output = torch.einsum("ohd,hde->ohe", output, up.repeat_interleave(size, dim=0))
    maps = {"q": query_map, "k": key_map, "v": value_map}
    return CutAttention(keep, rotary, _mapped(q.weight, query_map, group.heads),
                        _mapped(k.weight, key_map, group.kv_heads), _mapped(v.weight, value_map, group.kv_heads),
                        output.reshape(output.shape[0], group.heads * keep), maps)


def cut_linear(module: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` with ``weight`` (out × in) and ``bias`` in ``module``'s dtype, device and
    training mode."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=module.weight.device,
                      dtype=module.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.train(module.training)
    return layer


def cut_bias(group: AttentionGroup, cut: CutAttention, role: str, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias of projection ``role`` (q, k, v or o) once cut: each head's entries through its
    group's map; o's is unchanged."""
    if bias is None or role == "o":
        return bias
    heads = group.heads if role == "q" else group.kv_heads
    return _mapped(bias.detach(), cut.maps[role], heads)
