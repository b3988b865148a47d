"""The ``eval``, ``export`` and ``push`` commands of ``hf-wsvd`` (registered by ``cli.build_parser``),
and the model-card step of ``compress``."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time

from ..argtypes import hub_model_id, non_negative_int, positive_int

EVAL_EXAMPLES = """examples:
  hf-wsvd eval out/sst2-fwsvd --data ../shared/data/glue/SST-2/dev.tsv --text-columns sentence
  hf-wsvd eval out/smollm2-fwsvd --data ../shared/data/wikitext-2-raw/wiki.test.raw --max-length 256
  hf-wsvd eval out/sst2-fwsvd --data glue_sst2_disk --split validation   # a save_to_disk folder
"""
EXPORT_EXAMPLES = """examples:
  hf-wsvd export out/sst2-fwsvd out/sst2-fwsvd-dense
  python -c "from transformers import AutoModelForSequenceClassification as A; A.from_pretrained('out/sst2-fwsvd-dense')"
"""
HEAL_EXAMPLES = """examples:
  hf-wsvd heal out/lm-fw out/lm-fw-healed --teacher path/to/model.gguf \\
      --data ../shared/data/wikitext-2/wiki.valid.tokens --steps 300
  hf-wsvd heal out/lm-fw out/lm-fw-healed --teacher path/to/model --data train.txt --lora-rank 16
  # on a GPU, with little text: SmolLM2-135M at -40% went from 2.07x to 1.39x the dense perplexity in 7 min
  hf-wsvd heal out/lm-fw out/lm-fw-healed --teacher path/to/model.gguf --data wiki.valid.tokens \\
      --steps 1000 --batch-size 32 --learning-rate 3e-4 --hidden-weight 1 \\
      --teacher-samples 2048 --teacher-batch-size 512
"""
PUSH_EXAMPLES = """examples:
  hf-wsvd push out/sst2-fwsvd you/minilm-sst2-fwsvd          # uses your saved Hub token
  hf-wsvd push out/sst2-fwsvd you/minilm-sst2-fwsvd --private --token hf_...
"""


def _formatter() -> dict:
    return {"formatter_class": argparse.RawDescriptionHelpFormatter}


def add_data_arguments(parser: argparse.ArgumentParser, columns, labels: bool = True) -> None:
    """--split, --text-columns (and, with ``labels``, --label-column) shared by the commands that read data."""
    parser.add_argument("--split", help="split of a save_to_disk DatasetDict folder (default: its only split)")
    parser.add_argument("--text-columns", type=columns, help="comma-separated text column(s) (default: the first text column; "
                        "for a classifier, the data's two text columns if it has exactly two: a sentence pair)")
    if labels:
        parser.add_argument("--label-column", help="label column for classifiers (default: 'label'), target text column "
                            "for sequence-to-sequence LMs (default: 'target'); none for causal LMs")


def _hub_model_id(text: str) -> str:
    """An argparse type: a Hub model id (``user/name``), never a local path."""
    from ..integrations.card import hub_id

    if hub_id(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub model id (user/name)")
    return text


def add_card_arguments(parser: argparse.ArgumentParser) -> None:
    """``compress``'s model-card options beyond --repo-id and --eval-data."""
    parser.add_argument("--base-model", type=_hub_model_id,
                        help="Hub id of the dense model, recorded as the card's base_model when MODEL is a local "
                             "copy (default: MODEL, or the _name_or_path its config records, if a Hub id; else none)")


