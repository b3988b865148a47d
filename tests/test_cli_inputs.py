"""One-line errors, before any work, for what the command line reads that a user may have broken or
chosen wrong: tokenizers, dataset folders, hand-edited dense configs, quantization formats, model
cards, Hub ids; and inputs it must leave as they were."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest
import torch
import transformers

import tiny
from helpers import run_cli as run

def one_error(capsys, argv: list[str], code: int = 2) -> str:
    """The one error line ``hf-wsvd argv`` prints, exiting with ``code``."""
    capsys.readouterr()
    assert run(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"hf-wsvd {argv[0]}"), err
    return errors[0]


def test_a_tokenizer_far_smaller_than_the_embeddings_is_refused(tmp_path, tokenizer, tsv, capsys):
    """A tokenizer whose vocabulary files are gone loads with its special tokens alone, and every word
    would become the unknown token: eval and compress would run on that, quietly."""
    config = tiny.CONFIGS["bert"]()
    config.vocab_size = 4 * len(tokenizer) + 1
    path = tmp_path / "model"
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    error = one_error(capsys, ["eval", str(path), "--data", str(tsv)])
    assert f"the tokenizer of {str(path)!r} knows {len(tokenizer)} tokens, the model {config.vocab_size} token " \
           "embeddings" in error and error.endswith("(--tokenizer PATH)")
    # compress has no option naming another tokenizer, so its hint names none
    error = one_error(capsys, ["compress", str(path), str(tmp_path / "out"), "--data", str(tsv)])
    assert error.endswith("restore them") and "--tokenizer" not in error
    assert not (tmp_path / "out").exists()


def test_hand_edited_dense_configs_are_one_line(classifier_dir, tsv, capsys):
    config = json.loads((classifier_dir / "config.json").read_text())
    (classifier_dir / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    error = one_error(capsys, ["eval", str(classifier_dir), "--data", str(tsv)])
    assert "the tensor 'bert.embeddings.word_embeddings.weight' has another shape in the weights than config.json " \
           "gives it: (64, 32) in the file, (100, 32) in the model" in error
    (classifier_dir / "config.json").write_text(json.dumps({**config, "dtype": "foo"}))
    assert "cannot be loaded (AttributeError: module 'torch' has no attribute 'foo')" in one_error(
        capsys, ["eval", str(classifier_dir), "--data", str(tsv)])
    (classifier_dir / "config.json").write_text(json.dumps({**config, "problem_type": "regression"}))
    assert "problem_type='regression' with num_labels=2: hf_wsvd's regression loss (and the command line's labels) " \
           "take one number per example" in one_error(
        capsys, ["eval", str(classifier_dir), "--data", str(tsv)])


@pytest.mark.parametrize("name, text, message", [
    ("model.safetensors.index.json", "[]", "is not a JSON object (it holds an array)"),
    ("model.safetensors.index.json", "", "is not a JSON object (Expecting value"),
    ("model.safetensors.index.json", '{"weight_map": []}', "is not a safetensors index (its 'weight_map' of tensor -> "
                                                         "file is an array)"),
    ("model.safetensors.index.json", "{}", "is not a safetensors index (its 'weight_map' of tensor -> file is missing)"),
    ("model.safetensors.index.json", '{"weight_map": {"a": 5}}', "names the weights file 5, not a .safetensors file"),
    ("config.json", "null", "is not a JSON object (it holds null)"),
    ("config.json", "{", "is not a JSON object (Expecting property name"),
    ("tokenizer.json", "[]", "is not a JSON object (it holds an array)"),
    ("tokenizer_config.json", "", "is not a JSON object (Expecting value"),
    # transformers reads a damaged one as none: the output would lack the model's generation settings
    ("generation_config.json", "{bad", "is not a JSON object (Expecting property name"),
])
def test_a_hand_edited_json_file_is_named_by_every_command(tmp_path, classifier_dir, tsv, capsys, name, text, message):
    """Read unchecked, such files ended in a type error inside transformers, or in a message without
    the file's name (export blamed the tokenizer for a damaged config.json)."""
    out = tmp_path / "c"
    assert run(["compress", str(classifier_dir), str(out), "--method", "svd", "--param-ratio", "0.5"]) == 0
    if name == "model.safetensors.index.json":
        (out / name).write_text(text)  # beside model.safetensors an index is not read: the folder still loads
        assert run(["eval", str(out), "--data", str(tsv)]) == 0
        (out / "model.safetensors").unlink()  # a sharded checkpoint's, which the loader reads
    (out / name).write_text(text)
    for argv in (["inspect", str(out)], ["eval", str(out), "--data", str(tsv)],
                 ["export", str(out), str(tmp_path / "exported")],
                 ["compress", str(out), str(tmp_path / "again"), "--method", "svd"]):
        assert f"{out / name} {message}" in one_error(capsys, argv), argv
    assert not (tmp_path / "exported").exists() and not (tmp_path / "again").exists()


