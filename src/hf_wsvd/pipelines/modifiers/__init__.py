"""Modifiers: the algorithms a recipe turns on beside its method's factorization (MLP pruning,
attention pruning, compensation, block refinement, the input embeddings), each a plug-in with a
small life cycle that the pipelines call without knowing it (llm-compressor's modifiers).

A modifier is a ``Modifier`` subclass registered by name with ``register_modifier``;
``enabled(recipe)`` reads the recipe field that turns it on (``field``). A pipeline asks every enabled
modifier, in ``MODIFIERS`` order, at each point of its walk:

- ``problem(job, layer, stats)``: each layer's factorization problem, as the modifier sets it;
- ``groups(job)``: the layer groups it compresses by keeping channels (``ChannelGroup``); the
  allocation prices them with the layers' ranks (``budget``, ``spectrum``) and hands the
  kept ones back with their channels (``on_allocated``);
- ``on_walk_start(job, inputs)``, ``on_block_start(job, block)``, ``stages(job, block)``,
  ``collect(job, block, names)``, ``on_block_end(job, block)``, ``on_walk_end(job)``: the
  sequential walk over the transformer blocks (``Block``);
- ``observed(names)`` and ``compress(job, names, stats, block)``: each group of layers the
  pipeline factorizes (a block's stage, a block, or the whole model) — the layers whose statistics
  it reads there, then its own compression of them;
- ``on_end(job)``: after the pipeline, outside the blocks (its layers' ranks).

Every hook does nothing by default. Importing this module imports no torch (the recipe and the
command line read the registry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Callable, Protocol, Sequence

from ...registry import Registry

if TYPE_CHECKING:
    import torch

    from ...allocation import Budgeted
    from ...solvers import LayerProblem
    from ...statistics import Statistics
    from ..step import Job


class ChannelGroup(Protocol):
    """Layers compressed together by keeping some of their channels (``methods.mlp_pruning.MlpPair``,
    ``methods.attention_pruning.AttentionGroup``)."""

    @property
    def members(self) -> tuple[str, ...]: ...  # the layers it cuts

    @property
    def channels(self) -> int: ...  # the units the allocation counts

    @property
    def key(self) -> str: ...  # its name in the allocation, the spectra and the kept channels

    @property
    def anchor(self) -> str: ...  # the layer whose block and stage price and cut it, and whose cost places it on a process

    @property
    def observed(self) -> tuple[str, ...]: ...  # the layers whose statistics price and cut it


@dataclass
class Block:
    """One transformer block as the sequential walk hands it to the modifiers."""

    index: int
    module: "torch.nn.Module"
    device: "torch.device"
    paths: dict[str, str]  # the block's layers with work to do: name → module path inside ``module``
    inputs: list | None  # the compressed model's (hidden, kwargs, mask) entering it; None: no activations taken
    reference: "torch.nn.Module | None" = None  # a dense copy of the block (compensation)
    targets: list | None = None  # the dense block's outputs on the dense model's inputs (compensation, at the end)


class Modifier:
    """One algorithm of the recipe beside the factorization: a plug-in whose hooks the pipelines
    call (see the module); one instance per compression."""

    name: ClassVar[str]
    field: ClassVar[str]  # the recipe field that turns it on (what ``enabled`` reads by default)
    needs_activations: ClassVar[bool] = False  # the sequential walk captures the blocks' inputs for it
    walk_label: ClassVar[str | None] = None  # shown on the walk's progress bar: "blocks (label)"

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """Whether the recipe ``config`` turns this modifier on: its ``field`` is set."""
        return bool(getattr(config, cls.field))

    def on_start(self, job: "Job") -> None:
        """Before any pass over the data: raise for what the recipe and the model's shapes rule out."""

    def groups(self, job: "Job") -> list[ChannelGroup]:
        """The groups of ``job.targets`` it compresses by keeping channels."""
        return []

    def budget(self, job: "Job", group: ChannelGroup) -> "Budgeted":
        """``group`` as the greedy allocation sees it: the parameters of one channel, of all."""
        raise NotImplementedError

    def spectrum(self, job: "Job", group: ChannelGroup, stats: "Statistics") -> "tuple[torch.Tensor, float | None]":
        """``group``'s channel spectrum (float64, non-increasing, priced like singular values) and,
        for a method with a loss scale, its absolute loss."""
        raise NotImplementedError

    def on_allocated(self, job: "Job", kept: list[ChannelGroup], channels: dict[str, int]) -> None:
        """The groups the allocation cuts (fewer channels than they have) and every group's channels."""

    def problem(self, job: "Job", layer: "LayerProblem", stats: "Statistics") -> "LayerProblem":
        """The factorization problem of ``layer`` as this modifier sets it (e.g. a compensated
        target); every problem the step builds passes through each modifier in turn."""
        return layer

    def on_walk_start(self, job: "Job", inputs: list | None) -> None:
        """The sequential walk starts; ``inputs``: the first block's captured inputs."""

    def on_block_start(self, job: "Job", block: Block) -> None:
        """The walk reaches ``block``, before any of its layers is compressed."""

    def stages(self, job: "Job", block: Block) -> list[list[str]] | None:
        """The block's layers in the groups compressed one after another (None: not this modifier's
        to say; the first answer counts, else the whole block is one group)."""
        return None

    def collect(self, job: "Job", block: Block, names: list[str]) -> "Statistics | None":
        """The statistics of ``names`` in ``block`` (None: not this modifier's to take; the first
        answer counts, else the block's input statistics on its inputs)."""
        return None

    def observed(self, names: Sequence[str]) -> list[str]:
        """The layers whose statistics ``compress`` reads when the pipeline compresses ``names``."""
        return []

    def compress(self, job: "Job", names: Sequence[str], stats: "Statistics", block: Block | None) -> None:
        """Compress what is this modifier's among ``names`` (after their factorization), on ``stats``;
        ``block``: where they are (None in the whole-model pipeline)."""

    def on_block_end(self, job: "Job", block: Block) -> None:
        """``block``'s layers are all compressed; the walk advances its inputs through it next."""

    def on_walk_end(self, job: "Job") -> None:
        """The sequential walk is over: drop what it kept of the hidden states."""

    def on_end(self, job: "Job") -> dict[str, int]:
        """The pipeline is done: compress what lies outside it; return those layers' ranks."""
        return {}


