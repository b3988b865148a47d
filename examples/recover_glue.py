"""Recovery fine-tuning with the stock `transformers.Trainer`.

Compresses the shipped SST-2 MiniLM (`../shared/models/minilm-l6-sst2`, dev accuracy 0.904) at kept
ratio 0.3, fine-tunes the factors for one epoch on the SST-2 train split, saves the result
(factorized), reloads it with `AutoModelForSequenceClassification` and reports dev accuracy of the
dense, compressed and recovered models.

    python examples/recover_glue.py                       # CPU or GPU, whatever torch sees
    python examples/recover_glue.py --max-steps 50        # a timing run
    python examples/recover_glue.py --publish             # also write the README table

The data are read with the `csv` module (GLUE TSVs: quoting off), so the script needs neither
`datasets` nor network access: it runs as is on a GPU machine that has torch, transformers and
accelerate. `--distill W` / `--distill-hidden W` add distillation from the dense model (logits / hidden states).
"""

from __future__ import annotations

import argparse
import csv
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

import hf_wsvd
from hf_wsvd.evaluation import classification_metrics, predict
from hf_wsvd.solvers import SOLVERS

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) rows of a GLUE SST-2 TSV (quotes are text, the file may start with a BOM)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(row["sentence"], int(row["label"])) for row in rows]


def encode(tokenizer, rows: list[tuple[str, int]], max_length: int) -> list[dict]:
    encoded = tokenizer([s for s, _ in rows], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows)]


def accuracy(model, dev: list[dict], collator, device) -> float:
    model.to(device)
    loader = DataLoader(dev, batch_size=64, collate_fn=collator)
    return classification_metrics(*predict(model, loader))["accuracy"]


