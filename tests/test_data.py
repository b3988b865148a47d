"""Importance/evaluation data: only the sampled rows are tokenized, sentence pairs are found, causal-LM
blocks come from the whole text."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

import tiny
from hf_wsvd import WSVDConfig
from hf_wsvd.data import sample, text_blocks, tokenize
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