class ChannelModifier(Modifier):
    """A modifier that cuts channel groups: it keeps the groups the allocation cuts and their
    channels (``kept``, ``channels``) for its ``compress``."""

    def __init__(self) -> None:
        self.kept: list[ChannelGroup] = []
        self.channels: dict[str, int] = {}

    def on_allocated(self, job: "Job", kept: list[ChannelGroup], channels: dict[str, int]) -> None:
        self.kept, self.channels = kept, channels

    def none_found(self, job: "Job") -> str:
        """What it finds among the targets when it finds no group, for the notice that they are
        factorized instead."""
        return "no layers of a layout it knows"


# The built-in modifiers, in the order they are called: name → the module of this package that
# registers it. MLP then attention pruning (their cuts follow the factorization of a group),
# compensation before refinement (refinement trains toward the dense outputs compensation keeps).
BUILTIN_MODIFIERS = {"mlp_pruning": "mlp_pruning", "attention_pruning": "attention_pruning",
                     "compensation": "compensation", "block_refinement": "refinement", "embeddings": "embeddings"}
MODIFIERS: Registry[type[Modifier]] = Registry("modifier", __package__, BUILTIN_MODIFIERS)


def register_modifier(cls: type[Modifier]) -> type[Modifier]:
    """Class decorator registering a ``Modifier`` subclass under its ``name``."""
    MODIFIERS[cls.name] = cls
    return cls


def enabled_modifiers(config: Any) -> list[Modifier]:
    """A fresh instance of each registered modifier ``config`` turns on, in ``MODIFIERS`` order."""
    return [MODIFIERS[name]() for name in MODIFIERS if MODIFIERS[name].enabled(config)]


def first(modifiers: Sequence[Modifier], hook: Callable[[Modifier], Any]) -> Any:
    """The first answer other than None of ``hook`` over ``modifiers`` (None if none answers)."""
    for modifier in modifiers:
        answer = hook(modifier)
        if answer is not None:
            return answer
    return None
