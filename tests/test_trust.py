"""Damaged or edited factorized checkpoints never load as a model with random weights: each case
builds a checkpoint, edits it, and expects a clear error, with hf_wsvd and through the saved code."""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import tiny
from helpers import run_without_hf_wsvd
from hf_wsvd.cli import main

QUERY = "encoder.layer.0.attention.self.query"
AUTO = transformers.AutoModelForSequenceClassification


@pytest.fixture
def checkpoint(tmp_path):
    tiny.save_compressed(tmp_path / "ckpt", "bert")
    return tmp_path / "ckpt"


def edit_config(path, change) -> None:
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _rename(ranks: dict) -> None:
    ranks[QUERY.replace("query", "querx")] = ranks.pop(QUERY)


def _set_nan(tensors: dict) -> None:
    tensors[f"bert.{QUERY}.down.weight"][0, 0] = float("nan")


def _set_inf(tensors: dict) -> None:
    tensors[f"bert.{QUERY}.up.weight"][1, 0] = float("inf")


# (case, config edit, weights edit, message with hf_wsvd, message through the saved code)
CASES = [
    ("empty ranks", lambda c: c["wsvd"].update(ranks={}), None, r"\['ranks'\] must map", r"\['ranks'\] must map"),
    ("module dropped from ranks", lambda c: c["wsvd"]["ranks"].pop(QUERY), None,
     f"module '{QUERY}' is not factorized", f"module '{QUERY}' is not factorized"),
    ("module renamed in ranks", lambda c: _rename(c["wsvd"]["ranks"]), None, "names '.*querx'", "names '.*querx'"),
    ("base type of another architecture", lambda c: c.update(wsvd_base_model_type="gpt2"), None,
     "'gpt2' does not match its architecture", "'gpt2' does not match the checkpoint's architecture"),
    ("base type hf_wsvd", lambda c: c.update(wsvd_base_model_type="hf_wsvd"), None,
     "not hf_wsvd itself", "'hf_wsvd' does not match"),
    ("base type missing", lambda c: c.pop("wsvd_base_model_type"), None,
     "lacks wsvd_base_model_type", "None does not match"),
    ("bogus method", lambda c: c["wsvd"].update(method="bogus"), None, "'bogus' is not one of", None),
    ("method not a string", lambda c: c["wsvd"].update(method=3), None, "method'\\]=3", "method'\\]=3"),
    ("param_ratio 7", lambda c: c["wsvd"].update(param_ratio=7), None, "param_ratio'\\]=7", "param_ratio'\\]=7"),
    ("dtype edited to no dtype", lambda c: c.update(dtype="float17"), None,
     "config.json dtype='float17' is not a torch dtype", "config.json dtype='float17' is not a torch dtype"),
    ("dtype edited to auto", lambda c: c.update(dtype="auto"), None,  # a load's argument, never a stored dtype
     "config.json dtype='auto' is not a torch dtype", "config.json dtype='auto' is not a torch dtype"),
    ("fractional rank", lambda c: c["wsvd"]["ranks"].update({QUERY: 8.5}), None,
     "=8.5 is not a positive integer", "=8.5 is not a positive integer"),
    ("string rank", lambda c: c["wsvd"]["ranks"].update({QUERY: "8"}), None,
     "='8' is not a positive integer", "='8' is not a positive integer"),
    ("factor missing from the file", None, lambda t: t.pop(f"bert.{QUERY}.down.weight"),
     "down.weight' is missing", "down.weight' is missing"),
    ("dense tensor missing from the file", None, lambda t: t.pop("bert.encoder.layer.0.attention.output.LayerNorm.weight"),
     "LayerNorm.weight' is missing", "LayerNorm.weight' is missing"),
    ("head missing from the file", None, lambda t: t.pop("classifier.weight"), "'classifier.weight' is missing",
     "'classifier.weight' is missing"),
    ("block added in config.json", lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 1), None,
     r"encoder\.layer\.\d\..*' is missing", r"encoder\.layer\.\d\..*' is missing"),
    ("extra tensor of a block the model lacks", None,
     lambda t: t.update({"bert.encoder.layer.7.attention.self.query.weight": torch.zeros(32, 32)}),
     "has no place in this model .*'7.attention.self.query.weight'", "has no place in this model"),
    ("extra bias on a factor", None, lambda t: t.update({f"bert.{QUERY}.down.bias": torch.zeros(8)}),
     f"module '{QUERY}.down' has no 'bias'", "has no place in this model"),
    ("extra tensor on a module left as it was", None,
     lambda t: t.update({"bert.encoder.layer.0.attention.output.LayerNorm.scale": torch.ones(32)}),
     "module 'encoder.layer.0.attention.output.LayerNorm' has no 'scale'", "has no place in this model"),
    # bitsandbytes 4-bit keeps its packed data under the weight's own name, its scales beside it
    ("4-bit tensors without a quantization_config", None,
     lambda t: t.update({f"bert.{QUERY}.down.weight": torch.zeros(128, 1, dtype=torch.uint8),
                         f"bert.{QUERY}.down.weight.absmax": torch.ones(4)}),
     "holds quantized tensors \\(such as '.*down.weight.absmax'\\), but config.json has no quantization_config",
     "holds quantized tensors"),
    # integers cast to floats at load: numbers that were never the weight's
    ("factor stored as int8", None,
     lambda t: t.update({f"bert.{QUERY}.up.weight": (t[f"bert.{QUERY}.up.weight"] * 100).to(torch.int8)}),
     f"'bert.{QUERY}.up.weight' is stored as I8 in model.safetensors, but is a torch.float32 weight",
     f"'bert.{QUERY}.up.weight' is stored as I8"),
    ("norm stored as booleans", None,
     lambda t: t.update({"bert.embeddings.LayerNorm.weight": t["bert.embeddings.LayerNorm.weight"] > 0}),
     "'bert.embeddings.LayerNorm.weight' is stored as BOOL", "'bert.embeddings.LayerNorm.weight' is stored as BOOL"),
    ("NaN factor", None, _set_nan, "NaN or infinite", "NaN or infinite"),
    ("inf factor", None, _set_inf, "NaN or infinite", "NaN or infinite"),
    # Weights outside the compressed layers are checked as well: a NaN there spoils every output too.
    ("NaN in a norm", None, lambda t: t["bert.embeddings.LayerNorm.weight"].__setitem__(0, float("nan")),
     "bert.embeddings.LayerNorm.weight holds NaN or infinite", "LayerNorm.weight holds NaN or infinite"),
    ("inf in the head", None, lambda t: t["classifier.weight"].__setitem__((0, 0), float("-inf")),
     "classifier.weight holds NaN or infinite", "classifier.weight holds NaN or infinite"),
    ("ranks name a norm", lambda c: c["wsvd"]["ranks"].update({"embeddings.LayerNorm": 4}), None,
     r"\['ranks'\] names 'embeddings.LayerNorm', a LayerNorm, not a linear layer",
     r"\['ranks'\] names 'embeddings.LayerNorm', a LayerNorm, not a linear layer"),
    ("ranks name an attention", lambda c: c["wsvd"]["ranks"].update({"encoder.layer.0.attention.self": 4}), None,
     "names 'encoder.layer.0.attention.self', a .*SelfAttention, not a linear layer",
     "names 'encoder.layer.0.attention.self', a .*SelfAttention, not a linear layer"),
    ("rank edited", lambda c: c["wsvd"]["ranks"].update({QUERY: c["wsvd"]["ranks"][QUERY] - 1}), None,
     f"{QUERY}.down.weight' has the wrong shape .*: \\(8, 32\\) in the file, \\(7, 32\\) in the model",
     f"{QUERY}.down.weight' has the wrong shape"),
    ("factor truncated", None, lambda t: t.update({f"bert.{QUERY}.down.weight": t[f"bert.{QUERY}.down.weight"][:-1]}),
     f"{QUERY}.down.weight' has the wrong shape .*: \\(7, 32\\) in the file", f"{QUERY}.down.weight' has the wrong shape"),
]