def add_commands(commands, columns) -> None:
    """Register ``eval``, ``export`` and ``push`` on the ``hf-wsvd`` subparsers."""
    e = commands.add_parser("eval", help="task metrics (or perplexity) of a model on a data file", epilog=EVAL_EXAMPLES,
                            description="Accuracy, F1 and MCC for classifiers, Pearson/Spearman for regressors, "
                                        "perplexity for causal LMs (of the target text for sequence-to-sequence LMs); "
                                        "prints one JSON object.", **_formatter())
    e.add_argument("path", help="model folder (compressed or dense), Hub id, or .gguf file (evaluated dense: a "
                                "baseline for compress)")
    e.add_argument("--tokenizer", help="folder or Hub id of the tokenizer (default: the model's own)")
    e.add_argument("--data", required=True, help="TSV/CSV/JSON(L)/text/parquet file or save_to_disk folder")
    add_data_arguments(e, columns)
    e.add_argument("--max-length", type=positive_int, default=128, help="token truncation / block length (default: 128)")
    e.add_argument("--batch-size", type=positive_int, default=32, help="evaluation batch size (default: 32)")
    e.add_argument("--num-samples", type=positive_int, help="evaluate the first N rows/blocks only (default: all)")

    x = commands.add_parser("export", help="merge the factors back into a stock dense checkpoint", epilog=EXPORT_EXAMPLES,
                            description="Writes a checkpoint of the base architecture (stock model_type, no "
                                        "custom code) that stock transformers loads with the same outputs.",
                            **_formatter())
    x.add_argument("path", help="compressed checkpoint folder")
    x.add_argument("output", help="folder to write the dense checkpoint to (must not exist or be empty, or be an "
                                  "earlier hf-wsvd output with --overwrite)")
    x.add_argument("--dense", action="store_true", help="a dense checkpoint: the only format, accepted for older "
                                                        "command lines")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an earlier hf-wsvd output in OUTPUT (atomically, once the export succeeded)")

    h = commands.add_parser("heal", help="distill a compressed causal LM toward its dense teacher (short training)",
                            epilog=HEAL_EXAMPLES, description="KL distillation of the logits with the stock Trainer: "
                            "the compressed layers train (factors and pruned MLP linears, or LoRA adapters on them, merged "
                            "exactly); the output is an ordinary compressed checkpoint with its card updated.", **_formatter())
    h.add_argument("path", help="compressed checkpoint folder (written by hf-wsvd compress)")
    h.add_argument("output", help="folder to write the healed checkpoint to (must not exist or be empty, or be an "
                                  "earlier hf-wsvd output with --overwrite)")
    h.add_argument("--teacher", required=True, help="the dense model it was compressed from: folder, Hub id or .gguf")
    h.add_argument("--data", required=True, help="text to distill on, e.g. the calibration text: a plain text file "
                   "(its lines), or a TSV/CSV/JSON(L)/parquet file or save_to_disk folder (its text column, as compress reads it)")
    add_data_arguments(h, columns, labels=False)
    h.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default: 200)")
    h.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate, cosine decay (default: 1e-4)")
    h.add_argument("--lora-rank", type=positive_int, help="train LoRA adapters of this rank on the factors instead "
                                                          "of the factors themselves (merged into them at the end)")
    h.add_argument("--hidden-weight", type=float, default=0.0,
                   help="add this weight times the MSE of the last hidden states to the logit KL (default: 0)")
    h.add_argument("--teacher-samples", type=non_negative_int, default=0, metavar="N",
                   help="add N blocks written by the teacher (continuations of --data's blocks) to the training text: "
                        "more varied text when --data is small (default: 0)")
    h.add_argument("--teacher-batch-size", type=positive_int, default=64,
                   help="blocks the teacher writes at once (default: 64; larger is faster on a GPU)")
    h.add_argument("--batch-size", type=positive_int, default=8, help="blocks per step (default: 8)")
    h.add_argument("--max-length", type=positive_int, default=512, help="tokens per block (default: 512)")
    h.add_argument("--heldout-blocks", type=positive_int, default=16,
                   help="blocks of --data held out to measure the loss and perplexity before/after (default: 16)")
    h.add_argument("--evaluations", type=non_negative_int, default=10,
                   help="measure the held-out loss this many times during training and keep the weights where it "
                        "was lowest (default: 10; 0: the last step's)")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--overwrite", action="store_true",
                   help="replace an earlier hf-wsvd output in OUTPUT (atomically, once healing succeeded)")

    p = commands.add_parser("push", help="upload a compressed checkpoint folder and its model card to the Hub",
                            epilog=PUSH_EXAMPLES, **_formatter())
    p.add_argument("path", help="compressed checkpoint folder written by hf-wsvd compress (with README.md)")
    p.add_argument("repo_id", type=hub_model_id, help="Hub repository, e.g. you/model-fwsvd (created if missing)")
    p.add_argument("--private", action="store_true",
                   help="create the repository private (an existing public repository is refused)")
    p.add_argument("--token", help="Hub token (default: the saved login)")
    p.add_argument("--commit-message", help="commit message")


