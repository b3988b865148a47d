"""The hf-wsvd command line: compress, inspect, the recipe options generated from WSVDConfig, lazy imports,
what compress prints, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch
import transformers

import tiny
from helpers import ROWS, main_output, run_cli as run
from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd.cli import build_parser, main, recipe_from_args

from hf_wsvd.recipes import default_block_refine_steps
from hf_wsvd.statistics import default_accelerator

def _causal_lm_and_text(tmp_path, tokenizer, arch: str) -> tuple:
    """A saved tiny causal LM (with its tokenizer) and a calibration text file."""
    dense = tmp_path / "dense-lm"
    tiny.build(arch, "AutoModelForCausalLM").save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(s for s, _ in ROWS * 4) + "\n\n")
    return dense, text


def test_compress_and_inspect_a_classifier(tmp_path, classifier_dir, tsv, capsys):
    out = tmp_path / "compressed"
    code = main(["compress", str(classifier_dir), str(out), "--method", "fwsvd", "--allocation", "uniform",
                 "--param-ratio", "0.5", "--data", str(tsv), "--num-samples", "6", "--batch-size", "4"])
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
    assert "method=fwsvd allocation=uniform pipeline=whole_model param_ratio=0.5" in printed
    assert "base=BertForSequenceClassification (bert)" in printed and "total parameters:" in printed


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


def test_compress_a_causal_lm_from_text_with_the_recommended_recipe(tmp_path, tokenizer, capsys):
    dense, text = _causal_lm_and_text(tmp_path, tokenizer, "gpt2")
    out = tmp_path / "lm"
    assert main(["compress", str(dense), str(out), "--data", str(text), "--max-length", "8",
                 "--param-ratio", "0.4", "--eval-data", str(text)]) == 0
    printed = capsys.readouterr()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    recipe = model.config.wsvd
    # The text makes the labels: Fisher-weighted whitening, greedy ranks, block by block.
    assert (recipe["method"], recipe["allocation"], recipe["sequential"]) == ("fisher_whiten", "greedy", True)
    assert "compressed with fisher_whiten: greedy allocation, sequential pipeline (compensated), param_ratio 0.4" in printed.out
    # Each block refined toward the dense block: the summary and the card say how much its error fell.
    assert re.search(r"2 blocks refined: relative output error fell by a median \d+%", printed.out), printed.out
    steps = default_block_refine_steps(default_accelerator().device)
    assert f"| block refinement | 2 blocks refined ({steps} steps each)" in (out / "README.md").read_text()
    assert recipe["block_refine_steps"] == steps and sorted(recipe["refined"]) == ["0", "1"]
    assert "note:" not in printed.err
    assert sum(isinstance(m, FactorizedLinear) for m in model.modules()) == len(recipe["ranks"]) > 0
    assert main_output(model(**tiny.inputs("gpt2"))).isfinite().all()
    # Perplexity before and after, and their ratio.
    before, after, ratio = re.search(r"perplexity (\S+) -> (\S+) \(x(\S+)\)", printed.out).groups()
    assert float(ratio) == pytest.approx(float(after) / float(before), rel=2e-3)
    assert main(["eval", str(out), "--data", str(text), "--max-length", "8"]) == 0
    assert float(after) == pytest.approx(json.loads(capsys.readouterr().out)["perplexity"], rel=1e-3)


def test_compress_calibrates_a_causal_lm_on_blocks_it_writes_too(tmp_path, tokenizer, capsys):
    dense, text = _causal_lm_and_text(tmp_path, tokenizer, "llama")
    out = tmp_path / "lm"
    assert main(["compress", str(dense), str(out), "--data", str(text), "--max-length", "8", "--num-samples", "4",
                 "--generated-samples", "3", "--block-refine-steps", "2", "--param-ratio", "0.6"]) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.wsvd["generated_samples"] == 3
    assert "(7 examples, 3 of them written by the model itself, local data)" in (out / "README.md").read_text()
    # Without data there is nothing to continue: one line, before any model loads.
    assert run(["compress", str(dense), str(tmp_path / "none"), "--generated-samples", "3"]) == 2
    assert "--generated-samples 3 continues blocks of the calibration text: pass --data FILE" in capsys.readouterr().err
    assert run(["compress", str(dense), str(tmp_path / "none"), "--split", "train"]) == 2  # a split of no data
    assert "--split train picks a split of --data's dataset folder: pass --data FOLDER" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "MISSING.tsv"], "MISSING.tsv"),
    (["--text-columns", "review"], "'review'"),
    (["--label-column", "stars"], "'stars'"),
    (["--param-ratio", "0"], "outside (0, 1]"),
    (["--param-ratio", "1.5"], "outside (0, 1]"),
    (["--param-ratio", "half"], "'half'"),
    (["--target-modules", "nonexistent"], "matches no linear layer"),
    (["--param-ratio", "1", "--target-modules", "query,key,value", "--allocation", "uniform"], "saves nothing"),
    # the recipe's checks name the options given, not the WSVDConfig fields they set
    (["--param-ratio", "1"], "--param-ratio=1 keeps every parameter of the target layers, which saves nothing"),
    (["--embeddings", "--method", "fwsvd"], "--embeddings with --method='fwsvd': embedding rows have no Fisher "
                                            "information; set --embedding-method to one of"),
    (["--offload-activations", "--no-sequential"], "this recipe is not sequential (--no-sequential; sequential mode is "
                                                   "for causal LMs with calibration data): drop --offload-activations"),
    (["--target-modules", "method=("], "--target-modules='method=(' is not a regular expression"),  # a value: as given
    (["--method", "nope"], "'nope'"),
    (["--generated-samples", "-2"], "-2 is not an integer >= 0"),
    (["--generated-samples", "2"], "only a causal LM writes calibration text"),
    # a rank multiple the quantizer's group size set: the error names the option the user gave
    (["--quantize", "int4", "--quantize-group-size", "32"], "; lower --quantize-group-size (--rank-multiple=32 "
                                                              "follows it: --quantize='int4' takes a factor whose"),
])
def test_bad_input_exits_with_one_line(tmp_path, classifier_dir, tsv, capsys, args, message):
    argv = ["compress", str(classifier_dir), str(tmp_path / "out"), "--data", str(tsv), *args]
    assert run(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert errors[0].startswith("hf-wsvd") and len(errors[0]) < 300
    assert not re.search(r"--([\w-]+)=\S+ \(--\1\)", errors[0]), errors[0]
    assert not (tmp_path / "out").exists()


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
        assert "did not write or that changed since it wrote them (mine.txt)" in capsys.readouterr().err
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


@pytest.mark.parametrize("extra, allocation, sequential", [
    (["--method", "whiten", "--allocation", "greedy", "--no-sequential"], "greedy", False),
    # greedy: the default with data; without the prunings, which may take the whole budget on a tiny model
    (["--method", "fisher_whiten", "--sequential", "--no-mlp-pruning", "--no-attention-pruning"], "greedy", True),
    (["--method", "asvd", "--asvd-alpha", "1.0", "--allocation", "uniform"], "uniform", True),
])
def test_activation_methods_from_the_cli(tmp_path, tokenizer, extra, allocation, sequential):
    dense, text = _causal_lm_and_text(tmp_path, tokenizer, "llama")
    out = tmp_path / "lm"
    assert main(["compress", str(dense), str(out), "--data", str(text), "--max-length", "8", *extra]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    recipe = model.config.wsvd
    assert recipe["method"] == extra[1]
    assert (recipe["allocation"], recipe["sequential"]) == (allocation, sequential)
    assert sum(isinstance(m, FactorizedLinear) for m in model.modules()) == len(recipe["ranks"]) > 0


# --------------------------------------------------------------------------- the recipe options: WSVDConfig's fields


def _recipe_fields() -> list:
    return [f for f in dataclasses.fields(WSVDConfig) if f.name not in FILLED]


FILLED = ("ranks", "pruned", "attention", "experts", "refined", "residual")  # filled by the compressor, not options


def test_every_recipe_field_is_a_compress_option_with_its_own_help(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse re-wraps the help
    for f in _recipe_fields():
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert "".join(f.metadata["help"].split()) in text, f.name
    compress = next(a for a in build_parser()._actions if a.dest == "command").choices["compress"]
    options = {option for action in compress._actions for option in action.option_strings}
    assert not {f"--{name}" for name in FILLED} & options


def test_recipe_options_parse_to_the_config_the_api_builds(tmp_path):
    parse = build_parser().parse_args
    assert recipe_from_args(parse(["compress", "m", "o"])) == WSVDConfig()
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"by_shape": {"32x64": 0.4}}))
    argv = ["--method", "fwsvd", "--param-ratio", "0.3", "--target-modules", "query,value", "--exclude-modules", "key",
            "--fisher-axis", "input", "--num-samples", "64", "--batch-size", "4", "--max-length", "32",
            "--compute-dtype", "float64", "--asvd-alpha", "1", "--allocation", "greedy", "--sequential",
            "--pipeline", "sequential", "--offload-activations",
            "--no-compensate", "--compensation-ridge", "0.05", "--no-mlp-pruning", "--no-attention-pruning",
            "--block-refine-steps", "0", "--block-refine-learning-rate", "0.003",
            "--block-refine-batches", "4", "--seed", "7", "--generated-samples", "5", "--p", "1.5",
            "--embeddings", "--embedding-ratio", "0.25", "--embedding-method", "lp",
            "--embedding-weighting", "frequency", "--solver", "als", "--refine", "--max-iterations", "3",
            "--tolerance", "0.01", "--time-budget", "2", "--importance-power", "0.5", "--risk-threshold", "0.1",
            "--max-kept-ratio-for-speed", str(speed), "--rank-multiple", "4", "--quantize", "int4",
            "--quantize-group-size", "32", "--residual-method", "whiten", "--residual-rank", "16"]
    expected = WSVDConfig(
        method="fwsvd", param_ratio=0.3, target_modules=["query", "value"], exclude_modules=["key"],
        fisher_axis="input", num_samples=64, batch_size=4, max_length=32, compute_dtype="float64", asvd_alpha=1.0,
        allocation="greedy", sequential=True, pipeline="sequential", offload_activations=True, compensate=False,
        compensation_ridge=0.05, mlp_pruning=False,
        attention_pruning=False, block_refine_steps=0, block_refine_learning_rate=0.003, block_refine_batches=4, seed=7, generated_samples=5,
        p=1.5,
        embeddings=True,
        embedding_ratio=0.25,
        embedding_method="lp", embedding_weighting="frequency", solver="als", refine=True, max_iterations=3,
        tolerance=0.01, time_budget=2.0, importance_power=0.5, risk_threshold=0.1,
        max_kept_ratio_for_speed={"32x64": 0.4}, rank_multiple=4, quantize="int4", quantize_group_size=32,
        residual_method="whiten", residual_rank=16)
    assert recipe_from_args(parse(["compress", "m", "o", *argv])) == expected
    # every field differs from its default, so none was dropped on the way
    assert all(getattr(expected, f.name) != f.default for f in _recipe_fields())
    # the other value of the switches set above
    other = ["--no-sequential", "--pipeline", "whole_model", "--no-offload-activations"]
    assert recipe_from_args(parse(["compress", "m", "o", *other])) == WSVDConfig(
        sequential=False, pipeline="whole_model", offload_activations=False)


def test_the_command_line_lists_the_registered_methods_without_importing_torch():
    script = ("import sys; from hf_wsvd.cli import build_parser; from hf_wsvd.solvers import SOLVERS; "
              "[method] = [a for a in build_parser()._subparsers._group_actions[0].choices['compress']._actions "
              "if a.dest == 'method']; print(' '.join(method.choices), 'torch' in sys.modules); "
              "print(' '.join(name for name, solver in SOLVERS.items() if solver.name == name))")
    listed, loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout.splitlines()
    assert listed.split() == [*sorted(listed.split()[:-1]), "False"]
    # every built-in name is registered by the module the registry names for it
    assert loaded.split() == listed.split()[:-1]


# --------------------------------------------------------------------------- lazy imports

PARSE_ONLY = """
import sys
from hf_wsvd.cli import main
try:
    code = main({argv!r})
