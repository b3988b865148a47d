"""Time each element-wise solver on one LLaMA-7B-sized FFN matrix (4096×11008, rank 1024) with a
random positive (log-normal) importance, on the GPU; publishes benchmarks/results/solvers_gpu.json.
Needs only torch, transformers and hf_wsvd (no datasets, no task data).

    PYTHONPATH=src:benchmarks python benchmarks/solvers_gpu.py --json-out $OUT/solvers_gpu.json   # CUDA
    python benchmarks/solvers_gpu.py --from-json solvers_gpu.json   # publish a measurement taken elsewhere
    python benchmarks/solvers_gpu.py --small            # quick CPU check (512×1376, rank 128)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_wsvd.argtypes import positive_int
from hf_wsvd.solvers.elementwise import SOLVER_NAMES, solve_elementwise

from report import environment, markdown_table, publish
from timing import add_threads_argument, read_fields, read_json


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_features, in_features, rank = (512, 1376, 128) if args.small else (4096, 11008, 1024)
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(device)
    # Heavy-tailed like a real Fisher: log-normal, several orders of magnitude.
    importance = torch.exp(2.0 * torch.randn(out_features, in_features, generator=generator)).to(device)
    runs = []
    for solver in args.solvers.split(","):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = solve_elementwise(weight, importance, rank, solver=solver, max_iterations=args.max_iterations,
                                   tolerance=0.0, time_budget=args.time_budget)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        runs.append({"solver": solver, "seconds": seconds, "history": result.history, "times": result.times,
                     "phases": result.phases, "stopped": result.stopped, "peak_gib": peak})
        print({k: v for k, v in runs[-1].items() if k not in ("history", "times", "phases")},
              "best/start", min(result.history) / result.history[0], flush=True)
    return {"environment": environment(), "device": str(device), "shape": [out_features, in_features],
            "rank": rank, "max_iterations": args.max_iterations, "time_budget": args.time_budget, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="512×1376 at rank 128 (a CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--max-iterations", type=positive_int, default=8)
    parser.add_argument("--time-budget", type=float, default=100.0,
                        help="seconds per solver (default 100: all four fit one 10-minute device command)")
    parser.add_argument("--solvers", default=",".join(SOLVER_NAMES))
    add_threads_argument(parser)
    parser.add_argument("--json-out", help="measure and write the measurement here (no docs update; e.g. $OUT on the "
                                           "GPU machine)")
    parser.add_argument("--from-json", help="publish a measurement taken earlier instead of measuring")
    args = parser.parse_args()
    payload = read_json(args.from_json) if args.from_json else measure(args)
    if args.json_out:  # first: a measurement is kept whatever its rendering does
        Path(args.json_out).write_text(json.dumps(payload, indent=2))
    table = read_fields(render, payload, "solvers_gpu", args.from_json)
    if args.json_out:
        print(table)
        return
    publish("solvers_gpu_small" if payload["shape"][0] < 4096 else "solvers_gpu", payload, table)


def render(payload: dict) -> str:
    rows = [[r["solver"], r["history"][0], min(r["history"]), min(r["history"]) / r["history"][0],
             len(r["history"]) - 1, r.get("stopped", "-"), r["seconds"], r["peak_gib"]] for r in payload["runs"]]
    (out_features, in_features), rank = payload["shape"], payload["rank"]
    table = markdown_table(["solver", "FWSVD loss", "best loss", "ratio", "iterations", "stopped", "seconds",
                            "peak GPU GiB"], rows)
    # runs published before the limits were recorded
    limits = (f"up to {payload['max_iterations']} iterations or {payload['time_budget']:g} s per solver"
              if "max_iterations" in payload else "iterations and time per solver not recorded")
    return table + (f"\n\n{out_features}×{in_features} at rank {rank}, log-normal importance, {limits}; measured on "
                    f"{payload['environment'].get('cuda') or 'CPU'}.")

if __name__ == "__main__":
    main()
