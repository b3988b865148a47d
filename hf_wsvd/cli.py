"""The ``hf-wsvd`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .solvers import SOLVERS

EXAMPLES = """examples:
  hf-wsvd compress ../shared/models/minilm-l6-sst2 out/sst2-fwsvd --method fwsvd \\
      --param-ratio 0.5 --data ../shared/data/glue/SST-2/train.tsv --text-columns sentence \\
      --eval-data ../shared/data/glue/SST-2/dev.tsv
  hf-wsvd inspect out/sst2-fwsvd
  hf-wsvd eval out/sst2-fwsvd --data ../shared/data/glue/SST-2/dev.tsv
  hf-wsvd export out/sst2-fwsvd out/sst2-dense --dense
  hf-wsvd push out/sst2-fwsvd you/minilm-sst2-fwsvd
"""
COMPRESS_EXAMPLES = """examples:
  # a classifier, importance from its train split; the model card gets the dev results
  hf-wsvd compress ../shared/models/minilm-l6-sst2 out/sst2-fwsvd --method fwsvd --param-ratio 0.5 \\
      --data ../shared/data/glue/SST-2/train.tsv --eval-data ../shared/data/glue/SST-2/dev.tsv
  # a causal LM calibrated on plain text (no chat template), block by block
  hf-wsvd compress path/to/model.gguf out/lm-fw --method fisher_whiten --param-ratio 0.8 \\
      --data ../shared/data/wikitext-2/wiki.valid.tokens --num-samples 64 --max-length 256 --sequential
  # no data needed: plain truncated SVD of every block linear
  hf-wsvd compress ../shared/models/minilm-l6-sst2 out/sst2-svd --method svd --param-ratio 0.75
"""
INSPECT_EXAMPLES = """examples:
  hf-wsvd inspect out/sst2-fwsvd
