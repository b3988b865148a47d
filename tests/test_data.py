"""Importance/evaluation data: only the sampled rows are tokenized, sentence pairs are found, causal-LM
blocks come from the whole text."""

from __future__ import annotations

import dataclasses
import functools
import logging
import json
import re

import pytest
import torch
import transformers
from datasets import Dataset
from transformers import AutoTokenizer

import tiny
from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd.data import load_table, read_texts, sample, teacher_samples, text_blocks, tokenize
from hf_wsvd.tasks import CLASSIFICATION
from hf_wsvd.cli.workflow import data_loader

WORDS = tiny.WORDS


def _sentences(count: int, offset: int = 0) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j + offset) % len(WORDS)] for j in range(2 + i % 5)) for i in range(count)]


@pytest.fixture
def counted(tokenizer, monkeypatch):
    """The tiny tokenizer, counting the texts (first arguments) it is called on."""
    seen = []
    call = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        seen.extend([text] if isinstance(text, str) else text)
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    return tokenizer, seen


def test_only_the_sampled_rows_are_tokenized_and_they_are_the_same_rows_as_before(counted):
    tokenizer, seen = counted
    table = Dataset.from_dict({"sentence": _sentences(400), "label": [i % 2 for i in range(400)]})
    config = WSVDConfig(num_samples=16, max_length=16, seed=3)
    loader = data_loader(tiny.build("bert"), tokenizer, table, config)
    assert len(seen) == 16 and len(loader.dataset) == 16
    # The seeded sample of the rows is the sample the tokenize-everything order drew.
    everything = tokenize(table, tokenizer, CLASSIFICATION, ["sentence"], "label", 16, num_labels=2)
    expected = sample(everything, 16, seed=3)
    assert loader.dataset["input_ids"] == expected["input_ids"] and loader.dataset["labels"] == expected["labels"]
    seen.clear()
    ordered = data_loader(tiny.build("bert"), tokenizer, table, config, num_samples=5, shuffle=False)
    assert seen == table["sentence"][:5] and ordered.dataset["labels"] == table["label"][:5]


def test_causal_lm_blocks_come_from_the_whole_text_then_are_sampled(tokenizer):
    texts = _sentences(60)
    config = WSVDConfig(num_samples=4, max_length=8, seed=1)
    loader = data_loader(tiny.build("llama"), tokenizer, Dataset.from_dict({"text": texts}), config)
    blocks = Dataset.from_list(text_blocks(texts, tokenizer, 8))
    assert len(blocks) > 4
    assert loader.dataset["input_ids"] == sample(blocks, 4, seed=1)["input_ids"]
    assert all(len(ids) == 8 for ids in loader.dataset["input_ids"])


def test_causal_lm_blocks_of_one_token_are_refused_naming_the_option(tokenizer):
    """Each token predicts the next: a block of one would give perplexity and the loss nothing."""
    with pytest.raises(ValueError, match=re.escape("max_length=1 (--max-length) leaves a causal LM no token to predict")):
        text_blocks(_sentences(4), tokenizer, 1)
    assert all(len(block["input_ids"]) == 2 for block in text_blocks(_sentences(4), tokenizer, 2))


@pytest.mark.parametrize("label_column", ["label", "stars"])
def test_a_label_column_for_a_causal_lm_is_refused_as_such(tokenizer, label_column):
    """Named as what it is whether or not the data has such a column: no column would do."""
    table = Dataset.from_dict({"text": _sentences(4), "label": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match=f"^label column '{label_column}' given for a causal LM, which is trained on "):
        data_loader(tiny.build("llama"), tokenizer, table, WSVDConfig(max_length=8), label_column=label_column)


def test_two_text_columns_are_a_sentence_pair_for_a_classifier(tokenizer, caplog):
    first, second = _sentences(6), _sentences(6, offset=3)
    table = Dataset.from_dict({"sentence1": first, "sentence2": second, "label": ["yes", "no"] * 3})
    model = tiny.build("bert", label2id={"no": 0, "yes": 1}, id2label={0: "no", 1: "yes"})
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        loader = data_loader(model, tokenizer, table, WSVDConfig(max_length=32), shuffle=False)
    assert loader.dataset["input_ids"] == tokenizer(first, second, truncation=True, max_length=32)["input_ids"]
    assert any("'sentence1' and 'sentence2' as a sentence pair" in r.message and "--text-columns" in r.message
               for r in caplog.records)
    caplog.clear()
    # A third string column: no guess at a pair; the unused columns and the flag are named.
    table = table.add_column("source", ["web"] * 6)
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        loader = data_loader(model, tokenizer, table, WSVDConfig(max_length=32), shuffle=False)
    assert loader.dataset["input_ids"] == tokenizer(first, truncation=True, max_length=32)["input_ids"]
    assert any("not using 'sentence2', 'source'" in r.message and "--text-columns" in r.message for r in caplog.records)
    # Named columns: no notice.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        data_loader(model, tokenizer, table, WSVDConfig(max_length=32), ["sentence2"], shuffle=False)
    assert not caplog.records


def test_text_cut_at_max_length_is_counted_in_a_notice(tokenizer, caplog):
    """Rows longer than max_length are cut, as transformers cuts them; the notice counts the texts and
    the targets cut (a text exactly max_length tokens long is not cut)."""
    words = tiny.WORDS
    lengths = [len(ids) for ids in tokenizer([" ".join(words[:n]) for n in (2, 6, 9, 14)])["input_ids"]]
    limit = lengths[1]  # the second row fits exactly
    rows = [{"source": " ".join(words[:n]), "target": " ".join(words[:m])} for n, m in ((2, 2), (6, 3), (9, 5), (14, 14))]
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        encoded = tokenize(Dataset.from_list(rows), tokenizer, "seq2seq_lm", ["source"], "target", limit,
                           source="data file 'pairs.jsonl'")
    assert [len(ids) for ids in encoded["input_ids"]] == [lengths[0], limit, limit, limit]
    assert encoded.column_names == ["input_ids", "attention_mask", "labels"]
    assert [r.message for r in caplog.records] == [
        f"max_length={limit} (--max-length) cut the text of 2 and the target text of 1 of the 4 rows of data file "
        "'pairs.jsonl'"]
    caplog.clear()
    table = Dataset.from_dict({"text": [row["source"] for row in rows], "label": [0, 1, 0, 1]})
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        tokenize(table, tokenizer, CLASSIFICATION, ["text"], "label", max(lengths))
        assert not caplog.records  # nothing cut
        tokenize(table, tokenizer, CLASSIFICATION, ["text"], "label", limit)
    assert [r.message for r in caplog.records] == [
        f"max_length={limit} (--max-length) cut the text of 2 of the 4 rows of the text"]


def test_fields_of_a_column_of_objects_are_read_only_where_named(tmp_path, tokenizer):
    """Metadata objects beside the text are never taken for text; a field named is read, and a field
    whose name another column has is refused rather than read twice."""
    sentences = _sentences(6)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"meta": {"url": f"http://x/{i}"}, "text": s, "label": i % 2}) + "\n"
                            for i, s in enumerate(sentences)))
    model = tiny.build("bert")
    loader = data_loader(model, tokenizer, str(path), WSVDConfig(max_length=16), shuffle=False)
    assert loader.dataset["input_ids"] == tokenizer(sentences, truncation=True, max_length=16)["input_ids"]
    assert read_texts(str(path), "the corpus") == sentences
    assert read_texts(str(path), "the corpus", ["meta.url"]) == [f"http://x/{i}" for i in range(6)]
    named = data_loader(model, tokenizer, str(path), WSVDConfig(max_length=16), ["meta.url"], shuffle=False)
    assert named.dataset["input_ids"] == tokenizer([f"http://x/{i}" for i in range(6)], truncation=True,
                                                  max_length=16)["input_ids"]
    with pytest.raises(ValueError, match=re.escape("unknown column 'meta.title': data file") + ".*"
                       + re.escape("has columns ['meta', 'text', 'label']; fields ['meta.url']")):
        data_loader(model, tokenizer, str(path), WSVDConfig(), ["meta.title"])
    clash = Dataset.from_list([{"meta": {"url": "a", "title": "c"}, "meta.url": "b", "label": 0}] * 2)
    exact = data_loader(model, tokenizer, clash, WSVDConfig(max_length=16), ["meta.url"], shuffle=False)
    assert exact.dataset["input_ids"][0] == tokenizer("b", truncation=True, max_length=16)["input_ids"]
    with pytest.raises(ValueError, match=re.escape("the data has a column 'meta.url' and a column of objects with a "
                                                   "field of that name: rename one")):
        data_loader(model, tokenizer, clash, WSVDConfig(), ["meta.title"])