def _damage(path, config_edit, weights_edit) -> None:
    if config_edit:
        edit_config(path, config_edit)
    if weights_edit:
        edit_weights(path, weights_edit)


@pytest.mark.parametrize("case, config_edit, weights_edit, message, _", CASES, ids=[c[0] for c in CASES])
def test_damaged_checkpoint_fails_clearly_with_hf_wsvd(checkpoint, case, config_edit, weights_edit, message, _, capsys):
    before = AUTO.from_pretrained(checkpoint)  # the undamaged checkpoint loads
    assert before.config.model_type == "hf_wsvd"
    _damage(checkpoint, config_edit, weights_edit)
    with pytest.raises(ValueError, match=message):
        AUTO.from_pretrained(checkpoint)
    # the CLI's loaders report it as the one-line exit-2 error
    assert main(["inspect", str(checkpoint)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("hf-wsvd inspect: error:"), errors
    assert re.search(message, errors[0]), errors


def cli_errors(capsys, path, *commands: str) -> list[str]:
    """The one error line of each of ``commands`` (inspect, export, eval) run on ``path``; each exits 2."""
    data = path.parent / "text.txt"
    data.write_text("the movie was great\tand the plot was good\n" * 20)
    argv = {"inspect": ["inspect", str(path)], "export": ["export", str(path), str(path.parent / "exported")],
            "eval": ["eval", str(path), "--data", str(data), "--max-length", "8"]}
    found = []
    for command in commands:
        capsys.readouterr()
        assert main(argv[command]) == 2, command
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].startswith(f"hf-wsvd {command}: error:"), errors
        found.append(errors[0])
    assert not (path.parent / "exported").exists()
    return found


def test_a_foreign_model_type_never_runs_the_folders_code(checkpoint, capsys, tmp_path, monkeypatch):
    """config.json's model_type edited while its auto_map stays: transformers would ask whether to
    run the folder's modeling_wsvd.py (and run it on "y"); the commands refuse in one line instead."""
    import builtins

    ran = tmp_path / "code-ran"
    code = checkpoint / "modeling_wsvd.py"
    code.write_text(code.read_text() + f"\nopen({str(ran)!r}, 'w').close()\n")
    monkeypatch.setattr(builtins, "input", lambda *args: "y")  # a user who answers the prompt with yes
    edit_config(checkpoint, lambda config: config.update(model_type="nosuch"))
    inspected, exported, evaluated = cli_errors(capsys, checkpoint, "inspect", "export", "eval")
    assert not ran.exists()
    assert "is not an hf_wsvd checkpoint (model_type='nosuch')" in inspected and "model_type='nosuch'" in exported
    assert "needs code of its own to load" in evaluated and "hf-wsvd never runs" in evaluated


def test_a_tokenizer_of_custom_code_is_never_run(checkpoint, capsys, tmp_path, monkeypatch):
    """A tokenizer_config.json whose auto_map names a tokenizer class of the folder's own code."""
    import builtins

    ran = tmp_path / "code-ran"
    (checkpoint / "tokenization_evil.py").write_text(
        f"open({str(ran)!r}, 'w').close()\nfrom transformers import PreTrainedTokenizerFast as EvilTok\n")
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTok", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTok"]})
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(builtins, "input", lambda *args: "y")
    exported, evaluated = cli_errors(capsys, checkpoint, "export", "eval")
    assert not ran.exists()
    assert "the tokenizer saved in" in exported and "contains custom code" in exported, exported
    assert "tokenizer" in evaluated and "needs code of its own to load" in evaluated, evaluated


