"""Scale: the recommended LLM recipe — ``fisher_whiten``, greedy ranks, sequential (compensated, MLPs
pruned, blocks refined) — on Llama shapes with random bf16 weights: wall time and peak GPU memory per GPU.

    python benchmarks/scale.py --shape 7b --json-out 7b-1gpu.json                      # one GPU
    python benchmarks/scale.py --shape 7b --block-refine-steps 0 --json-out 7b-off.json  # without block refinement
    torchrun --nproc_per_node 2 benchmarks/scale.py --shape 7b --json-out 7b-2gpu.json \\
        --compare 7b-1gpu.pt                                                           # data-parallel
    python benchmarks/scale.py --shape 70b --layers 2 --placement offload --json-out 70b.json   # one GPU, model in CPU memory
    python benchmarks/scale.py --shape 70b --layers 8 --placement dispatch --json-out 70b-d.json
    python benchmarks/scale.py --device cpu                                            # small, CI-sized
    python benchmarks/scale.py --device cpu --shape probe                              # host-memory probe
    python benchmarks/scale.py --from-json 7b-1gpu.json 7b-2gpu.json 70b.json          # publish the table

Placements: ``gpu`` (the model on each process's GPU), ``offload`` (the model in CPU memory, pinned:
one block computing on the GPU while the next one's weights arrive; ``--no-prefetch``: each block
moved when its visit starts), ``dispatch`` (blocks spread over the visible GPUs by accelerate).
``--layers`` builds a contiguous slice of the shape's layers; the table then extrapolates the
per-layer time to the full depth and says so. ``--save`` / ``--compare`` store and compare the
row-summed Fisher (and the ranks) of two runs, e.g. one GPU against two.

Every run also samples this process's resident host memory (every 2 ms on a thread): its peak, and
the peak above the level at the start of ``compress`` as a multiple of the model's size (on CPU the
working set of the sequential walk beyond the model; with ``--placement offload`` the host memory
the run needs is the peak itself). ``--shape probe`` is a float32 Llama of 404 MiB on CPU (8 blocks
of 768 × 2048) whose blocks are large enough for that multiple to be the pipeline's own. Where glibc
tells (``mallinfo2``), the bytes malloc has handed out are sampled too: the live peak, without the
freed memory that glibc keeps in its heap (tensors under its mmap threshold, up to 32 MiB, go there,
and fragmentation keeps the resident set at the heap's high-water mark).
"""

from __future__ import annotations

import argparse
import json
import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from hf_wsvd import WSVDConfig, compress
from hf_wsvd.argtypes import non_negative_int, positive_int
from hf_wsvd.statistics import FISHER_ROWS, default_accelerator

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    "probe": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=32000),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=1000),
    # OLMoE-1B-7B: 64 experts of 1024 channels a block, 8 of them a token
    "olmoe-7b": dict(model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                     vocab_size=50304),
}


def shape_config(shape: str, **fields) -> PretrainedConfig:
    """The config of ``shape`` (a Llama unless it names its model type), with ``fields`` on top."""
    fields = {**SHAPES[shape], **fields}
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)


