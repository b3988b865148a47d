"""Dense ``nn.Linear`` vs ``FactorizedLinear`` forward time, per layer shape, token count and kept
ratio, on one device: the kept ratio above which a factorized layer is no faster than dense.

A factorized layer does r·(in+out) multiply-adds per token instead of in·out, the kept parameter
ratio, but in two smaller matrix products; below some size they stop paying. The crossing (speedup
1, interpolated between grid ratios) is measured per workload; the smallest crossing over the
workloads is the ``threshold`` to set as ``WSVDConfig.max_kept_ratio_for_speed`` on that device.

    python benchmarks/layer_speed.py --device cpu --json-out layer_speed_cpu.json
    python benchmarks/layer_speed.py --device cuda --json-out layer_speed_gpu.json   # GPU machine
    python benchmarks/layer_speed.py --from-json layer_speed_cpu.json layer_speed_gpu.json
"""

from __future__ import annotations

import argparse

import torch

from hf_wsvd import FactorizedLinear
from hf_wsvd.allocation import kept_ratio, uniform_ranks
from hf_wsvd.argtypes import non_negative_int, positive_int
from timing import (LLAMA_7B_LINEARS, MINILM_LINEARS, add_shape_arguments, cuda_graphed, device_label,
                    interleaved_seconds, kept_fraction, measure_or_publish, median, parse_shapes, require_cuda, run_header,
                    speedup)

# Shapes are in_features x out_features. CPU: MiniLM-L6 (attention, FFN up, FFN down) at batch
# 32 × 128 and 1 × 128 tokens; CUDA: Llama 7B (attention, gate/up, down) at prefill 8 × 2048 and
# decode batches 16 and 1.
PRESETS = {
    "cpu": {"shapes": [(i, o) for o, i in MINILM_LINEARS], "tokens": [4096, 128], "dtype": "float32"},
    "cuda": {"shapes": [(i, o) for o, i in LLAMA_7B_LINEARS], "tokens": [16384, 16, 1], "dtype": "bfloat16"},
}
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def crossing(points: list[dict]) -> float:
    """The kept ratio where the speedup falls to 1, linearly interpolated between the first grid
    point at or below 1 and the one before it (0 when the smallest ratio is already no faster,
    1 when every ratio is faster)."""
    points = sorted(points, key=lambda p: p["kept"])
    for index, point in enumerate(points):
        if point["speedup"] <= 1:
            if index == 0:
                return 0.0
            before = points[index - 1]
            slope = (point["speedup"] - before["speedup"]) / (point["kept"] - before["kept"])
            return before["kept"] + (1 - before["speedup"]) / slope
    return 1.0


def time_workload(in_features: int, out_features: int, tokens: int, ratios: list[float], dtype: torch.dtype,
                  device: torch.device, args) -> dict:
    """Dense vs factorized at every ratio of the grid, interleaved in the same rounds."""
    torch.manual_seed(0)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    dense = torch.nn.Linear(in_features, out_features, device=device, dtype=dtype)
    calls, layers, nominal = {"dense": lambda: dense(x)}, {}, {}
    for ratio in ratios:
        rank = uniform_ranks({"layer": (in_features, out_features)}, ratio, multiple=args.rank_multiple).get("layer")
        if rank is None or rank in layers:  # saves nothing, or the same rank as a smaller ratio
            continue
        layers[rank] = FactorizedLinear(in_features, out_features, rank, device=device, dtype=dtype)
        nominal[rank] = ratio
        calls[str(rank)] = (lambda layer: lambda: layer(x))(layers[rank])
    if args.cuda_graphs:  # one sample = one replay of a graph of `iters` calls
        calls = {name: cuda_graphed(call, args.iters) for name, call in calls.items()}
        seconds = {name: [t / args.iters for t in samples]
                   for name, samples in interleaved_seconds(calls, args.rounds, 1, args.warmup, device).items()}
    else:
        seconds = interleaved_seconds(calls, args.rounds, args.iters, args.warmup, device)
    points = [
        {"ratio": nominal[rank], "rank": rank, "kept": kept_ratio(in_features, out_features, rank),
         "ms": 1e3 * median(seconds[str(rank)]), "speedup": speedup(seconds["dense"], seconds[str(rank)])}
        for rank in layers
    ]
    return {"in": in_features, "out": out_features, "tokens": tokens, "dense_ms": 1e3 * median(seconds["dense"]),
            "points": points, "crossing": crossing(points)}