def test_mrpc_pairs_are_found_without_text_columns(shared):
    """MRPC's #1/#2 String columns (IDs are numbers) pair up as with --text-columns."""
    source = shared / "models" / "minilm-l6-mrpc"
    tokenizer = AutoTokenizer.from_pretrained(source)
    # a tiny model with the tokenizer's vocabulary and room for its 128 tokens
    model = tiny.build("bert", label2id={"0": 0, "1": 1}, vocab_size=len(tokenizer), max_position_embeddings=128)
    dev = str(shared / "data" / "glue" / "MRPC" / "dev.tsv")
    config = WSVDConfig(max_length=128)
    found = data_loader(model, tokenizer, dev, config, None, "Quality", num_samples=32, shuffle=False)
    named = data_loader(model, tokenizer, dev, config, ["#1 String", "#2 String"], "Quality", num_samples=32,
                        shuffle=False)
    assert found.dataset["input_ids"] == named.dataset["input_ids"]
    assert tokenizer.sep_token_id in found.dataset["input_ids"][0][1:-1]  # two segments


@pytest.mark.parametrize("rows, columns, message", [
    ({"sentence": ["good film", "", "bad"], "label": [1, 0, 1]}, None, "row 2 of the data has no text in 'sentence'"),
    ({"sentence": ["good film", "bad"], "score": [3, 4], "label": [1, 0]}, ["score"],
     "column 'score' of the data is not text (row 1: 3)"),
    ({"sentence": ["good film", " \t "], "label": [1, 0]}, None, "row 2 of the data has no text in 'sentence'"),
    ({"a": ["good film", ""], "b": ["nice", "  "], "label": [1, 0]}, None, "row 2 of the data has no text in 'a', 'b'"),
    ({"sentence": ["good film", "bad"], "label": [1, 0]}, ["sentence", "sentence"],
     "text_columns=['sentence', 'sentence'] names 'sentence' twice"),
    ({"sentence": ["good film", "bad"], "label": ["1", "0"]}, ["label"],
     "column 'label' is named both the label column and a text column"),
    ({"sentence": ["good film", None], "label": [1, 0]}, None, "column 'sentence' of the data is not text (row 2: None)"),
])
def test_rows_without_text_are_named(tokenizer, rows, columns, message):
    """The tiny tokenizer adds no special tokens: an empty text would be an example of no token (one
    that adds them would give a classifier an example of them alone, as blank text does)."""
    assert tokenizer("")["input_ids"] == []
    with pytest.raises(ValueError, match=re.escape(message)):
        data_loader(tiny.build("bert"), tokenizer, Dataset.from_dict(rows), WSVDConfig(max_length=8), columns,
                    shuffle=False)


def test_a_data_file_the_reader_cannot_parse_is_one_line_and_a_good_one_loads(tmp_path, logged):
    """datasets' CSV reader logs its failure before raising: that record is dropped for the one-line
    error saying the same; a good file still loads."""
    (tmp_path / "bad.csv").write_text("sentence,label\ngood film,1\nbad,0,extra,cols\n")
    with pytest.raises(ValueError, match="data file '.*bad.csv' cannot be read as csv: .*Expected 2 fields in line 3"):
        load_table(tmp_path / "bad.csv")
    assert [r.getMessage() for r in logged if "bad.csv" in r.getMessage()] == []
    # JSON lines: the first line that is not an object, counted from 1 (arrow's reader counts rows from 0)
    (tmp_path / "bad.jsonl").write_text('{"text": "good film"}\n{"text": "bad"}\nnot json\n')
    (tmp_path / "list.jsonl").write_text('{"text": "good film"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"cannot be read as jsonl: line 3 is not JSON \(Expecting value"):
        load_table(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"cannot be read as jsonl: line 2 is a JSON list, not an object"):
        load_table(tmp_path / "list.jsonl")
    (tmp_path / "mixed.jsonl").write_text('{"text": "good film"}\n{"text": 5}\n')  # loads, its column of two types
    with pytest.raises(ValueError, match=r"column 'text' of the data is not text \(row 2: 5\)"):
        read_texts(str(tmp_path / "mixed.jsonl"), "the data")
    (tmp_path / "good.csv").write_text("sentence,label\ngood film,1\nbad,0\n")
    assert load_table(tmp_path / "good.csv")["label"] == [1, 0]
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "fieldless.jsonl").write_text("{}\n{}\n")
    (tmp_path / "number.json").write_text("42\n")
    (tmp_path / "nothing.json").write_text("[]\n")
    # a first null crashes datasets' reader (a segmentation fault): refused before it reads
    (tmp_path / "null.json").write_text("null\n")
    (tmp_path / "null.jsonl").write_text('\nnull\n{"text": "good film"}\n')
    for name, said in (("blank.jsonl", "it holds no rows (no object with a field)"),
                       ("null.json", "it holds a JSON null, not rows (one object per line, or a list of objects)"),
                       ("null.jsonl", "it holds a JSON null, not rows"),
                       ("fieldless.jsonl", "it holds no rows (no object with a field)"),
                       ("number.json", "it holds a JSON number, not rows (one object per line, or a list of objects)"),
                       ("nothing.json", "it holds an empty list, not rows")):
        with pytest.raises(ValueError, match=re.escape(f"{name}' cannot be read as {name.split('.')[1]}: {said}")):
            load_table(tmp_path / name)
    (tmp_path / "columns.json").write_text(json.dumps({"text": ["good film " * 20] * 3}))
    with pytest.raises(ValueError, match=r"is not text \(row 1: \['good film (good film ){4}good \.\.\.\): name a column of text "
                                         r"\(--text-columns\); its cells are lists: write one object \(row\) per text"):
        read_texts(str(tmp_path / "columns.json"), "the data", ["text"])
    (tmp_path / "marked.txt").write_bytes("\ufeffgood film\nbad\n".encode())  # a byte-order mark is no text
    assert read_texts(str(tmp_path / "marked.txt"), "the data") == ["good film", "bad"]
    import hf_wsvd.data as data_module

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with pytest.MonkeyPatch.context() as patched:  # what a file the user may not read gives (tests run as root here)
        patched.setattr(data_module, "open", denied, raising=False)
        with pytest.raises(ValueError, match=r"^the data cannot be read: Permission denied$"):
            read_texts(str(tmp_path / "marked.txt"), "the data")
    logging.getLogger("datasets.packaged_modules.csv.csv").error("after the load")  # nothing held back any more
    assert [r.getMessage() for r in logged] == ["after the load"]


