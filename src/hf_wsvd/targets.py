"""Which modules of a model to factorize."""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from .blocks import block_prefixes
from .runtime.factorized_linear import FactorizedLinear, LowRankCorrectedLinear, linear_shape
from .runtime.modeling_wsvd import is_experts, relative_module_name


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or a transformers ``Conv1D`` (GPT-2), the layers hf_wsvd can factorize; not a
    model's own ``nn.Linear`` subclass whose forward does more than the product (Llama 4's router
    picks experts: its factors would drop that)."""
    try:
        linear_shape(module)
    except TypeError:
        return False
    own_forward = isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward \
        and type(module).__module__.startswith("transformers.models.")
    return not own_forward and not isinstance(module, (FactorizedLinear, LowRankCorrectedLinear))


def _tied_module_names(model: nn.Module) -> dict[str, str]:
    """Each module that is one with another (name → the other's name): its weight shared with another
    module (an LM head tied to embeddings), or the module itself held in two places of the model (one
    linear under two attributes: factorized under its first name, it would leave the other place the
    dense original). A module inside a block held twice is in one place (the block's), and a swap
    there reaches both."""
    places: dict[int, list[str]] = {}  # module → its (parent, attribute) places, by name
    seen: set[tuple[int, str]] = set()
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attribute, child in parent._modules.items():
            if child is not None and (id(parent), attribute) not in seen:
                seen.add((id(parent), attribute))
                places.setdefault(id(child), []).append(f"{parent_name}.{attribute}" if parent_name else attribute)
    holders: dict[int, list[str]] = {}  # weight → the first name of each module holding it
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            holders.setdefault(id(weight), []).append(name)
    groups = [names for names in (*places.values(), *holders.values()) if len(names) > 1]
    return {name: next(other for other in names if other != name) for names in groups for name in names}


def _matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def selects(name: str, target_modules: list[str] | str | None, exclude_modules: list[str] | str | None) -> bool:
    """Whether the module of base-model-relative ``name`` that is no linear layer (a mixture-of-experts
    module, which MLP pruning cuts) is compressed: named by ``target_modules`` where given, not by
    ``exclude_modules``."""
    return (target_modules is None or _matches(name, target_modules)) and not (
        exclude_modules is not None and _matches(name, exclude_modules))


def selected_experts(model: nn.Module, target_modules: list[str] | str | None,
                     exclude_modules: list[str] | str | None) -> list[str]:
    """The experts modules of ``model`` (base-model-relative names) that the patterns choose (``selects``)."""
    names = (relative_module_name(model, n) for n, m in model.named_modules() if is_experts(m))
    return [name for name in names if selects(name, target_modules, exclude_modules)]


def experts_alone(target_modules: list[str] | str | None, exclude_modules: list[str] | str | None) -> str:
    """How to say that the patterns leave experts modules alone (no linear layer): "target_modules=[...]
    leaves", "target_modules=..., exclude_modules=... leave"."""
    given = [f"{name}={value!r}" for name, value in (("target_modules", target_modules),
                                                     ("exclude_modules", exclude_modules)) if value is not None]
    return f"{', '.join(given)} {'leaves' if len(given) == 1 else 'leave'} only mixture-of-experts modules"


def unreached_advice(unreached: list[str], names: Iterable[str]) -> str:
    """What to say of the target layers ``unreached`` (of all ``names``) that the forward pass never
    called: why that happens, and the ``exclude_modules`` that leaves out exactly them."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in unreached})
    exclude = suffixes if {n for n in names if _matches(n, suffixes)} == set(unreached) else sorted(unreached)
    why = ("a model may read a layer's weight itself (Mamba's dt_proj) or skip it on this data (LED's global "
           "attention without a global_attention_mask); leave them out")
    if len(exclude) > 4:  # no short exclusion: rather the data than a list of every layer
        return f"{why} (exclude_modules, --exclude-modules: {len(exclude)} names, such as {exclude[:2]!r})"
    return f"{why}: exclude_modules={exclude!r} (--exclude-modules {','.join(exclude)})"


def select_targets(
    model: nn.Module,
    target_modules: list[str] | str | None = None,
    exclude_modules: list[str] | str | None = None,
) -> dict[str, str]:
    """Base-model-relative name → full module name, for every module to factorize (see
    ``WSVDConfig``).

    Raises ``ValueError`` naming the pattern when an explicit pattern selects nothing or selects a
    layer that cannot be factorized.
    """
    tied = _tied_module_names(model)
    blocks = block_prefixes(model)
    # The factors (``up``/``down``) of a layer that is already factorized are never targets.
    factorized = [f"{n}." for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    selected: dict[str, str] = {}
    excluded = experts = False  # whether exclude_modules names a layer; target_modules an experts module
    for full_name, module in model.named_modules():
        if any(full_name.startswith(prefix) for prefix in factorized):
            continue
        name = relative_module_name(model, full_name)
        if is_experts(module):  # no linear layer (MLP pruning cuts its experts, ``selects``), but chosen by name
            excluded |= exclude_modules is not None and _matches(name, exclude_modules)
            experts |= target_modules is not None and selects(name, target_modules, exclude_modules)
            continue
        if target_modules is None:
            if not (is_linear_like(module) and full_name not in tied
                    and any(full_name.startswith(p) for p in blocks)):
                continue
        elif not _matches(name, target_modules):
            continue
        elif isinstance(module, FactorizedLinear):
            continue
        elif not is_linear_like(module):
            # A regex may sweep over containers and norms; a list names layers on purpose.
            if isinstance(target_modules, list):
                raise ValueError(
                    f"target_modules={target_modules!r} selects {name!r}, a {type(module).__name__}; "
                    "only nn.Linear and Conv1D layers can be factorized"
                )
            continue
        elif full_name in tied:
            raise ValueError(f"target_modules={target_modules!r} selects {name!r}, which is one with "
                             f"{relative_module_name(model, tied[full_name])!r} (a tied weight, or one module in two "
                             "places); factorizing it would untie them")
        if exclude_modules is not None and _matches(name, exclude_modules):
            excluded = True
            continue
        selected[name] = full_name
    if exclude_modules is not None and not excluded:  # a typo would otherwise compress what it meant to keep
        raise ValueError(f"exclude_modules={exclude_modules!r} matches none of the {len(selected)} target layers of "
                         f"{type(model).__name__} (e.g. {next(iter(selected), '-')!r}): names, suffixes, or one regex "
                         "over whole names")
    if target_modules is not None and not selected and experts:  # MLP pruning cuts them (or says why not)
        return selected
    if target_modules is not None and not selected and excluded:
        raise ValueError(f"exclude_modules={exclude_modules!r} excludes every layer target_modules={target_modules!r} "
                         "selects: nothing is left to compress; exclude fewer layers")
    if target_modules is not None and not selected:
        hint = " (a string is one regex over whole names: for several names pass a list)" \
            if isinstance(target_modules, str) and "," in target_modules else ""
        raise ValueError(f"target_modules={target_modules!r} matches no linear layer of {type(model).__name__}{hint}")
    return selected
