"""Quantized compressed checkpoints: the stock ``from_pretrained(dir, quantization_config=...)``
quantizes the factors and pruned layers, the load-time integrity check reads quantized tensors,
and a quantized checkpoint saves and reloads with the same outputs (with hf_wsvd and through the
saved code)."""

from __future__ import annotations

import logging
import re
import shutil

import pytest
import torch
import transformers
from torchao.quantization import Int8WeightOnlyConfig
from transformers import TorchAoConfig

import hf_wsvd
import tiny
from helpers import main_output, run_cli, run_without_hf_wsvd
from hf_wsvd import FactorizedLinear
from hf_wsvd.cli import main
from hf_wsvd.integrations.checkpoint import structure, summarize
from hf_wsvd.integrations.export import densify
from hf_wsvd.integrations.quantization import is_quantized_tensor, quantization_config, quantize, weight_bits
from hf_wsvd.recipes import default_block_refine_steps
from hf_wsvd.statistics import default_accelerator
from hf_wsvd.runtime.modeling_wsvd import all_finite, relative_module_name
from test_trust import edit_config, edit_weights

CAUSAL = transformers.AutoModelForCausalLM


def _outputs(model, arch: str = "llama") -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**tiny.inputs(arch)))


def _factor_weights(model) -> list[torch.Tensor]:
    return [m.weight for layer in model.modules() if isinstance(layer, FactorizedLinear) for m in (layer.up, layer.down)]


def _saved_code_outputs(path, tmp_path) -> tuple[str, torch.Tensor]:
    """The class of the first q_proj's ``up`` and the logits of ``path`` loaded without hf_wsvd
    (``trust_remote_code=True``), computed in that interpreter."""
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        model = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)
        with torch.no_grad():
            out = model(input_ids=torch.tensor({tiny.inputs("llama")["input_ids"].tolist()}),
                        attention_mask=torch.tensor({tiny.inputs("llama")["attention_mask"].tolist()})).logits
        torch.save(out, {str(tmp_path / "out.pt")!r})
        model.save_pretrained({str(tmp_path / "resaved")!r})  # a pre-quantized load saves again
        print(type(model.model.layers[0].self_attn.q_proj.up).__name__)
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip(), torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("arch, auto_class", [("llama", "AutoModelForCausalLM"),
                                              ("bert", "AutoModelForSequenceClassification")])
