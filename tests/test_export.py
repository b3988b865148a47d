"""Dense export: a stock checkpoint that transformers loads without hf_wsvd and without remote code."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import tiny
from helpers import main_output, run_without_hf_wsvd
from hf_wsvd.cli import main
from hf_wsvd.integrations.export import densify, export_dense

STOCK = {"bert": "BertForSequenceClassification", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def test_dense_export_loads_in_stock_transformers_with_equal_outputs(tmp_path, tokenizer):
    # bert: nn.Linear; gpt2: GPT-2 Conv1D; llama: tied embeddings. One interpreter without hf_wsvd
    # checks all three (starting one costs seconds).
    for arch in STOCK:
        model, _ = tiny.save_compressed(tmp_path / arch / "factorized", arch)
        inputs = tiny.inputs(arch)
        with torch.no_grad():
            reference = main_output(model(**inputs))
        dense = export_dense(str(tmp_path / arch / "factorized"), str(tmp_path / arch / "dense"), show_progress=False)
        assert type(dense).__name__ == STOCK[arch] and dense.config.model_type == arch
        files = sorted(p.name for p in (tmp_path / arch / "dense").iterdir())
        assert not [f for f in files if f.endswith(".py")] and "tokenizer.json" in files
        config = json.loads((tmp_path / arch / "dense" / "config.json").read_text())
        assert config["model_type"] == arch and config["architectures"] == [STOCK[arch]]
        assert not {"wsvd", "wsvd_base_model_type", "auto_map"} & set(config)
        torch.save({"inputs": inputs, "reference": reference}, tmp_path / arch / "ref.pt")

    result = run_without_hf_wsvd(f"""
        import torch, transformers
        for arch, stock in {STOCK!r}.items():
            saved = torch.load(f"{tmp_path}/{{arch}}/ref.pt")
            auto = "SequenceClassification" if arch == "bert" else "CausalLM"
            model = getattr(transformers, "AutoModelFor" + auto).from_pretrained(f"{tmp_path}/{{arch}}/dense")
            assert type(model).__name__ == stock, type(model)
            assert not any("Factorized" in type(m).__name__ for m in model.modules())
            with torch.no_grad():
                diff = (model(**saved["inputs"]).logits - saved["reference"]).abs().max().item()
            assert diff <= 1e-5, (arch, diff)
            print("stock ok", arch)
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split().count("ok") == len(STOCK)


def test_densify_in_memory_gives_the_stock_class():
    dense_params = sum(p.numel() for p in tiny.build("bert").parameters())
    model, _ = tiny.compressed("bert")
    densify(model)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.model_type == "bert"
    assert sum(p.numel() for p in model.parameters()) == dense_params
    with pytest.raises(ValueError, match="not an hf_wsvd model"):
        densify(model)


def test_export_command(tmp_path, tokenizer, capsys):
    tiny.save_compressed(tmp_path / "factorized", "bert")
    out = tmp_path / "dense"
    assert main(["export", str(tmp_path / "factorized"), str(out), "--dense"]) == 0
    assert "model_type=bert" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    # a non-empty output needs --overwrite; an unknown folder is a one-line error
    assert main(["export", str(tmp_path / "factorized"), str(out), "--dense"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "x"), "--dense"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # --dense, the only format, may be left out
    assert main(["export", str(tmp_path / "factorized"), str(tmp_path / "y")]) == 0
    assert "model_type=bert" in capsys.readouterr().out
    assert json.loads((tmp_path / "y" / "config.json").read_text())["model_type"] == "bert"
    # exporting onto the input is refused, --overwrite or not: it would lose the checkpoint
    factorized = sorted(p.name for p in (tmp_path / "factorized").iterdir())
    assert main(["export", str(tmp_path / "factorized"), str(tmp_path / "factorized"), "--dense", "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "factorized").iterdir()) == factorized
    # a failing export with --overwrite (the input is the dense export, not a factorized
    # checkpoint) leaves the existing output (an earlier dense export) as it was
    assert main(["export", str(tmp_path / "factorized"), str(tmp_path / "mine"), "--dense"]) == 0
    mine = {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()}
    assert main(["export", str(out), str(tmp_path / "mine"), "--dense", "--overwrite"]) == 2
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == mine
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf-wsvd-")] == []


@pytest.mark.parametrize("arch, auto, head", [("llama", "AutoModelForCausalLM", "lm_head"),
                                              ("bert", "AutoModelForMaskedLM", "cls.predictions.decoder")])
def test_densify_factorized_embeddings_and_tied_heads(arch, auto, head, tmp_path):
    model, _ = tiny.compressed(arch, auto, embeddings=True, embedding_ratio=0.5)
    inputs = tiny.inputs(arch)
    with torch.no_grad():
        reference = model(**inputs).logits
    densify(model)
    embedding = model.get_input_embeddings()
    assert type(embedding) is torch.nn.Embedding and type(model.get_submodule(head)) is torch.nn.Linear
    assert model.get_submodule(head).weight is embedding.weight  # still tied
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = getattr(transformers, auto).from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, reference, rtol=1e-4, atol=1e-5)
