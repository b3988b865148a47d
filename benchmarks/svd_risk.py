"""Validate the per-matrix SVD-risk metrics: compress ONE matrix at a time (plain SVD, kept ratio
0.3) of the shipped SST-2 and MRPC models, measure the dev accuracy drop and dev loss increase,
and rank-correlate them (Spearman) with each metric computed from the Fisher.

    python benchmarks/svd_risk.py
    python benchmarks/svd_risk.py --json-out svd_risk.json   # measure, print (no docs update)
    python benchmarks/svd_risk.py --from-json svd_risk.json  # publish (the table and its figure)
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hf_wsvd.allocation import rank_for_ratio  # noqa: E402
from hf_wsvd.metrics import spearmanr  # noqa: E402
from hf_wsvd.solvers.elementwise import single_threaded_lapack  # noqa: E402
from hf_wsvd.solvers.fwsvd import solve_fwsvd  # noqa: E402
from hf_wsvd.solvers.registry import LayerProblem  # noqa: E402
from hf_wsvd.solvers.risk import predicted_loss  # noqa: E402
from hf_wsvd.statistics import FISHER  # noqa: E402
from hf_wsvd.linalg import truncated_svd  # noqa: E402

from common import load_task  # noqa: E402
from hf_wsvd.argtypes import positive_int  # noqa: E402
from timing import add_json_arguments, add_threads_argument, kept_fraction, measure_or_publish  # noqa: E402

METRICS = {
    "fisher_variance": "Fisher variance (study)",
    "fisher_cv2": "Fisher CV²",
    "svd_risk": "½ΣF·(W−SVD)² (predicted loss)",
    "svd_risk_relative": "½ΣF·(W−SVD)² / ½ΣF·W²",
    "fwsvd_risk_relative": "½ΣF·(W−FWSVD)² / ½ΣF·W²",
}


def fisher_variance(fisher: torch.Tensor) -> float:
    """Variance of the Fisher entries: the TFWSVD study's predictor (large variance → plain SVD,
    which ignores importance, drops much accuracy), in the Fisher's own units."""
    return float(fisher.double().var())


def fisher_cv2(fisher: torch.Tensor) -> float:
    """Squared coefficient of variation of the Fisher entries: the variance without its scale."""
    f = fisher.double()
    mean = f.mean()
    return float(f.var() / mean.square()) if mean > 0 else 0.0


