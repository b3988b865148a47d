"""Weighted loss reached by each element-wise solver vs wall time (CPU), on one FFN (1536×384) and
one attention (384×384) matrix of the shipped SST-2 model, with its Fisher, at kept ratio 0.5.

Every solver starts from FWSVD and runs for the same time budget; the loss is the normalized
weighted loss Σ w (W − AB)² / Σ w that they minimize.

    python benchmarks/solver_curves.py [--seconds 20]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import torch  # noqa: E402

from hf_wsvd.allocation import rank_for_ratio  # noqa: E402
from hf_wsvd.runtime.factorized_linear import linear_weight  # noqa: E402
from hf_wsvd.solvers.elementwise import SOLVER_NAMES, solve_elementwise  # noqa: E402
from hf_wsvd.statistics import FISHER  # noqa: E402

from common import RESULTS, load_task  # noqa: E402
from report import markdown_table, publish  # noqa: E402
from timing import kept_fraction, positive_number  # noqa: E402

LAYERS = ["encoder.layer.3.intermediate.dense", "encoder.layer.3.attention.self.query"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=positive_number, default=20.0, help="time budget per solver and layer")
    parser.add_argument("--ratio", type=kept_fraction, default=0.5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on the shared 2-core machine more threads spin against each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, _, stats, targets = load_task("sst2")
    runs, table = [], []
    fig, axes = plt.subplots(1, len(LAYERS), figsize=(6 * len(LAYERS), 4))
    for ax, name in zip(axes, LAYERS):
        weight = linear_weight(dense.get_submodule(targets[name])).detach()
        rank = rank_for_ratio(weight.shape[1], weight.shape[0], args.ratio)
        for solver in SOLVER_NAMES:
            result = solve_elementwise(weight, stats.get(name, FISHER), rank, solver=solver, max_iterations=10_000,
                                       tolerance=0.0, time_budget=args.seconds)
            start = result.history[0]
            runs.append({"layer": name, "shape": list(weight.shape), "rank": rank, "solver": solver,
                         "history": result.history, "times": result.times, "phases": result.phases})
            ax.plot(result.times, [h / start for h in result.history], marker=".", label=solver)
            # Time to get within 1% of the solver's own final improvement.
            best = result.best_loss
            target = best + 0.01 * (start - best)
            reach = next(t for t, h in zip(result.times, result.history) if h <= target)
            table.append([f"{name.replace('encoder.layer.', '')} {weight.shape[0]}×{weight.shape[1]} r{rank}", solver,
                          best / start, len(result.history) - 1, result.times[-1], reach])
            print(table[-1], flush=True)
        ax.set_title(f"{name.replace('encoder.layer.', 'layer ')} ({weight.shape[0]}×{weight.shape[1]}, rank {rank})", fontsize=9)
        ax.set_xlabel("wall time (s, CPU)")
        ax.set_ylabel("weighted loss / FWSVD loss")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "solver_curves.png", dpi=110)
    text = markdown_table(["layer", "solver", "best loss / FWSVD loss", "iterations", "seconds",
                           "s to 99% of its gain"], table)
    text += "\n\n![weighted loss vs time](../../benchmarks/results/solver_curves.png)"
    publish("solver_curves", {"seconds": args.seconds, "ratio": args.ratio, "runs": runs}, text)


if __name__ == "__main__":
    main()