def test_a_config_that_breaks_the_model_class_is_one_line_in_inspect_and_export(tmp_path, classifier_dir, capsys):
    out = tmp_path / "c"
    assert run(["compress", str(classifier_dir), str(out), "--method", "svd", "--param-ratio", "0.5"]) == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "hidden_act": "nope"}))
    for argv in (["inspect", str(out)], ["export", str(out), str(tmp_path / "exported")]):
        assert f"the checkpoint in {str(out)!r} cannot be loaded (KeyError: 'nope'): its config.json or files are " \
               "damaged or were edited" in one_error(capsys, argv)


def test_a_cut_gguf_file_is_one_line(tmp_path, tsv, capsys):
    cut = tmp_path / "model.gguf"
    # a version-3 header announcing one tensor and five metadata entries, cut in the first entry
    cut.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (5).to_bytes(8, "little") + b"\x01")
    assert f"{str(cut)!r} cannot be loaded" in one_error(capsys, ["eval", str(cut), "--data", str(tsv)])


def test_dataset_folders_are_read_not_written_and_bad_ones_are_one_line(tmp_path, classifier_dir, tsv, capsys):
    from datasets import Dataset

    folder = tmp_path / "ds"
    Dataset.from_dict({"sentence": ["good movie", "bad movie"] * 4, "label": [1, 0] * 4}).save_to_disk(folder)
    before = sorted(p.name for p in folder.iterdir())
    capsys.readouterr()
    assert run(["eval", str(classifier_dir), "--data", str(folder)]) == 0
    assert run(["eval", str(classifier_dir), "--data", str(folder), "--max-length", "8"]) == 0
    assert run(["compress", str(classifier_dir), str(tmp_path / "out"), "--data", str(folder), "--num-samples", "4"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == before  # no cache files in the user's folder
    assert "'bogus' names a split of a save_to_disk DatasetDict folder, but" in one_error(
        capsys, ["eval", str(classifier_dir), "--data", str(tsv), "--split", "bogus"])
    # compress --eval-split of an eval file is the split its card names, not one to read
    assert run(["compress", str(classifier_dir), str(tmp_path / "carded"), "--param-ratio", "0.5", "--eval-data", str(tsv),
                "--eval-split", "test", "--eval-dataset-id", "nyu-mll/glue:sst2"]) == 0
    assert "split: test" in (tmp_path / "carded" / "README.md").read_text()
    assert "holds one dataset, not splits" in one_error(
        capsys, ["eval", str(classifier_dir), "--data", str(folder), "--split", "bogus"])
    Dataset.from_dict({"sentence": [], "label": []}).save_to_disk(tmp_path / "empty")
    assert "holds no rows" in one_error(capsys, ["eval", str(classifier_dir), "--data", str(tmp_path / "empty")])
    listed = tmp_path / "lists.jsonl"
    listed.write_text('{"sentence": ["a good movie"], "label": 1}\n')
    assert "(columns ['sentence', 'label']) besides the label column 'label': name one" in one_error(
        capsys, ["eval", str(classifier_dir), "--data", str(listed)])
    assert "column 'sentence' of" in one_error(
        capsys, ["eval", str(classifier_dir), "--data", str(listed), "--text-columns", "sentence"])


def test_a_message_written_for_the_api_and_the_cli_names_the_option_once(tmp_path, tokenizer, capsys):
    """data.py says "max_length=1 (--max-length)"; compress's errors name options: said once."""
    from test_cli import _causal_lm_and_text

    dense, text = _causal_lm_and_text(tmp_path, tokenizer, "llama")
    capsys.readouterr()
    error = one_error(capsys, ["compress", str(dense), str(tmp_path / "lm"), "--data", str(text), "--max-length", "1"])
    assert "error: --max-length=1 leaves a causal LM no token to predict in a block" in error, error
    assert not (tmp_path / "lm").exists()


def test_an_exclusion_of_every_default_target_is_refused_before_the_data_is_read(tmp_path, classifier_dir, tsv, capsys,
                                                                                   monkeypatch):
    from hf_wsvd.cli import workflow

    monkeypatch.setattr(workflow, "data_loader", lambda *a, **k: pytest.fail("read the data before refusing"))
    error = one_error(capsys, ["compress", str(classifier_dir), str(tmp_path / "out"), "--data", str(tsv),
                               "--exclude-modules", ".*"])
    assert "--exclude-modules='.*' excludes every target layer of BertForSequenceClassification" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, group, message", [
    ("int4", "64", "--quantize='int4' groups every 64 inputs of a weight, but 'bert.pooler.dense' has 32 inputs: set "
                   "--quantize-group-size to a divisor of it"),
    ("int4-gpu", "16", "quantize='int4-gpu' runs torchao's packed int4 CUDA kernels and needs a CUDA GPU"),
    ("nf4", "64", "quantize='nf4' needs bitsandbytes (pip install bitsandbytes; the devices its kernels run on are in "
                  "its documentation)"),
    ("int8", "7", "--quantize-group-size=7: --quantize='int8' does not group its weights' inputs"),
])
def test_a_quantization_format_that_cannot_apply_is_refused_before_compressing(tmp_path, classifier_dir, tsv, capsys,
                                                                               monkeypatch, spec, group, message):
    from hf_wsvd import compressor

    if spec == "int4-gpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if spec == "nf4":
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(compressor, "_compress", lambda *a, **k: pytest.fail("compressed before refusing"))
    error = one_error(capsys, ["compress", str(classifier_dir), str(tmp_path / "out"), "--data", str(tsv), "--quantize", spec,
                               "--quantize-group-size", group])
    assert message in error
    assert not (tmp_path / "out").exists()


