"""GLUE quality of the element-wise solvers (tfwsvd: als, adam, em, hybrid) and rescue against svd
and fwsvd, on the shipped MiniLM task models, no re-training.

One Fisher per task (512 seeded train examples) is reused by every method (``compress(...,
statistics=...)``). Besides dev accuracy/F1, each row reports the objective the solvers
minimize, summed over the 36 layers: the Fisher-predicted loss increase ½ Σ F (W − AB)², so a
solver that lowers the objective but not the task score shows it.

    python benchmarks/elementwise_glue.py [--max-iterations 3]
    python benchmarks/elementwise_glue.py --variants tfwsvd-hybrid-8it --ratios 0.5 --append   # add rows
    python benchmarks/elementwise_glue.py --json-out run.json   # measure, print (no docs update)
    python benchmarks/elementwise_glue.py --from-json benchmarks/results/elementwise_glue.json run.json

Several runs make one table: a (task, method, kept ratio) measured again is taken from the later run.
"""

from __future__ import annotations

import argparse

import torch

from hf_wsvd.runtime.factorized_linear import FactorizedLinear, linear_weight
from hf_wsvd.solvers.risk import predicted_loss
from hf_wsvd.statistics import FISHER

from common import TASKS, compare_methods
from hf_wsvd.argtypes import positive_int
from timing import add_json_arguments, add_threads_argument, kept_fraction, listed, measure_or_publish

# benchmark variant → WSVDConfig options
VARIANTS = {
    "svd": dict(method="svd"),
    "fwsvd": dict(method="fwsvd"),
    "tfwsvd-als": dict(method="tfwsvd", solver="als"),
    "tfwsvd-adam": dict(method="tfwsvd", solver="adam"),
    "tfwsvd-em": dict(method="tfwsvd", solver="em"),
    "tfwsvd-hybrid": dict(method="tfwsvd", solver="hybrid"),
    "rescue": dict(method="rescue", solver="hybrid"),
    # the tuning row: more iterations of the best solver (docs/benchmarks/elementwise_glue.md: target status)
    "tfwsvd-hybrid-8it": dict(method="tfwsvd", solver="hybrid", max_iterations=8),
}


@torch.no_grad()
def objective(model, dense, stats, targets: dict[str, str]) -> dict[str, float]:
    """Σ over layers of ½ Σ F (W − W')²: the Fisher-predicted loss increase of the compression
    (layers left dense add nothing)."""
    total = 0.0
    for name, full in targets.items():
        module = model.get_submodule(full)
        if isinstance(module, FactorizedLinear):
            total += predicted_loss(linear_weight(dense.get_submodule(full)), stats.get(name, FISHER),
                                    module.up.weight, module.down.weight)
    return {"predicted_loss": total}


def method_order(method: str) -> int:
    return list(VARIANTS).index(method) if method in VARIANTS else -1


def measure(args) -> dict:
    from report import environment

    torch.set_num_threads(args.threads)
    options = {"max_iterations": args.max_iterations, "rank_multiple": args.rank_multiple}
    for key in ("importance_power", "risk_threshold"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    runs = [(variant, ratio, {**options, **VARIANTS[variant]}) for ratio in args.ratios
            for variant in args.variants.split(",")]
    rows = [row for task in args.tasks.split(",") for row in compare_methods(task, runs, measure=objective)]
    return {"environment": environment(), "options": options, "rows": rows}


def render(runs: list[dict]) -> str:
    """One table of the runs' rows: a (task, method, kept ratio) of a later run replaces an earlier
    one's; by task, kept ratio (largest first) and method."""
    from report import markdown_table

    latest = {(r["task"], r["method"], r["param_ratio"]): r for run in runs for r in run["rows"]}
    rows = sorted(latest.values(),
                  key=lambda r: (list(TASKS).index(r["task"]), -r["param_ratio"], method_order(r["method"])))
    headers = ["task", "method", "kept ratio", "accuracy", "F1", "majority-class share",
               "predicted loss ½ΣF·ΔW²", "factorize s"]
    return markdown_table(headers, [
        [r["task"], r["method"], r["param_ratio"], r["accuracy"], r.get("f1", float("nan")), r["majority_share"],
         f"{r['predicted_loss']:.3g}" if "predicted_loss" in r else "-", r.get("factorize_seconds", 0.0)]
        for r in rows
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,mrpc")
    parser.add_argument("--ratios", type=listed(kept_fraction), default=[0.5, 0.3], help="kept ratios, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--max-iterations", type=positive_int, default=3)
    parser.add_argument("--importance-power", type=float, default=None, help="default: WSVDConfig's")
    parser.add_argument("--risk-threshold", type=float, default=None, help="default: WSVDConfig's")
    parser.add_argument("--rank-multiple", type=positive_int, default=1,
                        help="default 1 (exact ranks): the published table predates the rounding default")
    parser.add_argument("--append", action="store_true",
                        help="publish this run after the published ones (its rows replace theirs of the same task, "
                             "method and ratio)")
    add_threads_argument(parser)
    add_json_arguments(parser)
    args = parser.parse_args(argv)
    if args.append and (args.json_out or args.from_json):
        parser.error("--append publishes a run measured here after the published runs: not with --json-out or "
                     "--from-json (give benchmarks/results/elementwise_glue.json first among the --from-json files)")
    measure_or_publish("elementwise_glue", args, measure, render, append=args.append)


if __name__ == "__main__":
    main()
