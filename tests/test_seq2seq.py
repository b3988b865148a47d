"""Sequence-to-sequence LMs (T5, BART) as a task of their own: the importance loss and perplexity of
their target text, data files of source and target columns, and the command line end to end."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import transformers
from datasets import ClassLabel, Dataset, Features, Value
from tokenizers import processors

import tiny
from helpers import run_without_hf_wsvd
from hf_wsvd import WSVDConfig, compress
from hf_wsvd.cli import main
from hf_wsvd.cli.workflow import data_loader
from hf_wsvd.evaluation import evaluate_model
from hf_wsvd.linalg import truncated_svd
from hf_wsvd.tasks import SEQ2SEQ_LM, per_example_loss, task_of


def _rows(count: int) -> list[dict[str, str]]:
    words = tiny.WORDS
    return [{"source": " ".join(words[i % 9: i % 9 + 4 + i % 3]), "target": " ".join(words[i % 5: i % 5 + 2 + i % 2])}
            for i in range(count)]


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows(24)))
    return path


def test_the_loss_of_each_example_is_the_model_s_own_loss_of_its_target_text():
    model = tiny.build("t5")
    assert task_of(model) == SEQ2SEQ_LM
    ids = torch.randint(7, tiny.VOCAB_SIZE, (3, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(7, tiny.VOCAB_SIZE, (3, 4), generator=torch.Generator().manual_seed(1))
    labels[1, 2:] = -100  # a shorter target, padded
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    losses = per_example_loss(SEQ2SEQ_LM)(model, batch)
    with torch.no_grad():
        for row in range(3):  # the model's mean token loss of each example alone
            alone = {k: v[row:row + 1] for k, v in batch.items()}
            assert torch.allclose(losses[row], model(**alone).loss, rtol=1e-5, atol=1e-6)


def test_data_files_of_source_and_target_text(tmp_path, tokenizer, pairs):
    model = tiny.build("t5")
    loader = data_loader(model, tokenizer, str(pairs), WSVDConfig(max_length=16, batch_size=4), shuffle=False)
    rows = _rows(24)
    assert loader.dataset["input_ids"] == tokenizer([r["source"] for r in rows], truncation=True,
                                                    max_length=16)["input_ids"]
    assert loader.dataset["labels"] == tokenizer(text_target=[r["target"] for r in rows], truncation=True,
                                                 max_length=16)["input_ids"]
    batch = next(iter(loader))
    shortest = min(range(4), key=lambda i: len(loader.dataset["labels"][i]))
    assert (batch["labels"][shortest] == -100).any()  # padding is not predicted
    # named columns, and what is refused
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"text": r["source"], "summary": r["target"]}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"no 'target' column in data file .* \(columns \['text', 'summary'\]\): name "
                                         r"the column of target text \(--label-column\)"):
        data_loader(model, tokenizer, str(renamed), WSVDConfig())
    named = data_loader(model, tokenizer, str(renamed), WSVDConfig(max_length=16), label_column="summary", shuffle=False)
    assert named.dataset["labels"] == loader.dataset["labels"]
    # a column of objects (the translation layout): its fields are columns of their own
    nested = tmp_path / "translation.jsonl"
    nested.write_text("".join(json.dumps({"translation": {"fr": r["target"], "en": r["source"]}}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=re.escape("(columns ['translation']; fields ['translation.fr', "
                                                   "'translation.en']): name the column of target text (--label-column)")):
        data_loader(model, tokenizer, str(nested), WSVDConfig())
    translated = data_loader(model, tokenizer, str(nested), WSVDConfig(max_length=16), ["translation.en"],
                             label_column="translation.fr", shuffle=False)
    assert translated.dataset["input_ids"] == loader.dataset["input_ids"]
    assert translated.dataset["labels"] == loader.dataset["labels"]
    wide = tmp_path / "wide.jsonl"
    wide.write_text("".join(json.dumps({**r, "context": r["source"]}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"text_columns=\['source', 'context'\]: a sequence-to-sequence LM reads one "):
        data_loader(model, tokenizer, str(wide), WSVDConfig(), ["source", "context"])
    targets_only = tmp_path / "targets.jsonl"
    targets_only.write_text("".join(json.dumps({"target": r["target"]}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"no text column in data file .* besides the target text column 'target': "):
        data_loader(model, tokenizer, str(targets_only), WSVDConfig())
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"source": r["source"], "target": 3}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"column 'target' of data file .* is not text \(row 1: 3\): name a column of "
                                         r"text \(--label-column\); this one holds numbers"):
        data_loader(model, tokenizer, str(numbers), WSVDConfig())
    classes = Dataset.from_dict({"source": ["the film", "a plot"], "target": [1, 0]},
                                features=Features({"source": Value("string"), "target": ClassLabel(names=["bad", "good"])}))
    with pytest.raises(ValueError, match=re.escape("column 'target' of the data is a ClassLabel (class indices of "
                                                   "['bad', 'good']), not text: a sequence-to-sequence LM's target is text")):
        data_loader(model, tokenizer, classes, WSVDConfig())
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"source": "the film", "target": "good"}) + "\n"
                     + json.dumps({"source": "a plot", "target": " "}) + "\n")
    closing = tiny.tokenizer()  # as T5's and BART's, it ends every text with </s>: a blank target is not empty
    closing.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 6)])
    for each in (tokenizer, closing):
        with pytest.raises(ValueError, match=r"row 2 of data file .* has no target text in 'target': remove the empty "):
            data_loader(model, each, str(blank), WSVDConfig(max_length=16), shuffle=False)


def test_labels_are_padded_on_the_right_whatever_side_the_tokenizer_pads(tokenizer, pairs):
    """The decoder reads the labels from the left: padded on the left, it would read padding first."""
    model = tiny.build("t5")
    config = WSVDConfig(max_length=16, batch_size=4)
    right = data_loader(model, tokenizer, str(pairs), config, shuffle=False)
    tokenizer.padding_side = "left"
    left = data_loader(model, tokenizer, str(pairs), config, shuffle=False)
    assert tokenizer.padding_side == "left"  # the user's tokenizer is left as it was
    for a, b in zip(right, left):
        assert torch.equal(a["labels"], b["labels"]) and (a["labels"][:, 0] != -100).all()
    assert evaluate_model(model, left) == evaluate_model(model, right)


def test_the_recommended_recipe_compresses_with_the_fisher_of_the_target_text(tokenizer, pairs):
    model = tiny.build("t5")
    loader = data_loader(model, tokenizer, str(pairs), WSVDConfig(max_length=16, batch_size=4))
    dense = evaluate_model(model, loader)["perplexity"]
    with torch.no_grad():  # the perplexity of the target text: its tokens' mean loss, exponentiated
        losses = [(model(**batch).loss * (batch["labels"] != -100).sum(), (batch["labels"] != -100).sum())
                  for batch in loader]
    assert math.isclose(dense, math.exp(sum(l for l, _ in losses) / sum(n for _, n in losses)), rel_tol=1e-5)
    compressed, report = compress(model, WSVDConfig(param_ratio=0.6), loader, show_progress=False)
    assert (report.method, report.allocation, report.pipeline) == ("fisher_whiten", "greedy", "whole_model")
    assert report.importance_examples == 24 and report.ranks and report.notices == []
    assert math.isfinite(evaluate_model(compressed, loader)["perplexity"])


def test_the_command_line_compresses_and_evaluates_a_sequence_to_sequence_lm(tmp_path, tokenizer, pairs, capsys):
    dense = tmp_path / "dense-t5"
    tiny.build("t5").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    out = tmp_path / "compressed"
    assert main(["compress", str(dense), str(out), "--param-ratio", "0.6", "--data", str(pairs), "--max-length", "16",
                 "--batch-size", "4", "--eval-data", str(pairs)]) == 0
    printed = capsys.readouterr().out
    assert "compressed with fisher_whiten: greedy allocation, whole_model pipeline" in printed
    assert "  perplexity " in printed
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out)
    assert model.config.wsvd["method"] == "fisher_whiten" and model.config.wsvd["num_samples"] == 24
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text2text-generation" in card
    assert "AutoModelForSeq2SeqLM.from_pretrained(" in card  # its task's class, not AutoModelForPreTraining
    assert main(["eval", str(out), "--data", str(pairs), "--max-length", "16"]) == 0
    measured = json.loads(capsys.readouterr().out)["perplexity"]
    loader = data_loader(model, tokenizer, str(pairs), WSVDConfig(max_length=16), shuffle=False)
    assert math.isclose(measured, evaluate_model(model, loader)["perplexity"], rel_tol=1e-5)


_COMMON = dict(pad_token_id=0, bos_token_id=5, eos_token_id=6, decoder_start_token_id=6)
_FAMILIES = {
    # FSMT's forward shifts the source ids into its decoder where it is given none
    "fsmt": lambda: transformers.FSMTConfig(langs=["en", "de"], src_vocab_size=64, tgt_vocab_size=64, d_model=32,
                                            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                            max_position_embeddings=64, **_COMMON),
    # ProphetNet's positional embeddings return a tuple
    "prophetnet": lambda: transformers.ProphetNetConfig(vocab_size=64, hidden_size=32, num_encoder_layers=2,
                                                        num_decoder_layers=2, num_encoder_attention_heads=4,
                                                        num_decoder_attention_heads=4, encoder_ffn_dim=64,
                                                        decoder_ffn_dim=64, max_position_embeddings=64, ngram=2,
                                                        **_COMMON),
    # M2M100: only its forward builds the decoder inputs from the labels
    "m2m100": lambda: transformers.M2M100Config(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                                encoder_attention_heads=4, decoder_attention_heads=4,
                                                encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                                **_COMMON),
    # Marian's encoder, decoder and shared embeddings are three modules of one table
    "marian": lambda: transformers.MarianConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                                encoder_attention_heads=4, decoder_attention_heads=4,
                                                encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                                **_COMMON),
}


def _family(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(_FAMILIES[name]()).eval()


def _batch(source: int = 6, target: int = 4) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(7, tiny.VOCAB_SIZE, (3, source), generator=generator)
    labels = torch.randint(7, tiny.VOCAB_SIZE, (3, target), generator=generator)
    labels[2, target // 2:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("family", ["fsmt", "prophetnet", "m2m100"])
def test_families_whose_forward_builds_other_decoder_inputs_score_their_target_text(family):
    """The decoder reads the labels shifted by the model's own method; FSMT's forward would have read
    the source (a wrong loss where both have one length, an error from torch where not)."""
    model = _family(family)
    batch = _batch()
    labels = batch["labels"].clone()
    losses = per_example_loss(SEQ2SEQ_LM)(model, batch)
    assert torch.equal(batch["labels"], labels)  # FSMT's shift fills the -100 with padding in place: not ours
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    with torch.no_grad():
        for row in range(3):  # teacher-forced on the target, shifted as the model shifts it
            alone = {k: v[row:row + 1] for k, v in batch.items()}
            if prepare is not None:
                decoder = prepare(labels=alone["labels"].clone())
            else:  # M2M100: only its forward shifts, given the labels
                decoder = torch.cat([torch.tensor([[model.config.decoder_start_token_id]]), alone["labels"][:, :-1]], 1)
                decoder = decoder.masked_fill(decoder == -100, model.config.pad_token_id)
                assert torch.allclose(losses[row], model(**alone).loss, rtol=1e-5, atol=1e-6)
            logits = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"],
                           decoder_input_ids=decoder, use_cache=False).logits
            expected = torch.nn.functional.cross_entropy(logits[0], alone["labels"][0], ignore_index=-100)
            assert torch.allclose(losses[row], expected, rtol=1e-5, atol=1e-6)
    _, report = compress(model, WSVDConfig(param_ratio=0.6), [_batch(), _batch(5, 5)], show_progress=False)
    assert report.method == "fisher_whiten" and report.ranks


def test_the_target_is_scored_without_a_cache_a_decoder_may_read_only_its_last_input_with(monkeypatch):
    """FSMT before transformers 5.25 decodes only the last decoder input where it keeps a cache (its
    config's use_cache, unless told otherwise): a BART that does the same scores every target token."""
    model = _family("m2m100")
    forward = type(model).forward

    def last_input_with_a_cache(self, *args, use_cache=None, decoder_input_ids=None, **kwargs):
        if (self.config.use_cache if use_cache is None else use_cache) and decoder_input_ids is not None:
            decoder_input_ids = decoder_input_ids[:, -1:]
        return forward(self, *args, use_cache=use_cache, decoder_input_ids=decoder_input_ids, **kwargs)

    expected = per_example_loss(SEQ2SEQ_LM)(model, _batch())
    assert model.config.use_cache
    monkeypatch.setattr(type(model), "forward", last_input_with_a_cache)
    assert torch.allclose(per_example_loss(SEQ2SEQ_LM)(model, _batch()), expected, rtol=1e-6, atol=1e-7)
    given = {**_batch(), "decoder_input_ids": torch.full((3, 4), model.config.decoder_start_token_id)}
    assert torch.isfinite(per_example_loss(SEQ2SEQ_LM)(model, given)).all()


def test_batches_a_seq2seq_lm_cannot_decode_are_named_before_any_work():
    model = tiny.build("t5")
    batch = _batch()
    with pytest.raises(ValueError, match=re.escape("labels of shape (3, 4) and decoder_input_ids of shape (3, 7): the "
                                                   "decoder predicts one label at each of its positions")):
        compress(model, WSVDConfig(method="whiten", param_ratio=0.5),
                 [{**batch, "decoder_input_ids": torch.ones(3, 7, dtype=torch.long)}], show_progress=False)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match=r"^T5ForConditionalGeneration needs each batch's labels \(the target text's "
                                         r"ids\) or decoder_input_ids to run its decoder"):
        compress(model, WSVDConfig(method="whiten", param_ratio=0.5), [unlabelled], show_progress=False)