def test_eval_reads_an_int4_checkpoint_of_a_half_precision_model(tmp_path, tokenizer, tsv, capsys):
    """Its scales are stored in float16: loaded in float32, the int4 matmul mixed the two."""
    half = tmp_path / "half"
    tiny.build("bert", "AutoModelForSequenceClassification").half().save_pretrained(half)
    tokenizer.save_pretrained(half)
    out = tmp_path / "q"
    assert run(["compress", str(half), str(out), "--param-ratio", "0.5", "--quantize", "int4",
                "--quantize-group-size", "16", "--rank-multiple", "8"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    capsys.readouterr()
    assert run(["eval", str(out), "--data", str(tsv)]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1


def test_a_card_whose_header_does_not_parse_is_one_line_before_any_work(tmp_path, classifier_dir, tsv, tokenizer,
                                                                         capsys, monkeypatch):
    out = tmp_path / "c"
    assert run(["compress", str(classifier_dir), str(out), "--param-ratio", "0.5"]) == 0
    card = out / "README.md"
    lines = card.read_text().splitlines()
    card.write_text("\n".join([lines[0], "library_name: [unclosed", *lines[2:]]) + "\n")
    assert "has a YAML header that does not parse" in one_error(capsys, ["push", str(out), "me/x"])
    card.write_text("---\n- a list\n- not metadata\n---\ncard\n")
    assert (f"the model card {str(card)!r} has a YAML header that does not parse as metadata (repo card metadata "
            "block should be a dict)") in one_error(capsys, ["push", str(out), "me/x"])
    card.write_bytes(b"\x96\xff binary")
    assert f"the model card {str(card)!r} is not UTF-8 text (invalid start byte at byte 0)" in one_error(
        capsys, ["push", str(out), "me/x"])
    # heal reads the card before it trains (it used to fail after training, losing it)
    from hf_wsvd.integrations import healing

    dense, _ = tmp_path / "lm", None
    tiny.build("llama", "AutoModelForCausalLM").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    student = tmp_path / "lmc"
    assert run(["compress", str(dense), str(student), "--method", "svd", "--param-ratio", "0.5"]) == 0
    (student / "README.md").write_text("---\nlibrary_name: [unclosed\n---\ncard\n")
    text = tmp_path / "text.txt"
    text.write_text("the movie was great and the plot was good\n" * 40)
    monkeypatch.setattr(healing, "heal", lambda *a, **k: pytest.fail("trained before reading the card"))
    error = one_error(capsys, ["heal", str(student), str(tmp_path / "healed"), "--teacher", str(dense), "--data",
                               str(text), "--steps", "2", "--max-length", "8"])
    assert f"the model card {str(student / 'README.md')!r} has a YAML header that does not parse" in error


def test_export_refuses_a_damaged_tokenizer_and_a_file_for_a_folder(tmp_path, classifier_dir, tsv, capsys):
    out = tmp_path / "c"
    assert run(["compress", str(classifier_dir), str(out), "--param-ratio", "0.5"]) == 0
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    (damaged / "tokenizer.json").write_bytes((damaged / "tokenizer.json").read_bytes()[:100])
    error = one_error(capsys, ["export", str(damaged), str(tmp_path / "exported")])
    assert f"{damaged / 'tokenizer.json'} is not a JSON object (Expecting value: line" in error  # cut short: named
    (damaged / "tokenizer.json").write_text("{}")  # JSON, but no tokenizer
    error = one_error(capsys, ["export", str(damaged), str(tmp_path / "exported")])
    assert f"the tokenizer saved in {str(damaged)!r} cannot be loaded" in error
    assert not (tmp_path / "exported").exists()
    assert f"{str(tsv)!r} is a file, not a checkpoint folder" in one_error(
        capsys, ["export", str(tsv), str(tmp_path / "exported")])
    assert run(["export", str(out), str(tmp_path / "exported")]) == 0  # the intact one keeps its tokenizer
    assert (tmp_path / "exported" / "tokenizer.json").is_file()


def test_hub_ids_are_checked_and_ctrl_c_is_one_line(tmp_path, classifier_dir, capsys, monkeypatch):
    assert "'not a repo!!' is not a Hub repository id" in one_error(
        capsys, ["compress", str(classifier_dir), str(tmp_path / "out"), "--repo-id", "not a repo!!"])
    assert "is not a Hub repository id" in one_error(capsys, ["push", str(classifier_dir), "bad id!"])
    from hf_wsvd.cli import commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "run_eval", interrupted)
    capsys.readouterr()
    assert run(["eval", str(classifier_dir), "--data", "x.tsv"]) == 130
    assert capsys.readouterr().err.strip() == "hf-wsvd eval: interrupted"


def test_heal_refuses_what_it_cannot_heal_before_loading_or_training(tmp_path, tokenizer, capsys, monkeypatch):
    from hf_wsvd.integrations import healing

    dense = tmp_path / "lm"
    tiny.build("llama", "AutoModelForCausalLM").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    student = tmp_path / "lmc"
    assert run(["compress", str(dense), str(student), "--method", "svd", "--param-ratio", "0.5"]) == 0
    text = tmp_path / "text.txt"
    text.write_text("the movie was great and the plot was good\n" * 40)
    monkeypatch.setattr(healing, "heal", lambda *a, **k: pytest.fail("trained"))

    def heal(path, teacher, *extra):
        return one_error(capsys, ["heal", str(path), str(tmp_path / "healed"), "--teacher", str(teacher), "--data",
                                  str(text), "--steps", "2", "--max-length", "8", *extra])

    assert "seed=-1 must be an integer in [0, 2**32)" in heal(student, dense, "--seed", "-1")
    assert f"{str(dense)!r} is a dense checkpoint (model_type 'llama')" in heal(dense, dense)
    assert f"model folder {str(tmp_path / 'gone')!r} does not exist" in heal(student, tmp_path / "gone")  # a teacher
    classifier = tmp_path / "cls"
    tiny.build("llama", "AutoModelForSequenceClassification").save_pretrained(classifier)
    tokenizer.save_pretrained(classifier)
    assert "is a LlamaForSequenceClassification, not a causal LM" in heal(student, classifier)
    other = tmp_path / "other-tokens"
    tiny.build("llama", "AutoModelForCausalLM").save_pretrained(other)
    words = dict(reversed(list(tokenizer.get_vocab().items())))
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(sorted(words, reverse=True))},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                         eos_token="</s>").save_pretrained(other)
    assert "has another tokenizer than" in heal(student, other)
    quantized = tmp_path / "q"
    assert run(["compress", str(dense), str(quantized), "--method", "svd", "--param-ratio", "0.9", "--quantize", "int8"]) == 0
    assert "stores quantized: heal the unquantized compressed checkpoint, then quantize it" in heal(quantized, dense)