def test_class_label_indices_follow_the_model_s_class_names(tokenizer, tmp_path):
    """A ClassLabel column's indices are renumbered to the model's classes of the same names (as a
    file's label names are); names the model lacks are refused; a model of default names (LABEL_0,
    ...) takes the indices as they are. A save_to_disk folder gets no cache file written into it."""
    from datasets import ClassLabel, Features, Value, load_from_disk

    texts, indices = ["good film", "bad film", "fine", "awful"], [0, 1, 0, 1]

    def labels(model, names: list[str]) -> list[int]:
        features = Features({"sentence": Value("string"), "label": ClassLabel(names=names)})
        folder = tmp_path / "_".join(names)
        Dataset.from_dict({"sentence": texts, "label": indices}, features=features).save_to_disk(folder)
        files = sorted(p.name for p in folder.iterdir())
        loader = data_loader(model, tokenizer, str(folder), WSVDConfig(max_length=8), shuffle=False)
        assert sorted(p.name for p in folder.iterdir()) == files
        assert load_from_disk(folder)["label"] == indices
        return [int(i) for batch in loader for i in batch["labels"]]

    named = tiny.build("bert", id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    assert labels(named, ["positive", "negative"]) == [1, 0, 1, 0]
    assert labels(named, ["Negative", "POSITIVE"]) == indices
    with pytest.raises(ValueError, match=re.escape("names its classes ['bad', 'good'] (its 'label' column), and 'bad' "
                                                   "is none of the model's labels ['negative', 'positive']")):
        labels(named, ["bad", "good"])
    assert labels(tiny.build("bert"), ["positive", "negative"]) == indices  # LABEL_0, LABEL_1


@pytest.mark.parametrize("num_labels, labels, message", [
    (1, [1.5, float("nan")], "label nan (row 2 of the data) is not a finite number"),
    (1, [1.5, float("inf")], "label inf (row 2 of the data) is not a finite number"),
    (1, ["1.5", "high"], "label 'high' (row 2 of the data) is not a number"),
    (2, [0, 5], "label 5 (row 2 of the data) is outside the model's 2 classes"),
])
def test_a_bad_label_is_named_with_its_row(tokenizer, num_labels, labels, message):
    """A regressor's labels are finite numbers (NaN would reach the Fisher and the metrics), a classifier's
    class indices; the error names the row."""
    rows = Dataset.from_dict({"sentence": _sentences(2), "label": labels})
    with pytest.raises(ValueError, match=re.escape(message)):
        data_loader(tiny.build("bert", num_labels=num_labels), tokenizer, rows, WSVDConfig(max_length=8), shuffle=False)


@pytest.mark.parametrize("labels", [[1, 2], ["1", "2"]])
def test_a_label_that_is_both_a_class_index_and_a_numeric_class_name_of_another_class_is_refused(tokenizer, labels):
    """Classes named "1", "2", "3" (indices 0, 1, 2): a file's numeric column reads as ints (indices), a
    JSON string as a name, so the same labels meant other classes in a TSV and in a JSONL file."""
    stars = tiny.build("bert", num_labels=3, id2label={0: "1", 1: "2", 2: "3"}, label2id={"1": 0, "2": 1, "3": 2})
    rows = Dataset.from_dict({"sentence": _sentences(2), "label": labels})
    with pytest.raises(ValueError, match=re.escape(f"label {labels[0]!r} (row 1 of the data) is ambiguous: the model names "
                                                   "its classes by numbers that are not their indices")):
        data_loader(stars, tokenizer, rows, WSVDConfig(max_length=8), shuffle=False)
    # names that are their own indices, and a number that only one reading allows, stay as they were
    rows = Dataset.from_dict({"sentence": _sentences(2), "label": ["3", "0"]})
    assert [int(b["labels"][0]) for b in data_loader(stars, tokenizer, rows, WSVDConfig(max_length=8, batch_size=1),
                                                   shuffle=False)] == [2, 0]
    # a ClassLabel column holds class indices, whatever the classes' names
    from datasets import ClassLabel

    rows = Dataset.from_dict({"sentence": _sentences(2), "label": [1, 2]}).cast_column(
        "label", ClassLabel(names=["1", "2", "3"]))
    assert [int(b["labels"][0]) for b in data_loader(stars, tokenizer, rows, WSVDConfig(max_length=8, batch_size=1),
                                                   shuffle=False)] == [1, 2]
    digits = tiny.build("bert", id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1})
    rows = Dataset.from_dict({"sentence": _sentences(2), "label": [1, 0]})
    assert [int(b["labels"][0]) for b in data_loader(digits, tokenizer, rows, WSVDConfig(max_length=8, batch_size=1),
                                                   shuffle=False)] == [1, 0]


def test_a_bad_row_is_named_by_its_place_in_the_data_sampled_or_not(tokenizer):
    """Rows are checked before sampling: the row named is the file's, not the sample's."""
    labels = [i % 2 for i in range(50)]
    labels[39] = 7
    rows = Dataset.from_dict({"sentence": _sentences(50), "label": labels})
    with pytest.raises(ValueError, match=re.escape("label 7 (row 40 of the data) is outside the model's 2 classes")):
        data_loader(tiny.build("bert"), tokenizer, rows, WSVDConfig(num_samples=5, max_length=8))


@pytest.fixture
def bert_tokenizer(tmp_path):
    """A tokenizer that adds special tokens ([CLS] ... [SEP]), unlike the tiny one."""
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("\n".join(tiny.SPECIALS + WORDS) + "\n")
    return BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))


