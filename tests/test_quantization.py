"""Quantized compressed checkpoints: the stock ``from_pretrained(dir, quantization_config=...)``
quantizes the factors and pruned layers, the load-time integrity check reads quantized tensors,
and a quantized checkpoint saves and reloads with the same outputs (with hf_wsvd and through the
saved code)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torchao.quantization import Int8WeightOnlyConfig
from transformers import TorchAoConfig

import tiny
from helpers import main_output, run_without_hf_wsvd
from hf_wsvd import FactorizedLinear
from hf_wsvd.runtime.modeling_wsvd import all_finite
from test_trust import edit_weights

CAUSAL = transformers.AutoModelForCausalLM


def _outputs(model, arch: str = "llama") -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**tiny.inputs(arch)))


def _factor_weights(model) -> list[torch.Tensor]:
    return [m.weight for layer in model.modules() if isinstance(layer, FactorizedLinear) for m in (layer.up, layer.down)]


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


def test_quantized_checkpoint_round_trip(tmp_path):
    tiny.save_compressed(tmp_path / "bf", "llama", with_tokenizer=False)
    quantized = CAUSAL.from_pretrained(tmp_path / "bf", quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    quantized.save_pretrained(tmp_path / "q")
    reloaded = CAUSAL.from_pretrained(tmp_path / "q")
    assert [type(w).__name__ for w in _factor_weights(reloaded)] == [type(w).__name__ for w in _factor_weights(quantized)]
    assert torch.equal(_outputs(reloaded), _outputs(quantized))
    reloaded.save_pretrained(tmp_path / "q-again")  # a pre-quantized load saves again (transformers could not)
    assert torch.equal(_outputs(CAUSAL.from_pretrained(tmp_path / "q-again")), _outputs(quantized))
    expected = _outputs(quantized).tolist()
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "q")!r}, trust_remote_code=True)
        ids = torch.tensor({tiny.inputs("llama")["input_ids"].tolist()})
        mask = torch.tensor({tiny.inputs("llama")["attention_mask"].tolist()})
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(out, torch.tensor({expected})), (out - torch.tensor({expected})).abs().max()
        model.save_pretrained({str(tmp_path / "q2")!r})
        again = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "q2")!r}, trust_remote_code=True)
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, out)
        print("ok", type(model.model.layers[0].mlp.up_proj.up.weight).__name__)
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "Int8Tensor"]