class DistillTrainer(Trainer):
    """The stock Trainer, plus optional distillation from the dense model: ``logits`` × KL(teacher ‖
    student) at temperature 2 and ``hidden`` × the mean squared distance of every layer's hidden
    states (padding excluded)."""

    def __init__(self, *args, teacher=None, logits: float = 0.0, hidden: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.logits_weight, self.hidden_weight = teacher, logits, hidden

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, output_hidden_states=self.hidden_weight > 0)
        loss = outputs.loss
        if self.teacher is not None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "minilm-l6-sst2"))
    parser.add_argument("--data-dir", default=str(SHARED / "data" / "glue" / "SST-2"), help="holds train.tsv, dev.tsv")
    parser.add_argument("--method", default="fwsvd", choices=sorted(SOLVERS))
    parser.add_argument("--param-ratio", type=float, default=0.3, help="fraction of each layer's parameters kept")
    parser.add_argument("--num-samples", type=int, default=512, help="importance examples")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (timing runs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--distill", type=float, default=0.0, help="weight of logit distillation from the dense model (0: none)")
    parser.add_argument("--distill-hidden", type=float, default=0.0, help="weight of hidden-state distillation (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(ROOT / "outputs" / "recover-sst2"))
    parser.add_argument("--results", help="write the results JSON here (default: OUTPUT/results.json)")
    parser.add_argument("--publish", action="store_true", help="write the table into README.md and benchmarks/RESULTS.md")
    parser.add_argument("--publish-from", help="only publish the results JSON of an earlier run (made elsewhere)")
    args = parser.parse_args()
    if args.publish_from:
        from benchmarks.report import publish

        payload = json.loads(Path(args.publish_from).read_text())
        publish("recovery", payload, report_table(payload))
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    collator = DataCollatorWithPadding(tokenizer)
    data_dir = Path(args.data_dir)
    train_rows, dev_rows = read_tsv(data_dir / "train.tsv"), read_tsv(data_dir / "dev.tsv")
    train, dev = encode(tokenizer, train_rows, args.max_length), encode(tokenizer, dev_rows, args.max_length)

    dense = AutoModelForSequenceClassification.from_pretrained(args.model, dtype=torch.float32)
    dense_accuracy = accuracy(dense, dev, collator, device)
    teacher = dense if args.distill > 0 or args.distill_hidden > 0 else None
    model = AutoModelForSequenceClassification.from_pretrained(args.model, dtype=torch.float32).to(device)
    config = hf_wsvd.WSVDConfig(method=args.method, param_ratio=args.param_ratio, num_samples=args.num_samples,
                                batch_size=8, max_length=args.max_length, seed=args.seed)
    importance = random.Random(args.seed).sample(train, args.num_samples)
    start = time.perf_counter()
    model, report = hf_wsvd.compress(model, config, DataLoader(importance, batch_size=8, collate_fn=collator),
                                     show_progress=False)
    compress_seconds = time.perf_counter() - start
    compressed_accuracy = accuracy(model, dev, collator, device)
    print(f"dense {dense_accuracy:.4f}  compressed {compressed_accuracy:.4f} "
          f"({report.params_before:,} -> {report.params_after:,} parameters)", flush=True)

    training = TrainingArguments(
        output_dir=str(Path(args.output) / "trainer"), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=0.06,
        weight_decay=0.01, lr_scheduler_type="linear", logging_steps=100, save_strategy="no",
        report_to="none", seed=args.seed, dataloader_num_workers=0, disable_tqdm=not sys.stderr.isatty(),
    )
    trainer = DistillTrainer(model=model, args=training, train_dataset=train, data_collator=collator,
                             teacher=teacher.to(device).eval() if teacher else None, logits=args.distill,
                             hidden=args.distill_hidden)
    start = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - start
    final_dir = Path(args.output) / "recovered"
    trainer.save_model(str(final_dir))
    tokenizer.save_pretrained(str(final_dir))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(final_dir))
    factorized = sum(isinstance(m, hf_wsvd.FactorizedLinear) for m in reloaded.modules())
    recovered_accuracy = accuracy(reloaded, dev, collator, device)
    print(f"recovered {recovered_accuracy:.4f} after {result.global_step} steps ({train_seconds:.0f} s); "
          f"reloaded with {factorized} factorized layers from {final_dir}", flush=True)

    from benchmarks.report import environment, publish

    payload = {
        "environment": environment(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "args": vars(args) | {"output": None, "results": None, "publish_from": None},
        "dense_accuracy": dense_accuracy, "compressed_accuracy": compressed_accuracy,
        "recovered_accuracy": recovered_accuracy, "params_before": report.params_before,
        "params_after": report.params_after, "train_steps": result.global_step, "train_loss": result.training_loss,
        "seconds": {"compress": compress_seconds, "train": train_seconds, "total": time.perf_counter() - started},
        "reloaded_factorized_layers": factorized,
    }
    results = Path(args.results or Path(args.output) / "results.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(payload, indent=2) + "\n")
    if args.publish:
        publish("recovery", payload, report_table(payload))
    else:
        print(report_table(payload))


def report_table(payload: dict) -> str:
    """The README table of one run's results JSON."""
    from benchmarks.report import markdown_table

    a = payload["args"]
    dense = payload["dense_accuracy"]
    rows = [
        ["dense", 1.0, payload["params_before"], dense, 0.0],
        [f"{a['method']}, no training", a["param_ratio"], payload["params_after"], payload["compressed_accuracy"],
         payload["compressed_accuracy"] - dense],
        [f"{a['method']} + {a['epochs']:g} epoch Trainer", a["param_ratio"], payload["params_after"],
         payload["recovered_accuracy"], payload["recovered_accuracy"] - dense],
    ]
    table = markdown_table(["model", "kept ratio", "parameters", "SST-2 dev accuracy", "vs dense"], rows)
    extras = [f"logit distillation {a['distill']:g}" if a.get("distill") else "",
              f"hidden-state distillation {a['distill_hidden']:g}" if a.get("distill_hidden") else ""]
    return table + (
        f"\n\nFine-tuned on {payload['device']} ({payload['environment']['torch']}, transformers "
        f"{payload['environment']['transformers']}) in {payload['seconds']['train'] / 60:.1f} min: "
        f"{payload['train_steps']} steps of {a['batch_size']}, lr {a['learning_rate']:g}, max length {a['max_length']}"
        + "".join(f", {e}" for e in extras if e) + f"; {payload['reloaded_factorized_layers']} factorized layers "
        "after reloading the saved model."
    )

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