def test_a_blank_row_is_an_example_of_special_tokens_but_blank_data_is_refused(bert_tokenizer):
    rows = Dataset.from_dict({"sentence": ["good film", " "], "label": [1, 0]})
    loader = data_loader(tiny.build("bert"), bert_tokenizer, rows, WSVDConfig(max_length=8), shuffle=False)
    assert loader.dataset["input_ids"][1] == [bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id]
    blank = Dataset.from_dict({"sentence": ["", " \t"], "label": [1, 0]})
    with pytest.raises(ValueError, match=re.escape("the data holds no text in 'sentence': every row is empty or blank")):
        data_loader(tiny.build("bert"), bert_tokenizer, blank, WSVDConfig(max_length=8), shuffle=False)


def test_a_max_length_with_no_room_for_text_is_refused(bert_tokenizer):
    """A tokenizer that adds special tokens does not truncate, without a word, to fewer than them."""
    rows = Dataset.from_dict({"a": _sentences(2), "b": _sentences(2, 3), "label": [0, 1]})
    model = tiny.build("bert")
    with pytest.raises(ValueError, match=re.escape("max_length=2 (--max-length) leaves no room for text: the "
                                                   "tokenizer adds 2 special tokens to each example; use at least 3")):
        data_loader(model, bert_tokenizer, rows, WSVDConfig(max_length=2), ["a"], shuffle=False)
    with pytest.raises(ValueError, match=re.escape("adds 3 special tokens to each example; use at least 4")):
        data_loader(model, bert_tokenizer, rows, WSVDConfig(max_length=3), ["a", "b"], shuffle=False)
    loader = data_loader(model, bert_tokenizer, rows, WSVDConfig(max_length=3), ["a"], shuffle=False)
    assert [len(ids) for ids in loader.dataset["input_ids"]] == [3, 3]  # [CLS] word [SEP]


def test_the_recipe_records_the_examples_the_data_held(tokenizer):
    """num_samples above what the data holds: every example is used, and the recipe says how many."""
    rows = Dataset.from_dict({"sentence": _sentences(6), "label": [i % 2 for i in range(6)]})
    loader = data_loader(tiny.build("bert"), tokenizer, rows, WSVDConfig(num_samples=1000, max_length=8))
    assert loader.num_samples == len(loader.dataset) == 6
    model, _ = compress(tiny.build("bert"), WSVDConfig(method="svd", param_ratio=0.5, num_samples=1000), loader,
                        show_progress=False)
    assert model.config.wsvd["num_samples"] == 6


def _batch(arch: str, **changes) -> dict:
    ids = torch.randint(len(tiny.SPECIALS), tiny.VOCAB_SIZE, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone() if arch == "llama" else torch.tensor([0, 1])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, **changes}


@pytest.mark.parametrize("arch, changes, message", [
    ("llama", {"input_ids": torch.full((2, 8), 1000)}, "input_ids go from 1000 to 1000, outside the model's 64 token"),
    ("bert", {"input_ids": torch.ones(2, 100, dtype=torch.long), "attention_mask": torch.ones(2, 100)},
     "holds sequences of 100 tokens, more than the model's 64 positions"),
    ("llama", {"input_ids": torch.ones(2, 8)}, "input_ids must be a 2-D integer tensor (examples × tokens), not a "
                                                "torch.float32 tensor of shape (2, 8)"),
    ("llama", {"input_ids": torch.ones(8, dtype=torch.long)}, "not a torch.int64 tensor of shape (8,)"),
    ("llama", {"input_ids": [[5, 6, 7]]}, "input_ids must be a 2-D integer tensor (examples × tokens), not a list"),
    ("llama", {"input_ids": torch.zeros(0, 8, dtype=torch.long), "attention_mask": None, "labels": None},
     "holds no tokens (input_ids of shape (0, 8)): leave empty batches out"),
    ("bert", {"input_ids": torch.zeros(2, 0, dtype=torch.long), "attention_mask": None},
     "holds no tokens (input_ids of shape (2, 0))"),
    ("llama", {"input_ids": torch.ones(2, 8, dtype=torch.long, device="meta")},
     "input_ids are on the meta device (shapes without values): give the token ids"),
    ("llama", {"attention_mask": torch.ones(2, 5)}, "attention_mask is a torch.float32 tensor of shape (2, 5)"),
    ("bert", {"attention_mask": torch.zeros(2, 8, dtype=torch.long)},
     "attention_mask marks no token as real (all 0): leave the batch out"),
    ("llama", {"labels": torch.ones(2, 5, dtype=torch.long)}, "a causal LM's labels are its input ids ((2, 8) integers"),
    ("bert", {"labels": torch.tensor([0, 6])}, "label 6 is outside the model's 2 classes"),
    ("bert", {"labels": torch.tensor([0.0, 1.0])}, "a classifier's labels are one class index per example"),
    ("bert", {"labels": torch.ones(2, 8, dtype=torch.long)}, "not a torch.int64 tensor of shape (2, 8)"),
    ("llama", {"labels": torch.full((2, 8), 999)}, "label 999 is outside the model's 64 output tokens"),
    ("llama", {"labels": torch.full((2, 8), -5)}, "label -5 is outside the model's 64 output tokens"),
    ("llama", {"labels": torch.ones(2, 8, dtype=torch.bool)}, "a causal LM's labels are its input ids"),
    # refinement weighs each token's error by its mask: a mask is 0 or 1
    ("llama", {"attention_mask": -torch.ones(2, 8, dtype=torch.long)}, "attention_mask holds -1; it marks each token"),
    ("llama", {"attention_mask": torch.full((2, 8), 0.5)}, "attention_mask holds 0.5; it marks each token"),
    # rows of the model's other embedding tables (an IndexError inside torch otherwise)
    ("bert", {"token_type_ids": torch.full((2, 8), 7)}, "token_type_ids go from 7 to 7, outside the model's 2 token "
                                                        "types (type_vocab_size)"),
    ("bert", {"token_type_ids": torch.ones(2, 8)}, "token_type_ids must be an integer tensor, not a torch.float32"),
    ("bert", {"position_ids": torch.arange(60, 68).expand(2, 8)}, "position_ids go from 60 to 67, outside the "
                                                                  "model's 64 positions (max_position_embeddings)"),
    ("bert", {"position_ids": -torch.ones(1, 8, dtype=torch.long)}, "position_ids go from -1 to -1"),
])
def test_compress_names_a_bad_calibration_batch_before_any_work(arch, changes, message):
    good = _batch(arch)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        compress(tiny.build(arch), WSVDConfig(method="fwsvd", param_ratio=0.5), [good, _batch(arch, **changes)],
                 show_progress=False)
    assert str(error.value).startswith("calibration batch 1")  # checked before the first batch's pass
    with pytest.raises(TypeError, match="calibration batch 0 is a list: each batch must be a dict of tensors"):
        compress(tiny.build(arch), WSVDConfig(method="fwsvd", param_ratio=0.5), [[good]], show_progress=False)
    with pytest.raises(ValueError, match="calibration batch 0 is an empty dict: each batch must hold the model's"):
        compress(tiny.build(arch), WSVDConfig(method="fwsvd", param_ratio=0.5), [{}], show_progress=False)


