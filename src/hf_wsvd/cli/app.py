"""The ``hf-wsvd`` command line. Parsing imports neither torch nor transformers, so ``--help`` and
argument errors answer at once; the recipe options are generated from ``WSVDConfig``'s fields."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import select
import signal
import sys
import threading
import traceback

from ..argtypes import comma_list, hub_dataset, hub_model_id
from ..config import WSVDConfig
from .output import ENDING_SIGNALS

EXAMPLES = """examples:
  hf-wsvd compress ../shared/models/minilm-l6-sst2 out/sst2-fw --param-ratio 0.5 \\
      --data ../shared/data/glue/SST-2/train.tsv --text-columns sentence \\
      --eval-data ../shared/data/glue/SST-2/dev.tsv
  hf-wsvd inspect out/sst2-fw
  hf-wsvd eval out/sst2-fw --data ../shared/data/glue/SST-2/dev.tsv
  hf-wsvd export out/sst2-fw out/sst2-dense
  hf-wsvd push out/sst2-fw you/minilm-sst2-fw
"""
COMPRESS_EXAMPLES = """examples:
  # a classifier, importance from its train split (labels: fisher_whiten, greedy ranks);
  # prints the dev score before and after, the model card gets the compressed one
  hf-wsvd compress ../shared/models/minilm-l6-sst2 out/sst2-fw --param-ratio 0.5 \\
      --data ../shared/data/glue/SST-2/train.tsv --eval-data ../shared/data/glue/SST-2/dev.tsv
  # a causal LM calibrated on plain text (no chat template): fisher_whiten, greedy, block by block
  hf-wsvd compress path/to/model.gguf out/lm-fw --param-ratio 0.8 \\
      --data ../shared/data/wikitext-2/wiki.valid.tokens --num-samples 64 --max-length 256
  # little text: the model writes as many blocks again (continuations of the real ones) to calibrate on
  hf-wsvd compress path/to/model.gguf out/lm-fw --param-ratio 0.6 --data small.txt --num-samples 64 \\
      --max-length 256 --generated-samples 64 --batch-size 32
  # a chosen recipe; without data only svd (plain truncated SVD of every block linear)
  hf-wsvd compress ../shared/models/minilm-l6-sst2 out/sst2-fwsvd --method fwsvd --allocation uniform \\
      --data ../shared/data/glue/SST-2/train.tsv
  hf-wsvd compress ../shared/models/minilm-l6-sst2 out/sst2-svd --param-ratio 0.75
  # compressed, then saved int4-quantized (torchao, groups of 64; ranks step by 64 so all quantize)
  hf-wsvd compress path/to/model.gguf out/lm-fw-int4 --param-ratio 0.8 --data wiki.valid.tokens \\
      --quantize int4
  # int4 plus a rank-32 correction of its error, weighted like fisher_whiten (LQER/QERA)
  hf-wsvd compress path/to/model.gguf out/lm-int4-qr --method quantized_residual --quantize int4 \\
      --residual-rank 32 --data wiki.valid.tokens
"""
INSPECT_EXAMPLES = """examples:
  hf-wsvd inspect out/sst2-fw
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the problem (``--help`` shows the usage). Options are taken by
    their whole name only: an abbreviation would change meaning the day an option sharing its start
    is added (``--param`` is ``--param-ratio`` until then)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per ``WSVDConfig`` field with command-line metadata: its help, type, choices."""
    group = parser.add_argument_group("recipe", "the WSVDConfig fields (help(hf_wsvd.WSVDConfig) documents the same)")
    for f in _recipe_fields():
        options = dict(f.metadata["cli"])
        if f.default is False:
            options.setdefault("action", "store_true")
        text = f.metadata["help"]
        if f.default is not None and not isinstance(f.default, bool):
            text += f" (default: {f.default})"
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                           help=text.replace("%", "%%"), **options)


def recipe_from_args(args: argparse.Namespace) -> WSVDConfig:
    """The ``WSVDConfig`` of the parsed recipe options; a refused combination's error names them as
    options (``--embedding-method``), not as the fields they set (``embedding_method``)."""
    try:
        return WSVDConfig(**{f.name: getattr(args, f.name) for f in _recipe_fields()})
    except ValueError as error:
        raise ValueError(_as_options(str(error))) from error


def _as_options(message: str) -> str:
    """``message`` with the recipe fields it names as ``field=value`` or after ``set``, ``drop``,
    ``lower`` or ``raise`` written as the options that set them (``sequential=True``:
    ``--sequential``); quoted values (a user's pattern) are left as they are."""
    names = "|".join(sorted((f.name for f in _recipe_fields()), key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.-])({names})=(True|False)\b|(?<![\w.-])({names})(?==)"
                         rf"|(?:(?<=\bset )|(?<=\bdrop )|(?<=\blower )|(?<=\braise ))({names})\b")

    def option(match: re.Match) -> str:
        name = match.group(1) or match.group(3) or match.group(4)
        flag = name.replace("_", "-")
        return f"--{'no-' if match.group(2) == 'False' else ''}{flag}"

    # Odd parts are quoted spans (an apostrophe after a letter opens none): values given, not names.
    parts = re.split(r"((?<!\w)'(?:[^'\\]|\\.)*'|(?<!\w)\"(?:[^\"\\]|\\.)*\")", message)
    written = "".join(part if i % 2 else pattern.sub(option, part) for i, part in enumerate(parts))
    # A message written for both audiences ("max_length=1 (--max-length)") names the option once.
    return re.sub(r"(--(?P<flag>[a-z][\w-]*)=(?:'[^']*'|\"[^\"]*\"|[^\s()]+)) \(--(?P=flag)\)", r"\1", written)


