"""Time of the factorizations of all 224 target matrices of a Llama 7B shape (random float32
weights), per shape and method: ``torch.linalg.svd`` one matrix at a time and stacked,
``hf_wsvd.linalg.truncated_svd`` (what the solvers run) and a float32 Gram eigendecomposition with
its accuracy. Meant for a CUDA GPU.

    python benchmarks/speed_svd.py --json-out gpu_svd.json                     # GPU machine
    python benchmarks/speed_svd.py --from-json gpu_svd.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from hf_wsvd.allocation import rank_for_ratio
from hf_wsvd.argtypes import positive_int
from hf_wsvd.linalg import truncated_svd
from timing import LLAMA_7B_LINEARS, add_json_arguments, measure_or_publish, require_cuda, synchronize, with_key


def time_svds(args) -> list[dict]:
    """Seconds for the factorizations of all (float32) target matrices of the 7B shape (random
    N(0, 0.02) weights), per shape and method, time-boxed: each (shape, method) gets
    ``args.svd_seconds / (shapes × methods)``; matrices are timed until that is spent and the
    per-matrix time is extrapolated to all of them (``measured`` says how many were timed).

    ``loop``: ``torch.linalg.svd`` one matrix at a time; ``batched``: the same on stacks of
    ``args.svd_chunk`` matrices; ``solver``: ``hf_wsvd.linalg.truncated_svd`` (float64 Gram
    eigendecomposition and factors, what the solvers do) at the rank of a 40% reduction;
    ``eigh``: singular values and vectors from float32
    ``torch.linalg.eigh`` of the Gram matrix of the smaller side, stacked (its accuracy against
    ``svd`` on the first matrix is recorded: the relative error of the singular values that
    carry 99.9% of the energy, and of the rank-½ truncation error)."""
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(3)
    torch.linalg.svd(torch.randn(64, 64, device=device))  # solver initialisation
    torch.linalg.eigh(torch.randn(64, 64, device=device))
    share = args.svd_seconds / (len(LLAMA_7B_LINEARS) * len(args.svd_methods))
    chunk = max(1, args.svd_chunk or 4)
    rows = []
    for (out_features, in_features), per_block in LLAMA_7B_LINEARS.items():
        count = per_block * args.svd_layers
        stack = torch.randn(chunk, out_features, in_features, generator=generator, device=device).mul_(0.02)
        reference = torch.linalg.svdvals(stack[0]).double() if "eigh" in args.svd_methods else None
        for method in args.svd_methods:
            def run():
                if method == "loop":
                    return [torch.linalg.svd(stack[0], full_matrices=False, driver=args.svd_driver)], 1
                if method == "batched":
                    return [torch.linalg.svd(stack, full_matrices=False, driver=args.svd_driver)], chunk
                if method == "solver":
                    rank = rank_for_ratio(in_features, out_features, 0.6)
                    return list(truncated_svd(stack[0], rank)), 1
                wide = out_features <= in_features
                gram = stack @ stack.mT if wide else stack.mT @ stack
                values, vectors = torch.linalg.eigh(gram)
                return [values, vectors], chunk

            row = {"shape": [out_features, in_features], "matrices": count, "method": method,
                   "driver": {"eigh": "Gram", "solver": "float64 Gram"}.get(method, args.svd_driver or "default")}
            try:
                run()  # warm-up (workspace allocation)
                spent, done = 0.0, 0
                while done < count and (done == 0 or spent < share):
                    synchronize(device)
                    start = time.perf_counter()
                    outputs, n = run()
                    synchronize(device)
                    spent += time.perf_counter() - start
                    done += n
                row.update(measured=done, seconds=spent / done * count, seconds_per_matrix=spent / done)
                if method == "eigh":
                    values = outputs[0][0].double().clamp_min(0).sqrt().flip(0)
                    energy = reference.square().cumsum(0) / reference.square().sum()
                    top = int((energy < 0.999).sum()) + 1
                    half = min(out_features, in_features) // 2
                    row["sigma_rel_error"] = ((values[:top] - reference[:top]).abs() / reference[:top]).max().item()
                    tail = lambda v: v[half:].square().sum().sqrt()
                    row["truncation_error_rel_error"] = ((tail(values) - tail(reference)).abs()
                                                         / tail(reference)).item()
            except Exception as error:  # noqa: BLE001 - recorded, the other methods go on
                row["error"] = f"{type(error).__name__}: {error}"[:2000]
            rows.append(row)
            print(f"svd {row}", file=sys.stderr)
        del stack
        torch.cuda.empty_cache()
    return rows



def measure(args) -> dict:
    from report import environment

    start = time.perf_counter()
    rows = time_svds(args)
    return {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "svd": rows, "seconds": time.perf_counter() - start, "environment": environment()}


def render(runs: list[dict]) -> str:
    from report import markdown_table

    timed = [s for run in with_key(runs, "svd") for s in run["svd"]]
    rows = [[f"{s['shape'][0]}×{s['shape'][1]}", s["matrices"], f"{s['method']} ({s['driver']})",
             s.get("measured", "—"), s.get("seconds", s.get("error", "—")), s.get("seconds_per_matrix", "—"),
             s.get("sigma_rel_error", "—"), s.get("truncation_error_rel_error", "—")] for s in timed]
    total = {}
    for s in timed:
        if "seconds" in s:
            total[s["method"]] = total.get(s["method"], 0.0) + s["seconds"]
    text = markdown_table(
        ["factorization (float32 matrices), 7B targets", "matrices", "method", "timed", "seconds (all)", "s/matrix",
         "σ rel. error (eigh)", "tail rel. error (eigh)"], rows)
    return text + (f"\n\nAll {sum(s['matrices'] for s in timed) // len({s['method'] for s in timed})} target matrices "
                   "(timed ones extrapolated): " + ", ".join(f"{k} {v:.1f} s" for k, v in total.items()) + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--svd-layers", type=positive_int, default=32, help="blocks whose target matrices are decomposed")
    parser.add_argument("--svd-methods", nargs="+", default=["loop", "solver", "eigh"],
                        choices=["loop", "batched", "solver", "eigh"])
    parser.add_argument("--svd-seconds", type=float, default=60.0,
                        help="time box (per-matrix times are extrapolated to all matrices)")
    parser.add_argument("--svd-driver", choices=["gesvd", "gesvdj", "gesvda"], help="cuSOLVER driver (default: torch's)")
    parser.add_argument("--svd-chunk", type=positive_int, help="batched/eigh: matrices per stacked call (default: 4)")
    add_json_arguments(parser)
    args = parser.parse_args()
    require_cuda(args)
    measure_or_publish("speed_svd", args, measure, render)


if __name__ == "__main__":
    main()
