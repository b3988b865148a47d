"""GLUE quality of the compression methods on the shipped MiniLM task models, no re-training.

Fisher and activation statistics from 512 seeded train examples (as `hf-wsvd compress` computes
them), dev scores. Suites:
  core        svd and fwsvd (both Fisher orientations), every encoder linear at the same kept ratio
  activation  the activation-aware methods, each with uniform and greedy rank allocation

    python benchmarks/glue.py --suite core
    python benchmarks/glue.py --suite activation
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from hf_wsvd import WSVDConfig, compress
from hf_wsvd.evaluation import classification_metrics, predict
from hf_wsvd.importance import collect_activation_stats, compute_fisher
from hf_wsvd.tasks import per_example_loss, task_of
from hf_wsvd.targets import select_targets
from hf_wsvd.workflow import data_loader, load_model_and_tokenizer

from report import markdown_table, publish

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
TASKS = {
    "sst2": ("minilm-l6-sst2", "SST-2", ["sentence"], "label"),
    "mrpc": ("minilm-l6-mrpc", "MRPC", ["#1 String", "#2 String"], "Quality"),
}
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
SUITES = {
    "core": (["svd", "fwsvd-output", "fwsvd-input"], [0.75, 0.5, 0.3]),
    "activation": (["svd", "fwsvd-output", "asvd", "whiten", "fisher_whiten", "svd+greedy", "fwsvd-output+greedy",
                    "asvd+greedy", "whiten+greedy", "fisher_whiten+greedy"], [0.5, 0.3]),
}


def run_task(task: str, ratios: list[float], variants: list[str], num_samples: int, shared: Path) -> list[dict]:
    model_dir, glue_dir, text_columns, label_column = TASKS[task]
    dense, tokenizer = load_model_and_tokenizer(str(shared / "models" / model_dir), dtype=torch.float32)
    base = WSVDConfig(num_samples=num_samples, batch_size=8, max_length=128, seed=0)
    dev = data_loader(dense, tokenizer, str(shared / "data/glue" / glue_dir / "dev.tsv"), base,
                      text_columns, label_column, shuffle=False)
    train = data_loader(dense, tokenizer, str(shared / "data/glue" / glue_dir / "train.tsv"), base,
                        text_columns, label_column)
    rows = [{"task": task, "method": "dense", "param_ratio": 1.0, **classification_metrics(*predict(dense, dev))}]
    start = time.perf_counter()
    modules = {n: dense.get_submodule(f) for n, f in select_targets(dense).items()}
    fisher = compute_fisher(dense, train, modules, per_example_loss(task_of(dense)))
    fisher_seconds = time.perf_counter() - start
    activations = collect_activation_stats(dense, train, modules)
    for variant in variants:
        for ratio in ratios:
            config = WSVDConfig(param_ratio=ratio, num_samples=num_samples, seed=0, **VARIANTS[variant])
            model, report = compress(copy.deepcopy(dense), config, importance=fisher, activations=activations,
                                     show_progress=False)
            metrics = classification_metrics(*predict(model, dev))
            rows.append({"task": task, "method": variant, "param_ratio": ratio, **metrics,
                         "params_after": report.params_after, "params_before": report.params_before,
                         "factorize_seconds": report.seconds["factorize"], "fisher_seconds": fisher_seconds})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="core")
    parser.add_argument("--tasks", default="sst2,mrpc")
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args()
    variants, ratios = SUITES[args.suite]
    rows = []
    for task in args.tasks.split(","):
        rows += run_task(task, ratios, variants, args.num_samples, args.shared)
    headers = ["task", "method", "kept ratio", "accuracy", "F1", "majority-class share"]
    table = markdown_table(headers, [
        [r["task"], r["method"], r["param_ratio"], r["accuracy"], r.get("f1", float("nan")), r["majority_share"]]
        for r in rows
    ])
    publish("glue" if args.suite == "core" else f"glue_{args.suite}", {"rows": rows}, table)


if __name__ == "__main__":
    main()
