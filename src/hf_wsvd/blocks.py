"""The repeated transformer blocks of a model and where each one runs.

A block runs where it lives: on its accelerate hook's execution device when the model was
dispatched (``device_map``: several GPUs, CPU or disk offload), else on the device of its weights,
except that blocks kept in CPU memory are moved to the accelerator one at a time while they run
(``placed``), so a model larger than the accelerator is processed block by block.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from typing import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: its largest ``nn.ModuleList``, with its name."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def block_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes of every repeated block (children of any ``nn.ModuleList``)."""
    return [f"{name}.{index}." if name else f"{index}." for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) for index in range(len(module))]


def hooked(module: nn.Module) -> bool:
    """Whether accelerate dispatched ``module`` (its hook moves inputs and, offloaded, weights)."""
    return any(hasattr(m, "_hf_hook") for m in module.modules())


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed ``model`` or part of it (``device_map``, ``cpu_offload``): its
    hooks move weights and inputs, so nothing may move the model as a whole."""
    return hooked(model)


@contextlib.contextmanager
def given_back(model: nn.Module) -> Iterator[None]:
    """Whatever moves ``model`` for the duration, it ends on the device it was on: a model on one
    device that accelerate did not place goes back there (also after an error); a dispatched model
    keeps its placement, and one spread by hand over several devices stays where it was moved."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    home = devices.pop() if len(devices) == 1 and not is_dispatched(model) else None
    try:
        yield
    except BaseException:
        if home is not None:
            try:
                model.to(home)
            except Exception as error:  # (a CUDA error that sticks): the first error is the one to see
                logger.warning(f"could not move the model back to {home} after an error: {error}")
        raise
    if home is not None:
        model.to(home)


@contextlib.contextmanager
def kept_flags(model: nn.Module) -> Iterator[None]:
    """Each of ``model``'s modules comes back in the train or eval mode it had, and each of its
    parameters with the ``requires_grad`` it had (also after an error), whatever the body set. A
    module the body put in place of another takes the mode of the one it replaced (of its nearest
    ancestor that was there: a factorized layer's factors, their layer's)."""
    modes = {name: module.training for name, module in model.named_modules()}
    trainable = {param: param.requires_grad for param in model.parameters()}
    try:
        yield
    finally:
        for name, module in model.named_modules():
            known = name
            while known not in modes:
                known = known.rpartition(".")[0]
            module.training = modes[known]
        for param, flag in trainable.items():
            param.requires_grad_(flag)


def home_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (CPU for an empty module)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def execution_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where accelerate's hooks run ``module``: the first execution device among its hooks (a
    block offloaded with ``cpu_offload`` has it on its layers only), else ``default``."""
    for submodule in module.modules():
        for part in _hook_parts(submodule):
            if getattr(part, "execution_device", None) is not None:
                return torch.device(part.execution_device)
    return torch.device(default)


# Blocks kept in CPU memory travel to an accelerator from pinned memory, and the next block of a
# walk is copied on a side CUDA stream while the current one computes (False: each block is moved
# when its visit starts; the same weights either way).
PREFETCH = True


def _cpu_tensors(block: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """(module, "_parameters"/"_buffers", key, tensor) of every weight of ``block`` in CPU memory."""
    return [(module, kind, key, tensor) for module in block.modules() for kind in ("_parameters", "_buffers")
            for key, tensor in getattr(module, kind).items() if tensor is not None and tensor.device.type == "cpu"]


def _copy(source: torch.Tensor, device: torch.device, cuda: bool) -> torch.Tensor:
    """``source``'s copy on ``device`` (asynchronous from pinned memory on CUDA)."""
    return source.to(device, non_blocking=cuda)


