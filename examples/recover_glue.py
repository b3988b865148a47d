"""Recovery fine-tuning with the stock `transformers.Trainer`.

Compresses the shipped SST-2 MiniLM (`../shared/models/minilm-l6-sst2`, dev accuracy 0.904) at kept
ratio 0.3 with `fisher_whiten` and greedy ranks (the best recipe without retraining), fine-tunes the
factors for one epoch on the SST-2 train split, saves the result (factorized), reloads it with
`AutoModelForSequenceClassification` and reports dev accuracy of the dense, compressed and
recovered models. Comma-separated `--learning-rate` / `--distill` / `--distill-hidden` values train
one copy of the compressed model per combination (compression runs once); `--validation N` holds
out N train examples and selects the best run on them, never on dev.

    python examples/recover_glue.py                           # CPU or GPU, whatever torch sees
    python examples/recover_glue.py --max-steps 20            # a smoke run
    python examples/recover_glue.py --output out/rec --publish    # also write the table into docs/benchmarks/recovery.md
    python examples/recover_glue.py --publish-from out/rec/recovery.json   # publish a run made elsewhere

The TSVs (optionally gzipped) are read with the `csv` module (GLUE: quoting off), so the script
needs neither `datasets` nor `evaluate` nor network access: torch, transformers and accelerate are
enough (a GPU machine). `--distill W` mixes in logit distillation from the dense model,
`--distill-hidden W` hidden-state distillation (mean squared distance of every layer's output).
"""

from __future__ import annotations

import argparse
import copy
import csv
import gzip
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # benchmarks.report, and hf_wsvd from a plain checkout

