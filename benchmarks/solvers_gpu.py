"""Time each element-wise solver on one LLaMA-7B-sized FFN matrix (4096×11008, rank 1024) with a
random positive (log-normal) importance, on the GPU; writes benchmarks/results/solvers_gpu.json.

    python benchmarks/solvers_gpu.py                    # CUDA, full size
    python benchmarks/solvers_gpu.py --small            # quick CPU check (512×1376, rank 128)
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_wsvd.solvers.elementwise import SOLVER_NAMES, solve_elementwise

from report import markdown_table, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="512×1376 at rank 128 (a CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--max-iterations", type=int, default=8)
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds per solver")
    parser.add_argument("--solvers", default=",".join(SOLVER_NAMES))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on the shared 2-core machine more threads spin against each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_features, in_features, rank = (512, 1376, 128) if args.small else (4096, 11008, 1024)
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(device)
    # Heavy-tailed like a real Fisher: log-normal, several orders of magnitude.
    importance = torch.exp(2.0 * torch.randn(out_features, in_features, generator=generator)).to(device)
    rows, runs = [], []
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
        rows.append([solver, result.history[0], result.best_loss, result.best_loss / result.history[0],
                     len(result.history) - 1, seconds, peak])
        print(rows[-1], flush=True)
    table = markdown_table(["solver", "FWSVD loss", "best loss", "ratio", "iterations", "seconds", "peak GPU GiB"], rows)
    name = "solvers_gpu_small" if args.small else "solvers_gpu"
    publish(name, {"device": str(device), "shape": [out_features, in_features], "rank": rank, "runs": runs},
            table, readme=False)


if __name__ == "__main__":
    main()
