"""Metrics (numpy, local evaluate modules offline), evaluation by task, data from Datasets and
save_to_disk folders, and `hf-wsvd eval`."""

from __future__ import annotations

import json
import math

import evaluate
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

import tiny
from hf_wsvd import WSVDConfig, metrics
from hf_wsvd.cli import main
from hf_wsvd.data import load_table
from hf_wsvd.evaluation import evaluate_model, perplexity
from hf_wsvd.cli.workflow import data_loader

PRED = [1, 0, 1, 1, 0, 1, 0, 0]
REF = [1, 0, 0, 1, 0, 1, 1, 1]
ROWS = [("the movie was great", 1), ("awful plot", 0), ("really good story", 1), ("bad actor", 0),
        ("very fine film", 1), ("not great", 0), ("good", 1), ("awful", 0)]


def test_metric_functions_on_known_values():
    assert metrics.accuracy(PRED, REF) == 5 / 8
    # tp=3, fp=1, fn=2: F1 = 6 / 9; MCC = (tp·tn - fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))
    assert metrics.f1(PRED, REF) == pytest.approx(6 / 9)
    assert metrics.matthews_correlation(PRED, REF) == pytest.approx((3 * 2 - 1 * 2) / math.sqrt(4 * 5 * 3 * 4))
    assert metrics.matthews_correlation([1, 1], [1, 1]) == 0.0  # undefined -> 0
    assert metrics.f1([0, 1, 2], [0, 1, 1], average="macro") == pytest.approx((1 + 2 / 3 + 0) / 3)
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 8.0]
    assert metrics.pearsonr(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert metrics.spearmanr(x, y) == pytest.approx(0.8)
    # ties share their average rank: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]
    assert metrics.spearmanr([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    assert metrics.perplexity([2.0, 4.0], [2, 4]) == pytest.approx(math.e)
    with pytest.raises(ValueError):
        metrics.perplexity([], [])


SCORES = {"predictions": [0.1, 0.5, 0.3, 0.9], "references": [0.0, 1.0, 0.2, 0.7]}


@pytest.mark.parametrize("name, inputs, expected", [
    ("accuracy", {"predictions": PRED, "references": REF}, 5 / 8),
    ("f1", {"predictions": PRED, "references": REF}, 6 / 9),
    ("matthews_correlation", {"predictions": PRED, "references": REF}, (3 * 2 - 1 * 2) / math.sqrt(4 * 5 * 3 * 4)),
    ("pearsonr", SCORES, np.corrcoef(SCORES["predictions"], SCORES["references"])[0, 1]),
    ("spearmanr", SCORES, np.corrcoef([1, 3, 2, 4], [1, 4, 2, 3])[0, 1]),  # the ranks' correlation
    ("perplexity", {"nll": [3.0, 1.5], "tokens": [4, 2]}, math.exp(4.5 / 6)),
])
def test_local_evaluate_modules_load_offline(name, inputs, expected, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = evaluate.load(metrics.metric_path(name))
    assert module.compute(**inputs) == {name: pytest.approx(expected)}
    # incremental use, as in an evaluation loop
    keys = list(inputs)
    for values in zip(*inputs.values()):
        module.add_batch(**{k: [v] for k, v in zip(keys, values)})
    assert module.compute()[name] == pytest.approx(expected)


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="available"):
        metrics.metric_path("bleu")


def test_data_from_a_dataset_and_from_save_to_disk_folders(tmp_path):
    table = Dataset.from_dict({"sentence": [s for s, _ in ROWS], "label": [l for _, l in ROWS]})
    assert load_table(table) is table
    table.save_to_disk(tmp_path / "plain")
    assert list(load_table(tmp_path / "plain")["sentence"]) == [s for s, _ in ROWS]
    DatasetDict({"train": table, "validation": table.select(range(3))}).save_to_disk(tmp_path / "dict")
    assert len(load_table(tmp_path / "dict", split="validation")) == 3
    with pytest.raises(ValueError, match="splits"):
        load_table(tmp_path / "dict")
    DatasetDict({"test": table}).save_to_disk(tmp_path / "single")
    assert len(load_table(tmp_path / "single")) == len(ROWS)
    (tmp_path / "files").mkdir()  # a folder of data files, or an empty one: not a dataset
    (tmp_path / "files" / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match="data folder '.*files' is not a dataset saved with save_to_disk"):
        load_table(tmp_path / "files")


@pytest.mark.parametrize("name", ["dev?.tsv", "data[1].tsv", "st*r.tsv"])
def test_a_data_file_name_with_glob_characters_reads_that_file_alone(tmp_path, name):
    rows = "".join(f"{s}\t{l}\n" for s, l in ROWS)
    (tmp_path / name).write_text("sentence\tlabel\n" + rows)
    for neighbour in ("dev1.tsv", "data1.tsv", "star.tsv"):  # what the name would match as a pattern
        (tmp_path / neighbour).write_text("sentence\tlabel\nnot mine\t0\n")
    assert list(load_table(tmp_path / name)["sentence"]) == [s for s, _ in ROWS]


def test_data_loader_names_what_it_cannot_take(tokenizer):
    """The public data_loader says, in one line, what it takes instead of failing deep inside."""
    table = Dataset.from_dict({"sentence": [s for s, _ in ROWS], "label": [l for _, l in ROWS]})
    config, classifier = WSVDConfig(max_length=16, batch_size=4), tiny.build("bert")
    cases = [(dict(data_path=DatasetDict({"train": table})), r"DatasetDict \(pick one split: data\['train'\]\)"),
             (dict(data_path=table.to_list()), "data of type list: pass a datasets.Dataset"),
             (dict(num_samples=-1), "num_samples=-1 must be a positive integer"),
             (dict(num_samples=0), "num_samples=0 must be a positive integer"),
             (dict(tokenizer=None), "tokenizer=None: pass the model's tokenizer"),
             (dict(config=None), "config=None: pass a WSVDConfig or a CalibrationConfig")]
    for changed, message in cases:
        arguments = {**dict(model=classifier, tokenizer=tokenizer, data_path=table, config=config), **changed}
        with pytest.raises(ValueError, match=message):
            data_loader(**arguments)
    # one text column may be named alone; a NumPy integer is a count
    loader = data_loader(classifier, tokenizer, table, config, text_columns="sentence", shuffle=False)
    assert sum(len(batch["input_ids"]) for batch in loader) == len(ROWS)
    loader = data_loader(classifier, tokenizer, table, config, num_samples=np.int64(3), shuffle=False)
    assert sum(len(batch["input_ids"]) for batch in loader) == 3


def test_evaluate_model_follows_the_task(tokenizer):
    table = Dataset.from_dict({"sentence": [s for s, _ in ROWS], "label": [l for _, l in ROWS]})
    config = WSVDConfig(max_length=16, batch_size=4)
    classifier = tiny.build("bert")
    result = evaluate_model(classifier, data_loader(classifier, tokenizer, table, config, shuffle=False))
    assert set(result) == {"accuracy", "f1", "matthews_correlation"}
    with torch.no_grad():
        encoded = tokenizer([s for s, _ in ROWS], padding=True, return_tensors="pt")
        predicted = classifier(**encoded).logits.argmax(-1).numpy()
    assert result["accuracy"] == pytest.approx(metrics.accuracy(predicted, [l for _, l in ROWS]))

    regressor = tiny.build("bert", num_labels=1)
    scores = Dataset.from_dict({"sentence": table["sentence"], "label": [float(i) for i in range(len(ROWS))]})
    result = evaluate_model(regressor, data_loader(regressor, tokenizer, scores, config, shuffle=False))
    assert set(result) == {"pearsonr", "spearmanr"}
    with torch.no_grad():
        predicted = regressor(**encoded).logits.squeeze(-1).numpy()
    targets = [float(i) for i in range(len(ROWS))]
    assert result["pearsonr"] == pytest.approx(metrics.pearsonr(predicted, targets), abs=1e-6)
    assert result["spearmanr"] == pytest.approx(metrics.spearmanr(predicted, targets), abs=1e-6)

    lm = tiny.build("llama")
    text = Dataset.from_dict({"text": [s for s, _ in ROWS] * 3})
    result = evaluate_model(lm, data_loader(lm, tokenizer, text, WSVDConfig(max_length=8, batch_size=2), shuffle=False))
    assert set(result) == {"perplexity"} and 1 < result["perplexity"] < 200  # random model, vocab 64


def test_perplexity_is_the_exponential_of_the_models_own_mean_token_loss():
    lm = tiny.build("llama")
    batch = tiny.inputs("llama", batch=3, length=9)  # the first row's padded tail is not predicted
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = math.exp(lm(**batch).loss.item())
    assert perplexity(lm, [batch]) == pytest.approx(expected, rel=1e-5)


def test_eval_command_on_a_compressed_classifier_and_a_causal_lm(tmp_path, tokenizer, capsys):
    model, _ = tiny.save_compressed(tmp_path / "clf", "bert")
    table = Dataset.from_dict({"sentence": [s for s, _ in ROWS], "label": [l for _, l in ROWS]})
    DatasetDict({"validation": table, "train": table}).save_to_disk(tmp_path / "glue")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "clf"), "--data", str(tmp_path / "glue"), "--split", "validation"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {"accuracy", "f1", "matthews_correlation"} <= set(printed)
    with torch.no_grad():
        encoded = tokenizer([s for s, _ in ROWS], padding=True, return_tensors="pt")
        predicted = model(**encoded).logits.argmax(-1).numpy()
    assert printed["accuracy"] == pytest.approx(metrics.accuracy(predicted, [l for _, l in ROWS]))

    tiny.save_compressed(tmp_path / "lm", "gpt2")
    (tmp_path / "text.txt").write_text("\n".join(s for s, _ in ROWS * 4) + "\n")
    assert main(["eval", str(tmp_path / "lm"), "--data", str(tmp_path / "text.txt"), "--max-length", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    assert main(["eval", str(tmp_path / "clf"), "--data", str(tmp_path / "glue")]) == 2
    assert "splits" in capsys.readouterr().err


def test_classification_metrics_on_known_values():
    from hf_wsvd.evaluation import classification_metrics

    found = classification_metrics(torch.tensor([1, 1, 0, 0, 0]), torch.tensor([1, 0, 0, 0, 1]))
    assert found == pytest.approx({"accuracy": 0.6, "f1": 0.5, "majority_share": 0.6})
    assert "f1" not in classification_metrics(torch.tensor([2, 1]), torch.tensor([2, 0]))  # not binary