def build(shape: str, layers: int | None, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights built directly on ``device`` (no init pass: N(0, 0.02) filled in place)."""
    config = shape_config(shape, **({"num_hidden_layers": layers} if layers else {}), max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32, device=device).mul_(0.02))
    model.model.rotary_emb.__init__(config=config)  # buffers were left empty by to_empty
    model.model.rotary_emb.to(device)
    return model.eval()


def full_depth_bytes(shape: str, dtype: torch.dtype) -> int:
    """The size of the shape's weights at full depth in ``dtype`` (counted on the meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=dtype)
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def extrapolate(result: dict, sequences: int) -> dict:
    """The full-depth run with ``sequences`` calibration sequences, from a slice or fewer sequences:
    time per layer × full depth × ``sequences`` / sequences run (linear: an upper bound, as the
    per-layer solves do not grow with the tokens); host memory: the run's peak less the slice's
    weights plus the full model's (with ``--placement offload`` the weights are in host memory; the
    working set beyond them is one block's); the two hidden-state streams of the extra tokens
    (compressed and dense, T × hidden each in bf16) are added where they wait: in host memory with
    ``offload_activations``, else on the GPU."""
    scale_tokens = sequences / result["sequences"]
    extra_tokens = (sequences - result["sequences"]) * result["length"]
    streams = 2 * extra_tokens * SHAPES[result["shape"]]["hidden_size"] * 2 / 2**30
    # runs from before offload_activations existed kept the streams on the GPU
    host_streams, gpu_streams = (streams, 0.0) if result.get("offload_activations") else (0.0, streams)
    host = result["host_peak_gib"] - (result["model_gib"] if result["placement"] == "offload" else 0)
    return {
        "sequences": sequences,
        "seconds": result["compress_seconds"] / result["layers"] * result["full_layers"] * scale_tokens,
        "host_gib": host + (result["full_model_gib"] if result["placement"] == "offload" else 0) + host_streams,
        "peak_gib_per_gpu": [g + gpu_streams for g in result["peak_gib_per_gpu"] if g is not None],
    }


def dispatch(model: torch.nn.Module) -> torch.nn.Module:
    """Blocks split evenly over the visible GPUs (embeddings on the first, norm and head on the last)."""
    from accelerate import dispatch_model

    gpus, layers = torch.cuda.device_count(), len(model.model.layers)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": gpus - 1, "lm_head": gpus - 1}
    device_map.update({f"model.layers.{i}": i * gpus // layers for i in range(layers)})
    return dispatch_model(model, device_map=device_map)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use():
    """A function giving the bytes glibc's malloc has handed out and not had back (heap and mmap),
    or None where there is no glibc ``mallinfo2``."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2

    def in_use() -> int:
        info = function()
        return info.uordblks + info.hblkhd

    return in_use


def _main_frames(thread: int) -> list[str]:
    """The hf_wsvd frames of ``thread``'s stack, innermost first."""
    frame, where = sys._current_frames().get(thread), []
    while frame is not None:
        if "hf_wsvd" in frame.f_code.co_filename:
            where.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return where


@contextlib.contextmanager
def host_memory(interval: float = 0.002):
    """Samples this process's host memory on a thread while the block runs; yields a dict that holds,
    afterwards, the resident memory at the ``start`` and its ``peak``, and, where glibc tells, the
    bytes malloc had handed out (``live``: what the process holds, without what the allocator keeps
    of freed memory) at the start and at their peak (``live_start``, ``live_peak``); ``where`` and
    ``live_where``: the hf_wsvd frames running at each peak; on CUDA, the highest sampled bytes
    allocated on the current GPU (``gpu_peak``) and the frames running then (``gpu_where``: the
    step that holds the GPU peak, which ``max_memory_allocated`` does not name)."""
    process, main = psutil.Process(), threading.get_ident()
    in_use = _malloc_in_use()
    cuda = torch.cuda.is_available()
    found = {"start": process.memory_info().rss, "peak": 0, "where": [],
             "live_start": in_use() if in_use else None, "live_peak": 0, "live_where": [],
             "gpu_peak": 0, "gpu_where": []}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = process.memory_info().rss
            if rss > found["peak"]:
                found["peak"], found["where"] = rss, _main_frames(main)
            live = in_use() if in_use else 0
            if live > found["live_peak"]:
                found["live_peak"], found["live_where"] = live, _main_frames(main)
            allocated = torch.cuda.memory_allocated() if cuda else 0
            if allocated > found["gpu_peak"]:
                found["gpu_peak"], found["gpu_where"] = allocated, _main_frames(main)
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        done.set()
        thread.join()


def measure(args) -> dict:
    accelerator = default_accelerator()
    cuda = args.device == "cuda"
    device = accelerator.device if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    start = time.perf_counter()
    model = build(args.shape, args.layers, device if args.placement != "offload" else torch.device("cuda"), dtype)
    if args.placement == "offload":
        model.to("cpu")
    elif args.placement == "dispatch":
        model = dispatch(model.to("cpu"))
    build_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.sequences, args.length), generator=generator)
    data = DataLoader([{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids],
                      batch_size=args.batch_size)
    config = WSVDConfig(method="fisher_whiten", allocation="greedy", sequential=True,
                        param_ratio=1 - args.reduction, max_length=args.length, batch_size=args.batch_size,
                        block_refine_steps=args.block_refine_steps, offload_activations=args.offload_activations)
    if cuda:
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
        torch.cuda.synchronize()
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    with host_memory() as host:
        start = time.perf_counter()
        model, report = compress(model, config, data, accelerator=accelerator,
                                 show_progress=accelerator.is_main_process)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peaks = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())] if cuda else []
    fisher = {n: report.statistics.get(n, FISHER_ROWS).float().cpu() for n in report.ranks}
    result = {
        "shape": args.shape, "layers": args.layers or SHAPES[args.shape]["num_hidden_layers"],
        "full_layers": SHAPES[args.shape]["num_hidden_layers"], "placement": args.placement,
        "processes": accelerator.num_processes, "sequences": args.sequences, "length": args.length,
        "batch_size": args.batch_size, "reduction": args.reduction, "compress_seconds": seconds,
        "prefetch": args.placement == "offload" and not args.no_prefetch,
        "offload_activations": model.config.wsvd["offload_activations"],
        "stage_seconds": report.seconds, "build_seconds": build_seconds, "peak_gib_per_gpu": peaks,
        "factorized_layers": len(report.ranks), "params_before": report.params_before,
        "params_after": report.params_after, "block_refine_steps": model.config.wsvd["block_refine_steps"],
        "refined": report.refined, "model_gib": model_bytes / 2**30,
        "full_model_gib": full_depth_bytes(args.shape, dtype) / 2**30,
        "host_start_gib": host["start"] / 2**30, "host_peak_gib": host["peak"] / 2**30,
        "host_peak_over_model": (host["peak"] - host["start"]) / model_bytes, "host_peak_in": host["where"][::-1],
        "host_live_peak_over_model": (host["live_peak"] - host["live_start"]) / model_bytes
        if host["live_start"] is not None else None, "host_live_peak_in": host["live_where"][::-1],
        "gpu_sampled_peak_gib": host["gpu_peak"] / 2**30, "gpu_peak_in": host["gpu_where"][::-1],
    }
    if accelerator.num_processes > 1:  # every process's own peak, time and stages (waits show where work is uneven)
        gathered = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, {"peak": peaks[accelerator.local_process_index] if cuda else None,
                                                       "seconds": seconds, "stage_seconds": report.seconds})
        result["per_process"] = gathered
        result["peak_gib_per_gpu"] = [g["peak"] for g in gathered]
        result["compress_seconds"] = max(g["seconds"] for g in gathered)
    if args.compare:
        reference = torch.load(args.compare)
        difference = max(float((fisher[n] - reference["fisher"][n]).abs().max() / reference["fisher"][n].abs().max())
                         for n in reference["fisher"])
        result["compared_with"] = args.compare
        result["fisher_rows_max_relative_difference"] = difference
        result["ranks_equal"] = reference["ranks"] == report.ranks
    if cuda and (result["layers"] < result["full_layers"] or args.sequences < args.extrapolate_sequences):
        result["extrapolated"] = extrapolate(result, args.extrapolate_sequences)
    if args.save and accelerator.is_main_process:
        torch.save({"fisher": fisher, "ranks": report.ranks}, args.save)
    return result


