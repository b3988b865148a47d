"""The dtype of a compressed checkpoint: factors computed in float32, stored in the dtype of the layer
they replace — the same checkpoint from the API (model loaded in its own dtype) and from the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import tiny
from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd.cli import main


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_api_keeps_the_dtype_of_the_replaced_layers_and_matches_the_cli(tmp_path, tokenizer, dtype):
    tiny.build("bert").to(dtype).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense")
    assert model.dtype == dtype
    upcast = copy.deepcopy(model).float()
    config = WSVDConfig(method="svd", param_ratio=0.5)
    model, report = compress(model, config, show_progress=False)
    reference, _ = compress(upcast, config, show_progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert len(layers) == len(report.ranks) > 0
    assert {p.dtype for p in model.parameters()} == {dtype}
    for name, layer in layers.items():
        # Computed in float32 (the float32 run's factors), stored in the layer's dtype.
        exact = reference.get_submodule(name)
        assert torch.equal(layer.up.weight, exact.up.weight.to(dtype))
        assert torch.equal(layer.down.weight, exact.down.weight.to(dtype))
    model.save_pretrained(tmp_path / "api")
    assert main(["compress", str(tmp_path / "dense"), str(tmp_path / "cli"), "--method", "svd",
                 "--param-ratio", "0.5"]) == 0
    api, cli = load_file(tmp_path / "api" / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert api.keys() == cli.keys()
    assert all(api[k].dtype == dtype and torch.equal(api[k], cli[k]) for k in api)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "api")
    assert reloaded.dtype == dtype


def _overflowing_half_llama() -> torch.nn.Module:
    """A float16 Llama whose MLP activations pass float16's 65504 on the test batch."""
    model = tiny.build("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.mul_(3000)
    return model.half()


@pytest.mark.parametrize("method, allocation, statistic", [("whiten", "greedy", "gram"), ("asvd", "greedy", "mean_abs"),
                                                           ("asvd", "uniform", "mean_abs")])
def test_statistics_spoilt_by_a_float16_overflow_are_named_with_what_to_do(method, allocation, statistic):
    """Said once for every method, as the overflow it is (asvd's greedy allocation raised a LinAlgError)."""
    batch = tiny.inputs("llama", batch=4, length=8)
    batch["labels"] = batch["input_ids"].clone()
    with pytest.raises(ValueError, match=rf"^the {statistic} statistics of layer 'layers\.0\.mlp\.down_proj' hold NaN or "
                                         r"inf values: the model's activations or gradients overflowed on the "
                                         r"calibration data \(float16 activations overflow past 65504: load the model "
                                         r"in bfloat16 or float32\)$"):
        compress(_overflowing_half_llama(), WSVDConfig(method=method, allocation=allocation, sequential=False), [batch],
                 show_progress=False)
    with pytest.raises(ValueError, match=r"^the importance loss is NaN or infinite for importance batch 0 .*\(float16 "
                                         r"activations overflow past 65504: load the model in bfloat16 or float32\)$"):
        compress(_overflowing_half_llama(), WSVDConfig(method="fisher_whiten", sequential=False), [batch],
                 show_progress=False)
    compress(_overflowing_half_llama().float(), WSVDConfig(method=method, allocation=allocation, sequential=False),
             [batch], show_progress=False)  # in float32 the same weights compress