def test_non_finite_outputs_are_an_error_not_a_metric(tmp_path, capsys):
    """A dense model whose weights hold a NaN: eval refuses to print a perplexity of NaN (not JSON)
    or an accuracy read off NaN logits."""
    (tmp_path / "text.txt").write_text("the movie was great and the plot was good\n" * 20)
    (tmp_path / "labelled.tsv").write_text("sentence\tlabel\n" + "the movie was great\t1\nthe plot was bad\t0\n" * 10)
    for kind, weight, data in (("bert", "bert.embeddings.LayerNorm.weight", tmp_path / "labelled.tsv"),
                               ("llama", "model.norm.weight", tmp_path / "text.txt")):
        model = tiny.build(kind)
        with torch.no_grad():
            model.get_parameter(weight)[0] = float("nan")
        tiny.save(model, tmp_path / kind)
        capsys.readouterr()
        assert main(["eval", str(tmp_path / kind), "--data", str(data), "--max-length", "8"]) == 2
        captured = capsys.readouterr()
        assert "NaN" not in captured.out, captured.out
        (error,) = [line for line in captured.err.splitlines() if "error:" in line]
        assert error.startswith("hf-wsvd eval: error: the model's outputs hold NaN or infinite values"), error


@pytest.mark.parametrize("refined", [{"0": [None, None]}, "x", [[1, 2]], {"0": [1]}, {"0": [1.0, -0.5]}])
def test_an_edited_refinement_record_is_one_line_in_inspect(checkpoint, refined, capsys):
    edit_config(checkpoint, lambda config: config["wsvd"].update(refined=refined))
    (error,) = cli_errors(capsys, checkpoint, "inspect")
    assert "config.json 'wsvd'['refined']=" in error and "[error before, error after]" in error, error