def test_a_list_option_may_end_with_a_comma():
    from hf_wsvd.argtypes import comma_list, names

    assert comma_list("sentence1,sentence2,") == ["sentence1", "sentence2"] and names("query,") == ["query"]


@pytest.mark.parametrize("option, value", [("--text-columns", ""), ("--text-columns", ","),
                                           ("--exclude-modules", ""), ("--target-modules", "query,,value")])
def test_a_list_option_with_an_empty_name_is_refused(tmp_path, classifier_dir, tsv, capsys, option, value):
    """An empty name would be dropped, and the option silently mean its default."""
    error = one_error(capsys, ["compress", str(classifier_dir), str(tmp_path / "out"), "--data", str(tsv),
                               option, value])
    assert f"{value!r} holds an empty name: give comma-separated names (a,b)" in error


def test_a_model_path_that_is_a_file_or_an_empty_output_is_named(tmp_path, classifier_dir, tsv, capsys):
    config = str(classifier_dir / "config.json")
    assert f"model {config!r} is a file: name the model's folder (or a .gguf file)" in one_error(
        capsys, ["eval", config, "--data", str(tsv)])
    assert "output folder '' is empty: name a folder" in one_error(
        capsys, ["compress", str(classifier_dir), "", "--data", str(tsv)])


def test_an_output_inside_a_data_folder_is_refused(tmp_path, classifier_dir, capsys):
    """A save_to_disk folder is the user's input, as the model is."""
    from datasets import Dataset

    folder = tmp_path / "rows"
    Dataset.from_dict({"sentence": ["good film", "bad plot"], "label": [1, 0]}).save_to_disk(folder)
    before = sorted(p.name for p in folder.iterdir())
    error = one_error(capsys, ["compress", str(classifier_dir), str(folder / "out"), "--data", str(folder)])
    assert f"output folder {str(folder / 'out')!r} lies inside the input {str(folder)!r}" in error
    assert sorted(p.name for p in folder.iterdir()) == before