def relative_risk(weight: torch.Tensor, fisher: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """``predicted_loss`` of the factors over that of dropping the matrix (½ Σ F W²): the share of
    the matrix's Fisher-weighted content the factorization loses, scale-free across tasks."""
    energy = 0.5 * float((fisher.double() * weight.double().square()).sum())
    return predicted_loss(weight, fisher, up, down) / energy if energy > 0 else 0.0


@torch.no_grad()
def dev_scores(model, dev) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the dev loader."""
    correct = total = 0
    loss = 0.0
    for batch in dev:
        labels = batch.pop("labels")
        logits = model(**batch).logits
        loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total, loss / total


def matrix_metrics(weight: torch.Tensor, fisher: torch.Tensor, rank: int) -> tuple[dict[str, float], torch.Tensor]:
    """The risk metrics of one matrix at ``rank`` and its rank-``rank`` SVD approximation."""
    with single_threaded_lapack(weight.device):
        up, down = truncated_svd(weight.double(), rank)
        fw = solve_fwsvd(LayerProblem("m", weight.double(), rank, fisher=fisher.double()))
    svd = predicted_loss(weight, fisher, up, down)
    return {
        "fisher_variance": fisher_variance(fisher),
        "fisher_cv2": fisher_cv2(fisher),
        "svd_risk": svd,
        "svd_risk_relative": relative_risk(weight, fisher, up, down),
        "fwsvd_risk_relative": relative_risk(weight, fisher, *fw),
    }, (up @ down).float()


def run_task(task: str, ratio: float, num_samples: int) -> list[dict]:
    dense, dev, stats, targets = load_task(task, num_samples)
    dev = [dict(b) for b in dev]
    base_accuracy, base_loss = dev_scores(dense, [dict(b) for b in dev])
    rows = []
    for name, f in ((n, stats.get(n, FISHER)) for n in targets):
        layer = dense.get_submodule(targets[name])
        weight = layer.weight.data.clone()
        rank = rank_for_ratio(weight.shape[1], weight.shape[0], ratio)
        metrics, approx = matrix_metrics(weight, f, rank)
        layer.weight.data.copy_(approx)  # the product of the factors: same outputs as the factorized layer
        accuracy, loss = dev_scores(dense, [dict(b) for b in dev])
        layer.weight.data.copy_(weight)
        rows.append({"task": task, "module": name, "rank": rank, **metrics,
                     "accuracy_drop": base_accuracy - accuracy, "loss_increase": loss - base_loss})
        print(rows[-1], flush=True)
    return rows


def measure(args) -> dict:
    from report import environment

    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    rows = [r for task in tasks for r in run_task(task, args.ratio, args.num_samples)]
    correlations = []
    for task in tasks:
        task_rows = [r for r in rows if r["task"] == task]
        for metric in METRICS:
            values = [r[metric] for r in task_rows]
            correlations.append({"task": task, "metric": metric,
                                 "spearman_accuracy_drop": spearmanr(values, [r["accuracy_drop"] for r in task_rows]),
                                 "spearman_loss_increase": spearmanr(values, [r["loss_increase"] for r in task_rows])})
    return {"environment": environment(), "ratio": args.ratio, "rows": rows, "correlations": correlations}


def render(runs: list[dict]) -> str:
    from report import markdown_table

    table = markdown_table(["task", "metric", "Spearman ρ vs accuracy drop", "Spearman ρ vs dev-loss increase"],
                           [[c["task"], METRICS[c["metric"]], c["spearman_accuracy_drop"], c["spearman_loss_increase"]]
                            for run in runs for c in run["correlations"]])
    return table + "\n\n![metric vs drop](../../benchmarks/results/svd_risk.png)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,mrpc")
    parser.add_argument("--ratio", type=kept_fraction, default=0.3)
    parser.add_argument("--num-samples", type=positive_int, default=512)
    add_threads_argument(parser)
    add_json_arguments(parser)
    measure_or_publish("svd_risk", parser.parse_args(argv), measure, render, figure=plot)


def plot(runs: list[dict], path) -> None:
    """Each metric against the accuracy drop, one panel per task and metric, at ``path``."""
    rows = [r for run in runs for r in run["rows"]]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    rho = {(c["task"], c["metric"]): c["spearman_accuracy_drop"] for run in runs for c in run["correlations"]}
    shown = ["fisher_variance", "svd_risk", "svd_risk_relative"]
    fig, axes = plt.subplots(len(tasks), len(shown), figsize=(4.2 * len(shown), 3.4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        task_rows = [r for r in rows if r["task"] == task]
        for j, metric in enumerate(shown):
            ax = axes[i][j]
            for kind, marker in (("intermediate", "s"), ("output.dense", "^"), ("attention", "o")):
                sel = [r for r in task_rows if kind in r["module"] and not (kind == "output.dense" and "attention" in r["module"])]
                if kind == "attention":
                    sel = [r for r in task_rows if "attention" in r["module"]]
                ax.scatter([r[metric] for r in sel], [100 * r["accuracy_drop"] for r in sel], marker=marker, s=18,
                           label={"intermediate": "FFN up", "output.dense": "FFN down", "attention": "attention"}[kind])
            ax.set_xscale("log")
            ax.set_title(f"{task}: ρ = {rho[task, metric]:.2f}", fontsize=9)
            ax.set_xlabel(METRICS[metric], fontsize=8)
            ax.set_ylabel("dev accuracy drop (points)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    ratios = " / ".join(dict.fromkeys(f"{run['ratio']:g}" for run in runs))
    fig.suptitle(f"one matrix SVD-compressed at kept ratio {ratios}: metric vs dev accuracy drop", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