def test_torchao_int8_load_quantizes_the_factors(tmp_path, arch, auto_class):
    """The regression of issue 22: the integrity check crashed on torchao's tensor subclass."""
    model, _ = tiny.save_compressed(tmp_path, arch, auto_class, with_tokenizer=False)
    auto = getattr(transformers, auto_class)
    quantized = auto.from_pretrained(tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    weights = _factor_weights(quantized)
    assert weights and all(type(w).__name__ == "Int8Tensor" for w in weights)
    reference, out = _outputs(model, arch), _outputs(quantized, arch)
    # int8 per-row weights: about 0.4% relative error per weight, far below the outputs' scale
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()
    assert (out - reference).abs().max() > 0  # quantized for real


def test_the_integrity_check_reads_quantized_factors(tmp_path):
    tiny.save_compressed(tmp_path, "llama", with_tokenizer=False)
    edit_weights(tmp_path, lambda t: t["model.layers.0.mlp.up_proj.down.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(ValueError, match="layers.0.mlp.up_proj.down.weight holds NaN or infinite"):
        CAUSAL.from_pretrained(tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    with pytest.raises(ValueError, match="NaN or infinite"):  # plain tensors are still checked
        CAUSAL.from_pretrained(tmp_path)


QDATA = "model.layers.0.self_attn.q_proj.down._weight_qdata"


SCALE = QDATA.replace("_weight_qdata", "_weight_scale")


@pytest.mark.parametrize("edit, key, message", [
    (lambda path: edit_config(path, lambda c: c["wsvd"]["ranks"].update({"layers.0.self_attn.q_proj": 3})),
     "down.weight", r"\(8, 32\) in the file, \(3, 32\) in the model"),
    (lambda path: _edit_keeping_metadata(path, lambda t: t.update({QDATA: t[QDATA][:-1].clone()})),
     "down.weight", r"\(7, 32\) in the file, \(8, 32\) in the model"),
    # one scale for every row would broadcast; twice the rows would fail in the first forward
    (lambda path: _edit_keeping_metadata(path, lambda t: t.update({SCALE: t[SCALE][:1].clone()})),
     "down._weight_scale", r"\(1, 1\) in the file, \(8, 1\) in the model"),
    (lambda path: _edit_keeping_metadata(path, lambda t: t.update({SCALE: torch.cat([t[SCALE], t[SCALE]])})),
     "down._weight_scale", r"\(16, 1\) in the file, \(8, 1\) in the model"),
], ids=["rank edited", "quantized rows cut", "scales cut", "scales doubled"])
def test_a_quantized_factor_of_the_wrong_shape_is_refused(tmp_path, edit, key, message):
    """torchao loads its own tensors whole, whatever their shape, so the load reports no mismatch."""
    tiny.save_compressed(tmp_path / "bf", "llama", with_tokenizer=False)
    CAUSAL.from_pretrained(tmp_path / "bf", quantization_config=TorchAoConfig(Int8WeightOnlyConfig())).save_pretrained(
        tmp_path / "q")
    edit(tmp_path / "q")
    with pytest.raises(ValueError, match=f"'model.layers.0.self_attn.q_proj.{key}' has the wrong shape in the "
                                         "checkpoint's weights: " + message):
        CAUSAL.from_pretrained(tmp_path / "q")


def test_the_scales_of_a_weight_s_activations_are_not_taken_for_its_own():
    """An int8 weight with a static activation scale (one for the whole input) is of the right shape."""
    from torchao.quantization import PerRow, PerTensor, quantize_
    from torchao.quantization.quant_api import Int8StaticActivationInt8WeightConfig

    from hf_wsvd.runtime.modeling_wsvd import _misshapen_part

    linear = torch.nn.Sequential(torch.nn.Linear(64, 16))
    quantize_(linear, Int8StaticActivationInt8WeightConfig(act_quant_scale=torch.tensor([[0.05]]),
                                                            granularity=[PerTensor(), PerRow()]))
    weight = linear[0].weight
    assert tuple(weight.act_quant_scale.shape) == (1, 1) and tuple(weight.scale.shape) == (16, 1)
    assert _misshapen_part(weight) is None
    weight.scale = weight.scale[:1]
    assert _misshapen_part(weight) == ("scale", (1, 1), (16, 1))


@pytest.mark.parametrize("verbosity", ["warning", "error"])
def test_a_quantized_tensor_deleted_from_the_file_is_a_value_error_naming_the_weight(tmp_path, capsys, verbosity):
    """transformers raises a RuntimeError naming no tensor (after its load report names it); the
    error names the weight the report names, also where transformers logs errors only, and the CLI
    reports it on one line."""
    from hf_wsvd.cli import main

    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(getattr(transformers.logging, verbosity.upper()))
    try:
        _deleted_part_is_named(tmp_path, capsys, main)
    finally:
        transformers.logging.set_verbosity(before)


def _deleted_part_is_named(tmp_path, capsys, main):
    tiny.save_compressed(tmp_path / "bf", "llama", with_tokenizer=False)
    CAUSAL.from_pretrained(tmp_path / "bf", quantization_config=TorchAoConfig(Int8WeightOnlyConfig())).save_pretrained(
        tmp_path / "q")
    _edit_keeping_metadata(tmp_path / "q", lambda t: t.pop(QDATA.replace("_weight_qdata", "_weight_scale")))
    weight = QDATA.replace("._weight_qdata", ".weight")
    with pytest.raises(ValueError, match=f"transformers could not rebuild the weight '{re.escape(weight)}' from the "
                                         "checkpoint's stored tensors: .*does not match config.json's quantization_config"):
        CAUSAL.from_pretrained(tmp_path / "q")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q")]) == 2
    assert f"hf-wsvd inspect: error: transformers could not rebuild the weight '{weight}'" in capsys.readouterr().err


def test_a_load_report_naming_no_weight_leaves_the_error_pointing_to_it():
    from hf_wsvd.runtime.modeling_wsvd import _unbuilt_weight

    def record(message):
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, message, None, None)

    said = "Error: TorchAoDeserialize on tensors destined for model.layers.0.mlp.up.weight. Ckpt contains: 2"
    assert _unbuilt_weight([record("LOAD REPORT"), record(said)]) == "model.layers.0.mlp.up.weight"
    assert _unbuilt_weight([record("LOAD REPORT without the line")]) is None


def test_all_finite_on_plain_and_quantized_tensors():
    plain = torch.ones(4, 8)
    assert all_finite(plain) and all_finite(torch.nn.Parameter(plain)) and all_finite(torch.ones(3, dtype=torch.int8))
    plain[1, 2] = float("inf")
    assert not all_finite(plain) and not all_finite(torch.nn.Parameter(plain))
    linear = torch.nn.Linear(8, 4)
    from torchao.quantization import quantize_

    quantize_(linear, Int8WeightOnlyConfig())
    assert type(linear.weight).__name__ == "Int8Tensor" and all_finite(linear.weight)
    linear.weight.scale[0] = float("nan")
    assert not all_finite(linear.weight)


def _export_error(capsys, source, output) -> str:
    """The one error line of ``hf-wsvd export source output``, which exits 2 and writes nothing."""
    capsys.readouterr()
    assert main(["export", str(source), str(output)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("hf-wsvd export: error:") and not output.exists(), errors
    return errors[0]


def test_quantized_checkpoint_round_trip(tmp_path, capsys):
    tiny.save_compressed(tmp_path / "bf", "llama", with_tokenizer=False)
    quantized = CAUSAL.from_pretrained(tmp_path / "bf", quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    quantized.save_pretrained(tmp_path / "q")
    reloaded = CAUSAL.from_pretrained(tmp_path / "q")
    assert [type(w).__name__ for w in _factor_weights(reloaded)] == [type(w).__name__ for w in _factor_weights(quantized)]
    assert torch.equal(_outputs(reloaded), _outputs(quantized))
    reloaded.save_pretrained(tmp_path / "q-again")  # a pre-quantized load saves again (transformers could not)
    assert torch.equal(_outputs(CAUSAL.from_pretrained(tmp_path / "q-again")), _outputs(quantized))
    kind, out = _saved_code_outputs(tmp_path / "q", tmp_path)
    assert kind == "Linear" and torch.equal(out, _outputs(quantized))
    # A dense export cannot multiply quantized factors out: one line, nothing written.
    assert _export_error(capsys, tmp_path / "q", tmp_path / "dense").endswith(
        "is quantized (torchao), which has no exact dense form: export a checkpoint saved unquantized (compress "
        "without --quantize, or the model loaded without its quantization_config), then quantize the dense model at "
        "load")
    assert type(CAUSAL.from_pretrained(tmp_path / "resaved").model.layers[0].mlp.up_proj.up.weight).__name__ == "Int8Tensor"


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("quantization_config"), "the weights file holds quantized tensors .*_weight_qdata.*, but config.json "
                                              "has no quantization_config that transformers reads them with"),
    (lambda c: c["quantization_config"].update(quant_method="nonsense"), "holds quantized tensors"),
])
def test_a_quantized_checkpoint_whose_quantization_config_was_edited_is_named(tmp_path, capsys, change, message):
    tiny.save_compressed(tmp_path / "bf", "llama")
    CAUSAL.from_pretrained(tmp_path / "bf", quantization_config=TorchAoConfig(Int8WeightOnlyConfig())).save_pretrained(
        tmp_path / "q")
    edit_config(tmp_path / "q", change)
    with pytest.raises(ValueError, match=message):
        CAUSAL.from_pretrained(tmp_path / "q")
    # and an unquantized checkpoint given a torchao quantization_config
    edit_config(tmp_path / "bf", lambda c: c.update(quantization_config={
        "quant_method": "torchao", "quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_version": 2,
                                                              "_data": {}}}}))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "bf")]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "(Invalid torchao safetensors metadata): config.json has a torchao quantization_config, but the weights " \
           "were not saved quantized by torchao" in error, error