def test_misread_paths_are_named_for_what_they_are(tmp_path, classifier_dir, tsv, capsys):
    """Each of these once gave a message about something else: a folder without config.json
    ("Unrecognized model"), a device as data ("does not exist"), a tokenizer path called a model's."""
    (tmp_path / "empty").mkdir()
    assert f"{str(tmp_path / 'empty')!r} holds no config.json: not a checkpoint folder" in one_error(
        capsys, ["inspect", str(tmp_path / "empty")])
    assert "data '/dev/null' is neither a file nor a folder (a device or a pipe)" in one_error(
        capsys, ["eval", str(classifier_dir), "--data", "/dev/null"])
    assert f"tokenizer {str(tsv)!r} is a file: name the tokenizer's folder" in one_error(
        capsys, ["eval", str(classifier_dir), "--data", str(tsv), "--tokenizer", str(tsv)])
    error = one_error(capsys, ["eval", str(classifier_dir), "--data", str(tsv), "--tokenizer", str(tmp_path / "empty")])
    assert f"tokenizer folder {str(tmp_path / 'empty')!r} has no tokenizer" in error and "--tokenizer" not in error
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert f"model file {str(tmp_path / 'empty.gguf')!r} is empty" in one_error(
        capsys, ["eval", str(tmp_path / "empty.gguf"), "--data", str(tsv)])
    config = json.loads((classifier_dir / "config.json").read_text())
    (classifier_dir / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    assert "problem_type='multi_label_classification' is neither a causal LM, a sequence-to-sequence LM nor a " \
           "single-label sequence classifier" in one_error(capsys, ["eval", str(classifier_dir), "--data", str(tsv)])
    assert "':::' is not a Hub dataset id" in one_error(
        capsys, ["compress", str(classifier_dir), str(tmp_path / "out"), "--eval-dataset-id", ":::"])
    for command in ("compress", "eval"):  # a model folder, said as one (transformers asks for a model_type key)
        assert f"model folder {str(tmp_path / 'empty')!r} holds no config.json: name a saved model's folder" in \
            one_error(capsys, [command, str(tmp_path / "empty"), *([str(tmp_path / "out")] if command == "compress" else []),
                               "--data", str(tsv)])
    assert "model '/dev/null' is no folder" in one_error(capsys, ["eval", "/dev/null", "--data", str(tsv)])


@pytest.mark.parametrize("arguments, message", [
    (["--method", "svd", "--refine"], "--method svd --refine needs importance/calibration data: pass --data FILE"),
    (["--method", "svd", "--eval-split", "dev"], "--eval-split dev picks a split of --eval-data's dataset folder: pass "
                                                 "--eval-data FOLDER"),
    (["--method", "svd", "--data", ""], "--data '' names no file: name a data file or dataset folder, or leave --data "
                                        "out"),
    (["--method", "svd", "--eval-data", "gone.tsv"], "--eval-data 'gone.tsv': data file or folder 'gone.tsv' does not "
                                                     "exist"),
], ids=["refine without data", "eval split without eval data", "empty data path", "missing eval data"])
def test_options_that_need_another_or_name_nothing_are_refused(tmp_path, classifier_dir, capsys, arguments, message):
    assert message in one_error(capsys, ["compress", str(classifier_dir), str(tmp_path / "out"), *arguments])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["inspect", "model"], ["eval", "model", "--data", "text.txt"],
                                  ["compress", "model", "out"], ["export", "model", "out"]])