def evaluate_path(model, tokenizer, data, args: argparse.Namespace, split: str | None, num_samples: int | None) -> dict:
    """Task metrics of ``model`` on ``data`` (file, folder or Dataset), all rows in file order,
    with the column, length and batch options of ``args``."""
    from ..config import CalibrationConfig
    from ..evaluation import evaluate_model
    from .workflow import data_loader

    config = CalibrationConfig(max_length=args.max_length, batch_size=args.batch_size)
    loader = data_loader(model, tokenizer, data, config, args.text_columns, args.label_column,
                         num_samples=num_samples, shuffle=False, split=split)
    return evaluate_model(model, loader, show_progress=True)


def check_data(path: str | None, flag: str = "--data") -> None:
    """Raise unless ``path`` (given with ``flag``; None: not given) is a file or folder."""
    if path is not None and not path.strip():
        raise ValueError(f"{flag} {path!r} names no file: name a data file or dataset folder, or leave {flag} out")
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r}: data file or folder {path!r} does not exist")
    if path and not (os.path.isfile(path) or os.path.isdir(path)):
        raise ValueError(f"data {path!r} is neither a file nor a folder (a device or a pipe): name a data file or "
                         "dataset folder")


def run_eval(args: argparse.Namespace) -> None:
    from .workflow import load_dtype, load_model_and_tokenizer

    check_data(args.data)
    # As compress loads its input: the same sources (folder, Hub id, .gguf), in float32 (a quantized
    # checkpoint in its own dtype).
    model, tokenizer = load_model_and_tokenizer(args.path, args.tokenizer, "--tokenizer", dtype=load_dtype(args.path))
    metrics = evaluate_path(model, tokenizer, args.data, args, args.split, args.num_samples)
    print(json.dumps({"model": args.path, "data": args.data, **metrics}, indent=2))


def run_export(args: argparse.Namespace) -> None:
    from ..integrations.checkpoint import check_checkpoint_folder
    from ..integrations.export import export_dense
    from .output import check_output

    check_checkpoint_folder(args.path)
    with check_output(args.path, args.output, args.overwrite) as claim, claim.write("export") as staging:
        model = export_dense(args.path, staging)
    print(f"exported {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"model_type={model.config.model_type}) to {args.output}")


def run_push(args: argparse.Namespace) -> None:
    from ..integrations.hub import check_folder, push

    skipped = check_folder(args.path).skipped
    if skipped:
        print(f"not uploading {', '.join(skipped)}: not checkpoint files")
    try:
        url = push(args.path, args.repo_id, private=args.private or None, commit_message=args.commit_message,
                   token=args.token)
    except Exception as error:  # the HTTP client's connection errors are not OSErrors (its HTTP errors are)
        if not type(error).__module__.startswith("httpx") and not isinstance(error, (ConnectionError, TimeoutError)):
            raise
        raise OSError(f"cannot reach the Hub to push {args.path!r} ({type(error).__name__}: {error})") from error
    print(f"pushed {args.path} to {args.repo_id}: {url}")