except SystemExit as exit:
    code = exit.code
print("imported:", sorted(m for m in ("torch", "transformers") if m in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize("argv, code, shown", [
    (["--help"], 0, "compress"),
    (["compress", "--help"], 0, "KEPT"),
    (["export", "--help"], 0, "dense"),
    (["compress", "model", "out", "--param-ratio", "2"], 2, "param ratio 2.0 is outside (0, 1]"),
    (["compress", "model", "out", "--method", "nope"], 2, "invalid choice: 'nope'"),
    (["compress", "model", "out", "--num-samples", "0"], 2, "0 is not a positive integer"),
    (["compress", "model", "out", "--num-samples", "-3"], 2, "-3 is not a positive integer"),  # worded as 0 is
    # past C's int, tqdm and islice would fail in their own words after the statistics
    (["compress", "model", "out", "--block-refine-steps", "99999999999999999999"], 2,
     "argument --block-refine-steps: 99999999999999999999 is too large (at most 2147483647)"),
    (["compress", "model", "out", "--batch-size", "2147483648"], 2, "2147483648 is too large (at most 2147483647)"),
    (["heal", "model", "out", "--teacher", "t", "--data", "d", "--teacher-samples", str(2**64)], 2,
     f"argument --teacher-samples: {2**64} is too large"),
    # a byte that is not UTF-8 in a path (Python keeps it as a lone surrogate): refused before any file is read
    (["compress", "model", "out\udce9"], 2, "argument b'out\\xe9' is not valid UTF-8, which model cards"),
    (["compress", "model", "out", "--target-modules", "q\udce9"], 2, "--target-modules b'q\\xe9' is not valid UTF-8"),
    (["inspect", "m\udce9"], 2, "argument b'm\\xe9' is not valid UTF-8"),
])
def test_help_and_argument_errors_import_neither_torch_nor_transformers(argv, code, shown):
    result = subprocess.run([sys.executable, "-c", PARSE_ONLY.format(argv=argv)], capture_output=True, text=True)
    assert result.returncode == code, result.stderr[-2000:]
    assert "imported: []" in result.stdout
    assert shown in result.stdout + result.stderr


@pytest.mark.parametrize("first", [
    "import hf_wsvd",
    "from hf_wsvd import summarize",  # transformers first imported half-way through hf_wsvd's own modules
    "import hf_wsvd.integrations.autoconfig",  # ... by the registering module itself
])
def test_importing_hf_wsvd_registers_the_model_type_whenever_transformers_comes(tmp_path, first):
    model, _ = compress(tiny.build("bert"), WSVDConfig(method="svd", param_ratio=0.5), show_progress=False)
    model.save_pretrained(tmp_path / "ckpt")
    factorized = sum(isinstance(m, FactorizedLinear) for m in model.modules())
    script = f"""
import sys
{first}
light = "torch" not in sys.modules and "transformers" not in sys.modules
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'ckpt')!r})
print(light, sum(type(m).__name__ == "FactorizedLinear" for m in model.modules()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(first == "import hf_wsvd"), str(factorized)]


def test_the_registered_model_type_is_the_checkpoints():
    from hf_wsvd.integrations import autoconfig
    from hf_wsvd.runtime import modeling_wsvd

    assert autoconfig.MODEL_TYPE == modeling_wsvd.MODEL_TYPE


# --------------------------------------------------------------------------- what compress and inspect print


def test_compress_prints_the_recipe_sizes_and_scores_before_and_after(tmp_path, classifier_dir, tsv, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(classifier_dir), str(out), "--data", str(tsv), "--eval-data", str(tsv),
                 "--num-samples", "6", "--batch-size", "4"]) == 0
    printed = capsys.readouterr()
    assert "note:" not in printed.err  # labelled data: the recommended recipe, no fallback
    assert "compressed with fisher_whiten: greedy allocation, whole_model pipeline, param_ratio 0.5" in printed.out
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    factorized = sum(isinstance(m, FactorizedLinear) for m in model.modules())
    layers = re.search(r"(\d+) layers factorized, (\d+) kept dense", printed.out).groups()
    assert int(layers[0]) == factorized and factorized + int(layers[1]) == 12  # tiny BERT: 12 block linears
    dense = tiny.build("bert", "AutoModelForSequenceClassification")
    dense_params, now = sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in model.parameters())
    # the target layers (the 12 block linears) before and after, counted on the two models
    targets = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n]
    assert len(targets) == 12
    target_dense, target_now = (sum(p.numel() for n in targets for p in m.get_submodule(n).parameters())
                                for m in (dense, model))
    ratios = f"target layers kept {target_now / target_dense:.3f} of their parameters; whole model kept " \
             f"{now / dense_params:.3f}"
    assert f"  {ratios} (parameters {dense_params:,} -> {now:,})" in printed.out
    assert f"saved to {out}" in printed.out
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0  # inspect says the same
    assert ratios in capsys.readouterr().out
    # the card too, and never "per target layer" under greedy allocation
    card = (out / "README.md").read_text()
    assert f"| target layers kept | {target_now / target_dense:.3f} of their parameters |" in card
    assert f"| whole model kept | {now / dense_params:.3f} of its parameters ({now:,} of {dense_params:,}) |" in card
    assert "per target layer" not in card and "| allocation | `greedy`: one budget of param_ratio 0.5" in card
    before, after, change = map(float, re.search(r"accuracy (\S+) -> (\S+) \((\S+)\)", printed.out).groups())
    scores = {}
    for path in (classifier_dir, out):
        assert main(["eval", str(path), "--data", str(tsv), "--batch-size", "4"]) == 0
        scores[path] = json.loads(capsys.readouterr().out)["accuracy"]
    assert (before, after) == (pytest.approx(scores[classifier_dir], abs=1e-4), pytest.approx(scores[out], abs=1e-4))
    assert change == pytest.approx(after - before, abs=1e-4)


def test_a_fallback_notice_is_printed_once(tmp_path, classifier_dir, capsys):
    assert main(["compress", str(classifier_dir), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr()
    assert printed.err.count("hf-wsvd: note: no data: method=svd") == 1
    assert "compressed with svd: uniform allocation, whole_model pipeline" in printed.out


def test_inspect_shows_the_base_architecture_and_the_recipe_of_old_checkpoints_too(tmp_path, tokenizer, capsys):
    dense, text = _causal_lm_and_text(tmp_path, tokenizer, "llama")
    out = tmp_path / "lm"
    assert main(["compress", str(dense), str(out), "--data", str(text), "--max-length", "8"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "base=LlamaForCausalLM (llama)" in printed
    assert "method=fisher_whiten allocation=greedy pipeline=sequential param_ratio=0.5" in printed
    steps = default_block_refine_steps(default_accelerator().device)
    assert re.search(rf"block refinement: 2 blocks refined \({steps} steps each\): relative "
                     r"output error fell by a median \d+% \(least \d+%, most \d+%\)", printed), printed
    # A checkpoint saved before allocation, sequential and refinement were recorded: uniform, whole-model.
    config = json.loads((out / "config.json").read_text())
    for key in ("allocation", "sequential", "pipeline", "recipe_version", "block_refine_steps", "block_refine_learning_rate", "refined"):
        del config["wsvd"][key]
    (out / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "allocation=uniform pipeline=whole_model" in printed and "block refinement" not in printed


def test_an_error_another_process_of_the_run_caused_is_one_line(tmp_path, monkeypatch, capsys):
    """Under torchrun: a pass another process failed, or an exchange with the others that broke (one
    ended), is said in one line; any other RuntimeError stays a traceback (a bug to report)."""
    import socket

    import torch.distributed as dist

    from hf_wsvd.statistics.passes import OtherProcessFailed

    argv = ["compress", str(tmp_path / "model"), str(tmp_path / "out")]

    def fails(error):
        def command(args):
            raise error() if isinstance(error, type) else error
        return command

    monkeypatch.setattr("hf_wsvd.cli.app._compress",
                        fails(OtherProcessFailed("the Fisher pass failed in 1 other process(es); their error says why")))
    capsys.readouterr()
    assert run(argv) == 2
    assert capsys.readouterr().err.strip() == ("hf-wsvd compress: error: the Fisher pass failed in 1 other process(es); "
                                               "their error says why")

    def exchange(args):
        dist.broadcast(torch.zeros(1), src=1)  # a collective called wrongly: a bug, not another process

    monkeypatch.setattr("hf_wsvd.cli.app._compress", fails(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        run(argv)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        monkeypatch.setattr("hf_wsvd.cli.app._compress", fails(dist.DistNetworkError("Connection reset by peer")))
        capsys.readouterr()
        assert run(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == ("hf-wsvd compress: error: an exchange with the other processes of this run failed (Connection "
                       "reset by peer): another process failed or was stopped, and its own output says why"), err
        for bug in (RuntimeError("a bug"), exchange):
            monkeypatch.setattr("hf_wsvd.cli.app._compress", bug if callable(bug) else fails(bug))
            with pytest.raises(RuntimeError, match="a bug|invalid root rank"):
                run(argv)
    finally:
        dist.destroy_process_group()


def test_a_compress_that_fails_midway_does_not_tell_the_command_line_user_about_the_model_object(
        tmp_path, tokenizer, monkeypatch, capsys):
    """The API's note on a run stopped midway (the replaced layers stay in the caller's model) means
    nothing to a command-line user, who holds no model: only the error is said."""
    import hf_wsvd.pipelines.step as step

    dense, text = _causal_lm_and_text(tmp_path, tokenizer, "llama")
    solve_and_swap, calls = step.solve_and_swap, []

    def fails_the_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("a decomposition failed")
        return solve_and_swap(*args, **kwargs)

    monkeypatch.setattr(step, "solve_and_swap", fails_the_second_time)
    capsys.readouterr()
    assert main(["compress", str(dense), str(tmp_path / "out"), "--data", str(text), "--max-length", "8",
                 "--method", "whiten", "--sequential"]) == 2
    err = capsys.readouterr().err
    assert "hf-wsvd compress: error: a decomposition failed" in err and "midway" not in err, err
    assert len(calls) == 2
