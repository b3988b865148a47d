"""Recovery fine-tuning with the stock transformers.Trainer: the factors train, checkpoints reload
factorized."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

import tiny
from hf_wsvd import FactorizedLinear

SENTENCES = ["the movie was great", "awful plot", "really good story", "bad actor", "not a good film",
             "very fine film", "the story is awful", "good"]


def _dataset(tokenizer) -> list[dict]:
    rows = [(s, int(any(w in s for w in ("great", "good", "fine")) and "not" not in s)) for s in SENTENCES] * 4
    encoded = tokenizer([s for s, _ in rows])
    return [{"input_ids": i, "attention_mask": m, "labels": label}
            for i, m, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows)]


def test_trainer_fine_tunes_factors_and_checkpoints_reload_factorized(tmp_path, tokenizer):
    model, report = tiny.compressed("bert")
    layer = model.bert.encoder.layer[0].attention.self.query
    before = {"up": layer.up.weight.detach().clone(), "down": layer.down.weight.detach().clone()}
    assert all(p.requires_grad for p in layer.parameters())

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, per_device_train_batch_size=8,
        learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(tokenizer),
                      data_collator=DataCollatorWithPadding(tokenizer))
    result = trainer.train()

    assert result.global_step == 4 and math.isfinite(result.training_loss)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert not torch.equal(layer.up.weight, before["up"]) and not torch.equal(layer.down.weight, before["down"])
    assert layer.rank == report.ranks["encoder.layer.0.attention.self.query"]  # training never changes ranks

    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "modeling_wsvd.py").exists() and (checkpoint / "optimizer.pt").exists()
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint)
    factorized = {n: m.rank for n, m in reloaded.named_modules() if isinstance(m, FactorizedLinear)}
    assert len(factorized) == 12
    inputs = tiny.inputs("bert")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-6)
    # An intermediate checkpoint holds the intermediate factors, not the initial ones.
    middle = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "checkpoint-2")
    up = middle.bert.encoder.layer[0].attention.self.query.up.weight
    assert not torch.equal(up, before["up"]) and not torch.equal(up, layer.up.weight)


def test_trainer_resumes_from_a_factorized_checkpoint(tmp_path, tokenizer):
    model, _ = tiny.compressed("bert")
    args = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, learning_rate=1e-2,
                report_to="none", use_cpu=True, disable_tqdm=True, seed=0, save_steps=2)
    data, collator = _dataset(tokenizer), DataCollatorWithPadding(tokenizer)
    Trainer(model=model, args=TrainingArguments(max_steps=2, **args), train_dataset=data, data_collator=collator).train()
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "checkpoint-2")
    trainer = Trainer(model=fresh, args=TrainingArguments(max_steps=4, **args), train_dataset=data, data_collator=collator)
    result = trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert result.global_step == 4
    assert sum(isinstance(m, FactorizedLinear) for m in trainer.model.modules()) == 12


def test_trainer_on_a_causal_lm(tmp_path, tokenizer):
    model, _ = tiny.compressed("llama")
    ids = tokenizer(SENTENCES)["input_ids"]
    data = [{"input_ids": i, "labels": i} for i in ids]
    trainer = Trainer(model=model, train_dataset=data,
                      data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True),
                      args=TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                             report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no"))
    assert math.isfinite(trainer.train().training_loss)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert sum(isinstance(m, FactorizedLinear) for m in reloaded.modules()) > 0


def test_the_recovery_example_runs_without_datasets(tmp_path, tokenizer, monkeypatch):
    """examples/recover_glue.py end to end on a tiny classifier and gzipped TSVs, with `datasets`
    and `evaluate` unimportable (as on the GPU machine): compress, train, save, reload, report."""
    import gzip
    import importlib.util
    import json
    import sys
    from pathlib import Path

    model_dir, data_dir = tmp_path / "model", tmp_path / "SST-2"
    tiny.save(tiny.build("bert"), model_dir)
    data_dir.mkdir()
    rows = "".join(f"{s}\t{int('good' in s or 'great' in s or 'fine' in s)}\n" for s in SENTENCES * 3)
    with gzip.open(data_dir / "train.tsv.gz", "wt") as handle:
        handle.write('sentence\tlabel\n"quoted" start\t0\n' + rows)
    (data_dir / "dev.tsv").write_text("sentence\tlabel\n" + rows)

    for name in ("datasets", "evaluate"):
        monkeypatch.setitem(sys.modules, name, None)
    path = Path(__file__).resolve().parent.parent / "examples" / "recover_glue.py"
    spec = importlib.util.spec_from_file_location("recover_glue", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.read_tsv(data_dir / "train.tsv")[0] == ('"quoted" start', 0)  # finds the .gz, keeps quotes

    payload = example.main(["--model-dir", str(model_dir), "--data-dir", str(data_dir), "--output", str(tmp_path / "out"),
                            "--method", "fwsvd", "--num-samples", "8", "--max-steps", "2", "--batch-size", "4",
                            # 0.5: the default 0.3 is below rank 8 (the rank multiple) in every 32-wide layer
                            "--param-ratio", "0.5",
                            "--max-length", "16", "--distill", "0,0.5", "--distill-hidden", "0,1", "--validation", "6",
                            "--note", "tiny test."])
    saved = json.loads((tmp_path / "out" / "recovery.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(payload["runs"])) and len(saved["runs"]) == 4
    names = ["lr0.0001", "lr0.0001-hidden1", "lr0.0001-distill0.5", "lr0.0001-distill0.5-hidden1"]
    assert [r["name"] for r in saved["runs"]] == names
    assert saved["validation_examples"] == 6 and saved["train_examples"] == 3 * len(SENTENCES) + 1 - 6
    best = max(r["validation_accuracy"] for r in saved["runs"])
    assert saved["selected"] in names and saved["runs"][names.index(saved["selected"])]["validation_accuracy"] == best
    factorized = saved["factorized_layers"]  # greedy allocation may keep some of the 12 dense
    assert 0 < factorized <= 12
    assert all(r["train_steps"] == 2 and r["reloaded_factorized_layers"] == factorized for r in saved["runs"])
    assert 0 <= saved["compressed_accuracy"] <= 1 and saved["params_after"] < saved["params_before"]
    for run in saved["runs"]:
        reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "recovered" / run["name"])
        assert sum(isinstance(m, FactorizedLinear) for m in reloaded.modules()) == factorized
    table = example.report_table([saved])
    assert "fwsvd (greedy ranks) + 2 steps Trainer, lr 0.0001, logit distillation 0.5, hidden-state distillation 1" in table
    assert "held-out train accuracy" in table and table.count("**(selected)**") == 1
    assert table.endswith("tiny test.")
    uniform = {**saved, "args": {k: v for k, v in saved["args"].items() if k != "allocation"}, "selected": None}
    both = example.report_table([uniform, saved])
    assert both.count("| dense |") == 1 and "fwsvd (uniform ranks), no training" in both
    assert "fwsvd (greedy ranks), no training" in both