def table(payloads: list[dict]) -> str:
    from report import markdown_table

    rows = []
    for p in payloads:
        sliced = p["layers"] < p["full_layers"]
        rows.append([
            f"Llama {p['shape']} shape" + (f", {p['layers']} of {p['full_layers']} layers" if sliced else ""),
            p["placement"] + (", hidden states in CPU memory" if p.get("offload_activations") else ""),
            p["processes"], f"{p['sequences']}×{p['length']}, batch {p['batch_size']}", f"{p['reduction']:.0%}",
            p.get("block_refine_steps", 0), round(p["compress_seconds"], 1),
            ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in p.get("stage_seconds", {}).items()) or "-",
            _extrapolated(p) if sliced or "extrapolated" in p else "-",
            " / ".join(f"{g:.1f}" for g in p["peak_gib_per_gpu"] if g is not None) or "-",
            f"{p['host_peak_gib']:.1f} ({p['host_peak_over_model']:.2f}× the model above the start)"
            if "host_peak_gib" in p else "-",
            p.get("fisher_rows_max_relative_difference", "-"),
            p["environment"].get("cuda") or "cpu",
        ])
    return markdown_table(["model", "placement", "processes", "calibration", "reduction", "refinement steps",
                           "wall time (s)", "stages (s; process 0)",
                           "full depth (s)", "peak GiB per GPU", "host peak GiB", "Fisher rows vs 1 GPU (max rel.)",
                           "device"], rows)