import hf_wsvd  # noqa: E402
from hf_wsvd.evaluation import classification_metrics, predict  # noqa: E402
from hf_wsvd.solvers import SOLVERS  # noqa: E402


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) rows of a GLUE SST-2 TSV, plain or ``.gz`` (quotes are text, the file may
    start with a BOM)."""
    if not path.exists() and path.with_name(path.name + ".gz").exists():
        path = path.with_name(path.name + ".gz")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:
        rows = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row["sentence"], int(row["label"])) for row in rows]


def encode(tokenizer, rows: list[tuple[str, int]], max_length: int) -> list[dict]:
    encoded = tokenizer([s for s, _ in rows], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows)]


def accuracy(model, dev: list[dict], collator, device) -> float:
    model.to(device)
    loader = DataLoader(dev, batch_size=128, collate_fn=collator)
    return classification_metrics(*predict(model, loader))["accuracy"]


class DistillTrainer(Trainer):
    """The stock Trainer, plus optional distillation from the dense model: ``logits`` × KL(teacher ‖
    student) at temperature 2 (mixed with the task loss) and ``hidden`` × the mean squared distance
    of every layer's hidden states (padding excluded)."""

    def __init__(self, *args, teacher=None, logits: float = 0.0, hidden: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.logits_weight, self.hidden_weight = teacher, logits, hidden

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs, output_hidden_states=self.hidden_weight > 0)
        loss = outputs.loss
        with torch.no_grad():
            teacher = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"},
                                   output_hidden_states=self.hidden_weight > 0)
        if self.logits_weight > 0:
            t = 2.0
            kl = F.kl_div(F.log_softmax(outputs.logits / t, -1), F.softmax(teacher.logits / t, -1),
                          reduction="batchmean") * t * t
            loss = (1 - self.logits_weight) * loss + self.logits_weight * kl
        if self.hidden_weight > 0:
            mask = inputs["attention_mask"].unsqueeze(-1).to(outputs.logits.dtype)
            pairs = list(zip(outputs.hidden_states[1:], teacher.hidden_states[1:]))
            distance = sum(((s - t) ** 2 * mask).sum() / (mask.sum() * s.shape[-1]) for s, t in pairs)
            loss = loss + self.hidden_weight * distance / len(pairs)
        return (loss, outputs) if return_outputs else loss


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", "--model", dest="model_dir", default=str(SHARED / "models" / "minilm-l6-sst2"),
                        help="the dense SST-2 classifier (default: the shipped MiniLM)")
    parser.add_argument("--data-dir", default=str(SHARED / "data" / "glue" / "SST-2"),
                        help="holds train.tsv and dev.tsv (or .tsv.gz)")
    parser.add_argument("--output", default=str(ROOT / "outputs" / "recover-sst2"),
                        help="folder for recovery.json (and the recovered models unless --save-dir)")
    parser.add_argument("--save-dir", help="where the recovered checkpoints go (default: OUTPUT/recovered-*)")
    parser.add_argument("--method", default="fisher_whiten", choices=sorted(SOLVERS))
    parser.add_argument("--param-ratio", type=float, default=0.3, help="fraction of each layer's parameters kept")
    parser.add_argument("--allocation", default="greedy", choices=["uniform", "greedy"],
                        help="ranks: the same kept ratio in every layer, or the greedy allocator at the same budget")
    parser.add_argument("--num-samples", type=int, default=512, help="importance examples (seeded draw from train)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=_floats, default=[1e-4], help="one or more, comma-separated")
    parser.add_argument("--distill", type=_floats, default=[0.0],
                        help="weight(s) of logit distillation from the dense model, comma-separated (0: none)")
    parser.add_argument("--distill-hidden", type=_floats, default=[0.0],
                        help="weight(s) of hidden-state distillation, comma-separated (0: none)")
    parser.add_argument("--validation", type=int, default=0,
                        help="hold out this many seeded train examples, score every run on them and select the "
                             "best there (dev stays untouched by the choice)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (CUDA only; default: float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", help="a sentence recorded with the results and shown under the table")
    parser.add_argument("--publish", action="store_true", help="write the table into docs/benchmarks/recovery.md")
    parser.add_argument("--publish-from", nargs="+",
                        help="only publish the recovery.json of earlier runs (made elsewhere), in one table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.publish_from:
        from benchmarks.report import publish

        payloads = [json.loads(Path(path).read_text()) for path in args.publish_from]
        merged = payloads[0] if len(payloads) == 1 else {
            "environment": {**payloads[-1]["environment"],
                            "command": " ; ".join(p["environment"]["command"] for p in payloads)},
            "runs": payloads}
        publish("recovery", merged, report_table(payloads))
        return payloads

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    collator = DataCollatorWithPadding(tokenizer)
    data_dir = Path(args.data_dir)
    train = encode(tokenizer, read_tsv(data_dir / "train.tsv"), args.max_length)
    held_out_indices = set(random.Random(args.seed + 1).sample(range(len(train)), args.validation))
    validation = [e for i, e in enumerate(train) if i in held_out_indices]
    train = [e for i, e in enumerate(train) if i not in held_out_indices]
    dev = encode(tokenizer, read_tsv(data_dir / "dev.tsv"), args.max_length)

    dense = AutoModelForSequenceClassification.from_pretrained(args.model_dir, dtype=torch.float32)
    dense_accuracy = accuracy(dense, dev, collator, device)
    compressed = copy.deepcopy(dense)
    config = hf_wsvd.WSVDConfig(method=args.method, param_ratio=args.param_ratio, allocation=args.allocation,
                                num_samples=args.num_samples,
                                batch_size=8, max_length=args.max_length, seed=args.seed)
    importance = random.Random(args.seed).sample(train, args.num_samples)
    start = time.perf_counter()
    compressed, report = hf_wsvd.compress(compressed, config, DataLoader(importance, batch_size=8, collate_fn=collator),
                                          show_progress=False)
    compress_seconds = time.perf_counter() - start
    compressed_accuracy = accuracy(compressed, dev, collator, device)
    print(f"dense {dense_accuracy:.4f}  {args.method} ({args.allocation}) at {args.param_ratio}: {compressed_accuracy:.4f} "
          f"({report.params_before:,} -> {report.params_after:,} parameters, {compress_seconds:.1f} s)", flush=True)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "args": {k: v for k, v in vars(args).items() if k not in ("output", "save_dir", "publish", "publish_from",
                                                                   "model_dir", "data_dir", "note")},
        "dense_accuracy": dense_accuracy, "compressed_accuracy": compressed_accuracy,
        "params_before": report.params_before, "params_after": report.params_after,
        "factorized_layers": len(report.ranks), "compress_seconds": compress_seconds, "train_examples": len(train), "validation_examples": len(validation),
        "runs": [],
        **({"note": args.note} if args.note else {}),
    }
    from benchmarks.report import environment as recorded_environment

    environment = recorded_environment()
    for learning_rate, distill, hidden in itertools.product(args.learning_rate, args.distill, args.distill_hidden):
        payload["runs"].append(recover(args, copy.deepcopy(compressed), dense, train, dev, validation, tokenizer,
                                       collator, device, learning_rate, distill, hidden))
        if validation:
            payload["selected"] = max(payload["runs"], key=lambda r: r["validation_accuracy"])["name"]
        payload["seconds_total"] = time.perf_counter() - started
        payload["environment"] = environment
        (output / "recovery.json").write_text(json.dumps(payload, indent=2) + "\n")  # after every run
    if args.publish:
        from benchmarks.report import publish

        publish("recovery", payload, report_table([payload]))
    else:
        print(report_table([payload]))
    return payload


def recover(args, model, dense, train, dev, validation, tokenizer, collator, device, learning_rate: float,
            distill: float, hidden: float) -> dict:
    """Fine-tune one copy of the compressed model, save it, reload it factorized, measure dev (and
    held-out train) accuracy."""
    name = f"lr{learning_rate:g}" + (f"-distill{distill:g}" if distill else "") + (f"-hidden{hidden:g}" if hidden else "")
    save_dir = Path(args.save_dir or Path(args.output) / "recovered") / name
    teacher = dense.to(device).eval() if distill > 0 or hidden > 0 else None
    training = TrainingArguments(
        output_dir=str(save_dir.parent / f".trainer-{name}"), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=learning_rate, warmup_steps=0.06,
        weight_decay=0.01, lr_scheduler_type="linear", logging_steps=100, save_strategy="no", report_to="none",
        seed=args.seed, dataloader_num_workers=0, bf16=args.bf16 and device == "cuda", use_cpu=device == "cpu",
        disable_tqdm=not sys.stderr.isatty(),
    )
    trainer = DistillTrainer(model=model, args=training, train_dataset=train, data_collator=collator,
                             teacher=teacher, logits=distill, hidden=hidden)
    start = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - start
    trainer.save_model(str(save_dir))
    tokenizer.save_pretrained(str(save_dir))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(save_dir), dtype=torch.float32)
    factorized = sum(isinstance(m, hf_wsvd.FactorizedLinear) for m in reloaded.modules())
    recovered_accuracy = accuracy(reloaded, dev, collator, device)
    validation_score = {"validation_accuracy": accuracy(reloaded, validation, collator, device)} if validation else {}
    print(f"{name}: recovered {recovered_accuracy:.4f} after {result.global_step} steps ({train_seconds:.0f} s); "
          f"reloaded with {factorized} factorized layers from {save_dir}", flush=True)
    return {"name": name, "learning_rate": learning_rate, "distill": distill, "distill_hidden": hidden,
            "recovered_accuracy": recovered_accuracy, **validation_score,
            "train_steps": result.global_step, "train_loss": result.training_loss, "train_seconds": train_seconds,
            "reloaded_factorized_layers": factorized,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}


