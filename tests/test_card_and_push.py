"""Model cards written by `hf-wsvd compress`, and `hf-wsvd push` through a substituted Hub API."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard

import tiny
from helpers import FolderHub, run_without_hf_wsvd
from hf_wsvd import FactorizedLinear, WSVDConfig, compress, hub
from hf_wsvd.integrations.card import Evaluation, build_card, write_card
from hf_wsvd.cli import main

ROWS = [("the movie was great", 1), ("awful plot", 0), ("really good story", 1), ("bad actor", 0),
        ("very fine film", 1), ("not great", 0)]


@pytest.fixture
def compressed(tmp_path) -> tuple[Path, list[str]]:
    dense = tiny.save(tiny.build("bert"), tmp_path / "dense")
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in ROWS))
    out = tmp_path / "compressed"
    argv = ["compress", str(dense), str(out), "--method", "fwsvd", "--param-ratio", "0.5", "--data", str(data),
            "--num-samples", "6", "--eval-data", str(data), "--repo-id", "user/tiny-fwsvd"]
    assert main(argv) == 0
    return out, argv


def test_eval_data_may_be_a_dataset_folder_with_one_split(tmp_path):
    from datasets import Dataset, DatasetDict

    dense = tiny.save(tiny.build("bert"), tmp_path / "dense")
    rows = {"sentence": [s for s, _ in ROWS], "label": [l for _, l in ROWS]}
    DatasetDict({"test": Dataset.from_dict(rows)}).save_to_disk(tmp_path / "eval_disk")
    out = tmp_path / "compressed"
    assert main(["compress", str(dense), str(out), "--method", "svd", "--param-ratio", "0.5",
                 "--eval-data", str(tmp_path / "eval_disk")]) == 0
    card = ModelCard.load(out / "README.md")
    assert "| eval_disk | validation | accuracy |" in card.text
    assert card.data.eval_results is None  # a local folder is no Hub dataset id: text only


def test_compress_writes_a_complete_card(compressed):
    out, argv = compressed
    card = ModelCard.load(out / "README.md")
    text = card.text
    assert card.data.library_name == "transformers" and {"hf_wsvd", "compressed", "low-rank"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-classification"
    # Local input and data: no base_model, datasets or model-index metadata, which must name Hub ids.
    assert card.data.base_model is None and card.data.datasets is None and card.data.eval_results is None
    assert "base_model" not in (out / "README.md").read_text().split("---")[1]
    results = dict(re.findall(r"\| train\.tsv \| validation \| (\w+) \| (-?[0-9.]+) \|", text))
    assert set(results) == {"accuracy", "f1", "matthews_correlation"}
    assert card.data.hf_wsvd["method"] == "fwsvd" and card.data.hf_wsvd["param_ratio"] == 0.5
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    now = sum(p.numel() for p in model.parameters())
    assert card.data.hf_wsvd["params"] == now and f"{now:,}" in text
    assert "| base model | `dense` (a local checkpoint) |" in text and "`fwsvd` (Fisher weights per output)" in text
    factorized = sum(isinstance(m, FactorizedLinear) for m in model.modules())
    assert f"| layers | {factorized} layers factorized, " in text
    assert f"Its target layers: {factorized} layers factorized, " in text and "two thin factors" in text
    assert "`train.tsv` (6 examples, local data)" in text
    # the exact command, its paths outside the working folder by their last part (the card is published)
    shown = [os.path.basename(a) if os.path.isabs(a) else a for a in argv]
    assert "hf-wsvd " + " ".join(shown) in text and str(out.parent) not in text
    assert 'from_pretrained("user/tiny-fwsvd", trust_remote_code=True)' in text and "import hf_wsvd" in text
    assert 'AutoTokenizer.from_pretrained("user/tiny-fwsvd", trust_remote_code=False)' in text
    assert "AutoModelForSequenceClassification" in text
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear):
            assert f"| `{name.removeprefix('bert.')}` | {module.out_features} × {module.in_features} | {module.rank} |" in text
    # hf_wsvd is installed from a clone (no such PyPI package), and export has no --dense to give
    assert "pip install hf_wsvd" not in text and "pip install -e ." in text
    assert "--dense" not in text and "`hf-wsvd export FOLDER dense-copy`" in text
    assert "](rank_per_layer.png)" in text
    assert (out / "rank_per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_base_model_is_a_hub_id_or_absent(compressed, tmp_path, capsys):
    """From the input if it is a Hub id, else the _name_or_path a config records, else --base-model;
    a local path never."""
    out, _ = compressed
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    local = str(tmp_path / "dense")
    assert build_card(model, base_model=local, command="c").data.base_model is None
    model.config._name_or_path = "sentence-transformers/all-MiniLM-L6-v2"  # as loaded from the Hub
    card = build_card(model, base_model=local, command="c")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert "[`sentence-transformers/all-MiniLM-L6-v2`](https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2)" in card.text
    model.config._name_or_path = local
    # An older checkpoint's config.json records the Hub id it was saved from.
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    (tmp_path / "dense" / "config.json").write_text(json.dumps({**config, "_name_or_path": "google/bert_uncased_L-2_H-128_A-2"}))
    assert build_card(model, base_model=local, command="c").data.base_model == "google/bert_uncased_L-2_H-128_A-2"
    assert build_card(model, base_model="you/dense", command="c", base_model_hub_id="me/other").data.base_model == "me/other"
    with pytest.raises(ValueError, match="'../x' is not a Hub model id"):
        build_card(model, base_model=local, command="c", base_model_hub_id="../x")
    argv = ["compress", local, str(tmp_path / "o"), "--method", "svd", "--base-model"]
    assert main([*argv, "user/dense-model"]) == 0
    assert ModelCard.load(tmp_path / "o" / "README.md").data.base_model == "user/dense-model"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv, str(tmp_path / "dense"), "--overwrite"])
    assert "is not a Hub model id" in capsys.readouterr().err


def test_card_model_index_names_a_hub_dataset(compressed):
    out, _ = compressed
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    evaluation = Evaluation(dataset="GLUE SST-2", metrics={"accuracy": 0.875}, dataset_type="nyu-mll/glue",
                            dataset_config="sst2")
    card = build_card(model, base_model="user/dense", command="c", evaluation=evaluation)
    card.save(out / "hub.md")
    loaded = ModelCard.load(out / "hub.md").data
    assert loaded.datasets == ["nyu-mll/glue"] and loaded.base_model == "user/dense"
    [result] = loaded.eval_results
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == ("nyu-mll/glue", "sst2", "validation")
    assert (result.metric_type, result.metric_value, result.task_type) == ("accuracy", 0.875, "text-classification")


def test_write_card_writes_beside_a_saved_checkpoint_and_names_a_folder_that_is_not_there(compressed, tmp_path):
    out, _ = compressed
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    with pytest.raises(ValueError, match=re.escape(f"folder={str(tmp_path / 'elsewhere')!r} is not a folder: save the "
                                                   "model there first")):
        write_card(tmp_path / "elsewhere", model, base_model="user/dense", command="c")
    assert not (tmp_path / "elsewhere").exists()
    card = write_card(out, model, base_model="user/dense", command="c")
    assert ModelCard.load(out / "README.md").data.base_model == "user/dense" == card.data.base_model
    assert (out / "rank_per_layer.png").stat().st_size > 0


def test_eval_dataset_id_turns_the_scores_into_model_index_metadata(tmp_path, capsys):
    """--eval-data alone gives a text table (a local file is no Hub dataset); with the Hub dataset
    it comes from, the scores become model-index metadata that huggingface_hub reads back."""
    dense = tiny.save(tiny.build("bert"), tmp_path / "dense")
    data = tmp_path / "dev.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in ROWS))
    out = tmp_path / "out"
    assert main(["compress", str(dense), str(out), "--method", "svd", "--eval-data", str(data),
                 "--eval-dataset-id", "nyu-mll/glue:sst2"]) == 0
    printed = dict(re.findall(r"  (\w+) \S+ -> (\S+) ", capsys.readouterr().out))
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["nyu-mll/glue"]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"accuracy", "f1", "matthews_correlation"}
    for name, result in results.items():
        assert (result.dataset_type, result.dataset_config, result.dataset_split) == ("nyu-mll/glue", "sst2", "validation")
        assert (result.dataset_name, result.task_type) == ("nyu-mll/glue sst2", "text-classification")
        assert result.metric_value == pytest.approx(float(printed[name]), abs=1e-4)
    assert "| nyu-mll/glue sst2 | validation | accuracy |" in card.text
    # without a configuration, and refused without --eval-data or with a name that is no Hub id
    assert main(["compress", str(dense), str(tmp_path / "o2"), "--method", "svd", "--eval-data", str(data),
                 "--eval-dataset-id", "imdb"]) == 0
    [result, *_] = ModelCard.load(tmp_path / "o2" / "README.md").data.eval_results
    assert (result.dataset_type, result.dataset_config) == ("imdb", None)
    capsys.readouterr()
    assert main(["compress", str(dense), str(tmp_path / "o3"), "--method", "svd", "--eval-dataset-id", "imdb"]) == 2
    assert "--eval-dataset-id names the Hub dataset of --eval-data: pass --eval-data FILE too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", str(dense), str(tmp_path / "o3"), "--eval-data", str(data), "--eval-dataset-id", "../dev"])
    assert "'../dev' is not a Hub dataset id" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


def test_push_uploads_every_file_and_the_upload_loads(compressed, tmp_path, monkeypatch, capsys):
    out, _ = compressed
    api = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    capsys.readouterr()
    assert main(["push", str(out), "user/tiny-fwsvd", "--private"]) == 0
    assert "folder://user/tiny-fwsvd" in capsys.readouterr().out
    assert api.repos == [("user/tiny-fwsvd", {"private": True, "exist_ok": True, "repo_type": "model"})]
    (uploaded,) = api.commits
    local = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert sorted(uploaded) == local and api.messages[0]
    assert {"README.md", "rank_per_layer.png", "config.json", "model.safetensors", "modeling_wsvd.py",
            "factorized_linear.py", "tokenizer.json"} <= set(uploaded)
    repo = tmp_path / "hub" / "user" / "tiny-fwsvd"
    for name in uploaded:
        assert (repo / name).read_bytes() == (out / name).read_bytes(), name
    metadata = ModelCard.load(repo / "README.md").data.to_dict()
    assert metadata["hf_wsvd"]["method"] == "fwsvd" and metadata["library_name"] == "transformers"

    inputs = tiny.inputs("bert")
    with torch.no_grad():
        reference = transformers.AutoModelForSequenceClassification.from_pretrained(out)(**inputs).logits
        loaded = transformers.AutoModelForSequenceClassification.from_pretrained(repo)
        assert torch.equal(loaded(**inputs).logits, reference)
    torch.save({"inputs": inputs, "reference": reference}, tmp_path / "ref.pt")
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        saved = torch.load("{tmp_path}/ref.pt")
        model = transformers.AutoModelForSequenceClassification.from_pretrained("{repo}", trust_remote_code=True)
        with torch.no_grad():
            assert torch.equal(model(**saved["inputs"]).logits, saved["reference"])
        print("remote ok")
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_push_uploads_the_files_it_checked_or_nothing(compressed, tmp_path, monkeypatch):
    """A run writing the folder while push checks it (--overwrite of the same output): the small files
    go up as read when checked, and a change since the check stops the push before the commit."""
    out, _ = compressed
    folder = tmp_path / "copy"
    shutil.copytree(out, folder, copy_function=shutil.copy2)
    api = FolderHub(tmp_path / "hub")
    real = hub.check_auto_map

    def written_meanwhile(path, config):  # during the load check, another run rewrites the weights
        real(path, config)
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())

    monkeypatch.setattr(hub, "check_auto_map", written_meanwhile)
    with pytest.raises(ValueError, match=r"copy changed while push checked it \(is a run writing it\?\): push again"):
        hub.push(folder, "user/raced", api=api)
    assert api.commits == [] and api.repos == []  # nothing created on the Hub
    monkeypatch.setattr(hub, "check_auto_map", real)
    hub.push(folder, "user/raced", api=api)
    (commit,) = api.commits
    assert {"config.json", "model.safetensors"} <= set(commit)


def test_push_refuses_incomplete_folders(compressed, tmp_path, capsys):
    out, _ = compressed
    api = FolderHub(tmp_path / "hub")
    (out / "README.md").unlink()
    with pytest.raises(ValueError, match="README.md"):
        hub.push(out, "user/x", api=api)
    (out / "factorized_embedding.py").unlink()  # imported by modeling_wsvd.py: needed to load
    with pytest.raises(ValueError, match="factorized_embedding.py"):
        hub.push(out, "user/x", api=api)
    assert api.repos == [] and api.commits == []
    assert main(["push", str(tmp_path / "nowhere"), "user/x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_push_refuses_a_card_folder_and_weights_saved_twice(compressed, tmp_path, capsys, monkeypatch):
    """A README.md that is a folder; model.safetensors beside a shard index (an unsharded and a
    sharded save into one folder): transformers would check the one and push uploaded the other.
    A connection that fails is one line."""
    import json

    out, _ = compressed
    api = FolderHub(tmp_path / "hub")
    (out / "README.md").rename(tmp_path / "card.md")
    (out / "README.md").mkdir()
    with pytest.raises(ValueError, match="lacks README.md"):
        hub.push(out, "user/x", api=api)
    (out / "README.md").rmdir()
    tiny.save(tiny.build("llama"), tmp_path / "dense")  # a dense folder is named as such, not as files it lacks
    with pytest.raises(ValueError, match="has model_type='llama', not an hf_wsvd checkpoint"):
        hub.push(tmp_path / "dense", "user/x", api=api)
    (tmp_path / "card.md").rename(out / "README.md")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "model-00001-of-00001.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="holds both model.safetensors and model.safetensors.index.json"):
        hub.push(out, "user/x", api=api)
    assert api.repos == [] and api.commits == []
    (out / "model.safetensors.index.json").unlink()
    (out / "model-00001-of-00001.safetensors").unlink()

    class Unreachable(Exception):
        pass

    Unreachable.__module__ = "httpx._exceptions"

    def refused(*args, **kwargs):
        raise Unreachable("[Errno 111] Connection refused")

    monkeypatch.setattr(hub, "push", refused)
    capsys.readouterr()
    assert main(["push", str(out), "user/x"]) == 2
    assert "cannot reach the Hub to push" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 3 // 5]), "model.safetensors"),
    (lambda path: path.write_bytes(b""), "model.safetensors"),
    (lambda path: _edit_rank(path.parent), "has the wrong shape"),
    (lambda path: (path.parent / "config.json").write_text("{'wsvd': 1}"), "config.json is not a JSON object"),
])
def test_push_refuses_a_checkpoint_that_would_not_load(compressed, tmp_path, capsys, damage, message):
    """Nothing reaches the Hub (not even an empty repository) that the load-time checks refuse."""
    out, _ = compressed
    api = FolderHub(tmp_path / "hub")
    damage(out / "model.safetensors")
    with pytest.raises((ValueError, OSError), match=message):
        hub.push(out, "user/x", api=api)
    assert api.repos == [] and api.commits == []


def _edit_auto_map(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change", [
    lambda config: config.pop("auto_map"),
    lambda config: config["auto_map"].pop("AutoConfig"),
    lambda config: config["auto_map"].pop("AutoModelForSequenceClassification"),  # the saved class's
    lambda config: config["auto_map"].update(AutoModel="someone/repo--modeling_wsvd.WsvdBertModel"),
    lambda config: config["auto_map"].update(AutoModel="modeling_other.WsvdBertModel"),
    lambda config: config.update(auto_map=["modeling_wsvd.WsvdBertConfig"]),
], ids=["deleted", "no AutoConfig", "no saved class", "another repository's code", "another module", "a list"])
def test_push_refuses_an_edited_auto_map(compressed, tmp_path, change):
    """hf_wsvd ignores auto_map, so such a folder loads here; pushed, it would fail to load without
    hf_wsvd (trust_remote_code=True), or run other code than the verified files."""
    out, _ = compressed
    api = FolderHub(tmp_path / "hub")
    hub.push(out, "user/kept", api=api)  # as saved, it goes up
    _edit_auto_map(out, change)
    with pytest.raises(ValueError, match=r"config.json has auto_map=.*not the classes' own \(AutoConfig: "
                                         r"modeling_wsvd.WsvdBertConfig, .*trust_remote_code=True"):
        hub.push(out, "user/x", api=api)
    assert [repo for repo, _ in api.repos] == ["user/kept"]


@pytest.mark.parametrize("change", [
    lambda config: config["auto_map"].pop("AutoModelForMaskedLM"),
    lambda config: config["auto_map"].update(AutoModelForNextSentencePrediction="modeling_wsvd.WsvdBertForNextSentencePrediction"),
], ids=["one less", "one more"])
def test_push_accepts_an_auto_map_of_another_transformers_version(compressed, tmp_path, change):
    """Another transformers version may list one Auto class less or more for the architecture,
    each naming a class the saved code builds."""
    out, _ = compressed
    _edit_auto_map(out, change)
    hub.push(out, "user/x", api=FolderHub(tmp_path / "hub"))


def _edit_rank(folder) -> None:
    config = json.loads((folder / "config.json").read_text())
    name, rank = next(iter(config["wsvd"]["ranks"].items()))
    config["wsvd"]["ranks"][name] = rank - 1
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("command", ["compress", "inspect", "eval", "export", "push"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "examples:" in printed and f"hf-wsvd {command} " in printed


@pytest.mark.parametrize("argument, shown", [
    ("/home/alice/models/dense", "dense"), ("~/data/train.tsv", "train.tsv"), ("../alice/train.tsv", "train.tsv"),
    ("--data=/home/alice/train.tsv", "--data=train.tsv"), ("out/sst2", "out/sst2"), ("user/name", "user/name"),
    ("0.5", "0.5"), ("/", "/"), ("./../alice/t.tsv", "t.tsv"), ("a/../../alice/t.tsv", "t.tsv"), ("a/../b", "a/../b"),
])
def test_a_cards_command_shows_outside_paths_by_their_last_part(argument, shown):
    """A card goes to the Hub with the model: the folder names of the machine it was made on stay there."""
    import argparse

    from hf_wsvd.cli.commands import card_command

    assert card_command(argparse.Namespace(argv=["compress", argument])) == f"hf-wsvd compress {shown}"


@pytest.mark.parametrize("recipe, said, unsaid", [
    (dict(method="whiten", sequential=True, allocation="uniform", attention_pruning=True, mlp_pruning=True,
          block_refine_steps=0, rank_multiple=2, param_ratio=0.6),
     r"2 MLPs pruned to 64 -> \d+ channels, 2 attentions cut to head dim 8 -> \d+, 0 kept dense",
     "Fisher weights"),
    (dict(method="fwsvd", param_ratio=0.5, rank_multiple=1), r"(\d+) layers factorized, (\d+) kept dense", None),
], ids=["pruned and cut", "factorized"])
def test_the_card_says_what_the_model_holds(tmp_path, recipe, said, unsaid):
    """The card counts what the model holds (pruned MLPs and cut attentions are no factorized layers),
    and names Fisher weights only for a method that reads them."""
    from hf_wsvd.integrations.card import build_card

    ids = torch.randint(len(tiny.SPECIALS), tiny.VOCAB_SIZE, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4]), "labels": ids[i:i + 4]}
            for i in (0, 4)]
    model, _ = tiny.compressed("llama", data=data, **recipe)
    text = build_card(model, base_model="dense", command="hf-wsvd compress dense out").text
    found = re.search(rf"\| layers \| {said} \|", text)
    assert found, text
    if found.groups():  # counted on the model: its factorized layers, and the rest of its 14 targets
        factorized = sum(isinstance(m, FactorizedLinear) for m in model.modules())
        assert [int(g) for g in found.groups()] == [factorized, 14 - factorized] and 0 < factorized < 14
    assert unsaid is None or unsaid not in text
    if recipe.get("allocation") == "uniform":  # a rounded rank, not param_ratio of each layer exactly
        assert "every target layer gets the rank (or channels) of param_ratio 0.6, rounded down to rank_multiple" in text


@pytest.mark.parametrize("arch, auto_class, expected", [
    ("gpt2", "AutoModelForCausalLM", "AutoModelForCausalLM"),  # also AutoModelForPreTraining's class
    ("t5", None, "AutoModelForSeq2SeqLM"),
    ("roberta", "AutoModelForMaskedLM", "AutoModelForMaskedLM"),  # generic, but before AutoModelForPreTraining
    ("bert", "AutoModelForSequenceClassification", "AutoModelForSequenceClassification"),
])
def test_the_card_loads_a_model_with_the_auto_class_of_its_task(arch, auto_class, expected):
    from hf_wsvd.integrations.card import auto_class_name

    model, _ = compress(tiny.build(arch, auto_class), WSVDConfig(method="svd", param_ratio=0.5), show_progress=False)
    assert auto_class_name(model) == expected