def _recipe_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(WSVDConfig) if f.metadata.get("cli") is not None]


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
        description="Unless --method, --allocation or --sequential say otherwise, the recommended recipe for\n"
                    "the data: fisher_whiten with greedy ranks given labelled data (a classifier's labels, a\n"
                    "causal LM's text; block by block for a causal LM), whiten for unlabelled data, svd without.",
    )
    c.add_argument("model", help="model folder or Hub id (causal LM, sequence-to-sequence LM or sequence classifier), or "
                                 "a causal LM's .gguf file")
    c.add_argument("output", help="folder to write the compressed checkpoint to (must not exist or be empty, or be "
                                  "an earlier hf-wsvd output with --overwrite)")
    c.add_argument("--data", help="importance data: TSV/CSV/JSON(L)/text/parquet file or save_to_disk folder "
                                  "(needed by every method but svd and lp)")
    add_data_arguments(c, comma_list)
    c.add_argument("--eval-data", help="evaluate the dense and the compressed model on this file/folder: both "
                                       "scores are printed, the compressed one goes into the model card (as text; "
                                       "as model-index metadata with --eval-dataset-id)")
    c.add_argument("--eval-dataset-id", type=hub_dataset, metavar="HUB_ID[:CONFIG]",
                   help="the Hub dataset --eval-data comes from (e.g. nyu-mll/glue:sst2): the card's scores then "
                        "become model-index metadata naming it, which the Hub shows as evaluation results")
    c.add_argument("--eval-split", help="split of a --eval-data dataset folder (default: its only split); "
                                        "also the split named in the card (default there: validation)")
    c.add_argument("--repo-id", type=hub_model_id, help="Hub id the model will be pushed to (used in the model card's loading snippets)")
    add_card_arguments(c)
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the saved checkpoint (default: the input checkpoint's)")
    c.add_argument("--device-map", choices=["auto"],
                   help="auto: load the model dispatched by accelerate over every GPU (and CPU memory past them), "
                        "for models larger than one GPU; each block is computed where it lives (default: the "
                        "model in CPU memory, moved to the GPU, or one block at a time with --sequential)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an earlier hf-wsvd output in OUTPUT (atomically, once compression succeeded)")
    add_recipe_arguments(c)

    i = commands.add_parser("inspect", help="print the recipe, base architecture and per-layer ranks of a compressed "
                                            "checkpoint", epilog=INSPECT_EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("path", help="compressed checkpoint folder")
    add_commands(commands, comma_list)
    parser.set_defaults(commands=commands.choices)
    return parser


def _compress(args: argparse.Namespace) -> None:
    import torch

    from .. import compress
    from ..blocks import is_dispatched
    from ..compressor import recipe_targets
    from ..integrations.checkpoint import quantization_summary, structure
    from .commands import card_evaluation, check_data, eval_folder_split, evaluate_path, write_compress_card
    from .output import check_output
    from ..solvers import solver_for
    from ..statistics import default_accelerator
    from .workflow import data_loader, load_model_and_tokenizer, stored_dtype

    with check_output([args.model, args.data, args.eval_data], args.output, args.overwrite) as claim:
        config = recipe_from_args(args)
        if config.method is not None and solver_for(config).needs and not args.data:
            asked = f"--method {config.method}{' --refine' if config.refine else ''}"  # refine needs data too
            raise ValueError(f"{asked} needs importance/calibration data: pass --data FILE")
        if config.generated_samples and not args.data:
            raise ValueError(f"--generated-samples {config.generated_samples} continues blocks of the calibration "
                             "text: pass --data FILE")
        check_data(args.data)
        check_data(args.eval_data, "--eval-data")
        if args.split and not args.data:
            raise ValueError(f"--split {args.split} picks a split of --data's dataset folder: pass --data FOLDER")
        if args.eval_split and not args.eval_data:
            raise ValueError(f"--eval-split {args.eval_split} picks a split of --eval-data's dataset folder: pass "
                             "--eval-data FOLDER")
        if args.eval_dataset_id and not args.eval_data:
            raise ValueError("--eval-dataset-id names the Hub dataset of --eval-data: pass --eval-data FILE too")
        if config.quantize:  # before the model loads (a large one, or a .gguf file, takes a while)
            from ..integrations.quantization import check_format

            check_format(config.quantize, config.quantize_group_size)
        save_dtype = getattr(torch, args.dtype) if args.dtype else stored_dtype(args.model)
        # Statistics and decompositions run in float32 whatever the checkpoint stores.
        placement = {"device_map": args.device_map} if args.device_map else {}
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32, **placement)
        # refused now, not after reading the data and the dense baseline (compress checks them again)
        recipe_targets(model, config)
        if config.quantize:
            from ..integrations.quantization import check_quantizable

            check_quantizable(model, config.quantize, config.quantize_group_size, save_dtype)
        loader = (data_loader(model, tokenizer, args.data, config.calibration, args.text_columns, args.label_column,
                              split=args.split)
                  if args.data else None)
        dense_scores = None
        if args.eval_data:  # the dense baseline, before compress factorizes the model in place
            dense_scores = evaluate_path(model, tokenizer, args.eval_data, args, eval_folder_split(args), None)
        # Under torchrun / accelerate launch every process takes its share of the data and ends with
        # the same model; process 0 alone evaluates and writes.
        accelerator = default_accelerator()
        model, report = compress(model, config, loader, accelerator=accelerator,
                                 show_progress=accelerator.is_main_process,
                                 dtype=save_dtype if config.method == "quantized_residual" else None)
        if not accelerator.is_main_process:
            return
        if config.quantize and config.method != "quantized_residual":
            from ..integrations.quantization import check_quantized, quantization_config, quantize

            # Quantized from the stored dtype, as from_pretrained(OUTPUT, quantization_config=...) would,
            # onto the accelerator (compress gives the model back on the CPU it was loaded on; some
            # formats' kernels are GPU-only, and the evaluation below runs where the model is).
            on_accelerator = accelerator.device.type != "cpu" and not is_dispatched(model)
            placement = {"device_map": {"": str(accelerator.device)}} if on_accelerator else {}
            model = quantize(model.to(save_dtype or model.dtype),
                             quantization_config(config.quantize, config.quantize_group_size), **placement)
            check_quantized(model, config.quantize, config.quantize_group_size)
        evaluation = card_evaluation(model, tokenizer, args)  # before the dtype change (float32 unless quantized)
        if save_dtype is not None and not config.quantize:
            model.to(save_dtype)

        with claim.write("compress") as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            write_compress_card(staging, model, args, evaluation, len(loader.dataset) if loader else None)
    print(compress_summary(report, structure(model), args.output, dense_scores,
                           evaluation.metrics if evaluation else None, quantization_summary(model)))


def kept_ratios(target: float, model: float) -> str:
    """The two kept fractions, each named: of the target layers' parameters (what param_ratio
    budgets) and of the whole model's."""
    return f"target layers kept {target:.3f} of their parameters; whole model kept {model:.3f}"


def compress_summary(report, layers: str, output: str, dense: dict[str, float] | None = None,
                     compressed: dict[str, float] | None = None, quantization: str | None = None) -> str:
    """What ``compress`` did (a ``CompressionReport``): the resolved recipe, what the model holds
    (``layers``: ``structure`` of it), the parameters before and after, the scores before and after,
    the quantization (``quantization_summary``) and the output."""
    if report.dense_targets and report.param_ratio == 1:
        layers += " (--param-ratio 1 keeps them whole)"
    elif report.dense_targets:
        layers += (" (the greedy allocation kept them whole, or factorized they would run no faster)"
                   if report.allocation == "greedy" else " (at their rank they would save nothing or run no faster)")
    lines = [
        f"compressed with {report.method}: {report.allocation} allocation, {report.pipeline} pipeline"
        f"{' (compensated)' if report.compensated else ''}, param_ratio {report.param_ratio}",
        f"  {layers}",
        f"  {kept_ratios(report.target_kept, report.model_kept)} "
        f"(parameters {report.params_before:,} -> {report.params_after:,})",
    ]
    if report.refined:
        from ..integrations.checkpoint import refinement_summary

        lines.append(f"  {refinement_summary(report.refined)}")
    for name, before in (dense or {}).items():
        after = (compressed or {})[name]
        if name == "perplexity":  # a ratio: perplexities multiply
            lines.append(f"  perplexity {before:.2f} -> {after:.2f} (x{after / before:.3f})")
        else:
            lines.append(f"  {name} {before:.4f} -> {after:.4f} ({after - before:+.4f})")
    if quantization:
        lines.append(f"  quantized with {quantization}")
    lines.append(f"  saved to {output}")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> None:
    from ..integrations.checkpoint import (check_checkpoint_folder, load_factorized, parameter_counts,
                                           quantization_summary, recipe_of, refinement_summary, structure,
                                           summarize, target_counts)
    from ..runtime.modeling_wsvd import BASE_TYPE_KEY, CLASS_PREFIX

    check_checkpoint_folder(args.path)
    model = load_factorized(args.path)
    recipe = recipe_of(model.config)
    rows = summarize(model)
    width = max(len(r.name) for r in rows)
    architecture = (model.config.architectures or [type(model).__name__])[0].removeprefix(CLASS_PREFIX)
    print(f"base={architecture} ({getattr(model.config, BASE_TYPE_KEY)})")
    # Recipes saved before allocation/sequential existed were uniform and whole-model; before the
    # pipeline was recorded, sequential named it.
    pipeline = recipe.get("pipeline") or ("sequential" if recipe.get("sequential") else "whole_model")
    print(f"method={recipe['method']} allocation={recipe.get('allocation') or 'uniform'} pipeline={pipeline} "
          f"param_ratio={recipe['param_ratio']}")
    refinement = refinement_summary(recipe.get("refined") or {}, recipe.get("block_refine_steps"),
                                    recipe.get("block_refine_batches", 1))
    if refinement:
        print(f"block refinement: {refinement}")
    print(f"{'module':<{width}}  {'shape':>11}  {'rank':>6}  {'params':>10}  {'dense':>10}")
    for r in rows:
        shape = f"{r.shape[0]}x{r.shape[1]}"
        print(f"{r.name:<{width}}  {shape:>11}  {r.kind:>6}  {r.params:>10,}  {r.dense_params:>10,}")
    now, dense = parameter_counts(model)
    target_now, target_dense = target_counts(model)
    print(structure(model))
    print(f"total parameters: {now:,} (dense {dense:,})")
    print(kept_ratios(target_now / target_dense, now / dense))
    quantization = quantization_summary(model)
    if quantization:
        print(f"quantized with {quantization}")


class _NoticeHandler(logging.Handler):
    """Prints hf_wsvd's warnings (e.g. why the recipe fell back from the recommended one) to the
    current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "model_in_memory", False):  # about a model object the caller holds: none here
            print(f"hf-wsvd: note: {record.getMessage()}", file=sys.stderr)


def _show_notices() -> None:
    # torchao 0.18 under a CPU (or other-CUDA) torch build warns on import that its CUDA kernels do
    # not load, and triggers a torch deprecation warning: noise for every command that loads a model.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logger = logging.getLogger("hf_wsvd")
    if not any(isinstance(handler, _NoticeHandler) for handler in logger.handlers):
        logger.addHandler(_NoticeHandler(logging.WARNING))


def _reader_gone() -> bool:
    """Whether standard output is a pipe or socket whose reading end is closed."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR | select.POLLHUP)  # a pipe's reader gone; a socket's peer
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (captured), no poll (Windows)
        return False


def _other_process_error(error: RuntimeError) -> str | None:
    """The one line for an error another process of a distributed run caused (it failed, or was
    stopped, and its own output says why), else None. Only modules already imported can have raised."""
    passes = sys.modules.get("hf_wsvd.statistics.passes")
    if passes is not None and isinstance(error, passes.OtherProcessFailed):
        return str(error)
    distributed = getattr(sys.modules.get("torch"), "distributed", None)
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return None
    first = (str(error).splitlines() or [type(error).__name__])[0]
    frames = traceback.extract_tb(error.__traceback__)
    # torch's network and timeout errors, and gloo's plain RuntimeError for a peer gone; not a
    # collective called wrongly here (a bug, which keeps its traceback).
    lost = isinstance(error, (distributed.DistNetworkError, distributed.DistStoreError)) or (
        frames and f"{os.sep}torch{os.sep}distributed{os.sep}" in frames[-1].filename
        and re.search(r"peer|connection|timed out|timeout", first, re.IGNORECASE))
    if not lost:
        return None
    return (f"an exchange with the other processes of this run failed ({first}): another process failed or was "
            "stopped, and its own output says why")


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that are the input's fault, reported in one line. FloatingPointError: non-finite
    factors (a NaN weight); LinAlgError: a decomposition that did not converge (huge weights);
    SafetensorError: a weights file that cannot be read (named by the loaders where it is local)."""
    from safetensors import SafetensorError

    return (ValueError, OSError, KeyError, FloatingPointError, SafetensorError, *_linalg_errors())


def _linalg_errors() -> tuple[type[Exception], ...]:
    # Only a module already imported can have raised: looking imports nothing.
    return tuple(sys.modules[name].linalg.LinAlgError for name in ("torch", "numpy") if name in sys.modules)


class _Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a scheduler, ``docker stop``) or SIGHUP (a closed terminal),
    unwound like Ctrl-C so that the run's staging folder is removed and OUTPUT left as it was."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's parser (its usage, "hf-wsvd eval: error:"), not the top one
        args.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in model cards
    unreadable = _not_utf8(args.argv)
    if unreadable:
        parser.error(unreadable)
    # Only the main thread may set a handler; the previous ones come back when main returns. A
    # SIGHUP ignored by the parent (nohup) stays ignored.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {kind: handler for kind in ENDING_SIGNALS if main_thread
                and (handler := signal.getsignal(kind)) is not None
                and not (kind != signal.SIGTERM and handler == signal.SIG_IGN)}
    for kind in previous:
        signal.signal(kind, _terminate)
    try:
        return _run(args)
    except _Terminated as ended:  # before or after the command itself
        with contextlib.suppress(OSError):  # the terminal may be gone
            print(f"hf-wsvd {args.command}: {'terminated' if ended.signum == signal.SIGTERM else 'hung up'}",
                  file=sys.stderr)
        return 128 + ended.signum
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, handler)


def console() -> int:
    """The ``hf-wsvd`` program: :func:`main` on the command line's arguments. Once it has returned the
    process only ends, so Ctrl-C pressed again (after "interrupted") ends it at once, with status 130,
    rather than breaking into the interpreter's exit handlers with tracebacks."""
    try:
        return main()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _exit_interrupted)


