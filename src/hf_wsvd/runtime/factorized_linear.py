"""`FactorizedLinear`: a linear layer stored as two thin factors, ``W ≈ up.weight @ down.weight``;
`SharedDown`: one matmul for the down factors of sibling layers that read the same input.

This file ships inside every compressed checkpoint (it is copied next to ``config.json`` so that
``trust_remote_code=True`` works without hf_wsvd), so it may import only torch and transformers.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

# Children of one module that read the same input in the architectures transformers ships
# (attention projections; a gated MLP's two input projections): their factorized ones share one
# down matmul at inference (``share_input_factors``).
SHARED_INPUT_CHILDREN = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """Return ``(in_features, out_features)`` of an ``nn.Linear``, a transformers ``Conv1D``, a
    ``FactorizedLinear``, a ``FullPrecisionLinear`` or a ``LowRankCorrectedLinear``."""
    if isinstance(module, (nn.Linear, FactorizedLinear, FullPrecisionLinear, LowRankCorrectedLinear)):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        # GPT-2 style Conv1D stores weight as (in, out) and computes x @ W + b.
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight of a linear-like module in ``nn.Linear`` layout (out × in)."""
    if isinstance(module, FactorizedLinear):
        return module.up.weight @ module.down.weight
    if isinstance(module, (nn.Linear, FullPrecisionLinear)):
        return module.weight
    if isinstance(module, LowRankCorrectedLinear):
        raise TypeError("a LowRankCorrectedLinear's base weight is quantized: it has no dense weight to read")
    linear_shape(module)  # raises for unsupported modules
    return module.weight.t()


def saves_parameters(in_features: int, out_features: int, rank: int) -> bool:
    """Whether rank ``rank`` factors hold fewer weights than the dense ``out × in`` matrix (or
    embedding table: the rule is symmetric in the two sides)."""
    return rank * (in_features + out_features) < in_features * out_features


def check_rank(rank: int, in_features: int, out_features: int) -> None:
    """Raise unless ``rank`` fits an ``out_features × in_features`` layer."""
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"rank={rank} is invalid for a {out_features}x{in_features} layer: "
            f"it must be between 1 and {min(in_features, out_features)}"
        )


class _RankedFactors:
    """``rank`` and a ``weight`` stand-in of a module with ``down`` (in → r) and ``up`` (r → out) factors."""

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The ``up`` factor, for dtype/device probes only (its shape is out × rank)."""
        return self.up.weight


class FactorizedLinear(_RankedFactors, nn.Module):
    """A drop-in replacement for ``nn.Linear(in_features, out_features)`` of rank ``rank``.

    ``forward(x) = up(down(x))`` with ``down: in → rank`` (no bias) and ``up: rank → out`` carrying
    the original bias. ``weight`` and ``bias`` are read-only stand-ins for dtype/device probes done
    by model code and libraries; the dense matrix is ``to_dense()``. ``shared_down``: the
    :class:`SharedDown` computing ``down`` together with its siblings', if any; ``overlap_products``:
    set by :func:`overlap_sibling_products`.
    """

    shared_down: "SharedDown | None" = None
    # Kept by the layer, not its group, so that a group stacked again after a conversion keeps it.
    overlap_products: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(rank, in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        # Child names must not end like model projections ("up_proj"): peft matches name suffixes.
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None
    ) -> "FactorizedLinear":
        """Build from ``up`` (out × r), ``down`` (r × in) and an optional ``bias`` (out)."""
        for name, value in (("up", up), ("down", down), ("bias", bias)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} is a {type(value).__name__}: from_factors takes tensors (a layer's .weight)")
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"factor shapes do not chain: up {tuple(up.shape)} and down {tuple(down.shape)}"
            )
        if bias is not None and bias.shape != (up.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match out_features={up.shape[0]}")
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None,
                    device=up.device, dtype=up.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down.to(up.dtype))
            if bias is not None:
                layer.up.bias.copy_(bias.to(up.dtype))
        return layer

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def num_parameters(self) -> int:
        """Number of stored parameters (both factors and the bias)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_down is not None:
            output = self.shared_down.output(self, x)
            if output is not None:
                return output
        return self.up(self.down(x))

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        # A conversion (.to, .half, ...) gives each factor a tensor of its own: a shared weight would
        # go stale. (A Wsvd model shares again after its own conversion.)
        if self.shared_down is not None:
            self.shared_down.release()
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function with the product of the factors."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.up.weight.device, dtype=self.up.weight.dtype)
        dense.weight.copy_(self.up.weight @ self.down.weight)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class _Product(NamedTuple):
    """One call's shared down product: the input it was computed from, each layer's rows, each
    layer's up output when computed ahead (else None), and which of those a layer has taken."""

    input: torch.Tensor
    rows: tuple[torch.Tensor, ...]
    ups: tuple[torch.Tensor, ...] | None
    taken: list[bool]


