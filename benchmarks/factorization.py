"""float32 ``torch.linalg.svd`` against ``hf_wsvd.linalg.truncated_svd`` (the float64 Gram
eigendecomposition the solvers use): time per matrix and truncation error above the optimum, per
shape, on one device. The test matrices have a known spectrum, σ_i = exp(−8·i/n) (down to 3e-4 of
the largest, like a whitened weight), so the optimal rank-r error is known exactly; r keeps 60% of
the layer's parameters.

    python benchmarks/factorization.py --device cpu --json-out factorization_cpu.json
    python benchmarks/factorization.py --device cuda --json-out factorization_gpu.json   # GPU machine
    python benchmarks/factorization.py --from-json factorization_cpu.json factorization_gpu.json
"""

from __future__ import annotations

import argparse

import torch

from hf_wsvd.allocation import rank_for_ratio
from hf_wsvd.linalg import truncated_svd
from timing import (LLAMA_7B_LINEARS, MINILM_LINEARS, SMOLLM2_LINEARS, add_shape_arguments, device_label,
                    interleaved_seconds, measure_or_publish, median, parse_shapes, run_header, speedup)

# out × in: CPU: MiniLM-L6 and SmolLM2-135M linears; CUDA: Llama 7B linears.
PRESETS = {"cpu": [*MINILM_LINEARS, *SMOLLM2_LINEARS], "cuda": list(LLAMA_7B_LINEARS)}
KEPT = 0.6


def known_spectrum_matrix(out_features: int, in_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 matrix U·diag(σ)·Vᵀ with random orthonormal U, V, and its σ."""
    generator = torch.Generator(device=device).manual_seed(0)
    n = min(out_features, in_features)
    u = torch.linalg.qr(torch.randn(out_features, n, generator=generator, device=device, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_features, n, generator=generator, device=device, dtype=torch.float64))[0]
    sigma = torch.exp(-8 * torch.arange(n, device=device, dtype=torch.float64) / n)
    return (u * sigma) @ v.T, sigma


def svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def measure_shape(out_features: int, in_features: int, device: torch.device, args) -> dict:
    exact, sigma = known_spectrum_matrix(out_features, in_features, device)
    matrix = exact.float()
    rank = rank_for_ratio(in_features, out_features, KEPT)
    methods = {"svd float32": lambda: svd_factors(matrix, rank), "Gram float64": lambda: truncated_svd(matrix, rank)}
    seconds = interleaved_seconds(methods, args.rounds, args.iters, 1, device)
    optimum = float(sigma[rank:].square().sum().sqrt())
    excess = {}
    for name, run in methods.items():
        up, down = run()
        excess[name] = float((exact - up.double() @ down.double()).norm()) / optimum - 1
    return {"out": out_features, "in": in_features, "rank": rank,
            "ms": {name: 1e3 * median(s) for name, s in seconds.items()},
            "speedup": speedup(seconds["svd float32"], seconds["Gram float64"]), "excess_error": excess}


def measure(args) -> dict:
    device = torch.device(args.device)
    shapes = parse_shapes(args.shapes) if args.shapes else PRESETS[device.type]
    return {**run_header(device, args), "rows": [measure_shape(o, i, device, args) for o, i in shapes]}


def render(payloads: list[dict]) -> str:
    from report import markdown_table

    rows = []
    for run in payloads:
        where = device_label(run)
        for r in run["rows"]:
            rows.append([where, f"{r['out']}×{r['in']}", r["rank"], r["ms"]["svd float32"], r["ms"]["Gram float64"],
                         r["speedup"], f"{r['excess_error']['svd float32']:.2g}",
                         f"{r['excess_error']['Gram float64']:.2g}"])
    table = markdown_table(["device", "matrix (out×in)", "rank", "svd float32 (ms)", "Gram float64 (ms)",
                            "speedup", "svd: error above optimum", "Gram: error above optimum"], rows)
    return (f"{table}\n\nTime: median of {payloads[0]['rounds']} interleaved rounds; speedup: median of the "
            "per-round ratios. Error above optimum: ‖M − AB‖_F / ‖σ_tail‖ − 1 against the float64 matrix, "
            f"rank keeping {KEPT:.0%} of the layer's parameters.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser, rounds=5, iters=2, shapes_help="out_featuresxin_features (default: the device's preset)")
    measure_or_publish("factorization", parser.parse_args(), measure, render)

if __name__ == "__main__":
    main()