@pytest.mark.parametrize("architectures, message", [
    (["AutoModelForSequenceClassification"], r"\['AutoModelForSequenceClassification'\], which names no transformers model"),
    (["BertTokenizer"], r"\['BertTokenizer'\], which names no transformers model class"),
    ("WsvdBertForSequenceClassification", "must be a list of model class names"),
    ([1], r"architectures=\[1\] must be a list"),
    (None, "architectures=None, which names no transformers model class"),
    (["PreTrainedModel"], r"\['PreTrainedModel'\], which names no transformers model class"),
])
def test_hand_edited_architectures_are_one_line(checkpoint, capsys, architectures, message):
    """Any transformers attribute (an Auto class, a tokenizer) or a value of the wrong type where the
    model class belongs: inspect and export name it, no traceback."""
    edit_config(checkpoint, lambda config: config.update(architectures=architectures))
    for error in cli_errors(capsys, checkpoint, "inspect", "export"):
        assert re.search(message, error), error


def _pruned_llama():
    """A tiny Llama compressed with pruned MLPs (and factorized attention)."""
    ids = torch.randint(len(tiny.SPECIALS), tiny.VOCAB_SIZE, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4]), "labels": ids[i:i + 4]}
            for i in (0, 4)]
    model, report = tiny.compressed("llama", data=data, method="whiten", param_ratio=0.6, sequential=True,
                                    mlp_pruning=True, allocation="uniform")
    assert DOWN in report.pruned
    return model


DOWN = "layers.0.mlp.down_proj"


def _shrink(tensors: dict) -> None:
    key = f"model.{DOWN}.weight"
    tensors[key] = tensors[key][:, :-1].contiguous()


def _edit_pruned(config: dict) -> None:
    config["wsvd"]["pruned"][DOWN]["shape"][0] -= 1


# (case, config edit, weights edit, shape in the file, shape in the model)
PRUNED_CASES = [
    ("pruned shape edited", _edit_pruned, None, "(32, 32)", "(32, 31)"),
    ("pruned record deleted", lambda c: c["wsvd"]["pruned"].pop(DOWN), None, "(32, 32)", "(32, 64)"),
    ("pruned tensor truncated", None, _shrink, "(32, 31)", "(32, 32)"),
]


@pytest.mark.parametrize("case, config_edit, weights_edit, in_file, in_model", PRUNED_CASES,
                         ids=[c[0] for c in PRUNED_CASES])