def _extrapolated(p: dict) -> str:
    """A slice's full-depth time: per layer × depth, and (``extrapolate``) with the sequences and the
    host memory and GPU peak of the full run, computed again from the measurement (so that a
    corrected rule reaches the rows already published)."""
    text = f"{p['compress_seconds'] / p['layers'] * p['full_layers']:.0f} (extrapolated)"
    if "extrapolated" in p:
        e = extrapolate(p, p["extrapolated"]["sequences"])
        gpu = " / ".join(f"{g:.1f}" for g in e["peak_gib_per_gpu"]) or "-"
        text += f"; {e['sequences']} sequences: {e['seconds']:.0f} s, host {e['host_gib']:.0f} GiB, GPU {gpu} GiB"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", type=positive_int, help="a contiguous slice of this many layers (default: all)")
    parser.add_argument("--placement", choices=["gpu", "offload", "dispatch"], default="gpu")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--sequences", type=positive_int, default=128)
    parser.add_argument("--length", type=positive_int, default=2048)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--reduction", type=float, default=0.2)
    parser.add_argument("--block-refine-steps", type=non_negative_int,
                        help="block refinement steps per block (0: off; default: the recommended recipe's)")
    parser.add_argument("--extrapolate-sequences", type=positive_int, default=128,
                        help="extrapolate a slice, or a run with fewer sequences, to full depth and this many")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="offload: move each block when its visit starts (hf_wsvd.blocks.PREFETCH off), to compare")
    parser.add_argument("--offload-activations", action=argparse.BooleanOptionalAction,
                        help="keep the walk's hidden states in CPU memory or on the GPU (WSVDConfig.offload_activations; "
                             "default: the recommended recipe's, in CPU memory on a GPU)")
    parser.add_argument("--save", help="store the row-summed Fisher and ranks here (.pt)")
    parser.add_argument("--compare", help="compare the row-summed Fisher and ranks with a --save file")
    parser.add_argument("--json-out")
    parser.add_argument("--from-json", nargs="+")
    args = parser.parse_args()

    from report import environment, publish, republished
    from timing import measured_runs, read_fields, require_cuda

    require_cuda(args)  # before the model is built

    if args.from_json:  # measurement files, or the published results file (its "runs")
        payloads = measured_runs(args, measure)
        publish("scale", {"environment": republished("scale"), "runs": payloads}, read_fields(table, payloads, "scale"))
        return
    if args.device == "cpu":
        args.shape, args.placement = "small" if args.shape == "7b" else args.shape, "gpu"
        args.sequences, args.length = min(args.sequences, 8), min(args.length, 64)
    if args.no_prefetch:
        import hf_wsvd.blocks

        hf_wsvd.blocks.PREFETCH = False
    payload = measure(args)
    payload["environment"] = environment()  # with the command; "processes" says how many torchrun started
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(payload, indent=2)
        print(text)
        if args.json_out:
            Path(args.json_out).write_text(text)


if __name__ == "__main__":
    main()
