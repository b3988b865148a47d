"""Running sums of per-batch input statistics, held once for the layers that read the same tensor.

Layers fed the very same input (a block's q/k/v projections, an MLP's gate/up) have equal sums: an
in × in Gram each (and, compensated, a cross moment), 3 equal copies for q/k/v — 0.8 GiB of float64
per Llama-7B block, 3 GiB per 70B block. Here they share one.

A layer's first contribution joins it to the layers that got the same contribution object in that
batch. A shared contribution is added once every layer sharing the sums has got it; a layer that
did not get it (its inputs diverged: it ran on another tensor, or once more) splits off with a
copy of the sums before that contribution. So every layer's sums equal what summing its own
contributions gives, bit for bit (sums are only ever added to, in the same order).
"""

from __future__ import annotations

import torch

from .passes import sum_across_processes
from .result import Statistics

Sums = dict[str, torch.Tensor]
TOKENS = "tokens"  # the entry of a contribution that counts its real tokens


class _Group:
    """Layers sharing one ``totals``; ``pending``: the contribution being handed round, ``claimed``:
    the layers that got it; ``open``: still in its first batch (new layers may join)."""

    def __init__(self, members: set[str], totals: Sums | None, pending: Sums | None) -> None:
        self.members, self.totals, self.pending = members, totals, pending
        self.claimed: set[str] = set(members) if pending is not None else set()
        self.open = pending is not None and totals is None


class SharedSums:
    """Per-layer running sums of contributions (dicts of tensors: one batch's Gram, cross moment,
    token count, ...), one copy for layers with the same contributions (see the module)."""

    def __init__(self) -> None:
        self._group: dict[str, _Group] = {}

    def add(self, name: str, contribution: Sums) -> None:
        """Add ``contribution`` to layer ``name``'s sums. It is held until every layer sharing the
        sums got it, and a first one may become the sums at ``finish`` (then added to in place)."""
        group = self._group.get(name)
        if group is None:
            group = next((g for g in self._groups() if g.open and g.pending is contribution), None)
            if group is None:
                self._group[name] = _Group({name}, None, contribution)
            else:
                group.members.add(name)
                group.claimed.add(name)
                self._group[name] = group
            return
        if group.pending is contribution and name not in group.claimed:
            group.claimed.add(name)
        else:
            self._settle(group)
            group = self._group[name]
            group.open, group.pending, group.claimed = False, contribution, {name}
        if not group.open and group.claimed == group.members:
            self._settle(group)

    def _groups(self) -> list[_Group]:
        return list({id(g): g for g in self._group.values()}.values())

    def _settle(self, group: _Group, own: bool = False) -> None:
        """Add the pending contribution to the layers that got it; the others split off. ``own``: the
        contribution is no longer handed out, so a first one becomes the sums without a copy."""
        if group.pending is None:
            return
        left = group.members - group.claimed
        if left:
            totals = {k: v.clone() for k, v in group.totals.items()} if group.totals is not None else None
            other = _Group(left, totals, None)
            for name in left:
                self._group[name] = other
            group.members = set(group.claimed)
        if group.totals is None:
            group.totals = dict(group.pending) if own else {k: v.clone() for k, v in group.pending.items()}
        else:
            for key, value in group.pending.items():
                group.totals[key] += value
        group.pending, group.claimed = None, set()

    def finish(self) -> None:
        """Settle every pending contribution: call it between batches (when the caller hands out
        no contribution of the last batch any more) and before reading the sums."""
        for group in self._groups():
            self._settle(group, own=True)
            group.open = False

    def totals(self, name: str) -> Sums | None:
        """Layer ``name``'s sums (shared with the layers that have the same; None if it saw nothing)."""
        self.finish()
        group = self._group.get(name)
        return group.totals if group is not None else None

    def reduce(self, accelerator, names: list[str], zeros) -> None:
        """Sum every layer's sums across processes. Processes may have grouped the layers differently
        (one that saw no batch has no groups), so each layer gets its own copy first, and a layer
        that saw nothing gets ``zeros(name)``."""
        if accelerator.num_processes == 1:
            return
        self.finish()
        for name in names:
            group = self._group.get(name)
            totals = zeros(name) if group is None or group.totals is None else \
                {k: v.clone() for k, v in group.totals.items()} if len(group.members) > 1 else group.totals
            self._group[name] = _Group({name}, totals, None)
        sum_across_processes(accelerator, [t for name in names for t in self._group[name].totals.values()])

    def statistics(self, names: list[str]) -> Statistics:
        """Each layer's means: its sums divided by its ``TOKENS`` entry, in place (the sums are spent),
        once per shared copy; layers that saw no token get no entry."""
        self.finish()
        done: dict[int, Sums] = {}
        values, tokens = {}, {}
        for name in names:
            group = self._group.get(name)
            if group is None or group.totals is None or float(group.totals[TOKENS]) <= 0:
                continue
            tokens[name] = int(float(group.totals[TOKENS]))
            if id(group) not in done:
                count = group.totals[TOKENS]
                done[id(group)] = {k: v.div_(count) for k, v in group.totals.items() if k != TOKENS}
            values[name] = done[id(group)]
        return Statistics(values, 0, tokens)
