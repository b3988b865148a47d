"""Word-embedding compression of the shipped MiniLM task models: SVD against the robust ℓp
subspace (p = 1, 1.25, 1.5), uniform rows or rows weighted by token frequency, no re-training.

Only ``embeddings.word_embeddings`` (30522 × 384, about half of MiniLM-L6's parameters) is
factorized (``param_ratio=1``), at 28% and 50% parameter reduction of that matrix; dev scores on
the full dev sets. "freq" weights each token's row by 1 + its count in the task's whole train set.
The objective columns are Σ_rows dist(row, subspace)^q of each solution divided by the SVD
solution's, for q = 1 and 2. A last line times the solver alone on a 50k × 1024 matrix.

    python benchmarks/embeddings.py
    python benchmarks/embeddings.py --json-out embeddings.json   # measure, print (no docs update)
    python benchmarks/embeddings.py --from-json embeddings.json  # publish
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from hf_wsvd import WSVDConfig, compress
from hf_wsvd.methods.embeddings import input_embedding_name
from hf_wsvd.evaluation import classification_metrics, predict
from hf_wsvd.solvers.lp import lp_subspace
from hf_wsvd.cli.workflow import data_loader, load_model_and_tokenizer

from common import SHARED, TASKS
from timing import add_json_arguments, kept_fraction, listed, measure_or_publish

# variant → (embedding_method, p, embedding_weighting)
VARIANTS = {
    "svd": ("svd", 2.0, "uniform"),
    "lp1": ("lp", 1.0, "uniform"),
    "lp1.25": ("lp", 1.25, "uniform"),
    "lp1.5": ("lp", 1.5, "uniform"),
    "svd-freq": ("lp", 2.0, "frequency"),  # p = 2 with row weights: the row-weighted SVD
    "lp1.25-freq": ("lp", 1.25, "frequency"),
}


def residual_norms(model: torch.nn.Module, dense_weight: torch.Tensor) -> torch.Tensor:
    """Distance of each dense embedding row to its factorized reconstruction (= to the subspace)."""
    factorized = model.get_input_embeddings()
    approx = factorized.weight.detach() @ factorized.proj.weight.detach().T
    return (dense_weight - approx).double().norm(dim=1)


def run_task(task: str, ratios: list[float], variants: list[str], shared: Path) -> list[dict]:
    model_dir, glue_dir, text_columns, label_column = TASKS[task]
    dense, tokenizer = load_model_and_tokenizer(str(shared / "models" / model_dir), dtype=torch.float32)
    base = WSVDConfig(batch_size=32, max_length=128, seed=0)
    dev = data_loader(dense, tokenizer, str(shared / "data/glue" / glue_dir / "dev.tsv"), base,
                      text_columns, label_column, shuffle=False)
    # Token counts over the whole train set (all rows, in order).
    train = data_loader(dense, tokenizer, str(shared / "data/glue" / glue_dir / "train.tsv"), base,
                        text_columns, label_column, shuffle=False)
    weight = dense.get_submodule(input_embedding_name(dense)).weight.detach().clone()
    rows = [{"task": task, "variant": "dense", "embedding_ratio": 1.0, **classification_metrics(*predict(dense, dev))}]
    print(rows[-1], flush=True)
    for ratio in ratios:
        svd_objective = {}
        for variant in variants:
            method, p, weighting = VARIANTS[variant]
            config = WSVDConfig(method="svd", param_ratio=1.0, embeddings=True, embedding_ratio=ratio,
                                embedding_method=method, p=p, embedding_weighting=weighting, seed=0)
            model, report = compress(copy.deepcopy(dense), config, train if weighting == "frequency" else None,
                                     show_progress=False)
            dist = residual_norms(model, weight)
            objective = {q: float(dist.pow(q).sum()) for q in (1.0, 1.25, 1.5, 2.0)}
            if variant == "svd":
                svd_objective = objective
            metrics = classification_metrics(*predict(model, dev))
            rows.append({
                "task": task, "variant": variant, "embedding_ratio": ratio, "rank": next(iter(report.ranks.values())),
                "p": p, **metrics, "objective": {str(q): v for q, v in objective.items()},  # keyed as in JSON
                "objective_vs_svd": ({str(q): objective[q] / svd_objective[q] for q in objective}
                                     if svd_objective else None),
                "embedding_params_kept": report.params_after - (report.params_before - weight.numel()),
                "embedding_params_dense": weight.numel(), "solve_seconds": report.seconds["embeddings"],
            })
            print({k: v for k, v in rows[-1].items() if k != "objective"}, flush=True)
    return rows


def large_matrix_timing(n: int = 50_000, d: int = 1024, rank: int = 512, p: float = 1.0) -> dict:
    """Seconds of ``lp_subspace`` on an n × d matrix with heavy-tailed row norms."""
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(n, d, generator=g) * torch.linspace(2, 0.1, d)
    matrix *= torch.distributions.StudentT(2.0).sample((n, 1)).abs().clamp(0.1, 50)
    start = time.perf_counter()
    result = lp_subspace(matrix, rank, p)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    torch.linalg.svd(matrix, full_matrices=False)  # the reference cost: one plain SVD
    return {"shape": [n, d], "rank": rank, "p": p, "seconds": seconds, "svd_seconds": time.perf_counter() - start,
            "iterations": result.iterations, "objective_start": result.objectives[0],
            "objective_end": result.objectives[-1]}


def measure(args) -> dict:
    from report import environment

    torch.manual_seed(0)
    rows = []
    for task in args.tasks.split(","):
        rows += run_task(task, args.ratios, args.variants.split(","), args.shared)
    timing = large_matrix_timing()
    print(timing, flush=True)
    return {"environment": environment(), "rows": rows, "large_matrix": timing}


def render(runs: list[dict]) -> str:
    """Every run's rows (their accuracy loss against the dense row of their run), then the timing
    of the solver alone of each run."""
    from report import markdown_table

    rows, notes = [], []
    for run in runs:
        dense = {r["task"]: r for r in run["rows"] if r["variant"] == "dense"}
        rows += [[r["task"], r["variant"], r["embedding_ratio"], r.get("rank", "-"), r["accuracy"],
                  r.get("f1", float("nan")), dense[r["task"]]["accuracy"] - r["accuracy"],
                  r["objective_vs_svd"]["1.0"] if r.get("objective_vs_svd") else "-",
                  r["objective_vs_svd"]["2.0"] if r.get("objective_vs_svd") else "-",
                  r.get("solve_seconds", "-")] for r in run["rows"]]
        timing = run["large_matrix"]
        notes.append(f"Solver alone, {timing['shape'][0]}×{timing['shape'][1]} heavy-tailed rows, rank "
                     f"{timing['rank']}, p = {timing['p']}: {timing['seconds']:.1f} s (one plain SVD of it: "
                     f"{timing['svd_seconds']:.1f} s), {timing['iterations']} IRLS steps, objective "
                     f"{timing['objective_start']:.4g} → {timing['objective_end']:.4g}.")
    headers = ["task", "embedding", "kept", "rank", "accuracy", "F1", "acc. loss", "ℓ1 obj. / SVD",
               "ℓ2 obj. / SVD", "solve s"]
    return "\n\n".join([markdown_table(headers, rows), *notes])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,mrpc")
    parser.add_argument("--ratios", type=listed(kept_fraction), default=[0.72, 0.5],
                        help="kept fractions of the embedding matrix, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--shared", type=Path, default=SHARED)
    add_json_arguments(parser)
    measure_or_publish("embeddings", parser.parse_args(argv), measure, render)


if __name__ == "__main__":
    main()