def test_token_types_and_positions_are_checked_against_the_tables_the_model_reads():
    """DeBERTa has no token-type table (type_vocab_size 0) and ignores the zeros its tokenizer gives;
    OPT adds 2 to position ids, so its padding's -1 is a row; one past the table is refused."""
    import transformers

    from hf_wsvd.data import check_batch

    ids = torch.randint(5, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    deberta = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        type_vocab_size=0, max_position_embeddings=64))
    check_batch(deberta, {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "labels": torch.tensor([0, 1])}, 0)
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=32))
    padded = torch.arange(-1, 7).expand(2, 8)
    check_batch(opt, {"input_ids": ids, "position_ids": padded, "labels": ids}, 0)
    with pytest.raises(ValueError, match=re.escape("position_ids go from 57 to 64, outside the model's 64 positions")):
        check_batch(opt, {"input_ids": ids, "position_ids": padded + 58, "labels": ids}, 0)


def test_token_types_of_a_model_without_a_type_table_are_checked_as_the_tokens_it_reads_them_as():
    """GPT-2 has no type_vocab_size and looks token_type_ids up in its word table: one past it is
    named, not an IndexError inside the model; types inside it run."""
    from hf_wsvd.data import check_batch

    model = tiny.build("gpt2")
    ids = torch.randint(7, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    inside = {"input_ids": ids, "token_type_ids": torch.full_like(ids, tiny.VOCAB_SIZE - 1), "labels": ids}
    check_batch(model, inside, 0)
    with torch.no_grad():
        model(**inside)
    with pytest.raises(ValueError, match=re.escape(f"token_type_ids go from {tiny.VOCAB_SIZE} to {tiny.VOCAB_SIZE}, "
                                                   f"outside the model's {tiny.VOCAB_SIZE} tokens")):
        check_batch(model, {**inside, "token_type_ids": torch.full_like(ids, tiny.VOCAB_SIZE)}, 0)


def test_a_table_of_relative_positions_limits_neither_length_nor_position_ids():
    """DeBERTa-v3 reads positions through attention's relative table (2 x 256 buckets = 512 rows, as
    many as max_position_embeddings): longer sequences and any position ids run, and are taken."""
    import transformers

    from hf_wsvd.data import check_batch, positions

    model = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, position_buckets=256, relative_attention=True, position_biased_input=False,
        pos_att_type=["p2c", "c2p"], type_vocab_size=0, norm_rel_ebd="layer_norm")).eval()
    assert model.deberta.encoder.rel_embeddings.num_embeddings == 512
    assert positions(model) is None
    long = torch.randint(5, 60, (1, 600), generator=torch.Generator().manual_seed(0))
    check_batch(model, {"input_ids": long, "labels": torch.tensor([0])}, 0)
    short = long[:, :8]
    far = torch.arange(600, 608)[None]
    check_batch(model, {"input_ids": short, "position_ids": far, "labels": torch.tensor([0])}, 0)
    with torch.no_grad():  # what the check lets through runs
        assert model(input_ids=long).logits.shape == (1, 2)
        assert model(input_ids=short, position_ids=far).logits.shape == (1, 2)
    biased = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, position_buckets=256, relative_attention=True, position_biased_input=True,
        type_vocab_size=0))
    assert positions(biased).longest == 512  # its absolute table, not the relative one of as many rows


def _bounded_models():
    import transformers as t

    bert = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    mpt = t.MptForCausalLM(t.MptConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=64, max_seq_len=16))
    ctrl = t.CTRLLMHeadModel(t.CTRLConfig(n_embd=32, n_head=2, n_layer=1, vocab_size=64, n_positions=16, dff=64))
    led = t.LEDForConditionalGeneration(t.LEDConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64, max_encoder_position_embeddings=32,
        max_decoder_position_embeddings=16, attention_window=[8]))
    bert2bert = t.EncoderDecoderModel(config=t.EncoderDecoderConfig.from_encoder_decoder_configs(
        t.BertConfig(**bert, max_position_embeddings=32),
        t.BertConfig(**bert, max_position_embeddings=16, is_decoder=True, add_cross_attention=True)))
    bert2bert.config.decoder_start_token_id, bert2bert.config.pad_token_id = 2, 0
    nystromformer = t.NystromformerForMaskedLM(t.NystromformerConfig(**bert, max_position_embeddings=16, num_landmarks=4,
                                                                    segment_means_seq_len=16))
    return {"mpt": (mpt, (16, "max_seq_len"), None), "ctrl": (ctrl, (16, "n_positions"), None),
            "nystromformer": (nystromformer, (16, "max_position_embeddings"), None),
            "led": (led, (32, "max_encoder_position_embeddings"), (16, "max_decoder_position_embeddings")),
            "bert2bert": (bert2bert, (32, "max_position_embeddings"), (16, "max_position_embeddings"))}


@pytest.mark.parametrize("name", ["mpt", "ctrl", "nystromformer", "led", "bert2bert"])
def test_bounds_without_a_max_position_embeddings_table_are_read(name):
    """MPT's ALiBi bias and CTRL's sinusoidal table are built to a config field's length;
    Nystromformer's table holds two more rows than the positions it takes; LED and bert2bert bound
    their encoder and decoder apart. Each bound is read, named by its field, and
    checked: what it refuses the model's forward could not run, what it lets through runs."""
    from hf_wsvd.data import check_batch, check_fits, positions

    model, (longest, field), target = _bounded_models()[name]
    model.eval()
    bound = positions(model)
    assert (bound.longest, bound.field) == (longest, field)
    decoder = positions(model, decoder=True) if target else None
    assert (decoder and (decoder.longest, decoder.field)) == target

    def batch(length: int, target_length: int = 4) -> dict:
        ids = torch.randint(5, 60, (1, length + target_length), generator=torch.Generator().manual_seed(length))
        return {"input_ids": ids[:, :length], **({"labels": ids[:, length:]} if target else {})}

    check_batch(model, batch(longest), 0, task_labels=False)
    with pytest.raises(ValueError, match=re.escape(f"--max-length 99 exceeds the model's {longest} positions ({field})")):
        check_fits(model, [[5] * (longest + 1)], 99)
    if target:
        check_fits(model, [[5] * longest], 99, target_ids=[[5] * target[0]])
        with pytest.raises(ValueError, match=re.escape(f"exceeds the model's {target[0]} target positions ({target[1]})")):
            check_fits(model, [[5] * 4], 99, target_ids=[[5] * (target[0] + 1)])
    with torch.no_grad():
        model(**batch(longest))
        if name == "nystromformer":  # explicit position ids reach the table's two extra rows, not past them
            last = {**batch(longest), "position_ids": torch.arange(bound.high - longest, bound.high)[None]}
            check_batch(model, last, 0, task_labels=False)
            model(**last)
            with pytest.raises(ValueError, match=re.escape("position_ids go from 3 to 18, outside the model's 18 "
                                                           "positions (max_position_embeddings)")):
                check_batch(model, {**last, "position_ids": last["position_ids"] + 1}, 0, task_labels=False)
        with pytest.raises(ValueError, match=re.escape(f"more than the model's {longest} positions ({field})")):
            check_batch(model, batch(longest + 1), 0, task_labels=False)
        if target is None:
            with pytest.raises((RuntimeError, IndexError)):
                model(**batch(longest + 1))
            return
        check_batch(model, batch(8, target[0]), 0, task_labels=False)
        model(**batch(8, target[0]))
        with pytest.raises(ValueError, match=re.escape(f"more than the model's {target[0]} target positions "
                                                       f"({target[1]})")):
            check_batch(model, batch(8, target[0] + 1), 0, task_labels=False)
        with pytest.raises((RuntimeError, IndexError)):
            model(**batch(8, target[0] + 1))