"""


def _speed_limit(text: str) -> float | dict[str, float]:
    """A kept-ratio number, or a JSON file with per-shape limits: the ``by_shape`` of a
    ``benchmarks/layer_speed.py --json-out`` measurement, or a plain {"INxOUT": limit} mapping."""
    if not text.lower().endswith(".json"):
        return _fraction(text, "max kept ratio for speed")
    try:
        payload = json.loads(Path(text).read_text())
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"cannot read per-shape speed limits from {text!r}: {error}")
    table = payload.get("by_shape", payload) if isinstance(payload, dict) else None
    if not isinstance(table, dict) or not table or not all(isinstance(v, (int, float)) for v in table.values()):
        raise argparse.ArgumentTypeError(
            f"{text!r} holds no per-shape limits: expected the JSON written by benchmarks/layer_speed.py "
            "--json-out (one measurement, with 'by_shape') or a {\"INxOUT\": limit} mapping")
    return table


def _fraction(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} {text!r} is not a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{name} {value} is outside (0, 1]: it is a fraction of each layer's parameters kept"
        )
    return value


def _ratio(text: str) -> float:
    return _fraction(text, "param ratio")


def _columns(text: str) -> list[str]:
    return [c for c in text.split(",") if c]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the problem (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .commands import add_card_arguments, add_commands, add_data_arguments

    parser = _Parser(
        prog="hf-wsvd", description="Importance-weighted low-rank compression of transformers models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = commands.add_parser(
        "compress", help="compress a model and save a checkpoint (with its model card)", epilog=COMPRESS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("model", help="model folder, Hub id, or .gguf file (causal LM or sequence classifier)")
    c.add_argument("output", help="folder to write the compressed checkpoint to (must not exist or be empty, or be "
                                  "an earlier hf-wsvd output with --overwrite)")
    c.add_argument("--method", default="fwsvd", choices=sorted(SOLVERS), help="factorization method (default: fwsvd)")
    c.add_argument("--param-ratio", type=_ratio, default=0.5,
                   help="fraction of each target layer's parameters that is KEPT, in (0, 1] (default: 0.5)")
    c.add_argument("--data", help="importance data: TSV/CSV/JSON(L)/text/parquet file or save_to_disk folder (needed by fwsvd)")
    add_data_arguments(c, _columns)
    c.add_argument("--eval-data", help="evaluate the compressed model on this file/folder; results go into the model card")
    c.add_argument("--eval-split", help="split of a --eval-data dataset folder (default: its only split); "
                                        "also the split named in the card (default there: validation)")
    c.add_argument("--repo-id", help="Hub id the model will be pushed to (used in the model card's loading snippets)")
    add_card_arguments(c)
    c.add_argument("--num-samples", type=int, default=512, help="examples used for importance (default: 512)")
    c.add_argument("--batch-size", type=int, default=8, help="importance batch size (default: 8)")
    c.add_argument("--max-length", type=int, default=128, help="token truncation / block length (default: 128)")
    c.add_argument("--fisher-axis", choices=["output", "input"], default="output",
                   help="fwsvd: one weight per output row (default) or per input column")
    c.add_argument("--allocation", choices=["uniform", "greedy"], default="uniform",
                   help="uniform: every layer keeps --param-ratio; greedy: one global budget spent where the "
                        "method's weighted loss falls most per parameter")
    c.add_argument("--sequential", action="store_true",
                   help="causal LMs: compress block by block on the compressed model's own activations "
                        "(one block on the device at a time)")
    c.add_argument("--asvd-alpha", type=float, default=0.5, help="asvd: exponent of the activation scaling")
    c.add_argument("--p", type=float, default=1.0,
                   help="lp method: the exponent p in [1, 2] of Σ_rows dist(row, subspace)^p (default: 1.0; 2 = SVD)")
    c.add_argument("--embeddings", action="store_true",
                   help="also factorize the input embeddings (vocab × r lookup + r → hidden projection); "
                        "with --param-ratio 1 only the embeddings")
    c.add_argument("--embedding-ratio", type=float, default=0.5,
                   help="fraction of the embedding matrix's parameters KEPT, in (0, 1) (default: 0.5)")
    c.add_argument("--embedding-method", choices=["svd", "lp"],
                   help="method for the embeddings (default: --method, which must then be svd or lp)")
    c.add_argument("--embedding-weighting", choices=["uniform", "frequency"], default="uniform",
                   help="lp row weights of the embeddings: uniform, or 1 + token count in --data (default: uniform)")
    c.add_argument("--solver", choices=["als", "adam", "em", "hybrid"], default="hybrid",
                   help="tfwsvd/rescue: element-wise solver, started from fwsvd (default: hybrid = adam then als)")
    c.add_argument("--refine", action="store_true",
                   help="after --method, run the element-wise --solver from its factors on the per-entry Fisher objective")
    c.add_argument("--max-iterations", type=int, default=8, help="tfwsvd/rescue: iterations per matrix (default: 8)")
    c.add_argument("--tolerance", type=float, default=1e-4,
                   help="tfwsvd/rescue: stop when an iteration changes the weighted loss by less than this fraction")
    c.add_argument("--time-budget", type=float, help="tfwsvd/rescue: seconds per matrix (default: none)")
    c.add_argument("--importance-power", type=float, default=1.0,
                   help="tfwsvd/rescue: weight entries by Fisher**POWER, in (0, 1] (default: 1)")
    c.add_argument("--risk-threshold", type=float, default=1e-3,
                   help="rescue: refine the matrices whose FWSVD predicted loss ½ΣF(W−AB)² exceeds this (default: 1e-3)")
    c.add_argument("--target-modules", type=_columns, help="comma-separated module names/suffixes to factorize")
    c.add_argument("--exclude-modules", type=_columns, help="comma-separated module names/suffixes to keep dense")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the saved checkpoint (default: the input checkpoint's)")
    c.add_argument("--rank-multiple", type=int, default=8,
                   help="round ranks down to a multiple of this: GPU kernels want aligned shapes (default: 8; 1 = exact)")
    c.add_argument("--max-kept-ratio-for-speed", type=_speed_limit,
                   help="keep dense every layer whose rank would keep more than this fraction of its weights "
                        "(no faster factorized): a number, or the JSON of benchmarks/layer_speed.py --json-out "
                        "for per-shape limits (default: none)")
    c.add_argument("--device-map", choices=["auto"],
                   help="auto: load the model dispatched by accelerate over every GPU (and CPU memory past them), "
                        "for models larger than one GPU; each block is computed where it lives (default: the "
                        "model in CPU memory, moved to the GPU, or one block at a time with --sequential)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an earlier hf-wsvd output in OUTPUT (atomically, once compression succeeded)")

    i = commands.add_parser("inspect", help="print per-layer ranks and parameter counts of a compressed checkpoint",
                            epilog=INSPECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("path", help="compressed checkpoint folder")
    add_commands(commands, _columns)
    return parser


def _compress(args: argparse.Namespace) -> None:
    from . import compress
    from .config import WSVDConfig
    from .solvers import solver_for
    from .commands import card_evaluation, check_data, write_compress_card
    from .output import check_output, staged_output
    from .statistics import default_accelerator
    from .workflow import data_loader, load_model_and_tokenizer, stored_dtype

    check_output(args.model, args.output, args.overwrite)
    config = WSVDConfig(
        method=args.method, param_ratio=args.param_ratio, target_modules=args.target_modules,
        exclude_modules=args.exclude_modules, fisher_axis=args.fisher_axis, num_samples=args.num_samples,
        allocation=args.allocation, sequential=args.sequential, asvd_alpha=args.asvd_alpha,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, p=args.p,
        embeddings=args.embeddings, embedding_ratio=args.embedding_ratio, embedding_method=args.embedding_method,
        embedding_weighting=args.embedding_weighting, max_kept_ratio_for_speed=args.max_kept_ratio_for_speed,
        rank_multiple=args.rank_multiple,
        solver=args.solver, refine=args.refine, max_iterations=args.max_iterations, tolerance=args.tolerance,
        time_budget=args.time_budget, importance_power=args.importance_power, risk_threshold=args.risk_threshold,
    )
    if solver_for(config).needs and not args.data:
        raise ValueError(f"--method {args.method} needs importance/calibration data: pass --data FILE")
    check_data(args.data)
    check_data(args.eval_data)
    save_dtype = getattr(torch, args.dtype) if args.dtype else stored_dtype(args.model)
    # Statistics and decompositions run in float32 whatever the checkpoint stores.
    placement = {"device_map": args.device_map} if args.device_map else {}
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32, **placement)
    loader = (data_loader(model, tokenizer, args.data, config, args.text_columns, args.label_column, split=args.split)
              if args.data else None)
    # Under torchrun / accelerate launch every process takes its share of the data and ends with
    # the same model; process 0 alone evaluates and writes.
    accelerator = default_accelerator()
    model, report = compress(model, config, loader, accelerator=accelerator,
                             show_progress=accelerator.is_main_process)
    if not accelerator.is_main_process:
        return
    evaluation = card_evaluation(model, tokenizer, args)  # in float32, before the dtype change
    if save_dtype is not None:
        model.to(save_dtype)

    with staged_output(args.output, "compress") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_compress_card(staging, model, args, evaluation, len(loader.dataset) if loader else None)
    print(
        f"compressed {len(report.ranks)} layers with {report.method} ({report.allocation} ranks, {report.pipeline} "
        f"pipeline, kept ratio {report.param_ratio}): "
        f"{report.params_before:,} -> {report.params_after:,} parameters; saved to {args.output}"
    )


def _inspect(args: argparse.Namespace) -> None:
    from .checkpoint import load_factorized, parameter_counts, recipe_of, summarize

    if not os.path.isdir(args.path):
        raise FileNotFoundError(f"checkpoint folder {args.path!r} does not exist")
    model = load_factorized(args.path)
    recipe = recipe_of(model.config)
    rows = summarize(model)
    width = max(len(r.name) for r in rows)
    print(f"method={recipe['method']} param_ratio={recipe['param_ratio']} base={type(model).__name__}")
    print(f"{'module':<{width}}  {'shape':>11}  {'rank':>5}  {'params':>10}  {'dense':>10}")
    for r in rows:
        shape = f"{r.shape[0]}x{r.shape[1]}"
        print(f"{r.name:<{width}}  {shape:>11}  {r.rank:>5}  {r.params:>10,}  {r.dense_params:>10,}")
    now, dense = parameter_counts(model)
    print(f"total parameters: {now:,} (dense {dense:,}, kept {now / dense:.3f})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in model cards
    from .commands import run_eval, run_export, run_heal, run_push

    try:
        {"compress": _compress, "inspect": _inspect, "eval": run_eval, "export": run_export,
         "heal": run_heal, "push": run_push}[args.command](args)
    # FloatingPointError: non-finite factors (a NaN weight); LinAlgError: a decomposition that did
    # not converge (huge weights): both name the layer, so they are input errors, not crashes.
    except (ValueError, OSError, KeyError, FloatingPointError, torch.linalg.LinAlgError, np.linalg.LinAlgError) as error:
        message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
        if isinstance(error, (torch.linalg.LinAlgError, np.linalg.LinAlgError)):
            message = (message.splitlines() or ["?"])[0] + " (a decomposition failed: are some weights huge or non-finite?)"
        print(f"hf-wsvd {args.command}: error: {message.splitlines()[0] if message else type(error).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
