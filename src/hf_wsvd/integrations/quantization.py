"""Quantizing models (compressed or dense) the stock way, and what their weights cost in bits.

A compressed checkpoint takes the quantization configs of transformers like any model:
``from_pretrained(dir, quantization_config=...)`` quantizes the factors' and pruned layers' inner
``nn.Linear`` modules (a factor whose input size is not a multiple of the group size stays in the
model's dtype, said in one log line), and ``save_pretrained`` writes a quantized checkpoint.
``quantization_config(spec)`` names the tested configs; ``quantize`` does that round trip in memory.
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..blocks import block_prefixes
from ..config import GROUPED_QUANTIZE_SPECS, QUANTIZE_SPECS, WSVDConfig
from ..fields import is_integer
from ..runtime.factorized_linear import linear_shape, linear_weight


def quantization_config(spec: str, group_size: int = 64) -> Any:
    """The transformers quantization config of ``spec``, grouped by ``group_size`` input columns
    where the format has groups:

    - int8: torchao ``Int8WeightOnlyConfig``, one scale per output row (fast on GPU under torch.compile);
    - int2..int7: torchao ``IntxWeightOnlyConfig``, asymmetric affine per group (a scale in the
      weight's dtype and an int8 zero point per group); runs on CPU and GPU;
    - int4-gpu: torchao ``Int4WeightOnlyConfig`` (its packed int4 GPU kernels: CUDA and their kernel package);
    - nf4, bnb-int8: bitsandbytes 4-bit NormalFloat (blocks of 64) and LLM.int8 (CUDA)."""
    if spec not in QUANTIZE_SPECS:
        raise ValueError(f"quantize={spec!r} is not one of {QUANTIZE_SPECS}")
    if not is_integer(group_size) or group_size < 1:
        raise ValueError(f"quantize_group_size={group_size!r} must be a positive integer")
    # Else the load fails late, after one traceback a weight.
    if spec == "int4-gpu" and not torch.cuda.is_available():
        raise ValueError("quantize='int4-gpu' runs torchao's packed int4 CUDA kernels and needs a CUDA GPU; "
                         "on this machine use int4")
    if spec in ("nf4", "bnb-int8"):
        from transformers import BitsAndBytesConfig

        if spec == "nf4":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        return BitsAndBytesConfig(load_in_8bit=True)
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType, PerGroup
    except ImportError as error:
        raise ImportError(f"quantize={spec!r} needs torchao: pip install 'hf_wsvd[quant]'") from error
    from transformers import TorchAoConfig

    if spec == "int8":
        return TorchAoConfig(Int8WeightOnlyConfig())
    if spec == "int4-gpu":
        return TorchAoConfig(Int4WeightOnlyConfig(group_size=group_size))
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=getattr(torch, spec), granularity=PerGroup(group_size),
                                              mapping_type=MappingType.ASYMMETRIC))


# torchao's kernels assert on float64 deep inside from_pretrained's conversion: refused before it.
NOT_FLOAT64 = ("quantizes float32, float16 or bfloat16 weights, not torch.float64: use the model in one of those (dtype=, "
               "or --dtype)")


def check_format(spec: str, group_size: int = 64) -> None:
    """Raise a one-line ValueError where this machine cannot quantize in ``spec`` at all (what can be
    said before a model loads): an unknown format, its package missing, a CUDA-only format without CUDA."""
    try:
        quantization_config(spec, group_size)
    except ImportError as error:
        raise ValueError(str(error)) from None
    if spec in ("nf4", "bnb-int8") and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantize={spec!r} needs bitsandbytes (pip install bitsandbytes; the devices its kernels run "
                         "on are in its documentation)")


def check_quantizable(model: nn.Module, spec: str, group_size: int = 64, dtype: torch.dtype | None = None) -> None:
    """Raise a one-line ValueError, before any work, where ``spec`` could not quantize ``model``
    (dense or about to be compressed) in ``dtype`` (default: its own): its package missing, a CUDA-only
    format without CUDA, float64 weights, or a linear outside the repeated blocks and the output head
    (a classifier, a pooler) whose input size the format's groups do not divide (a linear of the
    blocks, factor, pruned or dense, of such a size is kept unquantized at load instead:
    ``keep_unquantizable``)."""
    check_format(spec, group_size)
    dtype = dtype or next(model.parameters()).dtype
    if dtype == torch.float64:
        raise ValueError(f"quantize={spec!r} {NOT_FLOAT64}")
    if spec not in GROUPED_QUANTIZE_SPECS:
        default = WSVDConfig.__dataclass_fields__["quantize_group_size"].default
        if group_size != default:  # the recipe would record a group size nothing used
            raise ValueError(f"quantize_group_size={group_size}: quantize={spec!r} does not "
                             f"group its weights' inputs (only {', '.join(GROUPED_QUANTIZE_SPECS)} do): leave it at "
                             f"{default}")
        return
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    blocks = tuple(block_prefixes(model))
    for name, module in model.named_modules():
        if (type(module) is nn.Linear and module is not head and not name.startswith(blocks)
                and module.in_features % group_size):
            raise ValueError(f"quantize={spec!r} groups every {group_size} inputs of a weight, but {name!r} has "
                             f"{module.in_features} inputs: set quantize_group_size to a divisor of it")


def check_quantized(model: nn.Module, spec: str, group_size: int) -> None:
    """Raise a one-line ValueError where quantizing ``model`` by ``spec`` left every weight of its
    block linears unquantized (``weight_bits``): the checkpoint would be quantized in name only."""
    bits = weight_bits(model)
    if bits.full_weights and not bits.quantized_weights:
        grouped = f" in groups of quantize_group_size={group_size}" if spec in GROUPED_QUANTIZE_SPECS else ""
        raise ValueError(f"quantize={spec!r} quantized none of the {bits.full_weights:,} weights of the block linears"
                         f"{grouped} (their input sizes: the hidden size, MLP widths, ranks): lower "
                         "quantize_group_size, or set rank_multiple to a multiple of it")


def quantize(model: PreTrainedModel, config: Any, dtype: torch.dtype | None = None, **kwargs: Any) -> PreTrainedModel:
    """``model`` quantized by the transformers quantization ``config`` exactly as
    ``from_pretrained(dir, quantization_config=config)`` does it: saved to a temporary folder and
    loaded back with its own class, in ``dtype`` (default: the model's), on the model's accelerator
    when it sits on one (else on the CPU); ``kwargs`` go to ``from_pretrained`` (e.g. ``device_map``).
    The result saves with ``save_pretrained``."""
    if (dtype or model.dtype) == torch.float64:
        raise ValueError(f"{type(config).__name__} {NOT_FLOAT64}")
    device = next(model.parameters()).device
    # from_pretrained loads on the CPU unless told; a dispatched or offloaded model is left to it
    if "device_map" not in kwargs and device.type not in ("cpu", "meta") and not getattr(model, "hf_device_map", None):
        kwargs["device_map"] = {"": str(device)}
    with tempfile.TemporaryDirectory(prefix="hf_wsvd-quantize-") as folder:
        model.save_pretrained(folder)
        return type(model).from_pretrained(folder, quantization_config=config, dtype=dtype or model.dtype, **kwargs)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight (out × in) a linear-like module computes with, in float32: a quantized weight
    dequantized (torchao's ``dequantize()``, else read through the module on the identity)."""
    weight = module.weight
    if hasattr(weight, "__tensor_flatten__") and hasattr(weight, "dequantize"):
        return weight.dequantize().float()
    if not is_quantized_tensor(weight):
        return linear_weight(module).detach().float()  # a Conv1D stores its weight in × out
    # Other quantized modules (bitsandbytes): their forward on the identity, less the bias.
    in_features = module.in_features
    with torch.no_grad():
        probe = torch.eye(in_features, device=weight.device, dtype=getattr(module, "compute_dtype", None) or torch.float16)
        out = module(probe).float()
        if getattr(module, "bias", None) is not None:
            out = out - module.bias.float()
    return out.T.contiguous()


def dequantized_linear(module: nn.Module) -> nn.Linear:
    """A float32 ``nn.Linear`` computing what the (quantized) linear ``module`` computes, with
    its dequantized weight: gradients flow through it, which quantized kernels may not allow."""
    weight = dequantized_weight(module)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
    return linear


def dequantized_modules(module: nn.Module) -> dict[nn.Module, nn.Linear]:
    """Each quantized linear inside ``module`` → its ``dequantized_linear`` (for
    ``hf_wsvd.blocks.detached_copy``'s ``substitutes``: a float32 working copy of a quantized block)."""
    return {m: dequantized_linear(m) for m in module.modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and getattr(m, "in_features", None) is not None
            and is_quantized_tensor(m.weight)}


def _dtype_bits(dtype: torch.dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    if name.startswith(("int", "uint")) and name.lstrip("uint").isdigit():
        return int(name.lstrip("uint"))
    return torch.empty((), dtype=dtype).element_size() * 8


def tensor_bits(tensor: torch.Tensor) -> tuple[int, int]:
    """``(weights, bits)``: how many values ``tensor`` represents and the bits it stores, packed: a
    torchao tensor's components (its values at their bit width, scales and zero points), a
    bitsandbytes 4-bit weight's packed bytes and block scales, a plain tensor's bytes."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        target = getattr(tensor, "target_dtype", None)  # torchao intx: values of `target` bits held in int8
        bits = 0
        for name in names:
            inner = getattr(tensor, name)
            width = _dtype_bits(target) if name == "qdata" and target is not None else None
            bits += inner.numel() * width if width else tensor_bits(inner)[1]
        return tensor.numel(), bits
    state = getattr(tensor, "quant_state", None)
    if state is not None:  # bitsandbytes Params4bit: shape and block scales in its quant state
        scales = [s.absmax for s in (state, getattr(state, "state2", None)) if s is not None]
        return int(torch.Size(state.shape).numel()), tensor.numel() * tensor.element_size() * 8 + sum(
            s.numel() * s.element_size() * 8 for s in scales)
    scb = getattr(tensor, "SCB", None)  # bitsandbytes Int8Params: one float scale per row
    return tensor.numel(), tensor.numel() * tensor.element_size() * 8 + (
        scb.numel() * scb.element_size() * 8 if isinstance(scb, torch.Tensor) else 0)


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` stores a quantized weight: integer or 8-bit float storage (FP8 checkpoints) or a
    quantizer's tensor subclass."""
    return (not tensor.is_floating_point() or tensor.element_size() < 2
            or type(tensor) not in (torch.Tensor, nn.Parameter))


@dataclass
class WeightBits:
    """The weights of a model's block linears (every linear inside its repeated blocks: factors,
    pruned layers, corrections, GPT-2 Conv1D) and the rest (embeddings, norms, biases, head): weights and
    stored bits."""

    quantized_weights: int = 0
    quantized_bits: int = 0
    full_weights: int = 0  # block linear weights kept in the model's dtype (refused factors, corrections)
    full_bits: int = 0
    other_weights: int = 0
    other_bits: int = 0

    @property
    def block_bits_per_weight(self) -> float:
        """Bits per stored weight of the block linears (scales, zero points and unquantized factors included)."""
        return (self.quantized_bits + self.full_bits) / max(self.quantized_weights + self.full_weights, 1)

    @property
    def total_bytes(self) -> float:
        return (self.quantized_bits + self.full_bits + self.other_bits) / 8

    def describe(self) -> str:
        """One line: bits per weight of the block linears, and what the rest of the model costs."""
        linears = self.quantized_weights + self.full_weights
        text = (f"{self.block_bits_per_weight:.2f} bits per weight in the block linears ({linears:,} weights, "
                f"{(self.quantized_bits + self.full_bits) / 8e6:.2f} MB")
        if self.full_weights:
            text += f"; {self.full_weights / linears:.1%} of them unquantized"
        return text + f"); other parameters (embeddings, norms, biases, head) {self.other_bits / 8e6:.2f} MB"


def weight_bits(model: nn.Module) -> WeightBits:
    """The stored bits of ``model``'s parameters (shared tensors once), block linears apart."""
    prefixes = tuple(block_prefixes(model))
    # the weights of the block linears (GPT-2's Conv1D too; biases count with the rest)
    linear_weights = {id(m.weight) for name, m in model.named_modules()
                      if name.startswith(prefixes) and isinstance(getattr(m, "weight", None), torch.Tensor)
                      and _linear_like(m)}
    result, seen = WeightBits(), set()
    for module in model.modules():
        for tensor in module.parameters(recurse=False):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            weights, bits = tensor_bits(tensor)
            if id(tensor) not in linear_weights:
                result.other_weights += weights
                result.other_bits += bits
            elif is_quantized_tensor(tensor):
                result.quantized_weights += weights
                result.quantized_bits += bits
            else:
                result.full_weights += weights
                result.full_bits += bits
    return result


def _linear_like(module: nn.Module) -> bool:
    try:
        linear_shape(module)
    except TypeError:
        return getattr(module, "in_features", None) is not None  # a quantizer's own linear (bitsandbytes)
    return True