def test_packed_sequences_restarting_their_position_ids_may_be_longer_than_the_position_table():
    """Two documents packed in one row restart position_ids: the row runs although it is longer
    than the table, so only the ids' range is checked; without them its length is refused."""
    import transformers

    from hf_wsvd.data import check_batch

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).eval()
    ids = torch.randint(5, 60, (1, 32), generator=torch.Generator().manual_seed(0))
    packed = {"input_ids": ids, "position_ids": (torch.arange(32) % 16)[None], "labels": ids}
    check_batch(model, packed, 0)
    with torch.no_grad():
        assert model(**packed).logits.shape == (1, 32, 64)
    with pytest.raises(ValueError, match=re.escape("holds sequences of 32 tokens, more than the model's 16 positions")):
        check_batch(model, {"input_ids": ids, "labels": ids}, 0)
    with pytest.raises(ValueError, match=re.escape("position_ids go from 0 to 31, outside the model's 16 positions")):
        check_batch(model, {**packed, "position_ids": torch.arange(32)[None]}, 0)


def test_models_whose_input_table_is_no_plain_embedding_are_checked_without_crashing():
    """Canine names no input embeddings (it hashes Unicode code points), Perceiver's are its latents,
    I-BERT's a QuantEmbedding: batches they run pass; I-BERT's ids past its table are still named."""
    import transformers

    from hf_wsvd.data import check_batch, vocabulary_size

    canine = transformers.CanineForSequenceClassification(transformers.CanineConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
        num_labels=2)).eval()
    code_points = torch.tensor([[0xE000, *map(ord, "hello world"), 0xE001]])
    perceiver = transformers.PerceiverForSequenceClassification(transformers.PerceiverConfig(
        d_model=32, d_latents=32, num_latents=8, num_blocks=1, num_self_attends_per_block=1, num_self_attention_heads=2,
        num_cross_attention_heads=2, vocab_size=262, max_position_embeddings=64, num_labels=2)).eval()
    ibert = transformers.IBertForSequenceClassification(transformers.IBertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=128,
        max_position_embeddings=40, num_labels=2)).eval()
    assert [vocabulary_size(m) for m in (canine, perceiver, ibert)] == [None, None, 128]
    ids = torch.randint(5, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    for model, tokens in ((canine, code_points), (perceiver, ids), (ibert, ids)):
        batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": torch.tensor([1])}
        check_batch(model, batch, 0)
        with torch.no_grad():
            assert model(**batch).logits.shape == (1, 2)
    with pytest.raises(ValueError, match=re.escape("input_ids go from 5 to 128, outside the model's 128 token")):
        check_batch(ibert, {"input_ids": torch.tensor([[5, 128]]), "labels": torch.tensor([1])}, 0)


@pytest.mark.parametrize("sources, targets", [(64, 128), (128, 64)])
def test_a_target_vocabulary_of_its_own_bounds_the_target_ids(sources, targets):
    """FSMT (and Marian without shared tables) reads its target text in a table of its own: target ids
    past the source vocabulary but inside the target one run and are taken, those past the target
    vocabulary are named, in the batch check and in the command line's check of the data."""
    import transformers

    from hf_wsvd.data import check_batch, check_fits

    model = transformers.FSMTForConditionalGeneration(transformers.FSMTConfig(
        langs=["en", "de"], src_vocab_size=sources, tgt_vocab_size=targets, d_model=32, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=40)).eval()
    source = torch.randint(5, 60, (1, 8), generator=torch.Generator().manual_seed(0))
    inside, past = torch.tensor([[10, targets - 1, 20, 2]]), torch.tensor([[10, targets, 20, 2]])
    check_batch(model, {"input_ids": source, "labels": inside}, 0)
    check_fits(model, source.tolist(), 8, [1], inside.tolist())
    with torch.no_grad():
        assert model(input_ids=source, decoder_input_ids=inside).logits.shape == (1, 4, targets)
    with pytest.raises(ValueError, match=re.escape(f"label {targets} is outside the model's {targets} target tokens")):
        check_batch(model, {"input_ids": source, "labels": past}, 0)
    with pytest.raises(ValueError, match=re.escape(f"ids go up to {targets} but the model has {targets} target tokens")):
        check_fits(model, source.tolist(), 8, [1], past.tolist())


@pytest.mark.parametrize("arch, labels", [("bert", torch.tensor([[1], [0]])), ("bert", torch.tensor([1, 0])),
                                          ("regression", torch.tensor([[0.5], [-1.0]])),
                                          ("regression", torch.tensor([0.5, -1.0]))])
def test_one_label_per_example_may_come_as_a_column(arch, labels):
    """transformers' losses flatten a column of labels (B × 1) as a row: so do the check and the
    importance loss, one loss per example either way."""
    from hf_wsvd.data import check_batch
    from hf_wsvd.tasks import per_example_loss, task_of

    model = tiny.build("bert", "AutoModelForSequenceClassification", **({"num_labels": 1} if arch == "regression" else {}))
    ids = torch.randint(5, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    check_batch(model, batch, 0)
    losses = per_example_loss(task_of(model))(model.eval(), batch)
    row = per_example_loss(task_of(model))(model, {**batch, "labels": labels.reshape(-1)})
    assert losses.shape == (2,)
    torch.testing.assert_close(losses, row, rtol=0, atol=0)
    with pytest.raises(ValueError, match=re.escape("labels are one")):
        check_batch(model, {**batch, "labels": labels.reshape(1, 2)}, 0)


@pytest.mark.parametrize("changes, message", [
    ({"labels": torch.full((2, 5), 64)}, "label 64 is outside the model's 64 target tokens (-100 marks a label not "
                                         "predicted)"),
    ({"labels": torch.full((2, 5), -3)}, "label -3 is outside the model's 64 target tokens"),
    ({"labels": torch.ones(2, 5)}, "an encoder-decoder model's labels are the target text's ids (2 rows of integers, "
                                   "-100 where not predicted), not a torch.float32 tensor of shape (2, 5)"),
    ({"labels": torch.ones(3, 5, dtype=torch.long)}, "not a torch.int64 tensor of shape (3, 5)"),
    ({"decoder_input_ids": torch.full((2, 5), 70)}, "decoder_input_ids go from 70 to 70, outside the model's 64"),
    ({"decoder_attention_mask": torch.ones(2, 4)}, "decoder_attention_mask is a torch.float32 tensor of shape (2, 4), "
                                                   "labels (2, 5): they must match"),
    ({"decoder_input_ids": torch.ones(2, 5, dtype=torch.long), "decoder_attention_mask": torch.full((2, 5), 2)},
     "decoder_attention_mask holds 2; it marks each token"),
    ({"decoder_input_ids": torch.ones(2, 6, dtype=torch.long)}, "labels of shape (2, 5) and decoder_input_ids of shape "
                                                                "(2, 6): the decoder predicts one label at each"),
])
def test_an_encoder_decoder_model_s_targets_are_checked_before_any_work(changes, message):
    """Its decoder reads the labels (or decoder_input_ids) whatever the loss: named, not an IndexError
    deep inside the model."""
    ids = torch.randint(5, tiny.VOCAB_SIZE, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, :5].clone(), **changes}
    with pytest.raises(ValueError, match=re.escape(message)):
        compress(tiny.build("t5", "AutoModelForSeq2SeqLM"), WSVDConfig(method="whiten", param_ratio=0.5), [batch],
                 show_progress=False)


def test_an_encoder_decoder_classifier_takes_one_class_per_example():
    """BART's classifier: its labels are classes (its decoder reads the input ids), not target text."""
    config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=16, num_labels=2)
    ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = config.eos_token_id
    model, _ = compress(transformers.BartForSequenceClassification(config), WSVDConfig(method="whiten", param_ratio=0.5),
                        [{"input_ids": ids, "labels": torch.tensor([0, 1])}], show_progress=False)
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    with pytest.raises(ValueError, match=re.escape("label 5 is outside the model's 2 classes")):
        compress(transformers.BartForSequenceClassification(config), WSVDConfig(method="whiten", param_ratio=0.5),
                 [{"input_ids": ids, "labels": torch.tensor([0, 5])}], show_progress=False)