def eval_folder_split(args: argparse.Namespace) -> str | None:
    """``compress --eval-split``: the split to read where ``--eval-data`` is a dataset folder; of a
    file it is only the split the card names."""
    return args.eval_split if os.path.isdir(args.eval_data) else None


def card_evaluation(model, tokenizer, args: argparse.Namespace):
    """``compress --eval-data``: the compressed model's metrics for its card (None without it),
    named after the Hub dataset of ``--eval-dataset-id`` when given (then ``model-index`` metadata)."""
    from ..integrations.card import Evaluation

    if not getattr(args, "eval_data", None):
        return None
    metrics = evaluate_path(model, tokenizer, args.eval_data, args, eval_folder_split(args), None)
    hub_id, config = getattr(args, "eval_dataset_id", None) or (None, None)
    name = f"{hub_id} {config}" if config else hub_id
    return Evaluation(dataset=name or os.path.basename(os.path.normpath(args.eval_data)), metrics=metrics,
                      split=args.eval_split or "validation", dataset_type=hub_id, dataset_config=config)


def card_command(args: argparse.Namespace) -> str:
    """The command that made a checkpoint, as its card shows it: a path outside the working folder
    (absolute, from ``~`` or ``..``) by its last part, since a card is published with the model and
    the folders of the machine it was made on are nobody else's business."""
    return "hf-wsvd " + shlex.join(_shown(a) for a in getattr(args, "argv", None) or [])


def _shown(argument: str) -> str:
    option, equals, value = argument.partition("=") if argument.startswith("--") else ("", "", argument)
    return option + equals + shown_path(value)


def shown_path(path: str) -> str:
    """``path`` as a model card shows it (see :func:`card_command`)."""
    outside = os.path.isabs(path) or path.startswith("~") or os.path.normpath(path).split(os.sep)[0] == ".."
    return os.path.basename(os.path.normpath(path)) or path if outside else path


def write_compress_card(folder: str, model, args: argparse.Namespace, evaluation=None,
                        importance_examples: int | None = None) -> None:
    """After ``compress``: write README.md (recipe, ranks, ``evaluation``, the command, the number
    of importance examples used) and the rank plot into ``folder``."""
    from ..integrations.card import write_card

    write_card(folder, model, base_model=args.model, command=card_command(args), importance_data=args.data,
               evaluation=evaluation, repo_id=getattr(args, "repo_id", None), importance_examples=importance_examples,
               base_model_hub_id=getattr(args, "base_model", None))


