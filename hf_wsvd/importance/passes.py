"""What every statistics pass shares: the accelerate set-up, sharded batches, and the reduction of
per-module sums and counts across processes."""

from __future__ import annotations

from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


def default_accelerator() -> Accelerator:
    """An ``Accelerator`` that never pads the last batch with repeated examples."""
    return Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))


def batches(
    model: nn.Module, dataloader: DataLoader, accelerator: Accelerator, desc: str, show_progress: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """This process's share of ``dataloader``, on the accelerator's device (the model too, unless
    accelerate already dispatched it)."""
    if accelerator.num_processes > 1 and accelerator.even_batches:
        raise ValueError(
            "the Accelerator has even_batches=True, which repeats examples to even out the last "
            "batch and would count them twice; build it with "
            "DataLoaderConfiguration(even_batches=False) (see hf_wsvd.importance.default_accelerator)"
        )
    if getattr(model, "hf_device_map", None) is None:
        model.to(accelerator.device)
    loader = accelerator.prepare_data_loader(dataloader) if accelerator.num_processes > 1 else dataloader
    for batch in tqdm(loader, desc=desc, disable=not (show_progress and accelerator.is_local_main_process)):
        yield {k: v.to(accelerator.device) for k, v in batch.items()}


def reduce_sums(
    accelerator: Accelerator, sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Add per-module sums and counts over processes (a no-op in one process)."""
    if accelerator.num_processes == 1:
        return sums, counts
    sums = {k: v.to(accelerator.device) for k, v in sums.items()}
    counts = {k: v.to(accelerator.device) for k, v in counts.items()}
    reduced = accelerator.reduce({"sums": sums, "counts": counts}, reduction="sum")
    return reduced["sums"], reduced["counts"]
