"""``token_counts``: how often each token id occurs in the data, the statistic of an input
embedding (its rows are weighted by it: ``WSVDConfig.embedding_weighting="frequency"``). Each
process counts its share of the batches; the counts are summed across processes. A sequence-to-sequence
model whose decoder reads the same embeddings counts its decoder's tokens too."""

from __future__ import annotations

from typing import Iterable

import torch
from accelerate import Accelerator
from torch import nn

from .inputs import decoder_tokens
from .passes import batches, failing_together, sum_across_processes


def token_counts(data: Iterable[dict], vocab_size: int, accelerator: Accelerator, show_progress: bool = False,
                 model: nn.Module | None = None) -> torch.Tensor:
    """How often each of ``vocab_size`` token ids occurs in ``data``'s ``input_ids``, padding
    excluded by the ``attention_mask`` where there is one, and, where ``model`` is an encoder-decoder
    whose decoder reads the same embeddings, in what its decoder reads (float64, on the CPU)."""
    device = accelerator.device
    counts = torch.zeros(vocab_size, dtype=torch.float64, device=device)
    shared = model is not None and _decoder_shares_embeddings(model)
    with failing_together(accelerator, "token counts"):
        for batch in batches(data, accelerator, device, "token counts", show_progress):
            read = [(batch["input_ids"], batch.get("attention_mask"))]
            if shared and (decoder := decoder_tokens(model, batch)) is not None:
                read.append(decoder)
            for ids, mask in read:
                ids = ids[mask.bool()] if mask is not None else ids.reshape(-1)
                if ids.numel():
                    low, high = int(ids.min()), int(ids.max())  # one device sync each
                    if low < 0 or high >= vocab_size:
                        raise ValueError(f"token id {high if high >= vocab_size else low} of the data is outside the "
                                         f"embeddings' vocabulary of {vocab_size}: check the tokenizer")
                counts += torch.bincount(ids, minlength=vocab_size).double()
    sum_across_processes(accelerator, [counts])
    return counts.cpu()


def _decoder_shares_embeddings(model: nn.Module) -> bool:
    if not getattr(model.config, "is_encoder_decoder", False):
        return False
    try:
        embeddings = model.get_decoder().get_input_embeddings()
        return embeddings is not None and embeddings.weight is model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):  # a custom model without them: its encoder's tokens alone
        return False