def test_an_encoder_decoder_model_s_targets_longer_than_its_positions_are_named():
    config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=16)
    ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.ones(2, 20, dtype=torch.long)}
    with pytest.raises(ValueError, match=re.escape("labels hold sequences of 20 tokens, more than the model's 16 "
                                                   "target positions")):
        compress(transformers.AutoModelForSeq2SeqLM.from_config(config), WSVDConfig(method="whiten", param_ratio=0.5),
                 [batch], show_progress=False)


class _Stream(torch.utils.data.IterableDataset):
    """A streaming dataset: no ``__len__``."""

    def __iter__(self):
        for seed in range(4):
            ids = tiny.inputs("llama", batch=1, length=8, seed=seed)["input_ids"][0]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_integer_labels_of_any_width_and_the_usual_mistakes_around_the_call():
    """int32 labels (numpy's default on Windows) give the int64 result; a no_grad() around compress
    changes nothing; one batch (a tokenizer's output) and inference_mode() are refused by name."""
    config = WSVDConfig(method="fwsvd", param_ratio=0.5)
    int64, _ = compress(tiny.build("llama"), config, [_batch("llama")], show_progress=False)
    int32, _ = compress(tiny.build("bert"), config, [_batch("bert", labels=torch.tensor([0, 1], dtype=torch.int32))],
                        show_progress=False)
    bert64, _ = compress(tiny.build("bert"), config, [_batch("bert")], show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(int32.state_dict().values(), bert64.state_dict().values()))
    batch = _batch("llama")
    with torch.no_grad():
        quiet, _ = compress(tiny.build("llama"), config, [dict(batch, labels=batch["labels"].int())],
                            show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(quiet.state_dict().values(), int64.state_dict().values()))
    encoded = tiny.tokenizer()(["good film", "bad"], return_tensors="pt", padding=True)
    with pytest.raises(TypeError, match=r"data is one batch \(a BatchEncoding\): pass an iterable of batches, e.g. "
                                        r"\[batch\]"):
        compress(tiny.build("llama"), config, encoded, show_progress=False)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"compress was called under "
                                                                    r"torch.inference_mode\(\)"):
        compress(tiny.build("llama"), config, [batch], show_progress=False)


def test_a_float64_default_dtype_does_not_reach_the_fisher_pass():
    """torch.set_default_dtype(torch.float64) (scientific code): the statistics are the same."""
    config = WSVDConfig(method="fwsvd", param_ratio=0.5)
    expected, _ = compress(tiny.build("llama"), config, [_batch("llama")], show_progress=False)
    model = tiny.build("llama")
    torch.set_default_dtype(torch.float64)
    try:
        got, _ = compress(model, config, [_batch("llama")], show_progress=False)
    finally:
        torch.set_default_dtype(torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), expected.state_dict().values()))