def report_table(payloads: list[dict]) -> str:
    """The table of one or more recovery.json (same dense model and task)."""
    from benchmarks.report import markdown_table

    dense = payloads[0]["dense_accuracy"]
    held_out = any(p.get("validation_examples") for p in payloads)
    extra = ["—"] if held_out else []
    rows = [["dense", 1.0, f"{payloads[0]['params_before']:,}", *extra, dense, 0.0]]
    for payload in payloads:
        a = payload["args"]
        method = f"{a['method']} ({a.get('allocation', 'uniform')} ranks)"
        after = f"{payload['params_after']:,}"
        rows.append([f"{method}, no training", a["param_ratio"], after, *extra, payload["compressed_accuracy"],
                     payload["compressed_accuracy"] - dense])
        for run in payload["runs"]:
            length = f"{run['train_steps']} steps" if a["max_steps"] > 0 else f"{a['epochs']:g} epoch"
            label = f"{method} + {length} Trainer, lr {run['learning_rate']:g}"
            label += f", logit distillation {run['distill']:g}" if run["distill"] else ""
            label += f", hidden-state distillation {run['distill_hidden']:g}" if run.get("distill_hidden") else ""
            label += " **(selected)**" if payload.get("selected") == run["name"] else ""
            rows.append([label, a["param_ratio"], after, *([run.get("validation_accuracy", "—")] if held_out else []),
                         run["recovered_accuracy"], run["recovered_accuracy"] - dense])
    table = markdown_table(["model", "kept ratio", "parameters", *(["held-out train accuracy"] if held_out else []),
                            "SST-2 dev accuracy", "vs dense"], rows)
    payload, a = payloads[0], payloads[0]["args"]
    env, first = payload["environment"], payload["runs"][0]
    minutes = ", ".join(f"{r['train_seconds'] / 60:.1f}" for p in payloads for r in p["runs"])
    steps = " or ".join(dict.fromkeys(str(r["train_steps"]) for p in payloads for r in p["runs"]))
    examples = " or ".join(dict.fromkeys(f"{p['train_examples']:,}" for p in payloads))
    notes = " ".join(dict.fromkeys(p["note"] for p in payloads if p.get("note")))
    selection = (f"the run with the best accuracy on {max(p.get('validation_examples', 0) for p in payloads):,} "
                 "held-out train examples is selected (the choice never sees dev); " if held_out else "")
    return table + (
        f"\n\nFine-tuned on {payload['device']} (torch {env['torch']}, transformers {env['transformers']}), "
        f"{steps} steps of {a['batch_size']} ({examples} examples), "
        f"{'bf16' if a.get('bf16') else 'float32'}, max length {a['max_length']}, linear decay with 6% warm-up, "
        f"{minutes} min per run; importance from {a['num_samples']} train examples; {selection}every recovered "
        f"model was saved and reloaded with `AutoModelForSequenceClassification` "
        f"({first['reloaded_factorized_layers']} factorized layers) before its evaluation." + (f" {notes}" if notes else "")
    )


if __name__ == "__main__":
    main()