def test_input_embeddings_tied_to_a_table_of_their_own_factorize_that_table(tmp_path):
    """Marian's input embeddings are the encoder's copy of model.shared (a declared tie): factorizing
    the copy alone untied it and grew the model; the shared table is factorized, and every copy with it."""
    model = _family("marian")
    batch = _batch()
    table = model.model.shared.weight.detach().clone().double()
    recipe = WSVDConfig(method="svd", param_ratio=0.99, embeddings=True, embedding_method="svd", embedding_ratio=0.9)
    compressed, report = compress(model, recipe, show_progress=False)
    assert report.params_after < report.params_before
    inner = compressed.model
    assert type(inner.shared).__name__ == "FactorizedEmbedding"
    assert inner.encoder.embed_tokens.weight is inner.shared.weight is inner.decoder.embed_tokens.weight
    assert compressed.lm_head.weight is inner.shared.weight
    up, down = truncated_svd(table, inner.shared.rank)  # the table's best factors (the encoder and decoder read it)
    torch.testing.assert_close((inner.shared.weight @ inner.shared.proj.weight.T).double(), up @ down, atol=1e-5,
                               rtol=1e-4)
    with torch.no_grad():
        logits = compressed(**batch).logits
    compressed.save_pretrained(tmp_path / "marian")
    again = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "marian")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits)
    torch.save({**batch, "logits": logits}, tmp_path / "expected.pt")
    remote = run_without_hf_wsvd("""
        import torch, transformers
        expected = torch.load("expected.pt")
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained("marian", trust_remote_code=True)
        logits = model(**{k: v for k, v in expected.items() if k != "logits"}).logits
        torch.testing.assert_close(logits, expected["logits"])
        assert model.model.encoder.embed_tokens.weight is model.model.shared.weight
        print("same")
    """, tmp_path)
    assert remote.stdout.strip().endswith("same"), remote.stderr[-2000:]
    # stopped right after the embeddings step, the table is recorded by the name it was factorized under
    from hf_wsvd.pipelines.modifiers.embeddings import Embeddings

    def stopped(self, job):
        Embeddings_on_end(self, job)
        raise KeyboardInterrupt

    Embeddings_on_end = Embeddings.on_end
    stopped_model = _family("marian")
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(Embeddings, "on_end", stopped)
        with pytest.raises(KeyboardInterrupt):
            compress(stopped_model, recipe, show_progress=False)
    recorded = stopped_model.config.wsvd["ranks"]
    assert "shared" in recorded and "encoder.embed_tokens" not in recorded
    stopped_model.save_pretrained(tmp_path / "stopped")
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "stopped")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, stopped_model(**batch).logits)
    # a module sharing the table without a declared tie would be left dense, untied: refused
    other = tiny.build("llama")
    other.model.copy = torch.nn.Embedding(tiny.VOCAB_SIZE, 32)
    other.model.copy.weight = other.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"factorizes the input embeddings 'model\.embed_tokens', whose table is "
                                         r"shared by \['model\.copy'\] without a declared tie"):
        compress(other, WSVDConfig(method="svd", param_ratio=0.6, embeddings=True, embedding_method="svd"),
                 show_progress=False)
