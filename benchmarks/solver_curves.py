"""Weighted loss reached by each element-wise solver vs wall time (CPU), on one FFN (1536×384) and
one attention (384×384) matrix of the shipped SST-2 model, with its Fisher, at kept ratio 0.5.

Every solver starts from FWSVD and runs for the same time budget; the loss is the normalized
weighted loss Σ w (W − AB)² / Σ w that they minimize.

    python benchmarks/solver_curves.py [--seconds 20]
    python benchmarks/solver_curves.py --json-out curves.json   # measure, print (no docs update)
    python benchmarks/solver_curves.py --from-json curves.json  # publish (the table and its figure)
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

from common import load_task  # noqa: E402
from timing import (add_json_arguments, add_threads_argument, kept_fraction, measure_or_publish,  # noqa: E402
                    positive_number)

LAYERS = ["encoder.layer.3.intermediate.dense", "encoder.layer.3.attention.self.query"]


def measure(args) -> dict:
    """Each solver's weighted loss and time per iteration on each layer (``curves``)."""
    from report import environment

    torch.set_num_threads(args.threads)
    dense, _, stats, targets = load_task("sst2")
    curves = []
    for name in LAYERS:
        weight = linear_weight(dense.get_submodule(targets[name])).detach()
        rank = rank_for_ratio(weight.shape[1], weight.shape[0], args.ratio)
        for solver in SOLVER_NAMES:
            result = solve_elementwise(weight, stats.get(name, FISHER), rank, solver=solver, max_iterations=10_000,
                                       tolerance=0.0, time_budget=args.seconds)
            curves.append({"layer": name, "shape": list(weight.shape), "rank": rank, "solver": solver,
                           "history": result.history, "times": result.times, "phases": result.phases})
            print(_row(curves[-1]), flush=True)
    return {"environment": environment(), "seconds": args.seconds, "ratio": args.ratio, "curves": curves}


def _row(curve: dict) -> list:
    """The table's row of one solver on one layer: its best loss over its start (FWSVD's), its
    iterations and seconds, and the time it took to get within 1% of its own final improvement."""
    history, times = curve["history"], curve["times"]
    start, best = history[0], min(history)
    target = best + 0.01 * (start - best)
    reach = next(t for t, h in zip(times, history) if h <= target)
    (out_features, in_features), rank = curve["shape"], curve["rank"]
    layer = f"{curve['layer'].replace('encoder.layer.', '')} {out_features}×{in_features} r{rank}"
    return [layer, curve["solver"], best / start, len(history) - 1, times[-1], reach]


def render(runs: list[dict]) -> str:
    from report import markdown_table

    text = markdown_table(["layer", "solver", "best loss / FWSVD loss", "iterations", "seconds",
                           "s to 99% of its gain"], [_row(curve) for run in runs for curve in run["curves"]])
    return text + "\n\n![weighted loss vs time](../../benchmarks/results/solver_curves.png)"


def plot(runs: list[dict], path) -> None:
    """One panel per layer: each solver's weighted loss over FWSVD's against wall time, at ``path``."""
    curves = [curve for run in runs for curve in run["curves"]]
    layers = list(dict.fromkeys(curve["layer"] for curve in curves))
    fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 4), squeeze=False)
    for ax, name in zip(axes[0], layers):
        on_layer = [curve for curve in curves if curve["layer"] == name]
        for curve in on_layer:
            ax.plot(curve["times"], [h / curve["history"][0] for h in curve["history"]], marker=".",
                    label=curve["solver"])
        (out_features, in_features), rank = on_layer[0]["shape"], on_layer[0]["rank"]
        ax.set_title(f"{name.replace('encoder.layer.', 'layer ')} ({out_features}×{in_features}, rank {rank})",
                     fontsize=9)
        ax.set_xlabel("wall time (s, CPU)")
        ax.set_ylabel("weighted loss / FWSVD loss")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=positive_number, default=20.0, help="time budget per solver and layer")
    parser.add_argument("--ratio", type=kept_fraction, default=0.5)
    add_threads_argument(parser)
    add_json_arguments(parser)
    measure_or_publish("solver_curves", parser.parse_args(argv), measure, render, figure=plot)


if __name__ == "__main__":
    main()
