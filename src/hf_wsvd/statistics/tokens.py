"""``token_counts``: how often each token id occurs in the data, the statistic of an input
embedding (its rows are weighted by it: ``WSVDConfig.embedding_weighting="frequency"``). Each
process counts its share of the batches; the counts are summed across processes."""

from __future__ import annotations

from typing import Iterable

import torch
from accelerate import Accelerator

from .passes import batches, failing_together, sum_across_processes


def token_counts(data: Iterable[dict], vocab_size: int, accelerator: Accelerator, show_progress: bool = False) -> torch.Tensor:
    """How often each of ``vocab_size`` token ids occurs in ``data``'s ``input_ids``, padding
    excluded by the ``attention_mask`` where there is one (float64, on the CPU)."""
    device = accelerator.device
    counts = torch.zeros(vocab_size, dtype=torch.float64, device=device)
    with failing_together(accelerator, "token counts"):
        for batch in batches(data, accelerator, device, "token counts", show_progress):
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            ids = ids[mask.bool()] if mask is not None else ids.reshape(-1)
            if ids.numel():
                low, high = int(ids.min()), int(ids.max())  # one device sync each
                if low < 0 or high >= vocab_size:
                    raise ValueError(f"token id {high if high >= vocab_size else low} of the data is outside the "
                                     f"embeddings' vocabulary of {vocab_size}: check the tokenizer")
            counts += torch.bincount(ids, minlength=vocab_size).double()
    sum_across_processes(accelerator, [counts])
    return counts.cpu()