def test_batches_that_worked_before_the_check_still_do():
    """A loader over a dataset of no length; a custom loss_fn reading labels of its own shape; a model
    of other inputs than token ids (a ViT's pixel_values)."""
    _, report = compress(tiny.build("llama"), WSVDConfig(method="fwsvd", param_ratio=0.6),
                         torch.utils.data.DataLoader(_Stream(), batch_size=2), show_progress=False)
    assert report.importance_examples == 4
    ids = torch.randint(len(tiny.SPECIALS), tiny.VOCAB_SIZE, (2, 8), generator=torch.Generator().manual_seed(0))
    last = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, -1]}]

    def last_token_loss(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -2]
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")

    _, report = compress(tiny.build("llama"), WSVDConfig(method="fwsvd", param_ratio=0.6), last,
                         loss_fn=last_token_loss, show_progress=False)
    assert report.ranks
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, image_size=16, patch_size=4, num_labels=3)).eval()
    pixels = [{"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}]
    _, report = compress(vit, WSVDConfig(method="whiten", param_ratio=0.6), pixels, show_progress=False)
    assert report.ranks


def test_a_causal_lm_adds_blocks_it_writes_itself_to_its_calibration_data(tokenizer):
    texts = _sentences(60)
    real = data_loader(tiny.build("llama"), tokenizer, Dataset.from_dict({"text": texts}),
                       WSVDConfig(num_samples=4, max_length=8, seed=1)).dataset
    config = WSVDConfig(num_samples=4, max_length=8, seed=1, generated_samples=3)
    model = tiny.build("llama")
    loader = data_loader(model, tokenizer, Dataset.from_dict({"text": texts}), config)
    blocks = loader.dataset["input_ids"]
    assert len(blocks) == 7 and blocks[:4] == real["input_ids"]
    written = blocks[4:]
    # Full blocks continuing the first two tokens (a quarter of 8) of a real block, not copies of one.
    assert all(len(ids) == 8 for ids in written) and loader.dataset["attention_mask"][4:] == [[1] * 8] * 3
    assert all(any(ids[:2] == r[:2] for r in real["input_ids"]) for ids in written)
    assert all(ids not in real["input_ids"] for ids in written)
    assert next(model.parameters()).device.type == "cpu"  # back where it was
    assert loader.generated_samples == 3  # what compress records
    again = data_loader(model, tokenizer, Dataset.from_dict({"text": texts}), config).dataset["input_ids"]
    assert again == blocks  # seeded
    other = dataclasses.replace(config, seed=2)
    assert data_loader(model, tokenizer, Dataset.from_dict({"text": texts}), other).dataset["input_ids"][-3:] != written
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (7, 8)


def test_only_a_causal_lm_writes_calibration_blocks(tokenizer):
    table = Dataset.from_dict({"sentence": _sentences(8), "label": [i % 2 for i in range(8)]})
    with pytest.raises(ValueError, match=r"generated_samples=2 \(--generated-samples\): only a causal LM writes "
                                         r"calibration text; BertForSequenceClassification is not one"):
        data_loader(tiny.build("bert", "AutoModelForSequenceClassification"), tokenizer, table,
                    WSVDConfig(max_length=8, generated_samples=2))


@pytest.mark.parametrize("value", [-1, 1.5, True, 2**31])
def test_generated_samples_is_a_count(value):
    with pytest.raises(ValueError, match=re.escape(f"generated_samples={value!r} must be an integer from 0 to 2147483647")):
        WSVDConfig(generated_samples=value)


def test_several_processes_write_their_share_and_calibrate_on_the_blocks_one_process_writes(two_process_results,
                                                                                           one_process_result):
    first, second = (r["written"] for r in two_process_results)
    assert len(first["blocks"]) == 7 and second["blocks"] == first["blocks"] == one_process_result["written"]["blocks"]
    # Two batches of written blocks: one each, where one process writes both.
    assert (first["generate_calls"], second["generate_calls"], one_process_result["written"]["generate_calls"]) == (1, 1, 2)


def test_shares_of_the_written_batches_are_the_batches_one_writer_writes():
    model, blocks = tiny.build("llama"), [{"input_ids": list(range(5 + i, 13 + i))} for i in range(6)]
    write = functools.partial(teacher_samples, model, blocks, 5, batch_size=2, seed=3, show_progress=False)
    whole, first, second = write(), write(share=(0, 2)), write(share=(1, 2))
    assert len(whole) == 5 and first == whole[0:2] + whole[4:5] and second == whole[2:4]
    assert write(share=(2, 3)) == whole[4:5]
    with pytest.raises(ValueError, match=re.escape("share=(2, 2) must be (index, processes) with 0 <= index < processes")):
        write(share=(2, 2))


def test_held_out_data_holds_no_written_blocks(tokenizer):
    config = WSVDConfig(max_length=8, generated_samples=3)
    loader = data_loader(tiny.build("llama"), tokenizer, Dataset.from_dict({"text": _sentences(60)}), config,
                         num_samples=5, shuffle=False)
    assert len(loader.dataset) == 5 and loader.generated_samples == 0


def test_blocks_longer_than_the_model_takes_are_refused_before_it_writes(tokenizer):
    model = tiny.build("gpt2")  # 64 positions
    with pytest.raises(ValueError, match="exceeds"):
        data_loader(model, tokenizer, Dataset.from_dict({"text": _sentences(200)}),
                    WSVDConfig(num_samples=2, max_length=80, generated_samples=2))


def test_a_dispatched_model_writes_where_it_is_and_a_plain_one_on_the_accelerator(tokenizer, monkeypatch):
    from accelerate import cpu_offload

    from hf_wsvd.statistics import default_accelerator

    moves = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: moves.append(args) or self)
    text = Dataset.from_dict({"text": _sentences(60)})
    config = WSVDConfig(num_samples=4, max_length=8, generated_samples=2)
    assert len(data_loader(tiny.build("llama"), tokenizer, text, config).dataset) == 6
    assert (default_accelerator().device,) in moves
    moves.clear()
    dispatched = tiny.build("llama")
    cpu_offload(dispatched.model.layers[1], execution_device=torch.device("cpu"))  # one block's weights offloaded
    assert len(data_loader(dispatched, tokenizer, text, config).dataset) == 6
    assert moves == []  # accelerate's hooks place it: nothing may move it as a whole


def test_running_out_of_memory_while_writing_calibration_blocks_says_what_to_lower(tokenizer, monkeypatch):
    import hf_wsvd.cli.workflow as workflow

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(workflow, "teacher_samples", out_of_memory)
    with pytest.raises(ValueError, match=r"writing generated_samples=3 calibration blocks ran out of memory on (cpu|cuda): "
                                         r"lower batch_size .* \(--device-map auto\)$"):
        data_loader(tiny.build("llama"), tokenizer, Dataset.from_dict({"text": _sentences(60)}),
                    WSVDConfig(num_samples=4, max_length=8, generated_samples=3))


def test_compress_records_the_written_blocks_its_data_holds(tokenizer, caplog):
    text = Dataset.from_dict({"text": _sentences(60)})
    quick = dict(method="whiten", allocation="uniform", sequential=False, param_ratio=0.5)
    loader = data_loader(tiny.build("llama"), tokenizer, text, WSVDConfig(num_samples=4, max_length=8, generated_samples=2))
    model, _ = compress(tiny.build("llama"), WSVDConfig(**quick), loader, show_progress=False)
    assert model.config.wsvd["generated_samples"] == 2 and model.config.wsvd["num_samples"] == 4
    # Batches of its own: compress writes nothing, says so once, and the recipe says 0.
    batches = list(data_loader(tiny.build("llama"), tokenizer, text, WSVDConfig(num_samples=4, max_length=8)))
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        model, _ = compress(tiny.build("llama"), WSVDConfig(**quick, generated_samples=3), batches, show_progress=False)
    assert model.config.wsvd["generated_samples"] == 0
    notes = [r.getMessage() for r in caplog.records if "generated_samples=3" in r.getMessage()]
    assert len(notes) == 1 and "none of them was written by the model" in notes[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_cpu_model_writes_its_blocks_on_the_gpu_and_comes_back(tokenizer, monkeypatch):
    model = tiny.build("llama")
    devices = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *args, **kwargs: devices.append(model.device) or generate(*args, **kwargs))
    text = Dataset.from_dict({"text": _sentences(60)})
    config = WSVDConfig(num_samples=4, max_length=8, batch_size=2, generated_samples=3)
    blocks = data_loader(model, tokenizer, text, config).dataset["input_ids"]
    assert len(blocks) == 7 and all(len(ids) == 8 for ids in blocks)
    assert {d.type for d in devices} == {"cuda"} and len(devices) == 2
    assert next(model.parameters()).device.type == "cpu"
    assert data_loader(model, tokenizer, text, config).dataset["input_ids"] == blocks  # seeded on the GPU too
