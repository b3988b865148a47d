"""What every statistics pass shares: the accelerate set-up, this process's share of the batches,
and the one in-place reduction of the accumulated sums across processes."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


def default_accelerator() -> Accelerator:
    """An ``Accelerator`` that never pads the last batch with repeated examples."""
    return Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))


def shard(data: Iterable[dict], accelerator: Accelerator) -> Iterable[dict]:
    """This process's share of the batches (all of them in one process)."""
    if accelerator.num_processes == 1:
        return data
    if accelerator.even_batches:
        raise ValueError(
            "the Accelerator has even_batches=True, which repeats examples to even out the last "
            "batch and would count them twice; build it with "
            "DataLoaderConfiguration(even_batches=False) (see hf_wsvd.statistics.default_accelerator)"
        )
    if not isinstance(data, DataLoader):
        raise ValueError(f"several processes split a torch DataLoader among them; got a {type(data).__name__}")
    return accelerator.prepare_data_loader(data)


def batches(data: Iterable[dict], accelerator: Accelerator, device: torch.device, desc: str,
            show_progress: bool) -> Iterator[dict[str, torch.Tensor]]:
    """This process's share of ``data`` with its tensors on ``device``, under a progress bar."""
    bar = tqdm(shard(data, accelerator), desc=desc, disable=not (show_progress and accelerator.is_local_main_process))
    for batch in bar:
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextlib.contextmanager
def exact_16bit_products(tensor: torch.Tensor) -> Iterator[torch.dtype]:
    """The dtype in which to multiply ``tensor`` (and tensors like it): float32 with TF32 tensor
    cores for CUDA bf16/fp16 activations — their 8- and 11-bit significands fit TF32's exactly, so
    the products are exact and the sums float32, at tensor-core speed (7× float64 on an H100) —
    float64 on the CPU path and for float64 activations anywhere, else float32."""
    if tensor.device.type != "cuda" or tensor.dtype not in (torch.bfloat16, torch.float16):
        yield torch.float64 if tensor.device.type == "cpu" or tensor.dtype == torch.float64 else torch.float32
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield torch.float32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def sum_across_processes(accelerator: Accelerator, tensors: Iterable[torch.Tensor]) -> None:
    """Add ``tensors`` (in place) over all processes; a tensor listed twice is reduced once."""
    if accelerator.num_processes == 1:
        return
    unique = {id(t): t for t in tensors}
    for tensor in unique.values():
        torch.distributed.all_reduce(tensor)