def by_shape(workloads: list[dict]) -> dict[str, float]:
    """Per layer shape ("INxOUT"), the smallest crossing over its token counts: the per-shape
    ``WSVDConfig.max_kept_ratio_for_speed``."""
    limits: dict[str, float] = {}
    for w in workloads:
        key = f"{w['in']}x{w['out']}"
        limits[key] = min(limits.get(key, 1.0), w["crossing"])
    return limits


def measure(args) -> dict:
    device = torch.device(args.device)
    preset = PRESETS[device.type]
    dtype = getattr(torch, args.dtype or preset["dtype"])
    shapes = parse_shapes(args.shapes) if args.shapes else preset["shapes"]
    workloads = [time_workload(i, o, t, args.ratios, dtype, device, args)
                 for i, o in shapes for t in (args.tokens or preset["tokens"])]
    return {
        **run_header(device, args), "dtype": str(dtype).removeprefix("torch."), "iters": args.iters,
        "rank_multiple": args.rank_multiple, "cuda_graphs": args.cuda_graphs,
        "workloads": workloads, "threshold": min(w["crossing"] for w in workloads), "by_shape": by_shape(workloads),
    }


def run_label(run: dict) -> str:
    return device_label(run) + (", CUDA graphs" if run.get("cuda_graphs") else "")


def render(payloads: list[dict]) -> str:
    from report import markdown_table

    ratios = sorted({p["ratio"] for run in payloads for w in run["workloads"] for p in w["points"]})
    rows = []
    for run in payloads:
        for w in run["workloads"]:
            by_ratio = {p["ratio"]: p["speedup"] for p in w["points"]}
            rows.append([f"{run_label(run)}, {run['dtype']}", f"{w['in']}→{w['out']}", w["tokens"], w["dense_ms"],
                         *[by_ratio.get(r, "—") for r in ratios], w["crossing"]])
    table = markdown_table(["device", "layer", "tokens", "dense (ms)", *[f"×dense at {r:g}" for r in ratios],
                            "crossing kept ratio"], rows)
    thresholds = "; ".join(
        f"{run_label(run)}: **{run['threshold']:.2f}**, by shape "
        + ", ".join(f"{shape} {limit:.2f}" for shape, limit in by_shape(run["workloads"]).items())
        for run in payloads)
    return (f"{table}\n\n×dense: dense time / factorized time (median of {payloads[0]['rounds']} interleaved rounds) "
            f"at the kept ratio of the column; rank rounded down to a multiple of {payloads[0]['rank_multiple']}. "
            f"Crossing 0: no kept ratio of the grid is faster. Threshold (smallest crossing) per device, and per "
            f"layer shape (`WSVDConfig.max_kept_ratio_for_speed` as a dict): {thresholds}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--tokens", nargs="+", type=positive_int, help="rows of the input (batch × sequence length)")
    parser.add_argument("--ratios", nargs="+", type=kept_fraction, default=RATIOS)
    parser.add_argument("--rank-multiple", type=positive_int, default=1, help="round ranks down to a multiple of this")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time replays of captured CUDA graphs (kernel time without launch overhead)")
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    add_shape_arguments(parser, rounds=7, iters=10, shapes_help="in_featuresxout_features, e.g. 384x1536")
    args = parser.parse_args()
    require_cuda(args)
    measure_or_publish("layer_speed", args, measure, render)

if __name__ == "__main__":
    main()