def test_an_unknown_option_is_named_by_the_command_it_was_given_to(argv, capsys):
    """As argparse says a missing argument: by the command's name (one_error checks the prefix), before
    anything is read."""
    assert f"hf-wsvd {argv[0]}: error: unrecognized arguments: --param-rate 0.5" == one_error(
        capsys, [*argv, "--param-rate", "0.5"])


def test_an_abbreviated_option_is_refused_not_taken_for_the_option_it_starts():
    """``--param`` would be ``--param-ratio`` only until another option starting so is added."""
    from hf_wsvd.cli.app import build_parser

    parser = build_parser()
    assert parser.parse_args(["compress", "model", "out", "--param-ratio", "0.5"]).param_ratio == 0.5
    _, unknown = parser.parse_known_args(["compress", "model", "out", "--param", "0.5"])
    assert unknown == ["--param", "0.5"]


def test_a_causal_lm_reads_one_text_column(tmp_path, tokenizer):
    from datasets import Dataset

    from hf_wsvd import WSVDConfig
    from hf_wsvd.cli.workflow import data_loader

    table = Dataset.from_dict({"sentence": ["the film was good"] * 4, "other": ["a bad plot"] * 4})
    with pytest.raises(ValueError, match=re.escape("text_columns=['sentence', 'other']: a causal LM reads one text "
                                                   "column; name one")):
        data_loader(tiny.build("llama"), tokenizer, table, WSVDConfig(max_length=8), ["sentence", "other"])
