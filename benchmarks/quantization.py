"""Weight bytes against WikiText-2 perplexity: quantization alone, the recommended low-rank recipe
followed by quantization, and the weighted residual (quantized_residual: Q + L, one row per ``--residual-refine-steps``: 0 for
the per-layer corrections alone, else refined block by block), on real LLMs. (The
decode speed of the quantized compressed Llama-7B shape against quantized dense is a part of
``benchmarks/speed_gpu.py``: ``--parts int8``.)

Quantizer: torchao ``IntxWeightOnlyConfig`` (``hf_wsvd.integrations.quantization.quantization_config``: int8
per row, int4/int3 asymmetric per group of 64) for the whole curve: one family at every bit width,
through the stock ``TorchAoConfig``, on CPU and GPU alike (transformers 5.x cannot load with
``HqqConfig``: its HQQ quantizer raises NotImplementedError). Bytes are counted packed: each value
at its bit width, plus the scales and zero points, the unquantized factors and corrections (bf16)
and every other parameter (embeddings, norms, head: bf16, stated apart); torchao's portable format
holds int4/int3 values one per byte in memory. Calibration (recipes and corrections): seeded
blocks of wiki.valid.tokens; test: the whole wiki.test.raw in non-overlapping blocks.

    python benchmarks/quantization.py --json-out quant.json            # GPU machine
    python benchmarks/quantization.py --from-json quant.json            # table, plot, results JSON
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

from hf_wsvd import WSVDConfig, compress
from hf_wsvd.argtypes import non_negative_int, positive_int
from hf_wsvd.config import GROUPED_QUANTIZE_SPECS
from hf_wsvd.data import text_blocks
from hf_wsvd.demo_models import DEMO_MODELS, demo_model
from hf_wsvd.evaluation import perplexity
from hf_wsvd.integrations.quantization import quantization_config, quantize, weight_bits
from hf_wsvd.runtime.factorized_linear import linear_shape
from hf_wsvd.statistics import FISHER_ROWS, GRAM, gradient_statistics, input_statistics
from hf_wsvd.targets import select_targets
from hf_wsvd.tasks import CAUSAL_LM, per_example_loss
from hf_wsvd.cli.workflow import load_model_and_tokenizer
from llm import SHARED, loader
from report import environment, markdown_table, page, publish
from timing import listed, read_fields, read_json, reduction

NAME = "quantization"
PLOT = "quantization.png"


def residual_rank(dense, bits_row: dict, extra: float, multiple: int = 8) -> int:
    """The largest uniform rank (a multiple of ``multiple``) whose bf16 corrections add at most
    ``extra`` of the quantized block linears' bytes."""
    per_rank = sum(sum(linear_shape(dense.get_submodule(f))) for f in select_targets(dense).values()) * 2
    return max(multiple, int(extra * bits_row["block_bytes"] / per_rank) // multiple * multiple)


def measure_model(name: str, args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = str(demo_model(name)) if name in DEMO_MODELS else name
    dense, tokenizer = load_model_and_tokenizer(path, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    blocks = text_blocks(Path(args.calibration).read_text(encoding="utf-8").splitlines(), tokenizer, args.calib_length)
    calibration = loader(blocks[: args.calib_samples], tokenizer, args.batch_size)
    test = text_blocks([Path(args.test).read_text(encoding="utf-8")], tokenizer, args.eval_length)
    test_loader = loader(test[: args.eval_blocks] if args.eval_blocks else test, tokenizer, args.batch_size)
    rows = []

    def row(label: str, kind: str, bits: int | None, reduction: float, model, **extra) -> dict:
        start = time.perf_counter()
        model.to(device)
        counted = weight_bits(model)
        result = {"model": name, "row": label, "kind": kind, "bits": bits, "reduction": reduction,
                  "bits_per_weight": counted.block_bits_per_weight, "block_bytes": (counted.quantized_bits + counted.full_bits) / 8,
                  "other_bytes": counted.other_bits / 8, "total_bytes": counted.total_bytes,
                  "perplexity": perplexity(model, test_loader), "eval_seconds": time.perf_counter() - start, **extra}
        model.to("cpu")
        print(json.dumps(result), flush=True)
        rows.append(result)
        if args.json_out:  # a publishable payload of the rows so far, in case the run is cut off
            Path(args.json_out + ".partial").write_text(json.dumps({**payload(args, rows), "cut_off": True}, indent=2))
        return result

    def quantized(model, bits: int):
        return quantize(model, quantization_config(f"int{bits}", args.group_size), dtype=dtype)

    row("bf16" if dtype == torch.bfloat16 else "float32", "dense", None, 0.0, copy.deepcopy(dense).to(dtype))
    alone = {bits: row(f"int{bits} alone", "quantized", bits, 0.0, quantized(dense, bits)) for bits in args.bits}
    modules = {n: dense.get_submodule(f) for n, f in select_targets(dense).items()}
    dense.to(device)
    stats = gradient_statistics(dense, calibration, modules, {FISHER_ROWS}, per_example_loss(CAUSAL_LM),
                                show_progress=False).merged(input_statistics(dense, calibration, modules, {GRAM},
                                                                             show_progress=False))
    dense.to("cpu")
    for reduction in args.reductions:
        # The recommended recipe; ranks in multiples of the group size, so that every factor quantizes.
        config = WSVDConfig(param_ratio=round(1 - reduction, 4), max_length=args.calib_length,
                            rank_multiple=args.group_size)
        start = time.perf_counter()
        compressed, _ = compress(copy.deepcopy(dense).to(device), config, calibration, statistics=stats,
                                 show_progress=False)
        seconds = time.perf_counter() - start
        compressed.to("cpu").to(dtype)
        row(f"recipe -{reduction:.0%}", "compressed", None, reduction, compressed, compress_seconds=seconds)
        for bits in args.bits:
            row(f"recipe -{reduction:.0%} + int{bits}", "compressed+quantized", bits, reduction, quantized(compressed, bits))
        del compressed
    for bits in args.residual_bits:
        rank = residual_rank(dense, alone[bits], args.residual_extra)
        for steps in args.residual_refine_steps:
            # int8 has one scale per row: a group size is refused for it
            grouped = {"quantize_group_size": args.group_size} if f"int{bits}" in GROUPED_QUANTIZE_SPECS else {}
            config = WSVDConfig(method="quantized_residual", quantize=f"int{bits}", **grouped,
                                residual_rank=rank, max_length=args.calib_length, block_refine_steps=steps)
            start = time.perf_counter()
            model, report = compress(dense.to(device), config, calibration, statistics=stats, show_progress=False,
                                     dtype=dtype)
            dense.to("cpu")
            label = f"int{bits} + correction (rank {rank})" + (f", refined {steps} steps" if steps else "")
            row(label, "residual", bits, 0.0, model, rank=rank, refine_steps=steps, refined=report.refined,
                compress_seconds=time.perf_counter() - start)
            del model
    gc.collect()
    return rows


def payload(args, rows: list[dict]) -> dict:
    return {"environment": environment(), "rows": rows,
            "options": {k: v for k, v in vars(args).items() if k != "from_json"}}


def measure(args) -> dict:
    return payload(args, [r for name in args.models for r in measure_model(name, args)])


KINDS = ("dense", "quantized", "compressed", "compressed+quantized", "residual")


def combined(payloads: list[dict]) -> dict:
    """One payload of several runs: their rows grouped by model and kind, a row measured again (same
    model and label) replaced by the later run's; the runs' commands in order."""
    rows: dict[tuple[str, str], dict] = {}
    for p in payloads:
        rows.update({(r["model"], r["row"]): r for r in p["rows"]})
    models = list(dict.fromkeys(model for model, _ in rows))
    ordered = sorted(rows.values(), key=lambda r: (models.index(r["model"]), KINDS.index(r["kind"])))
    commands = [p["environment"]["command"] + (" (cut off after its last row)" if p.get("cut_off") else "")
                for p in payloads]
    return {**payloads[-1], "rows": ordered, "environment": {**payloads[-1]["environment"], "command": "; ".join(commands)}}


def below_curve(rows: list[dict]) -> list[dict]:
    """Compressed + quantized rows with a lower perplexity than some quantization-only row of the
    same model at no fewer bytes."""
    alone = [r for r in rows if r["kind"] == "quantized"]
    return [r for r in rows if r["kind"] == "compressed+quantized"
            and any(a["model"] == r["model"] and a["total_bytes"] >= r["total_bytes"] and a["perplexity"] > r["perplexity"]
                    for a in alone)]


def gap_recovered(rows: list[dict], fixed: dict) -> float | None:
    """Fraction of the perplexity gap between quantization alone at the bits of the Q + L row
    ``fixed`` and the dense row that it closes."""
    model, bits = fixed["model"], fixed["bits"]
    dense = next(r for r in rows if r["model"] == model and r["kind"] == "dense")
    alone = next((r for r in rows if r["model"] == model and r["kind"] == "quantized" and r["bits"] == bits), None)
    if alone is None or alone["perplexity"] <= dense["perplexity"]:
        return None
    return (alone["perplexity"] - fixed["perplexity"]) / (alone["perplexity"] - dense["perplexity"])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    styles = {"dense": ("k", "*"), "quantized": ("C0", "o"), "compressed": ("C7", "s"),
              "compressed+quantized": ("C1", "^"), "residual": ("C2", "D")}
    for axis, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        curve = sorted((r for r in mine if r["kind"] == "quantized"), key=lambda r: r["total_bytes"])
        axis.plot([r["total_bytes"] / 1e6 for r in curve], [r["perplexity"] for r in curve], "C0-", alpha=0.5)
        for kind, (color, marker) in styles.items():
            points = [r for r in mine if r["kind"] == kind]
            axis.scatter([r["total_bytes"] / 1e6 for r in points], [r["perplexity"] for r in points], c=color,
                         marker=marker, label=kind)
            for r in points:
                axis.annotate(r["row"], (r["total_bytes"] / 1e6, r["perplexity"]), fontsize=6, alpha=0.7)
        axis.set(title=model, xlabel="weights, MB (packed)", ylabel="WikiText-2 perplexity", yscale="log")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def render(payload: dict) -> str:
    rows = payload["rows"]
    dense = {r["model"]: r["perplexity"] for r in rows if r["kind"] == "dense"}
    table = markdown_table(
        ["model", "row", "bits per weight (block linears)", "block linears MB", "other MB", "total MB", "perplexity",
         "× dense"],
        [[r["model"], r["row"], r["bits_per_weight"], r["block_bytes"] / 1e6, r["other_bytes"] / 1e6,
          r["total_bytes"] / 1e6, r["perplexity"], r["perplexity"] / dense[r["model"]]] for r in rows])
    lines = [table, ""]
    below = below_curve(rows)
    lines.append("Below the quantization-only curve (lower perplexity at no more bytes than a quantization-only "
                 "row): " + (", ".join(f"{r['model']} {r['row']}" for r in below) or "none") + ".")
    for fixed in (r for r in rows if r["kind"] == "residual"):
        share = gap_recovered(rows, fixed)
        if share is not None:
            lines.append(f"{fixed['model']}: {fixed['row']} recovers {share:.0%} of the perplexity gap between "
                         f"int{fixed['bits']} alone and the dense model.")
    lines.append(f"\n![weight bytes against perplexity]({PLOT})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=lambda s: [x for x in s.split(",") if x],
                        default=["smollm2-135m", "qwen2.5-coder-0.5b"],
                        help=f"comma-separated: {sorted(DEMO_MODELS)}, folders or .gguf files")
    parser.add_argument("--calibration", default=str(SHARED / "data/wikitext-2/wiki.valid.tokens"))
    parser.add_argument("--test", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"))
    parser.add_argument("--calib-samples", type=positive_int, default=64)
    parser.add_argument("--calib-length", type=positive_int, default=512)
    parser.add_argument("--eval-length", type=positive_int, default=512)
    parser.add_argument("--eval-blocks", type=non_negative_int, default=0, help="0: the whole test file")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--bits", type=lambda s: [positive_int(x) for x in s.split(",") if x], default=[8, 4, 3])
    parser.add_argument("--group-size", type=positive_int, default=64)
    parser.add_argument("--reductions", type=listed(reduction), default=[0.2, 0.4])
    parser.add_argument("--residual-bits", type=lambda s: [positive_int(x) for x in s.split(",") if x], default=[4, 3])
    parser.add_argument("--residual-extra", type=float, default=0.10,
                        help="the corrections' bytes as a fraction of the quantized block linears' (default 0.10)")
    parser.add_argument("--residual-refine-steps", type=lambda s: [non_negative_int(x) for x in s.split(",") if x],
                        default=[0, 64, 256],
                        help="comma-separated block_refine_steps of the Q + L rows, one row each (0: per-layer "
                             "corrections only; default 0,64,256)")
    parser.add_argument("--json-out", help="write the measurements here instead of publishing them")
    parser.add_argument("--from-json", nargs="+",
                        help="publish measurements written by --json-out (several runs: combined, a row measured "
                             "again taken from the later file)")
    args = parser.parse_args()
    if args.from_json:
        measured = read_fields(combined, [read_json(path) for path in args.from_json], NAME)
    else:
        measured = measure(args)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(measured, indent=2))
            print(render(measured))
            return
    plot(measured["rows"], page(NAME).parent / PLOT)
    publish(NAME, measured, read_fields(render, measured, NAME, args.from_json))


if __name__ == "__main__":
    main()