def run_heal(args: argparse.Namespace) -> None:
    import random
    from pathlib import Path

    import torch

    from ..integrations.card import add_healing, load_card
    from ..integrations.checkpoint import check_checkpoint_folder
    from ..data import check_block_length, check_fits, make_dataloader, read_texts, teacher_samples, text_blocks
    from ..evaluation import perplexity
    from ..integrations.healing import (HealConfig, check_student, check_teacher, check_teacher_config, heal,
                                        is_causal_lm_config)
    from .output import check_output
    from ..runtime.modeling_wsvd import MODEL_TYPE
    from ..tasks import CAUSAL_LM
    from .workflow import load_model_and_tokenizer, stored_config

    check_checkpoint_folder(args.path)
    check_data(args.data)
    check_block_length(args.max_length)
    stored = stored_config(args.path)  # what it is, said before the data is read and two models load
    if stored.model_type != MODEL_TYPE:
        raise ValueError(f"{args.path!r} is a dense checkpoint (model_type {stored.model_type!r}): heal trains a model "
                         "compressed by hf-wsvd compress toward its dense teacher")
    if stored.architectures and not is_causal_lm_config(stored):
        raise ValueError(f"heal works on causal LMs; {stored.architectures[0]} is not one")
    texts = read_texts(args.data, f"--data {args.data!r}", args.text_columns, args.split)  # before any model loads
    if (Path(args.path) / "README.md").is_file():  # the healed card extends it: read now, not after training
        load_card(Path(args.path) / "README.md")
    # The teacher is an input too: OUTPUT may not be, contain or lie inside it.
    with check_output([args.path, args.teacher, args.data], args.output, args.overwrite) as claim:
        claim.check_writer("heal")  # before two models load and train
        config = HealConfig(steps=args.steps, learning_rate=args.learning_rate, batch_size=args.batch_size,
                            lora_rank=args.lora_rank, hidden_weight=args.hidden_weight, seed=args.seed,
                            evaluations=args.evaluations)
        student, tokenizer = load_model_and_tokenizer(args.path, dtype=torch.float32)
        check_student(student)
        # its config first: a teacher of another architecture or task is refused before its weights load
        teacher_config = stored_config(args.teacher)
        check_teacher_config(student.config, teacher_config, f"--teacher {args.teacher!r}")
        if teacher_config.architectures and not is_causal_lm_config(teacher_config):  # as check_teacher says
            raise ValueError(f"--teacher {args.teacher!r} is a {teacher_config.architectures[0]}, not a causal LM: the "
                             "teacher must be the dense model the student was compressed from")
        teacher, teacher_tokenizer = load_model_and_tokenizer(args.teacher, dtype=torch.float32)
        check_teacher(student, teacher, f"--teacher {args.teacher!r}")
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():  # distilled toward other tokens' logits
            raise ValueError(f"--teacher {args.teacher!r} has another tokenizer than {args.path!r} (its vocabulary "
                             "maps tokens to other ids): the teacher must be the dense model it was compressed from")
        blocks = text_blocks(texts, tokenizer, args.max_length, f"--data {args.data!r}")
        for model in (student, teacher):
            check_fits(model, [block["input_ids"] for block in blocks], args.max_length)
        random.Random(args.seed).shuffle(blocks)
        if len(blocks) <= args.heldout_blocks:
            raise ValueError(f"--data {args.data!r} holds {len(blocks)} blocks of {args.max_length} tokens: more than "
                             f"--heldout-blocks {args.heldout_blocks} are needed (lower either, or give more text)")
        heldout, train = blocks[: args.heldout_blocks], blocks[args.heldout_blocks:]
        heldout_loader = make_dataloader(heldout, tokenizer, CAUSAL_LM, args.batch_size)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        before = perplexity(student.to(device), heldout_loader, show_progress=True)
        start = time.perf_counter()
        written = teacher_samples(teacher.to(device), train, args.teacher_samples, batch_size=args.teacher_batch_size,
                                  seed=args.seed)
        writing = time.perf_counter() - start
        student, report = heal(student, teacher, train + written, heldout, config)
        after = perplexity(student, heldout_loader, show_progress=True)
        dense = perplexity(teacher, heldout_loader, show_progress=True)
        save_dtype = stored.dtype  # the dtype the checkpoint records
        if save_dtype is not None:
            student.to(save_dtype)
        earlier = (f" (the weights of step {report.best_step}, where the held-out loss was lowest)"
                   if report.kept and report.best_step < args.steps else "")
        summary = ("" if report.kept else "healing did not help, the compressed weights are kept: ") + (
            f"healed {args.steps} steps{earlier} on {len(train)} blocks of {args.max_length} tokens of "
            f"`{shown_path(args.data)}`"
            + (f" and {len(written)} written by the teacher" if written else "")
            + f" ({'LoRA rank ' + str(args.lora_rank) + ', merged' if args.lora_rank else 'factors trained'}, "
            f"learning rate {args.learning_rate:g}, batch {args.batch_size}, "
            f"{(writing + report.seconds) / 60:.1f} min); held-out perplexity "
            f"{before:.2f} -> {after:.2f} (dense teacher {dense:.2f}); distillation KL {report.kl_before:.4f} -> "
            f"{report.kl_after:.4f}")
        with claim.write("heal") as staging:
            student.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            add_healing(args.path, staging, summary, card_command(args))
    print(f"{summary}; saved to {args.output}")