def _exit_interrupted(signum: int, frame: object) -> None:
    os._exit(130)


def _not_utf8(argv: list[str]) -> str | None:
    """Why ``argv`` cannot be taken, naming its first argument that holds bytes that are not UTF-8
    (Python keeps them as lone surrogates), or None. The arguments are written into UTF-8 model cards,
    and safetensors and tokenizers take UTF-8 paths only."""
    for position, token in enumerate(argv):
        try:
            token.encode("utf-8")
        except UnicodeEncodeError:
            option = argv[position - 1] if position and argv[position - 1].startswith("-") else "argument"
            return (f"{option} {os.fsencode(token)!r} is not valid UTF-8, which model cards and the weights' and "
                    "tokenizers' libraries need: rename it")
    return None


def _run(args: argparse.Namespace) -> int:
    from .commands import run_eval, run_export, run_heal, run_push

    _show_notices()
    try:
        {"compress": _compress, "inspect": _inspect, "eval": run_eval, "export": run_export,
         "heal": run_heal, "push": run_push}[args.command](args)
        sys.stdout.flush()  # here, not at exit: a reader gone by then is said below, not as a traceback
    except _input_errors() as error:
        if isinstance(error, BrokenPipeError) and _reader_gone():
            # The reader of the output left (``| head``): end quietly, as a program killed by SIGPIPE
            # would, and keep the interpreter's last flush of the unwritten rest from failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
        if isinstance(error, _linalg_errors()):
            message = (message.splitlines() or ["?"])[0] + " (a decomposition failed: are some weights huge or non-finite?)"
        if args.command == "compress":  # the recipe's checks inside compress name fields: said as the options
            message = _as_options(message)
        print(f"hf-wsvd {args.command}: error: {message.splitlines()[0] if message else type(error).__name__}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        said = _other_process_error(error)
        if said is None:
            raise
        print(f"hf-wsvd {args.command}: error: {said}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: check_output left the output as it was (or, mid-swap, finished and said so)
        print(f"hf-wsvd {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