def test_wrong_shapes_of_pruned_layers_are_named_in_both_load_paths(tmp_path, tokenizer, capsys, case, config_edit,
                                                                   weights_edit, in_file, in_model):
    """Not transformers' RuntimeError: the documented ValueError naming the tensor, with hf_wsvd,
    through the saved code, and as the CLI's one line."""
    path = tiny.save(_pruned_llama(), tmp_path / "ckpt")
    _damage(path, config_edit, weights_edit)
    message = f"'model.{DOWN}.weight' has the wrong shape in the checkpoint's weights: {in_file} in the file, {in_model} in the model"
    with pytest.raises(ValueError) as error:
        transformers.AutoModelForCausalLM.from_pretrained(path)
    assert message in str(error.value)
    assert all(message in line for line in cli_errors(capsys, path, "inspect", "export", "eval"))
    result = run_without_hf_wsvd(f"""
        import transformers
        try:
            transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)
        except ValueError as error:
            print(error)
    """, cwd=tmp_path)
    assert result.returncode == 0 and message in result.stdout, result.stderr[-3000:]
    assert "LOAD REPORT" not in result.stderr  # the one line, not transformers' table before it


def test_the_load_report_is_left_out_only_where_the_error_names_its_tensors(checkpoint, logged):
    """transformers' multi-line load report would come before the one-line error naming the same
    tensors; an accepted load (a new head of another size) still logs it."""
    def reports():
        found = [r.getMessage() for r in logged if "LOAD REPORT" in r.getMessage()]
        logged.clear()
        return found

    AUTO.from_pretrained(checkpoint, num_labels=5, ignore_mismatched_sizes=True)
    found = reports()
    assert len(found) == 1 and "classifier.weight" in found[0], found
    edit_config(checkpoint, lambda c: c["wsvd"]["ranks"].update({QUERY: c["wsvd"]["ranks"][QUERY] - 1}))
    with pytest.raises(ValueError, match="down.weight' has the wrong shape"):
        AUTO.from_pretrained(checkpoint)
    assert reports() == []
    logging.getLogger("transformers.modeling_utils").warning("after the load")  # nothing is held back any more
    assert [r.getMessage() for r in logged] == ["after the load"]