class _Staged:
    """Device copies of one CPU-resident block's weights: (module, kind, key, the CPU tensor copied,
    its device copy), and the CUDA event marking the end of the copies."""

    def __init__(self, block: nn.Module, device: torch.device, stream) -> None:
        self.block, self.entries, self.event = block, [], None
        cuda = torch.device(device).type == "cuda"
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for module, kind, key, tensor in _cpu_tensors(block):
                source = tensor.data
                if cuda and not source.is_pinned():  # pinned once: every later visit copies asynchronously
                    source = source.pin_memory()
                    tensor.data = source
                self.entries.append((module, kind, key, source, _copy(source, device, cuda)))
            if stream is not None:
                self.event = torch.cuda.Event()
                self.event.record(stream)

    def current(self) -> bool:
        """Whether the block holds just the CPU tensors that were copied (nothing swapped in since)."""
        now = _cpu_tensors(self.block)
        return len(now) == len(self.entries) and all(
            m is module and k == kind and n == key and t.data.data_ptr() == source.data_ptr()
            for (m, k, n, t), (module, kind, key, source, _) in zip(now, self.entries))

    def install(self) -> list:
        """Point the block's weights at the device copies (after the copies end, on this stream);
        returns what ``_restore`` needs."""
        if self.event is not None and self.entries:
            torch.cuda.current_stream(self.entries[0][4].device).wait_event(self.event)
        installed = []
        for module, kind, key, source, copy_ in self.entries:
            if self.event is not None:  # allocated on the side stream, used on this one
                copy_.record_stream(torch.cuda.current_stream(copy_.device))
            tensor = getattr(module, kind)[key]
            tensor.data = copy_
            installed.append((tensor, source, copy_, tensor._version))
        self.entries = []
        return installed


def _restore(block: nn.Module, installed: list, home: torch.device) -> None:
    """Back to CPU memory after a visit: a weight left as installed and unmodified gets its CPU
    tensor back (no copy); one modified in place, and every weight added during the visit (layers
    swapped in), is copied home."""
    for tensor, source, copy_, version in installed:
        if tensor.data.data_ptr() == copy_.data_ptr() and tensor._version == version:
            tensor.data = source
    block.to(home)


class Prefetcher:
    """The block staged for the next visit of a walk over CPU-resident blocks (one at a time, so at
    most two blocks are on the accelerator: the current one and the next)."""

    def __init__(self) -> None:
        self.staged: _Staged | None = None
        self.streams: dict = {}

    def stage(self, block: nn.Module, device: torch.device) -> None:
        """Start copying ``block``'s weights to ``device`` (on a side stream on CUDA)."""
        device = torch.device(device)
        stream = None
        if device.type == "cuda":
            stream = self.streams.get(device) or self.streams.setdefault(device, torch.cuda.Stream(device))
            stream.wait_stream(torch.cuda.current_stream(device))  # copies into memory freed by this stream
        self.staged = _Staged(block, device, stream)

    def take(self, block: nn.Module, device: torch.device) -> _Staged:
        """``block``'s staged copies if they are for it and still current, else copies made now."""
        staged, self.staged = self.staged, None
        if staged is None or staged.block is not block or not staged.current():
            staged = _Staged(block, device, None)
        return staged


_PREFETCHER = Prefetcher()


def _resident(block: nn.Module, device: torch.device) -> bool:
    """Whether ``block`` is kept in CPU memory and visits ``device`` (an accelerator) to run."""
    return not hooked(block) and home_device(block).type == "cpu" and torch.device(device).type != "cpu"


@contextlib.contextmanager
def placed(block: nn.Module, device: torch.device, upcoming: nn.Module | None = None) -> Iterator[torch.device]:
    """Run-time placement of ``block``: yields the device its inputs should be on. A block kept in
    CPU memory moves to ``device`` for the duration and back after; a dispatched block stays
    under its hook; any other block runs where its weights are. ``upcoming``: the block the walk
    visits next, whose weights are copied while this one runs (``PREFETCH``)."""
    if hooked(block):
        yield execution_device(block, device)
        return
    home = home_device(block)
    if not _resident(block, device):
        yield home
        return
    if not PREFETCH:
        block.to(device)
        try:
            yield torch.device(device)
        finally:
            block.to(home)
        return
    installed = _PREFETCHER.take(block, device).install()
    if upcoming is not None and upcoming is not block and _resident(upcoming, device):
        _PREFETCHER.stage(upcoming, device)
    try:
        yield torch.device(device)
    finally:
        _restore(block, installed, home)


def _hook_parts(module: nn.Module) -> list:
    """The accelerate hooks on ``module`` itself (the parts of a ``SequentialHook``, which
    ``cpu_offload`` of a module with weights of its own makes)."""
    hook = getattr(module, "_hf_hook", None)
    return [part for part in (getattr(hook, "hooks", None) or [hook]) if part is not None]


def offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps some of ``module``'s weights off the module (CPU or disk offload)."""
    return any(getattr(part, "offload", False) for m in module.modules() for part in _hook_parts(m))


@contextlib.contextmanager
def loaded(module: nn.Module, device: torch.device | None = None) -> Iterator[None]:
    """Every weight of ``module`` readable for the duration: loaded from where accelerate offloaded
    it (onto ``device``, default its hook's execution device), else moved to ``device`` if given.
    Unlike ``accelerate.utils.align_module_device``, this covers the submodules and finds an
    offload hook inside a ``SequentialHook``."""
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for submodule in module.modules():
            parts = [part for part in _hook_parts(submodule) if getattr(part, "offload", False)]
            if not parts:
                stack.enter_context(align_module_device(submodule, device))
            for part in parts:
                stack.callback(setattr, part, "execution_device", part.execution_device)
                part.execution_device = device if device is not None else part.execution_device
                part.pre_forward(submodule)
                stack.callback(part.post_forward, submodule, None)
        yield


def module_copy(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """``copy.deepcopy(module, memo)`` where a tensor a module keeps as a plain attribute (not a
    parameter or buffer) may carry autograd history: such state is copied detached."""
    memo = {} if memo is None else memo
    for submodule in module.modules():
        for value in vars(submodule).values():
            # e.g. RecurrentGemma's recurrent and convolution states, left by the Fisher pass's forward
            if torch.is_tensor(value) and value.grad_fn is not None and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(module, memo)


def detached_copy(block: nn.Module, device: torch.device, dtype: torch.dtype,
                  substitutes: dict[nn.Module, nn.Module] | None = None) -> nn.Module:
    """A copy of ``block`` on ``device`` in ``dtype`` holding its own weights, without accelerate's
    hooks (weights offloaded by them are read from where accelerate keeps them); each of
    ``substitutes``' keys (a submodule) is replaced by its value in the copy."""
    # Hooks are not copied: an offload hook's weight map can hold the whole model's weights.
    memo = {id(m._hf_hook): None for m in block.modules() if hasattr(m, "_hf_hook")}
    memo.update({id(module): substitute for module, substitute in (substitutes or {}).items()})
    with loaded(block):
        copied = module_copy(block, memo)
    for module in copied.modules():
        module.__dict__.pop("_hf_hook", None)
        if "_old_forward" in module.__dict__:  # accelerate's wrapper around the module's own forward
            module.forward = module.__dict__.pop("_old_forward")
    return copied.to(device, dtype)


def first_output(output) -> torch.Tensor:
    """The hidden states a block returns (alone or first of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    """``output`` with its hidden states replaced by ``hidden``."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def on_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` in CPU memory, pinned where CUDA is present so that the later copies to
    and from the accelerator run asynchronously (``tensor`` itself if it is there already). The copy
    is complete on return: the CPU may read it."""
    pin = torch.cuda.is_available()
    if tensor.device.type == "cpu" and (tensor.is_pinned() or not pin):
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin).copy_(tensor)


def host_clone(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` where it is, pinned again if it was pinned (an offloaded stream's copy;
    the CPU reads it, so no asynchronous copy into it may be pending)."""
    if tensor.device.type == "cpu" and tensor.is_pinned():
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
    return tensor.clone()


def stored_like(output: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """``output`` kept where ``stored`` (the hidden states it replaces) was kept: hidden states
    offloaded to pinned CPU memory stay there, written into their own buffer when the shapes agree
    (asynchronously from CUDA: ``run_block`` waits for those copies)."""
    if not stored.is_pinned() and (stored.device.type != "cpu" or output.device.type == "cpu"):
        return output  # kept on an accelerator, or a walk all in CPU memory
    if stored.shape == output.shape and stored.dtype == output.dtype:
        # On the output's stream, after the block's read of ``stored`` that produced ``output``.
        return stored.copy_(output, non_blocking=output.device.type == "cuda")
    return on_host(output)


@torch.no_grad()
def run_block(block: nn.Module, inputs: list, device: torch.device, hooks=None, in_place: bool = True) -> None:
    """Run ``block`` on every captured input (hidden states, keyword arguments, 2-D mask) on
    ``device``, calling ``hooks.new_batch(mask)`` before each when given (statistics hooks);
    ``in_place``: the outputs replace the inputs, ready for the next block, kept where the inputs
    were (CPU memory for offloaded hidden states)."""
    copied_from = set()
    for index, (hidden, kwargs, mask) in enumerate(inputs):
        if hooks is not None:
            hooks.new_batch(mask)
        output = first_output(block(hidden.to(device, non_blocking=True), **kwargs))
        if in_place:
            kept = stored_like(output, hidden)
            if kept is not output and output.device.type == "cuda":
                copied_from.add(output.device)
            inputs[index] = (kept, kwargs, mask)
    # The next reader may be another GPU (a dispatched model), whose stream does not wait for this one's copies.
    for source in copied_from:
        torch.cuda.current_stream(source).synchronize()


def release_host_cache() -> None:
    """Hand the pinned CPU memory that offloaded hidden states occupied back to the system (torch
    keeps freed pinned blocks for reuse, rounded up to powers of two)."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)  # torch >= 2.10
    if empty is not None and torch.cuda.is_available():
        empty()


def split_hidden(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """A block call's hidden states (its first argument) and every other argument by name, so
    that a re-run can switch off a cache passed positionally (GPT-2 blocks take it second)."""
    signature = inspect.signature(type(block).forward)
    bound = signature.bind(block, *args, **kwargs).arguments
    named = {}
    for name, value in list(bound.items())[1:]:
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError(f"{type(block).__name__}.forward takes *{name}: cannot re-run it by keyword")
        else:
            named[name] = value
    hidden_name = next(iter(named))
    return named.pop(hidden_name), named


# Keyword arguments through which a block would read or extend a key/value cache.
CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "cache", "layer_past")


def without_cache(kwargs: dict) -> dict:
    """A block call's keyword arguments with any key/value cache switched off (a block re-run on
    the same inputs must not see, or extend, what its first run cached)."""
    kwargs = {k: (None if k in CACHE_ARGUMENTS else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def _move(tensor: torch.Tensor, device: torch.device, where: dict, key: tuple) -> torch.Tensor:
    where[key] = tensor.device
    return tensor.to(device)


@contextlib.contextmanager
def outside_blocks_on(model: nn.Module, prefix: str, device: torch.device) -> Iterator[None]:
    """Every parameter and buffer outside the blocks (``prefix``) on ``device`` for the duration
    (embeddings, final norm, head, rotary tables); nothing moves on a dispatched model."""
    where: dict = {}
    # A tied weight (input embeddings and head) is one parameter: moved, and restored, once (its
    # second visit would record the device it was just moved to as its home).
    seen: set[int] = set()
    if not is_dispatched(model):
        for name, module in model.named_modules():
            if name == prefix or name.startswith(prefix + "."):
                continue
            for key, tensor in module._parameters.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    tensor.data = _move(tensor.data, device, where, (name, "_parameters", key))
            for key, tensor in module._buffers.items():  # each slot gets a moved tensor of its own
                if tensor is not None:
                    module._buffers[key] = _move(tensor, device, where, (name, "_buffers", key))
    try:
        yield
    finally:
        for (name, kind, key), home in where.items():
            module = model.get_submodule(name)
            if kind == "_parameters":
                module._parameters[key].data = module._parameters[key].data.to(home)
            else:
                module._buffers[key] = module._buffers[key].to(home)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()``, or None where the model names none (Canine hashes code points
    into tables of its own; transformers' default raises NotImplementedError)."""
    try:
        return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        return None


def input_device(model: nn.Module, device: torch.device) -> torch.device:
    """Where a model's input ids go: the input embeddings' execution device (without them, that of
    the model's first module holding weights)."""
    if not is_dispatched(model):
        return torch.device(device)
    embeddings = input_embeddings(model)
    if not isinstance(embeddings, nn.Module):  # Perceiver's are a parameter, Canine names none
        embeddings = next(m for m in model.modules() if next(m.parameters(recurse=False), None) is not None)
    return execution_device(embeddings, home_device(embeddings)) if hooked(embeddings) else home_device(embeddings)
