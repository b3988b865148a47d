"""The hf-wsvd command line: compress, inspect, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import transformers

import tiny
from helpers import main_output
from hf_wsvd import FactorizedLinear
from hf_wsvd.cli import main

ROWS = [
    ("the movie was great", 1), ('"not" a good film', 1), ("awful plot", 0), ("null", 0),
    ("the actor was very good", 1), ("really bad story", 0), ("fine film", 1), ("not great", 0),
]


@pytest.fixture
def classifier_dir(tmp_path):
    return tiny.save(tiny.build("bert"), tmp_path / "dense-classifier")


@pytest.fixture
def tsv(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in ROWS))
    return path


def test_compress_and_inspect_a_classifier(tmp_path, classifier_dir, tsv, capsys):
    out = tmp_path / "compressed"
    code = main(["compress", str(classifier_dir), str(out), "--method", "fwsvd", "--param-ratio", "0.5",
                 "--data", str(tsv), "--num-samples", "6", "--batch-size", "4"])
    assert code == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert len(ranks) == 12 and set(ranks.values()) == {8}  # 10 (intermediate) rounds down to rank_multiple 8
    assert model.config.wsvd["method"] == "fwsvd" and model.config.wsvd["num_samples"] == 6
    assert (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "encoder.layer.1.intermediate.dense" in printed and "64x32" in printed
    assert "method=fwsvd" in printed and "total parameters:" in printed


@pytest.mark.parametrize("extra", [["--method", "tfwsvd", "--solver", "hybrid", "--max-iterations", "3"],
                                   ["--method", "rescue", "--solver", "als", "--risk-threshold", "0"]])
def test_elementwise_methods_from_the_cli(tmp_path, classifier_dir, tsv, extra):
    out = tmp_path / "compressed"
    assert main(["compress", str(classifier_dir), str(out), "--param-ratio", "0.5", "--data", str(tsv),
                 "--num-samples", "6", "--batch-size", "4", *extra]) == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    recipe = model.config.wsvd
    assert (recipe["method"], recipe["solver"]) == (extra[1], extra[3])
    assert recipe["max_iterations"] == (3 if "--max-iterations" in extra else 8)
    assert sum(isinstance(m, FactorizedLinear) for m in model.modules()) == len(recipe["ranks"]) == 12
    assert main_output(model(**tiny.inputs("bert"))).isfinite().all()


def test_compress_a_causal_lm_from_text(tmp_path):
    dense = tiny.save(tiny.build("gpt2"), tmp_path / "dense-lm")
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(s for s, _ in ROWS * 4) + "\n\n")
    out = tmp_path / "lm"
    assert main(["compress", str(dense), str(out), "--data", str(text), "--max-length", "8",
                 "--param-ratio", "0.4"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    # attn.c_proj (32 × 32) would get rank 6 < --rank-multiple 8: it stays dense.
    assert len(layers) == 6 and all(m.rank == 8 for m in layers)
    assert main_output(model(**tiny.inputs("gpt2"))).isfinite().all()


@pytest.mark.parametrize("args, message", [
    (["--data", "MISSING.tsv"], "MISSING.tsv"),
    (["--text-columns", "review"], "'review'"),
    (["--label-column", "stars"], "'stars'"),
    (["--param-ratio", "0"], "outside (0, 1]"),
    (["--param-ratio", "1.5"], "outside (0, 1]"),
    (["--param-ratio", "half"], "'half'"),
    (["--target-modules", "nonexistent"], "matches no linear layer"),
    (["--param-ratio", "1", "--target-modules", "query,key,value"], "saves nothing"),
    (["--method", "nope"], "'nope'"),
])
def test_bad_input_exits_with_one_line(tmp_path, classifier_dir, tsv, capsys, args, message):
    argv = ["compress", str(classifier_dir), str(tmp_path / "out"), "--data", str(tsv), *args]
    assert run(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert errors[0].startswith("hf-wsvd") and len(errors[0]) < 300
    assert not (tmp_path / "out").exists()


def run(argv: list[str]) -> int:
    """The exit code of ``hf-wsvd argv``, whether argparse exits or main returns."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_fwsvd_without_data_is_refused(tmp_path, classifier_dir, capsys):
    assert run(["compress", str(classifier_dir), str(tmp_path / "out"), "--method", "fwsvd"]) == 2
    assert "--data" in capsys.readouterr().err


def test_existing_output_is_never_overwritten_without_consent(tmp_path, classifier_dir, tsv, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    # A folder hf-wsvd did not write is refused, --overwrite or not.
    for extra in [[], ["--overwrite"]]:
        assert main(["compress", str(classifier_dir), str(out), "--data", str(tsv), *extra]) == 2
        assert "did not write (mine.txt)" in capsys.readouterr().err
        assert (out / "mine.txt").read_text() == "user data"
    # An earlier hf-wsvd output needs --overwrite, and a failing run with it leaves it as it was.
    (out / "mine.txt").unlink()
    assert main(["compress", str(classifier_dir), str(out), "--method", "svd"]) == 0
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["compress", str(classifier_dir), str(out), "--method", "svd"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["compress", str(classifier_dir), str(out), "--data", str(tsv), "--text-columns", "x",
                 "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf-wsvd-")] == []


def test_installed_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hf_wsvd.cli", "inspect", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"hf-wsvd inspect: error: checkpoint folder {str(tmp_path / 'none')!r} does not exist"
    help_text = subprocess.run(["hf-wsvd", "compress", "--help"], capture_output=True, text=True).stdout
    assert "fraction of each target layer's parameters that is KEPT" in " ".join(help_text.split())


@pytest.mark.parametrize("extra", [["--method", "whiten", "--allocation", "greedy"],
                                   ["--method", "fisher_whiten", "--sequential"],
                                   ["--method", "asvd", "--asvd-alpha", "1.0"]])
def test_activation_methods_from_the_cli(tmp_path, extra):
    dense = tiny.save(tiny.build("llama"), tmp_path / "dense-lm")
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(s for s, _ in ROWS * 4))
    out = tmp_path / "lm"
    assert main(["compress", str(dense), str(out), "--data", str(text), "--max-length", "8", *extra]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    recipe = model.config.wsvd
    assert recipe["method"] == extra[1]
    assert recipe["allocation"] == ("greedy" if "greedy" in extra else "uniform")
    assert recipe["sequential"] == ("--sequential" in extra)
    assert sum(isinstance(m, FactorizedLinear) for m in model.modules()) == len(recipe["ranks"]) > 0