def test_held_records_hold_warnings_a_quieter_logger_would_not_make_and_log_only_what_its_level_shows():
    """transformers set to errors only (TRANSFORMERS_VERBOSITY=error) still makes its load report for
    the caller to read; it is not logged at the end, and the level is the user's again after."""
    from hf_wsvd.runtime.modeling_wsvd import held_records

    parent, log, seen = logging.getLogger("hf_wsvd.tests.quiet"), logging.getLogger("hf_wsvd.tests.quiet.child"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    parent.addHandler(handler)
    parent.propagate = False
    parent.setLevel(logging.ERROR)
    try:
        with held_records(log.name) as outer:
            with held_records(log.name) as inner:
                log.warning("a report")
                log.info("detail")
                assert [r.getMessage() for r in inner] == ["a report"]
            log.error("a failure")
            assert [r.getMessage() for r in outer] == ["a failure"]  # the inner block's warning: below the level
        assert seen == ["a failure"]
        assert log.level == logging.NOTSET and log.getEffectiveLevel() == logging.ERROR
        log.warning("after")
        assert seen == ["a failure"]
    finally:
        parent.removeHandler(handler)
        parent.setLevel(logging.NOTSET)


def test_held_records_nest_and_hold_only_their_own_thread():
    """An inner block's dropped records stay dropped under an outer block, its kept ones are held by
    the outer one in order; another thread's records (a load beside this one) pass at once."""
    import threading

    from hf_wsvd.runtime.modeling_wsvd import held_records

    log, seen = logging.getLogger("hf_wsvd.tests.held"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    log.propagate = False
    try:
        with held_records(log.name):
            log.warning("outer")
            with held_records(log.name) as held:
                log.warning("inner, dropped")
                assert [record.getMessage() for record in held] == ["inner, dropped"]
                held.clear()
            with held_records(log.name):
                log.warning("inner, kept")
            other = threading.Thread(target=log.warning, args=("another thread",))
            other.start()
            other.join()
            assert seen == ["another thread"]
        assert seen == ["another thread", "outer", "inner, kept"]
        assert log.filters == []
    finally:
        log.removeHandler(handler)


def test_a_truncated_weights_file_is_named_by_every_command(tmp_path, capsys):
    """A model.safetensors cut short (a copy interrupted, a disk that filled): one line naming the
    file from inspect, export and eval of a checkpoint, and from compress of a dense model."""
    def truncate(path):
        weights = path / "model.safetensors"
        with open(weights, "r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
        return weights

    tiny.save_compressed(tmp_path / "ckpt", "bert")
    weights = truncate(tmp_path / "ckpt")
    for line in cli_errors(capsys, tmp_path / "ckpt", "inspect", "export", "eval"):
        assert f"{weights} cannot be read (" in line and "the file is damaged or incomplete" in line, line
    # The stock Auto classes name it too, with hf_wsvd imported and through the saved code without it.
    with pytest.raises(ValueError, match=re.escape(f"{weights} cannot be read (")):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    result = run_without_hf_wsvd(f"""
        import transformers
        try:
            transformers.AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "ckpt")!r},
                                                                            trust_remote_code=True)
        except ValueError as error:
            print(error)
    """, cwd=tmp_path)
    assert result.returncode == 0 and f"{weights} cannot be read (" in result.stdout, result.stderr[-3000:]
    dense = truncate(tiny.save(tiny.build("bert"), tmp_path / "dense"))
    assert main(["compress", str(tmp_path / "dense"), str(tmp_path / "out"), "--method", "svd"]) == 2
    assert f"hf-wsvd compress: error: {dense} cannot be read (" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _remote_load_error(path) -> str:
    """The ValueError a causal LM folder's load raises through its saved code, hf_wsvd not installed."""
    result = run_without_hf_wsvd(f"""
        import transformers
        try:
            transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)
        except ValueError as error:
            print(error)
    """, cwd=path.parent)
    assert result.returncode == 0 and result.stdout, result.stderr[-3000:]
    return result.stdout


def test_a_stale_single_weights_file_beside_a_sharded_save_is_named(tmp_path):
    """An older save's model.safetensors left beside a sharded compressed save: transformers reads
    it, the factors are missing, and the error says that the folder holds both, through both paths."""
    model, _ = tiny.compressed("llama")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    shutil.copy(tiny.save(tiny.build("llama"), tmp_path / "dense", with_tokenizer=False) / "model.safetensors",
                tmp_path / "ckpt")
    both = "the folder holds both model.safetensors and a sharded save's model.safetensors.index.json"
    with pytest.raises(ValueError, match=r"is missing from the checkpoint's weights .*; " + re.escape(both)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert both in _remote_load_error(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()  # the sharded save alone loads
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = tiny.inputs("llama")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_a_sharded_save_s_index_that_is_not_json_is_named_through_both_paths(tmp_path):
    model, _ = tiny.compressed("llama")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    index.write_text(index.read_text()[:-40])  # cut short
    message = f"{index} is not valid JSON ("
    with pytest.raises(ValueError, match=re.escape(message)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert message in _remote_load_error(tmp_path / "ckpt")


def test_a_subfolder_s_own_weights_are_the_ones_checked(tmp_path):
    """The integrity checks read the files the load reads: a checkpoint in a subfolder, beside other
    weights in the folder above it (here stored as int8, which a float weight never is)."""
    model, _ = tiny.compressed("llama")
    model.save_pretrained(tmp_path / "repo" / "sub")
    ints = {k: (v * 100).to(torch.int8) for k, v in load_file(tmp_path / "repo" / "sub" / "model.safetensors").items()}
    save_file(ints, tmp_path / "repo" / "model.safetensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "repo", subfolder="sub")
    ids = tiny.inputs("llama")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    save_file(ints, tmp_path / "repo" / "sub" / "model.safetensors")
    with pytest.raises(ValueError, match=r"is stored as I8 in model.safetensors, but is a torch.float32 weight"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "repo", subfolder="sub")


def test_a_hub_model_s_cached_weights_are_checked(tmp_path, monkeypatch):
    """A model loaded by Hub id is read from the local cache: its files there are the ones checked."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, _ = tiny.compressed("llama")
    repo = tmp_path / "cache" / "models--user--tiny"
    model.save_pretrained(repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    load = functools.partial(transformers.AutoModelForCausalLM.from_pretrained, "user/tiny",
                             cache_dir=tmp_path / "cache", local_files_only=True)
    assert type(load()).__name__ == "WsvdLlamaForCausalLM"
    edit_weights(repo / "snapshots" / ("a" * 40), lambda t: t.update(
        {"model.layers.0.mlp.down_proj.up.weight": t["model.layers.0.mlp.down_proj.up.weight"].to(torch.int8)}))
    with pytest.raises(ValueError, match=re.escape("'model.layers.0.mlp.down_proj.up.weight' is stored as I8")):
        load()


def test_other_safetensors_errors_pass_as_they_are(tmp_path):
    """Only a file that cannot be opened is reported as damaged: another safetensors error, or one
    where no local folder is named, passes unchanged (never blamed on a healthy file)."""
    from safetensors import SafetensorError

    from hf_wsvd.runtime.modeling_wsvd import readable_weights

    tiny.save_compressed(tmp_path / "ckpt", "bert")
    for path in (tmp_path / "ckpt", "org/hub-model", None):
        with pytest.raises(SafetensorError, match="device meta is invalid"):
            with readable_weights(path):
                raise SafetensorError("device meta is invalid")


def test_damaged_checkpoints_fail_clearly_through_the_saved_code(tmp_path, tokenizer):
    """The same cases in an interpreter without hf_wsvd (trust_remote_code=True). A bogus method
    name passes there: the saved code cannot know the package's method list."""
    folders = {}
    model, _ = tiny.compressed("bert")
    for i, (case, config_edit, weights_edit, _, message) in enumerate(CASES):
        path = tmp_path / f"case{i}"
        model.save_pretrained(path)
        _damage(path, config_edit, weights_edit)
        folders[str(path)] = message
    result = run_without_hf_wsvd(f"""
        import re, transformers
        for path, message in {folders!r}.items():
            try:
                transformers.AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
            except ValueError as error:
                assert message and re.search(message, str(error)), (path, message, str(error))
                print("refused")
            else:
                assert message is None, (path, "loaded")
                print("loaded")
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["loaded" if c[4] is None else "refused" for c in CASES]


def test_model_type_edited_back_to_the_base_type(checkpoint, capsys):
    """What a hand-edited model_type can and cannot be protected against (README, save/load)."""
    edit_config(checkpoint, lambda c: c.update(model_type="bert"))
    # hf_wsvd's own loaders (CLI eval/compress/inspect/export) refuse it ...
    assert main(["inspect", str(checkpoint)]) == 2
    assert "not an hf_wsvd checkpoint (model_type='bert')" in capsys.readouterr().err
    with pytest.raises(ValueError, match="records an hf_wsvd recipe but model_type='bert'"):
        from hf_wsvd.tasks import load_task_model

        load_task_model(str(checkpoint))
    # ... the stock class only reports the factor tensors as unexpected and the dense weights as
    # missing (a warning): the report is how to detect it.
    _, info = AUTO.from_pretrained(checkpoint, output_loading_info=True)
    assert f"bert.{QUERY}.down.weight" in info["unexpected_keys"]
    assert f"bert.{QUERY}.weight" in info["missing_keys"]
    # with trust_remote_code=True, the saved auto_map still rebuilds the factorized model
    model = AUTO.from_pretrained(checkpoint, trust_remote_code=True)
    assert type(model).__name__ == "WsvdBertForSequenceClassification"


def test_model_type_edited_back_fails_loudly_with_a_factorized_embedding(tmp_path):
    """A factorized embedding's table (vocab × r) has the dense table's name, so a stock load
    raises on the shape."""
    tiny.save_compressed(tmp_path, "bert", with_tokenizer=False, embeddings=True, embedding_ratio=0.5)
    edit_config(tmp_path, lambda c: c.update(model_type="bert"))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AUTO.from_pretrained(tmp_path)


def test_ignore_mismatched_sizes_does_not_hide_wrong_factor_shapes(checkpoint):
    edit_config(checkpoint, lambda c: c["wsvd"]["ranks"].update({QUERY: c["wsvd"]["ranks"][QUERY] - 1}))
    with pytest.raises(ValueError, match="down.weight' has the wrong shape"):
        AUTO.from_pretrained(checkpoint, ignore_mismatched_sizes=True)


def test_a_new_head_size_is_a_named_error_unless_mismatches_are_allowed(checkpoint):
    """A head of another size outside the base model (a new label count): a ValueError naming it,
    and re-initialized with ignore_mismatched_sizes=True, as transformers does."""
    with pytest.raises(ValueError, match="'classifier.bias' has the wrong shape .*: \\(2,\\) in the file, "
                                         "\\(5,\\) in the model .*ignore_mismatched_sizes=True"):
        AUTO.from_pretrained(checkpoint, num_labels=5)
    model = AUTO.from_pretrained(checkpoint, num_labels=5, ignore_mismatched_sizes=True)
    assert model.classifier.weight.shape == (5, 32)


def test_another_task_class_gets_a_new_head_but_never_a_random_base_tensor(checkpoint):
    """Loading a checkpoint into another task's class (the stock way to start a new head) leaves only
    that head new; a base-model tensor missing is still an error."""
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(checkpoint, output_loading_info=True)
    assert info["missing_keys"] and all(k.startswith("cls.predictions.") for k in info["missing_keys"])
    saved = load_file(checkpoint / "model.safetensors")
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.up.weight, saved[f"bert.{QUERY}.up.weight"])
    edit_weights(checkpoint, lambda t: t.pop("bert.embeddings.word_embeddings.weight"))
    with pytest.raises(ValueError, match="'bert.embeddings.word_embeddings.weight' is missing"):
        transformers.AutoModelForMaskedLM.from_pretrained(checkpoint)


def test_a_class_that_names_the_layers_otherwise_is_refused_as_such_not_as_damage(tmp_path):
    """LlamaForQuestionAnswering keeps its base model under 'transformer.', the saved LlamaForCausalLM
    under 'model.': the file is intact, and the error says which class to load it with."""
    model, _ = tiny.compressed("llama")
    model.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"\(it holds 'model\.[^)]*\) \(\d+ tensors affected\): LlamaForQuestionAnswering "
                                         r"keeps its layers under other names than LlamaForCausalLM, the class the "
                                         r"checkpoint was saved as: load it as that class"):
        transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "lm")
    # the class it was saved as, with a file of other names: damage (or another file), not a class to change
    edit_weights(tmp_path / "lm", lambda t: t.update({"transformer" + k[len("model"):]: t.pop(k) for k in list(t)
                                                      if k.startswith("model.")}))
    with pytest.raises(ValueError, match="the file is damaged or belongs to another recipe"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm")


def test_loading_info_is_still_returned_on_request(checkpoint):
    model, info = AUTO.from_pretrained(checkpoint, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert torch.isfinite(model.bert.encoder.layer[0].attention.self.query.up.weight).all()


def test_a_recipe_section_of_the_wrong_type_is_shown_short(checkpoint, capsys):
    """A hand-edited ``ranks`` holding every layer's name as a list: the error names it, cut short."""
    edit_config(checkpoint, lambda config: config["wsvd"].update(ranks=[f"layers.{i}.mlp.down_proj" for i in range(40)]))
    for error in cli_errors(capsys, checkpoint, "inspect", "export"):
        assert "must map each factorized module to its rank" in error, error
        assert "got ranks=['layers.0.mlp.down_proj'" in error and "layers.39" not in error and len(error) < 400, error
