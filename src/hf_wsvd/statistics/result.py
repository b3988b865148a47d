"""``Statistics``: what the collectors produced, per layer, with the counts they average over."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .names import FISHER, FISHER_COLS, FISHER_ROWS

# What to do where a float16 model's statistics or loss came out NaN or inf (its range ends at 65504).
FLOAT16_OVERFLOW = " (float16 activations overflow past 65504: load the model in bfloat16 or float32)"

# Statistics that a per-entry Fisher holds too: the dimension it is summed over.
SUMS_OF_ENTRIES = {FISHER_ROWS: 1, FISHER_COLS: 0}


@dataclass
class Statistics:
    """``values[module][statistic]``: the mean of each collected statistic (base-model-relative
    module names); ``examples``: how many examples they were taken on (all processes; ``generated``
    of them written by the model itself, as ``compress`` records); ``tokens[module]``: how many tokens
    its input statistics average over."""

    values: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    examples: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    # A fixed sample of each module's dense weight where they were taken (``compress`` records it), so
    # that statistics reused on another model of the same shapes are refused.
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    generated: int = 0

    def get(self, module: str, statistic: str) -> torch.Tensor | None:
        """The statistic, or None; Fisher row/column sums are derived from a per-entry Fisher."""
        stats = self.values.get(module, {})
        if statistic not in stats and statistic in SUMS_OF_ENTRIES and FISHER in stats:
            return stats[FISHER].sum(dim=SUMS_OF_ENTRIES[statistic])
        return stats.get(statistic)

    def pop(self, module: str, statistic: str) -> torch.Tensor | None:
        """The statistic (as ``get``), removed from here: its last user lets it go early."""
        value = self.get(module, statistic)
        self.values.get(module, {}).pop(statistic, None)
        return value

    def has(self, modules, statistics) -> bool:
        """Whether every one of ``statistics`` is here for every one of ``modules``."""
        return all(self.get(m, s) is not None for m in modules for s in statistics)

    def merged(self, other: "Statistics") -> "Statistics":
        """These statistics with ``other``'s added (``other`` wins where both have one)."""
        values = {m: dict(v) for m, v in self.values.items()}
        for module, stats in other.values.items():
            values.setdefault(module, {}).update(stats)
        source = other if other.examples else self  # the examples, and those written among them, of one run
        return Statistics(values, source.examples, {**self.tokens, **other.tokens}, {**self.weights, **other.weights},
                          source.generated)