def test_dense_block_linears_the_groups_do_not_divide_stay_unquantized(tmp_path):
    """A target layer left dense whose input size the groups do not divide (32 inputs, groups of 64)
    is kept in the model's dtype, as factors are: the quantizer used to fail on it after the work."""
    model, report = tiny.compressed("llama")
    assert report.dense_targets
    quantized = quantize(model, quantization_config("int4", 64))
    for name in report.dense_targets:
        layer = quantized.model.get_submodule(name)
        assert type(layer).__name__ == "FullPrecisionLinear" and type(layer.weight) is torch.nn.Parameter, name
        assert torch.equal(layer.weight, model.model.get_submodule(name).weight)
    with torch.no_grad():
        assert torch.isfinite(quantized(**tiny.inputs("llama")).logits).all()


def test_factors_the_quantizer_refuses_stay_unquantized_and_round_trip(tmp_path, caplog):
    """Rank 8 up factors cannot be grouped by 32 inputs: they keep the model's dtype (one log
    line), the rest is int4; saved and reloaded, with hf_wsvd and through the saved code."""
    model, _ = tiny.compressed("llama")
    config = quantization_config("int4", 32)
    with caplog.at_level(logging.WARNING):
        quantized = quantize(model, config)
    lines = [r.getMessage() for r in caplog.records if "stay unquantized" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("hf_wsvd: 10 of the 24 factor, pruned and dense block linears"), lines
    layer = quantized.model.layers[0].self_attn.q_proj
    assert type(layer.up).__name__ == "FullPrecisionLinear" and type(layer.up.weight) is torch.nn.Parameter
    assert type(layer.down.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert torch.equal(layer.up.weight, model.model.layers[0].self_attn.q_proj.up.weight)  # kept as is
    bits = weight_bits(quantized)
    assert 0 < bits.full_weights < bits.quantized_weights
    # int4 values, a float32 scale and an int8 zero point per 32 weights; the unquantized up factors at 32 bits
    expected = (bits.quantized_weights * (4 + 40 / 32) + bits.full_weights * 32) / (bits.quantized_weights + bits.full_weights)
    assert bits.block_bits_per_weight == pytest.approx(expected)
    quantized.save_pretrained(tmp_path / "q")
    reloaded = CAUSAL.from_pretrained(tmp_path / "q")
    assert type(reloaded.model.layers[0].self_attn.q_proj.up).__name__ == "FullPrecisionLinear"
    assert torch.equal(_outputs(reloaded), _outputs(quantized))
    kind, out = _saved_code_outputs(tmp_path / "q", tmp_path)
    assert kind == "FullPrecisionLinear" and torch.equal(out, _outputs(quantized))


def test_pruned_layers_are_quantized(tmp_path):
    model, report = tiny.compressed("llama", data=_lm_batches(), method="fisher_whiten", param_ratio=0.6,
                                    sequential=True, mlp_pruning=True, rank_multiple=8)
    assert report.pruned
    quantized = quantize(model, quantization_config("int8"))
    name = next(iter(report.pruned))
    assert type(quantized.model.get_submodule(name).weight).__name__ == "Int8Tensor"
    quantized.save_pretrained(tmp_path)
    assert torch.equal(_outputs(CAUSAL.from_pretrained(tmp_path)), _outputs(quantized))
    # What inspect counts is the structure, quantized or not: the pruned layers a group size leaves
    # unquantized (another class) are pruned layers still.
    model.save_pretrained(tmp_path / "bf")
    grouped = CAUSAL.from_pretrained(tmp_path / "bf", quantization_config=quantization_config("int4", group_size=64))
    assert any(type(m).__name__ == "FullPrecisionLinear" for name, m in grouped.named_modules()
               if relative_module_name(grouped, name) in report.pruned)
    for each in (quantized, grouped):
        assert summarize(each) == summarize(model) and structure(each) == structure(model)


def test_cut_attentions_are_quantized_and_round_trip(tmp_path):
    model, report = tiny.compressed("llama", data=_lm_batches(), method="fisher_whiten", param_ratio=0.6,
                                    sequential=True, attention_pruning=True, allocation="uniform", rank_multiple=2)
    name = next(iter(report.attention))
    quantized = quantize(model, quantization_config("int8"))
    attention = quantized.model.get_submodule(name)
    assert attention.head_dim < 8 and type(attention.q_proj.weight).__name__ == "Int8Tensor"
    quantized.save_pretrained(tmp_path)
    reloaded = CAUSAL.from_pretrained(tmp_path)
    assert reloaded.model.get_submodule(name).head_dim == attention.head_dim
    assert torch.equal(_outputs(reloaded), _outputs(quantized))


def _lm_batches(count: int = 4, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(len(tiny.SPECIALS), len(tiny.SPECIALS) + len(tiny.WORDS), (2, length), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


QUANTIZE = dict(quantize="int3", quantize_group_size=16)


@pytest.fixture(scope="module")
def residual(tmp_path_factory):
    """A tiny dense Llama (saved), its int3 quantization alone, and Q + L at rank 8 (saved)."""
    folder = tmp_path_factory.mktemp("residual")
    dense = tiny.build("llama")
    dense.save_pretrained(folder / "dense")
    quantized = quantize(dense, quantization_config("int3", 16))
    model, report = hf_wsvd.compress(dense, hf_wsvd.WSVDConfig(method="quantized_residual", residual_rank=8, **QUANTIZE),
                                     _lm_batches(8), show_progress=False)
    model.save_pretrained(folder / "qlr")
    return folder, dense, quantized, model, report


def test_quantized_residual_beats_quantization_alone(residual):
    _, dense, quantized, model, report = residual
    assert report.pipeline == "quantized_residual" and len(report.ranks) == 14  # every block linear
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "LowRankCorrectedLinear" and layer.rank == 8
    assert type(layer.base.weight).__name__ == "IntxUnpackedToInt8Tensor"  # Q, as the stock quantizer stores it
    assert torch.equal(layer.base.weight.dequantize(), quantized.model.layers[0].self_attn.q_proj.weight.dequantize())
    reference = _outputs(dense)
    error_q = (_outputs(quantized) - reference).pow(2).mean()
    error_ql = (_outputs(model) - reference).pow(2).mean()
    assert error_ql < 0.5 * error_q, (error_ql, error_q)
    assert weight_bits(model).full_weights == sum(8 * (m.in_features + m.out_features) for m in
                                                  model.modules() if type(m).__name__ == "LowRankCorrectedLinear")


def test_quantized_residual_without_data_names_the_statistics_it_needs():
    with pytest.raises(ValueError, match=r"^quantized_residual with residual_method='fisher_whiten' needs \w.* "
                                         "statistics: pass calibration data$"):
        hf_wsvd.compress(tiny.build("llama"), hf_wsvd.WSVDConfig(method="quantized_residual", residual_rank=8,
                                                                  residual_method="fisher_whiten", **QUANTIZE),
                         show_progress=False)


def test_float64_weights_are_refused_before_quantizing():
    """torchao asserts on float64 deep inside from_pretrained's conversion, under a report of hundreds of lines."""
    message = re.escape("quantizes float32, float16 or bfloat16 weights, not torch.float64: use the model in one of those")
    with pytest.raises(ValueError, match="^quantize='int3' " + message):
        hf_wsvd.compress(tiny.build("llama").double(), hf_wsvd.WSVDConfig(method="quantized_residual", residual_rank=8,
                                                                          **QUANTIZE), _lm_batches(2), show_progress=False)
    with pytest.raises(ValueError, match="^quantize='int3' " + message):
        hf_wsvd.compress(tiny.build("llama"), hf_wsvd.WSVDConfig(method="quantized_residual", residual_rank=8, **QUANTIZE),
                         _lm_batches(2), show_progress=False, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        quantize(tiny.build("llama").double(), quantization_config("int8"))


def test_a_corrected_layer_counts_once_in_what_the_checkpoint_reports(residual):
    """A corrected layer's own base and factors are linears inside a target: they are no dense target
    of their own (they were counted twice, and the kept ratio came out 1.1 for 1.2)."""
    from hf_wsvd.integrations.checkpoint import structure, target_counts

    *_, model, _ = residual
    corrected = [m for m in model.modules() if type(m).__name__ == "LowRankCorrectedLinear"]
    now, dense = target_counts(model)
    assert dense == sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0) for m in corrected)
    assert now == dense + sum(m.rank * (m.in_features + m.out_features) for m in corrected)
    assert structure(model) == "14 layers quantized with a low-rank correction, 0 kept dense"
    assert not any("returns the model unquantized" in notice for notice in residual[4].notices)  # it quantizes
    from hf_wsvd.integrations.card import build_card

    text = build_card(model, base_model="dense", command="hf-wsvd compress dense out").text
    assert "| allocation | every target layer quantized, plus a rank-8 low-rank correction" in text
    assert "Its target layers: 14 layers quantized with a low-rank correction, 0 kept dense." in text


def test_quantized_residual_in_bfloat16_keeps_its_corrections_in_the_model_dtype():
    # The solver works in float32; a bf16 model whose layers have no bias once kept float32
    # corrections and failed at its first forward (a dtype mismatch in the correction).
    dense = tiny.build("llama")
    model, _ = hf_wsvd.compress(dense, hf_wsvd.WSVDConfig(method="quantized_residual", residual_rank=8, **QUANTIZE),
                                _lm_batches(4), show_progress=False, dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base.bias is None and layer.up.weight.dtype == layer.down.weight.dtype == torch.bfloat16
    assert torch.isfinite(_outputs(model).float()).all()


def test_quantized_residual_round_trip(residual, tmp_path, capsys):
    folder, _, _, model, _ = residual
    reloaded = CAUSAL.from_pretrained(folder / "qlr")
    assert type(reloaded.model.layers[1].mlp.up_proj).__name__ == "LowRankCorrectedLinear"
    assert torch.equal(_outputs(reloaded), _outputs(model))
    kind, out = _saved_code_outputs(folder / "qlr", tmp_path)
    assert kind == "FullPrecisionLinear" and torch.equal(out, _outputs(model))  # the correction's up factor
    # Q + L has no dense form: refused, in memory and from the checkpoint, never a stock model with L left in
    with pytest.raises(ValueError, match=r"quantized_residual \(Q \+ L\) model has no dense form"):
        densify(reloaded)
    assert "no dense form" in _export_error(capsys, folder / "qlr", tmp_path / "dense")


def test_quantized_residual_never_loads_as_w_plus_l_or_q_alone(residual, tmp_path):
    folder, dense, _, _, _ = residual
    shutil.copytree(folder / "qlr", tmp_path / "no-config")
    edit_config(tmp_path / "no-config", lambda c: c.pop("quantization_config"))
    with pytest.raises(ValueError, match="has no quantization_config"):
        CAUSAL.from_pretrained(tmp_path / "no-config")
    shutil.copytree(folder / "qlr", tmp_path / "no-correction")
    _edit_keeping_metadata(tmp_path / "no-correction", lambda t: t.pop("model.layers.0.self_attn.q_proj.up.weight"))
    with pytest.raises(ValueError, match="q_proj.up.weight' is missing"):
        CAUSAL.from_pretrained(tmp_path / "no-correction")
    # W + L: full-precision base weights under the residual recipe (saved through the quantizer)
    model = CAUSAL.from_pretrained(folder / "qlr")
    weights = dense.state_dict()
    for name in model.config.wsvd["residual"]:
        model.get_submodule(f"model.{name}").base.weight = torch.nn.Parameter(weights[f"model.{name}.weight"])
    model.save_pretrained(tmp_path / "w-plus-l")
    with pytest.raises(ValueError, match="base loaded unquantized"):
        CAUSAL.from_pretrained(tmp_path / "w-plus-l")


def _edit_keeping_metadata(path, change) -> None:
    """``edit_weights`` for a quantized checkpoint: its safetensors metadata (torchao's) is kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path / "model.safetensors", framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata=metadata)


def test_quantized_residual_exports_a_peft_adapter(residual, tmp_path):
    from peft import PeftModel

    from hf_wsvd.solvers.quantized_residual import residual_adapter

    folder, _, _, model, _ = residual
    residual_adapter(model, tmp_path / "adapter", str(folder / "dense"))
    base = CAUSAL.from_pretrained(folder / "dense", quantization_config=quantization_config("int3", 16))
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.allclose(_outputs(with_adapter), _outputs(model), atol=1e-6)


@pytest.mark.parametrize("extra, kind", [
    (["--param-ratio", "0.5", "--quantize", "int4", "--quantize-group-size", "8", "--no-mlp-pruning",
      "--no-attention-pruning"], "FactorizedLinear"),
    (["--method", "quantized_residual", "--quantize", "int4", "--quantize-group-size", "16", "--residual-rank", "4"],
     "LowRankCorrectedLinear"),
])
def test_compress_quantize_writes_a_quantized_checkpoint_in_one_go(tmp_path, tokenizer, capsys, extra, kind):
    from test_cli import _causal_lm_and_text

    from hf_wsvd.cli import main

    dense, text = _causal_lm_and_text(tmp_path, tokenizer, "llama")
    out = tmp_path / "lm"
    capsys.readouterr()
    assert main(["compress", str(dense), str(out), "--data", str(text), "--max-length", "8", *extra]) == 0
    said, noted = capsys.readouterr()
    assert "returns the model unquantized" not in noted, noted  # the command line quantizes it
    model = CAUSAL.from_pretrained(out)
    assert f"\n  quantized with torchao: {weight_bits(model).describe()}\n  saved to" in said, said
    assert model.config.quantization_config.quant_method == "torchao"
    layer = next(m for m in model.modules() if type(m).__name__ == kind)
    inner = layer.base if kind == "LowRankCorrectedLinear" else layer.down
    assert type(inner.weight).__name__ == "IntxUnpackedToInt8Tensor"
    # Ranks resolved to step by the group: no factor is left out of the quantization (Q + L keeps its
    # corrections in full precision by design).
    assert model.config.wsvd["rank_multiple"] == (8 if kind == "FactorizedLinear" else 16)
    assert kind != "FactorizedLinear" or not [m for m in model.modules() if type(m).__name__ == "FullPrecisionLinear"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("quantized with torchao: "))
    assert "bits per weight in the block linears" in line
    assert f"{weight_bits(model).block_bits_per_weight:.2f} bits per weight" in line
    # A causal LM with data: its blocks refined by default (Q + L: its corrections), said by inspect.
    assert sorted(model.config.wsvd["refined"]) == ["0", "1"]
    steps = default_block_refine_steps(default_accelerator().device)  # 64 on a CPU, more on an accelerator
    assert f"block refinement: 2 blocks refined ({steps} steps each)" in printed
    card = (out / "README.md").read_text()
    assert "| quantization | torchao: " in card and "bits per weight in the block linears" in card


def test_the_python_helper_refuses_int4_gpu_without_cuda(monkeypatch):
    """Loading with it would print one traceback per weight before failing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="quantize='int4-gpu' runs torchao's packed int4 CUDA kernels and needs a CUDA GPU"):
        quantization_config("int4-gpu", 32)


def test_the_command_line_refuses_a_format_this_machine_cannot_run_before_the_model_loads(tmp_path, monkeypatch,
                                                                                         capsys):
    from hf_wsvd.cli import workflow

    tiny.save_compressed(tmp_path / "model", "llama")  # dense or not: never read
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # after the compression, which may use CUDA
    monkeypatch.setattr(workflow, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["compress", str(tmp_path / "model"), str(tmp_path / "out"), "--method", "svd", "--param-ratio", "0.5",
                 "--quantize", "int4-gpu"]) == 2
    assert "error: --quantize='int4-gpu' runs torchao's packed int4 CUDA kernels" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compress_refuses_a_quantization_that_quantizes_no_block_linear(tmp_path, tokenizer, capsys):
    """A group size that divides no input size of the blocks (ranks in steps of 4, sizes up to 64):
    the output would carry a quantization config and not one quantized weight."""
    from test_cli import _causal_lm_and_text

    from hf_wsvd.cli import main

    dense, text = _causal_lm_and_text(tmp_path, tokenizer, "llama")
    capsys.readouterr()
    argv = ["compress", str(dense), str(tmp_path / "lm"), "--data", str(text), "--max-length", "8", "--quantize", "int4",
            "--quantize-group-size", "128", "--rank-multiple", "4", "--block-refine-steps", "0"]
    assert main(argv) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert re.search(r"--quantize='int4' quantized none of the [\d,]+ weights of the block linears in groups of "
                     r"--quantize-group-size=128 .*: lower --quantize-group-size, or set --rank-multiple", error), error
    assert not (tmp_path / "lm").exists()


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_an_error_naming_rank_multiple_says_when_the_group_size_set_it(allocation):
    """The tiny layers (sizes up to 64) have no rank in steps of 128: with int4 in groups of 128 the
    multiple was never given, so the error says to lower the group size; given by hand (with int4 in
    the default groups of 64 too), to lower the multiple."""
    with pytest.raises(ValueError, match=r"lower quantize_group_size \(rank_multiple=128 follows it: quantize='int4' "
                                         r"takes a factor whose rank is a multiple of the group size\)$"):
        tiny.compressed("llama", quantize="int4", quantize_group_size=128, allocation=allocation)
    for given in ({}, {"quantize": "int4"}):
        with pytest.raises(ValueError, match=r"lower rank_multiple$"):
            tiny.compressed("llama", rank_multiple=128, allocation=allocation, **given)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantizes on CUDA")
@pytest.mark.parametrize("spec", ["nf4", "bnb-int8"])
def test_bitsandbytes_round_trip_on_cuda(tmp_path, spec):
    pytest.importorskip("bitsandbytes")
    tiny.save_compressed(tmp_path / "bf", "llama", with_tokenizer=False)
    quantized = CAUSAL.from_pretrained(tmp_path / "bf", quantization_config=quantization_config(spec), device_map="cuda")
    assert type(quantized.model.layers[0].mlp.up_proj.down).__name__ in ("Linear4bit", "Linear8bitLt")
    inputs = {k: v.cuda() for k, v in tiny.inputs("llama").items()}
    with torch.no_grad():
        before = quantized(**inputs).logits
    quantized.save_pretrained(tmp_path / "q")
    reloaded = CAUSAL.from_pretrained(tmp_path / "q", device_map="cuda")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, before)
    assert 0 < weight_bits(reloaded).block_bits_per_weight < 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantizes on CUDA")
def test_bitsandbytes_4bit_weights_are_checked_through_their_scales_on_cuda(tmp_path):
    """bfloat16 storage (FSDP-QLoRA) holds packed codes that may read as NaN: it loads; a NaN planted
    in a scale (absmax) is refused; so is the quantized file without its quantization_config."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    tiny.save_compressed(tmp_path / "bf", "llama", with_tokenizer=False)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                bnb_4bit_quant_storage=torch.bfloat16)
    quantized = CAUSAL.from_pretrained(tmp_path / "bf", quantization_config=config, device_map="cuda")
    assert {p.dtype for p in quantized.parameters() if type(p).__name__ == "Params4bit"} == {torch.bfloat16}
    quantized.save_pretrained(tmp_path / "q")
    CAUSAL.from_pretrained(tmp_path / "q", device_map="cuda")
    shutil.copytree(tmp_path / "q", tmp_path / "nan")
    _edit_keeping_metadata(tmp_path / "nan", lambda t: next(t[k] for k in sorted(t) if k.endswith(".absmax")
                                                            and t[k].is_floating_point()).view(-1).__setitem__(0, float("nan")))
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        CAUSAL.from_pretrained(tmp_path / "nan", device_map="cuda")
    shutil.copytree(tmp_path / "q", tmp_path / "no-config")
    edit_config(tmp_path / "no-config", lambda c: c.pop("quantization_config"))
    with pytest.raises(ValueError, match=r"holds quantized tensors \(such as '.*\.absmax'\), but config.json has no"):
        CAUSAL.from_pretrained(tmp_path / "no-config", device_map="cuda")


def test_int8_warns_once_of_the_factors_a_compiled_cpu_model_would_compute_wrong(caplog):
    """PyTorch 2.13's CPU kernel behind compiled torchao int8 (``_weight_int8pack_mm``) is wrong for
    input sizes that are not multiples of 16; rank 8 factors are such, rank 16 ones are not."""
    for multiple, ratio, warned in ((8, 0.5, True), (16, 0.8, False)):
        model, report = tiny.compressed("llama", rank_multiple=multiple, param_ratio=ratio)
        assert report.ranks and {rank % multiple for rank in report.ranks.values()} == {0}
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            quantized = quantize(model, quantization_config("int8"))
        lines = [r.getMessage() for r in caplog.records if "torch.compile on a CPU" in r.getMessage()]
        unaligned = sum(rank % 16 != 0 for rank in report.ranks.values())  # the up factors' input size
        assert (unaligned > 0) == warned and len(lines) == int(warned), lines
        if warned:
            assert lines[0].startswith(f"hf_wsvd: {unaligned} of the {2 * len(report.ranks)} factor and pruned linears "
                                       "have an input size that is not a multiple of 16 (first: model.layers.")
            assert lines[0].endswith("compress with rank_multiple=16 to compile it there")
        # Warned, not kept: every factor is int8 all the same.
        assert all(type(w).__name__ == "Int8Tensor" for w in _factor_weights(quantized))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled int8 kernels of a GPU")
def test_compiled_int8_of_factor_sized_layers_matches_eager_on_cuda():
    """Whether the CPU kernel's fault (input sizes not a multiple of 16) exists on CUDA too: a rank 24
    factor and a 4096-wide one, torchao int8, compiled against eager."""
    from torchao.quantization import quantize_

    for width in (24, 4096):
        layer = torch.nn.Sequential(torch.nn.Linear(width, 256, bias=False)).to("cuda", torch.bfloat16)
        quantize_(layer, Int8WeightOnlyConfig())
        x = torch.randn(1, 3, width, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            eager, compiled = layer(x).float(), torch.compile(layer, fullgraph=True)(x).float()
        torch._dynamo.reset()
        assert (compiled - eager).abs().max() <= 0.02 * eager.abs().max(), width


def test_a_quantized_checkpoint_is_refused_as_input_in_one_line(tmp_path, capsys):
    dense = tiny.build("llama")
    dense.save_pretrained(tmp_path / "dense")
    int4 = CAUSAL.from_pretrained(tmp_path / "dense", quantization_config=quantization_config("int4", 16))
    with pytest.raises(ValueError, match="'layers.0.self_attn.q_proj' holds a quantized weight"):
        hf_wsvd.compress(int4, hf_wsvd.WSVDConfig(method="svd", param_ratio=0.5), None, show_progress=False)
    int4.save_pretrained(tmp_path / "int4")
    tiny.tokenizer().save_pretrained(tmp_path / "int4")
    (tmp_path / "text.txt").write_text("\n".join(" ".join(tiny.WORDS) for _ in range(8)))
    code = run_cli(["compress", str(tmp_path / "int4"), str(tmp_path / "out"), "--param-ratio", "0.6", "--data",
                    str(tmp_path / "text.txt"), "--max-length", "16", "--num-samples", "4", "--block-refine-steps", "0"])
    assert code == 2 and "holds a quantized weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quantized_residual_refuses_layers_the_quantizer_leaves_and_checks_the_format_first():
    gpt2 = tiny.build("gpt2")  # Conv1D layers, which torchao leaves unquantized
    with pytest.raises(ValueError, match="'h.0.attn.c_proj' is a Conv1D: exclude it"):
        hf_wsvd.compress(gpt2, hf_wsvd.WSVDConfig(method="quantized_residual", quantize="int8", residual_rank=4,
                                                  target_modules=["attn.c_proj"]), _lm_batches(2), show_progress=False)
    if not torch.cuda.is_available():  # a format that cannot apply is refused before the statistics pass
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            hf_wsvd.compress(tiny.build("llama"), hf_wsvd.WSVDConfig(method="quantized_residual", quantize="int4-gpu"),
                             iter(_broken_batches()), show_progress=False)
    # a low-rank recipe only aligns its ranks for the format here: it compresses for a GPU to quantize later
    model, _ = hf_wsvd.compress(tiny.build("llama"), hf_wsvd.WSVDConfig(method="svd", param_ratio=0.5, quantize="int4-gpu",
                                                                        quantize_group_size=8), None, show_progress=False)
    assert model.config.wsvd["ranks"] and all(rank % 8 == 0 for rank in model.config.wsvd["ranks"].values())


def _broken_batches():
    raise AssertionError("the data was read before the format was checked")
    yield


def test_bits_per_weight_count_gpt2_conv1d_block_weights_and_leave_biases_out():
    gpt2 = tiny.build("gpt2")
    bits = weight_bits(gpt2)
    conv1d = [m.weight for m in gpt2.modules() if type(m).__name__ == "Conv1D"]
    assert conv1d and bits.full_weights == sum(w.numel() for w in conv1d)  # biases are "other" parameters
    assert bits.quantized_weights == 0 and bits.block_bits_per_weight == 32
    model, _ = hf_wsvd.compress(tiny.build("llama"), hf_wsvd.WSVDConfig(method="svd", param_ratio=0.5, rank_multiple=8),
                                None, show_progress=False)
    quantized = weight_bits(quantize(model, quantization_config("int4", 8)))
    assert quantized.full_weights == 0 and quantized.quantized_weights > 0  # every factor quantized
    assert is_quantized_tensor(torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float8_e4m3fn), requires_grad=False))
    assert not is_quantized_tensor(torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16)))


def test_compress_says_that_it_returns_the_model_unquantized_and_the_cli_does_not(caplog, tmp_path, capsys):
    """``quantize`` shapes the ranks in ``compress``; the API returns the model unquantized (said, with
    what to call), the command line quantizes it (nothing said)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        model, report = hf_wsvd.compress(tiny.build("llama"), hf_wsvd.WSVDConfig(method="svd", param_ratio=0.5,
                                                                                rank_multiple=4, **QUANTIZE),
                                         None, show_progress=False)
    said = [n for n in report.notices if n.startswith("quantize='int3': compress returns the model unquantized")]
    assert said and "quantization_config('int3', 16)" in said[0] and said[0] in caplog.text
    assert getattr(model.config, "quantization_config", None) is None
