"""GLUE quality of the compression methods on the shipped MiniLM task models, no re-training.

Fisher and activation statistics from 512 seeded train examples (as `hf-wsvd compress` computes
them), dev scores. Suites:
  core        svd and fwsvd (both Fisher orientations), every encoder linear at the same kept ratio
  activation  the activation-aware methods, each with uniform and greedy rank allocation, and the
              best of them refined by the element-wise ALS solver

    python benchmarks/glue.py --suite core
    python benchmarks/glue.py --suite activation --json-out activation.json   # measure (no docs update)
    python benchmarks/glue.py --suite activation --from-json activation.json  # publish the suite's table
"""

from __future__ import annotations

import argparse
import functools

from common import compare_methods
from hf_wsvd.argtypes import positive_int
from timing import add_json_arguments, measure_or_publish

# benchmark variant → WSVDConfig settings
VARIANTS = {
    "svd": dict(method="svd"),
    "fwsvd-output": dict(method="fwsvd", fisher_axis="output"),
    "fwsvd-input": dict(method="fwsvd", fisher_axis="input"),
    "asvd": dict(method="asvd"),
    "whiten": dict(method="whiten"),
    "fisher_whiten": dict(method="fisher_whiten"),
}
VARIANTS.update({f"{name}+greedy": dict(settings, allocation="greedy") for name, settings in list(VARIANTS.items())
                 if name != "fwsvd-input"})
VARIANTS["fisher_whiten+refine"] = dict(method="fisher_whiten", refine=True, solver="als")
# suite → groups of (variants, kept ratios); the element-wise refinement (minutes per model on a
# CPU) runs at one ratio only.
SUITES = {
    "core": [(["svd", "fwsvd-output", "fwsvd-input"], [0.75, 0.5, 0.3])],
    "activation": [(["svd", "fwsvd-output", "asvd", "whiten", "fisher_whiten", "svd+greedy", "fwsvd-output+greedy",
                     "asvd+greedy", "whiten+greedy", "fisher_whiten+greedy"], [0.5, 0.3]),
                   (["fisher_whiten+refine"], [0.5])],
}


def measure(args) -> dict:
    from report import environment

    runs = [(v, r, VARIANTS[v]) for variants, ratios in SUITES[args.suite] for v in variants for r in ratios]
    rows = [row for task in args.tasks.split(",")
            for row in compare_methods(task, runs, args.num_samples, activations=True)]
    return {"environment": environment(), "suite": args.suite, "rows": rows}


def render(runs: list[dict], suite: str) -> str:
    """The table of every row of ``runs``, which must have measured ``suite`` (runs from before the
    suite was recorded are taken as it)."""
    from report import markdown_table

    other = next((run["suite"] for run in runs if run.get("suite", suite) != suite), None)
    if other:
        raise SystemExit(f"these runs measured --suite {other}, not {suite}: pass --suite {other} to publish its table")
    headers = ["task", "method", "kept ratio", "accuracy", "F1", "majority-class share"]
    return markdown_table(headers, [
        [r["task"], r["method"], r["param_ratio"], r["accuracy"], r.get("f1", float("nan")), r["majority_share"]]
        for run in runs for r in run["rows"]
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="core",
                        help="with --from-json: the suite whose table the runs give")
    parser.add_argument("--tasks", default="sst2,mrpc")
    parser.add_argument("--num-samples", type=positive_int, default=512)
    add_json_arguments(parser)
    args = parser.parse_args(argv)
    name = "glue" if args.suite == "core" else f"glue_{args.suite}"
    measure_or_publish(name, args, measure, functools.partial(render, suite=args.suite))


if __name__ == "__main__":
    main()
