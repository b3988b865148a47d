"""What every statistics pass shares: the accelerate set-up, this process's share of the batches,
and the one in-place reduction of the accumulated sums across processes."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterable, Iterator

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm


def default_accelerator() -> Accelerator:
    """An ``Accelerator`` that never pads the last batch with repeated examples."""
    return Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))


def splits_batches(data: Iterable[dict], accelerator: Accelerator) -> bool:
    """Whether each process takes a slice of every batch (several processes, a ``DataLoader`` whose
    batch size is a multiple of their count) rather than whole batches in turn."""
    return (accelerator.num_processes > 1 and isinstance(data, DataLoader) and data.batch_size is not None
            and data.batch_size % accelerator.num_processes == 0)


def check_shardable(data: Iterable[dict], accelerator: Accelerator) -> None:
    """Raise unless ``data`` can be split between the processes (any data in one process)."""
    if accelerator.num_processes == 1:
        return
    if not isinstance(data, DataLoader):
        raise ValueError(f"several processes split a torch DataLoader among them; got a {type(data).__name__}")
    if getattr(data, "_is_accelerate_prepared", False):
        raise ValueError("the DataLoader is already prepared by accelerate (split between the processes); "
                         "pass the plain DataLoader: hf_wsvd gives each process its share")
    if isinstance(data.dataset, IterableDataset):
        raise ValueError("several processes need a DataLoader over a map-style dataset: accelerate evens out an "
                         f"iterable one ({type(data.dataset).__name__}) by repeating examples, which would count twice")


def shard(data: Iterable[dict], accelerator: Accelerator) -> Iterable[dict]:
    """This process's share of the batches (all of them in one process): a slice of every batch
    where ``splits_batches`` (each slice collated on its own), else every P-th batch."""
    if accelerator.num_processes == 1:
        return data
    check_shardable(data, accelerator)
    # Slices of every batch where they can be even: then a step that reads one batch (block
    # refinement) keeps every process busy; the statistics are sums, the same in either layout. Never
    # the accelerator's even_batches: evening out the last batch repeats examples, counted twice.
    return prepare_data_loader(data, accelerator.device, num_processes=accelerator.num_processes,
                               process_index=accelerator.process_index, split_batches=splits_batches(data, accelerator),
                               put_on_device=False, rng_types=accelerator.rng_types.copy(), dispatch_batches=False,
                               even_batches=False, use_seedable_sampler=accelerator.use_seedable_sampler,
                               data_seed=accelerator.dataloader_config.data_seed)


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


class OtherProcessFailed(RuntimeError):
    """A step of a run in several processes failed in another process, which says why."""


def check_processes_agree(accelerator: Accelerator, parts: dict[str, bytes]) -> None:
    """Raise, in every process, unless each of ``parts`` (what → its bytes) is the same in all
    processes: ones that differ (another recipe, model or data) would go on to collectives that no
    longer match and wait until the timeout."""
    if accelerator.num_processes == 1:
        return
    digests = torch.tensor([int.from_bytes(hashlib.sha256(value).digest()[:7], "big") for value in parts.values()],
                           dtype=torch.int64, device=accelerator.device)
    gathered = [torch.empty_like(digests) for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather(gathered, digests)
    for index, what in enumerate(parts):
        other = next((process for process, theirs in enumerate(gathered) if theirs[index] != gathered[0][index]), None)
        if other is not None:
            raise ValueError(f"the processes of this run differ in their {what} (process {other} against process 0): "
                             "each must compress the same model with the same recipe and calibration data")


@contextlib.contextmanager
def failing_together(accelerator: Accelerator, desc: str) -> Iterator[None]:
    """Run this process's share of a pass so that an error in any process ends the pass in all of
    them: before the sums are reduced every process says whether it failed (one that raised alone
    would leave the others waiting in the reduction until the timeout)."""
    if accelerator.num_processes == 1:
        yield
        return
    failed = torch.zeros((), device=accelerator.device)
    try:
        yield
    except Exception:
        failed += 1
        with contextlib.suppress(Exception):  # this process's own error is the one to see
            torch.distributed.all_reduce(failed)
        raise
    torch.distributed.all_reduce(failed)
    if failed.item():
        raise OtherProcessFailed(f"the {desc} pass failed in {int(failed.item())} other process(es); their error says "
                                 "why")


def sum_across_processes(accelerator: Accelerator, tensors: Iterable[torch.Tensor]) -> None:
    """Add ``tensors`` (in place) over all processes; a tensor listed twice is reduced once."""
    if accelerator.num_processes == 1:
        return
    unique = {id(t): t for t in tensors}
    for tensor in unique.values():
        torch.distributed.all_reduce(tensor)