class SharedDown:
    """One matmul for the down factors of sibling ``FactorizedLinear`` layers that read the same input.

    ``weight`` stacks their down factors' rows and each layer's ``down.weight`` becomes a view of
    its rows: the parameters (so ``state_dict``, checkpoints, optimizers) are unchanged, no memory
    is added, and an in-place update of a factor is an update of ``weight``. Within one call of
    ``owner`` (the module whose children they are; its forward hooks open and close the call), the
    first layer called computes ``input @ weight.T`` for all of them, and each layer then called
    with that same input tensor takes its columns; no product outlives the call. A layer computes
    its own ``down`` instead while autograd needs a down factor's gradient (training them), and
    outside a call of ``owner``. With ``overlap_products`` set on every layer
    (:func:`overlap_sibling_products`), while a CUDA graph is being captured the first layer called
    also computes every layer's ``up`` (their hooks fire then), each on a CUDA stream of its own
    (parallel branches of the graph), and the others take their output; a group where a call left
    some of them untaken (a layer not called, or called with another input: a cross-attention)
    stops doing so. Once a factor is no longer a view of ``weight`` (a module replaced by peft, a
    quantizer, an offload hook or a LoRA merge; ``.to``) the group releases itself, in eager mode
    (data pointers cannot be read under ``torch.compile``, which guards the identity checks
    instead).
    """

    def __init__(self, owner: nn.Module, layers: list[FactorizedLinear]) -> None:
        self.owner, self.layers = owner, tuple(layers)
        self._ahead_wasted = False
        self._stack(tuple(layer.down for layer in layers))
        owner.register_forward_pre_hook(self._enter)
        owner.register_forward_hook(self._exit, always_call=True)
        for layer in layers:
            layer.shared_down = self

    def _stack(self, downs: tuple[nn.Linear, ...]) -> None:
        """Copy the weights of the layers' ``downs`` into one tensor, ``weight``, and make each a
        view of its rows."""
        self._downs, self.params = downs, tuple(down.weight for down in downs)
        params = self.params
        self.weight = torch.cat([param.detach() for param in params])
        self.ranks, self._product, self._open = [param.shape[0] for param in params], None, False
        start = 0
        for param in params:
            param.data = self.weight[start : start + param.shape[0]]
            start += param.shape[0]
        # Where each view starts: a factor given other storage (``.data`` set, by hand or by a
        # sharding library) starts elsewhere, since ``weight`` keeps this memory allocated.
        self._pointers = tuple(param.data_ptr() for param in params)

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self._open, self._product = True, None

    def _exit(self, module: nn.Module, args: tuple, output: object) -> None:
        product = self._product
        if product is not None and product.ups is not None and not all(product.taken):
            self._ahead_wasted = True  # some sibling was not called (or with another input)
        self._open, self._product = False, None

    def output(self, layer: FactorizedLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer(x)`` computed from the shared matmul, or None where ``layer`` computes its own."""
        # One attribute: read at once, never mixed from two calls (two threads calling the owner at
        # the same time recompute, never read each other's, though they may stop the group
        # computing ahead).
        product = self._product
        if not self._open:
            return None
        if product is None or product.input is not x:
            if not self._usable():
                return None
            # Rows: a layer's columns are strided, and a linear of strided 2-D rows is one addmm where
            # one of a strided 3-D batch is a matmul plus a bias add (slower, and one more launch).
            rows = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), self.weight)
            rows = rows.split_with_sizes(self.ranks, dim=1)
            if product is not None:  # a second input within one call: ups computed ahead are wasted
                self._ahead_wasted = True
            # The flags first: the capture query is a CUDA call, and eager decoding is host-bound.
            ups = (self._ups_on_streams(rows, x.shape[:-1])
                   if not self._ahead_wasted and all(m.overlap_products for m in self.layers) and _capturing(x)
                   else None)
            product = self._product = _Product(x, rows, ups, [False] * len(self.layers))
        index = self.layers.index(layer)
        if product.ups is not None and not product.taken[index]:
            product.taken[index] = True  # once: a second call gets a tensor of its own
            return product.ups[index]
        return layer.up(product.rows[index]).reshape(*x.shape[:-1], -1)

    def _ups_on_streams(self, rows: tuple[torch.Tensor, ...], lead: torch.Size) -> tuple[torch.Tensor, ...]:
        """Every layer's ``up`` of its rows, each on a stream of its own forked from the current
        one and joined back before returning."""
        main = torch.cuda.current_stream(rows[0].device)
        streams = _side_streams(main, len(self.layers))
        outputs = []
        for stream, layer, part in zip(streams, self.layers, rows):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outputs.append(layer.up(part).reshape(*lead, -1))
        for stream, output in zip(streams, outputs):
            main.wait_stream(stream)
            output.record_stream(main)  # made on its stream, read on the current one
        return tuple(outputs)

    def _usable(self) -> bool:
        """Whether the shared matmul may stand for the layers' own: no down factor needs a gradient
        and each is still the view made by ``_stack`` (else the group is released)."""
        if torch.is_grad_enabled() and any(param.requires_grad for param in self.params):
            return False  # autograd must reach each layer's own parameter
        # The dicts behind ``layer.down.weight`` directly: nn.Module.__getattr__ would cost more than
        # the launches saved at batch 1.
        linked = all(layer._modules.get("down") is down and down._parameters.get("weight") is param
                     for layer, down, param in zip(self.layers, self._downs, self.params))
        if torch.compiler.is_compiling():
            return linked
        if not (linked and all(param.data_ptr() == pointer for param, pointer in zip(self.params, self._pointers))):
            self.release()
            return False
        return True

    def release(self) -> None:
        """Stop sharing: each layer computes its own ``down`` again (its factor is left as it is)."""
        for layer in self.layers:
            if layer.shared_down is self:
                layer.shared_down = None
        for hooks in (self.owner._forward_pre_hooks, self.owner._forward_hooks):
            for key in [key for key, hook in hooks.items() if getattr(hook, "__self__", None) is self]:
                del hooks[key]
                self.owner._forward_hooks_always_called.pop(key, None)
        self._open, self._product = False, None

    def __deepcopy__(self, memo: dict) -> "SharedDown":
        # A deep-copied parameter gets storage of its own: stack the copies again so that the copy
        # shares too. The owner and layers may still be under construction (deepcopy fills their
        # attributes last): only referenced here; their downs are complete.
        copied = memo[id(self)] = object.__new__(SharedDown)
        copied._ahead_wasted = self._ahead_wasted
        copied.owner, copied.layers = copy.deepcopy((self.owner, self.layers), memo)
        copied._stack(copy.deepcopy(self._downs, memo))
        return copied


def _capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s kernels are being captured into a CUDA graph (not traced by dynamo). Streams
    only there: in eager decoding their switches cost host time, which bounds it at small batches."""
    return x.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()


# Side streams per device, shared by every group (each new stream gets a cuBLAS workspace of its own).
_SIDE_STREAMS: dict[torch.device, list] = {}


def _side_streams(main: "torch.cuda.Stream", count: int) -> list:
    """``count`` streams of ``main``'s device other than ``main`` (a branch on the capturing stream
    itself would run in turn, not at once)."""
    streams = _SIDE_STREAMS.setdefault(main.device, [])
    streams[:] = [stream for stream in streams if stream != main]
    while len(streams) < count:
        stream = torch.cuda.Stream(main.device)
        if stream != main:
            streams.append(stream)
    return streams[:count]


def _shareable(module: nn.Module | None) -> bool:
    """Whether ``module`` is a ``FactorizedLinear`` not yet sharing whose down factor is a plain
    ``nn.Linear`` with a floating-point weight on a real device (not quantized, offloaded, wrapped
    by peft) and under no accelerate hook."""
    if type(module) is not FactorizedLinear or module.shared_down is not None or type(module.down) is not nn.Linear:
        return False
    weight = module.down.weight
    return (type(weight) is nn.Parameter and weight.is_floating_point() and weight.device.type != "meta"
            and not any(hasattr(m, "_hf_hook") for m in (module, module.down)))


def share_input_factors(model: nn.Module) -> int:
    """Let the factorized children of each module of ``model`` that read the same input
    (``SHARED_INPUT_CHILDREN``: q/k/v, gate/up) compute their down factors as one matmul
    (:class:`SharedDown`); returns how many groups now share. Layers already sharing, or whose down
    factor is quantized, offloaded or wrapped by peft, are left alone."""
    groups = 0
    for owner in list(model.modules()):
        for names in SHARED_INPUT_CHILDREN:
            layers = [child for child in (owner._modules.get(name) for name in names) if _shareable(child)]
            if len(layers) > 1 and len({(layer.in_features, layer.down.weight.dtype, layer.down.weight.device)
                                        for layer in layers}) == 1:
                SharedDown(owner, layers)
                groups += 1
    return groups


def _groups(model: nn.Module) -> list[SharedDown]:
    return list({id(m.shared_down): m.shared_down for m in model.modules()
                 if isinstance(m, FactorizedLinear) and m.shared_down is not None}.values())


def overlap_sibling_products(model: nn.Module, enabled: bool = True) -> int:
    """Let the sibling layers of each :class:`SharedDown` group of ``model`` run their up products
    on parallel CUDA streams in CUDA graphs captured from now on (the outputs are the same); kept
    through conversions such as ``.to()``; returns how many groups share now. Off by default: a
    whole replayed decode step gained at most 1% (docs/benchmarks/speed.md)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled={enabled!r} must be True or False")
    for module in model.modules():
        if isinstance(module, FactorizedLinear):
            module.overlap_products = enabled
    return len(_groups(model))


def unshare_input_factors(model: nn.Module) -> int:
    """Undo ``share_input_factors``: every ``FactorizedLinear`` of ``model`` computes its own down
    factor again; returns how many groups were released."""
    groups = _groups(model)
    for group in groups:
        group.release()
    return len(groups)


class FullPrecisionLinear(nn.Module):
    """``nn.Linear``'s computation under another class. Quantizers (torchao, bitsandbytes, HQQ)
    convert ``nn.Linear`` modules (bitsandbytes GPT-2's ``Conv1D`` too), so this one keeps its dtype
    under a quantization config: a factor whose shape the quantizer's kernels refuse, or a low-rank
    correction."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    forward = nn.Linear.forward
    extra_repr = nn.Linear.extra_repr


class LowRankCorrectedLinear(_RankedFactors, nn.Module):
    """``base(x) + up(down(x))``: a linear whose weight the checkpoint stores quantized (``base``,
    carrying the bias) plus a rank-``rank`` correction of its quantization error kept in full
    precision (``down: in → rank``, ``up: rank → out``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_rank(rank, in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.down = FullPrecisionLinear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = FullPrecisionLinear(rank, out_features, bias=False, device=device, dtype=dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
