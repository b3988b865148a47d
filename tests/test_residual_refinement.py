"""Block refinement of quantized_residual's corrections (``block_refine_steps``): each block's
corrections trained toward the dense block's outputs, Q frozen."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_wsvd import WSVDConfig, compress
from hf_wsvd.integrations.healing import distillation_kl
from hf_wsvd.recipes import default_block_refine_steps
from hf_wsvd.statistics import default_accelerator
from test_refinement import _relative_errors, trained  # noqa: F401  (trained: the fixture)

# int2 in groups of 32 and rank-8 corrections on a tiny trained Llama: errors left to train away.
RECIPE = dict(method="quantized_residual", quantize="int2", quantize_group_size=32, residual_rank=8)


def _corrections(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith((".up.weight", ".down.weight"))}


@pytest.fixture(scope="module")
def corrected(trained):  # noqa: F811
    """Q + L without and with refinement (twice, same seed) of the trained tiny Llama."""
    dense, calibration, _ = trained
    plain, plain_report = compress(copy.deepcopy(dense), WSVDConfig(**RECIPE, block_refine_steps=0), calibration,
                                   show_progress=False)
    config = WSVDConfig(**RECIPE, block_refine_steps=32)
    refined, report = compress(copy.deepcopy(dense), config, calibration, show_progress=False)
    again, again_report = compress(copy.deepcopy(dense), config, calibration, show_progress=False)
    return plain, plain_report, refined, report, again, again_report


def test_refinement_lowers_the_block_errors_and_the_heldout_distillation_loss_reproducibly(trained, corrected):  # noqa: F811
    dense, calibration, heldout = trained
    plain, plain_report, refined, report, again, again_report = corrected
    assert plain_report.refined == {} and plain.config.wsvd["block_refine_steps"] == 0
    assert report.seconds["refine"] > 0 and refined.config.wsvd["block_refine_steps"] == 32
    # Every block was refined and its error on the calibration data fell; the recipe records it.
    assert sorted(report.refined) == ["0", "1"]
    assert all(after < 0.9 * before for before, after in report.refined.values()), report.refined
    assert refined.config.wsvd["refined"] == report.refined
    # Only the corrections changed: Q is the same quantized weight, the ranks are the same.
    assert report.ranks == plain_report.ranks
    for name in report.ranks:
        a, b = (m.get_submodule(f"model.{name}").base.weight.dequantize() for m in (plain, refined))
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(_corrections(plain).values(), _corrections(refined).values()))
    # The recorded errors are the quantized models' own (block 0 sees the same inputs either way).
    plain_errors, errors = _relative_errors(dense, plain, calibration), _relative_errors(dense, refined, calibration)
    assert report.refined["0"][0] == pytest.approx(plain_errors[0], rel=1e-4)
    for index, error in enumerate(errors):
        assert report.refined[str(index)][1] == pytest.approx(error, rel=1e-4)
    assert errors[-1] < 0.8 * plain_errors[-1]
    # Held-out sequences: the next-token distributions are closer to the dense model's than with the
    # per-layer corrections (the distillation loss; perplexities sit within noise of the dense one).
    plain_kl, refined_kl = (distillation_kl(m, dense, heldout.dataset, 16) for m in (plain, refined))
    assert refined_kl < 0.7 * plain_kl, (plain_kl, refined_kl)
    # The same seed gives bit-identical corrections.
    assert again_report.refined == report.refined
    for (name, a), b in zip(_corrections(refined).items(), _corrections(again).values()):
        assert torch.equal(a, b), name


def test_refined_corrections_save_reload_and_export_as_a_peft_adapter(trained, corrected, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_wsvd.integrations.quantization import quantization_config
    from hf_wsvd.solvers.quantized_residual import residual_adapter

    dense, calibration, _ = trained
    _, _, refined, report, _, _ = corrected
    batch = next(iter(calibration))
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).logits

    refined.save_pretrained(tmp_path / "qlr")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qlr")
    assert reloaded.config.wsvd["refined"] == report.refined
    assert torch.equal(logits(reloaded), logits(refined))
    dense.save_pretrained(tmp_path / "dense")
    residual_adapter(refined, tmp_path / "adapter", str(tmp_path / "dense"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=quantization_config("int2", 32))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, tmp_path / "adapter")), logits(refined),
                               rtol=1e-5, atol=1e-5)


def test_quantized_residual_refines_a_causal_lm_by_default_and_not_without_data(trained):  # noqa: F811
    dense, calibration, _ = trained
    model, report = compress(copy.deepcopy(dense), WSVDConfig(**RECIPE), calibration, show_progress=False)
    steps = default_block_refine_steps(default_accelerator().device)
    assert model.config.wsvd["block_refine_steps"] == steps and sorted(report.refined) == ["0", "1"]
    model, report = compress(copy.deepcopy(dense), WSVDConfig(**RECIPE, residual_method="svd"), show_progress=False)
    assert model.config.wsvd["block_refine_steps"] == 0 and report.refined == {}


def test_a_diverging_refinement_keeps_the_per_layer_corrections(trained, corrected):  # noqa: F811
    dense, calibration, _ = trained
    plain = corrected[0]
    diverged, report = compress(copy.deepcopy(dense), WSVDConfig(**RECIPE, block_refine_steps=4,
                                                                 block_refine_learning_rate=1e4),
                                calibration, show_progress=False)
    assert sorted(report.refined) == ["0", "1"] and all(b == a for b, a in report.refined.values()), report.refined
    for (name, a), b in zip(_corrections(plain).items(), _corrections(diverged).values()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_on_the_gpu_comes_back_quantized_and_refined_on_the_gpu(trained):  # noqa: F811
    dense, calibration, _ = trained
    data = [{k: v.cuda() for k, v in batch.items()} for batch in calibration]
    model, report = compress(copy.deepcopy(dense).cuda(), WSVDConfig(**RECIPE, block_refine_steps=4), data,
                             show_progress=False)
    assert {p.device.type for p in model.parameters()} == {"cuda"} and sorted(report.refined) == ["0", "1"]
    assert torch.isfinite(model(input_ids=data[0]["input_ids"]).logits).all()
