"""Speed paths of compressed models: the factorized forward is two plain matrix products (no copies
or casts), compressed models compile with torch.compile and run in bf16/fp16, and layers whose
factorization would not be faster can be kept dense (``max_kept_ratio_for_speed``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import tiny
from hf_wsvd import FactorizedLinear, WSVDConfig
from hf_wsvd.allocation import greedy_ranks, kept_ratio, uniform_ranks
from hf_wsvd.cli import build_parser

MATMULS = {"mm", "addmm", "bmm", "matmul", "linear"}
COPIES = {"_to_copy", "to", "copy_", "clone", "contiguous", "_copy_from"}


class OpLog(TorchDispatchMode):
    """Records the name of every aten op run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def compressed(arch: str, ratio: float = 0.5, **config):
    model, _ = tiny.compressed(arch, param_ratio=ratio, **config)
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    return model.eval()


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_factorized_forward_is_two_matmuls_without_copies(dtype, bias):
    layer = FactorizedLinear(48, 40, 8, bias=bias, dtype=dtype)
    x = torch.randn(3, 5, 48, dtype=dtype)
    with torch.inference_mode(), OpLog() as log:
        y = layer(x)
    assert sum(op in MATMULS for op in log.ops) == 2, log.ops
    assert not COPIES & set(log.ops), log.ops
    assert y.dtype == dtype and y.shape == (3, 5, 40)
    dense = layer.up.weight.double() @ layer.down.weight.double()
    reference = x.double() @ dense.T + (layer.bias.double() if bias else 0)
    assert relative_error(y, reference.float()) < (1e-5 if dtype == torch.float32 else 3e-2)


def test_torch_compile_inductor_matches_eager():
    """The default backend (inductor, C++ on CPU) on a whole compressed BERT classifier."""
    model = compressed("bert")
    inputs = tiny.inputs("bert")
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    with torch.no_grad():
        eager = model(**inputs).logits
        compiled = torch.compile(model, backend=counter)(**inputs).logits
    assert counter.frame_count >= 1  # something was compiled, not all run eagerly
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_factorized_layer_compiles_without_graph_breaks():
    layer = FactorizedLinear(32, 24, 6)
    x = torch.randn(4, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)(x)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled, layer(x))


def test_torch_compile_causal_lm_matches_eager():
    model = compressed("llama")
    ids = tiny.inputs("llama")["input_ids"][:1]
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled_model = copy.copy(model)
        compiled_model.forward = torch.compile(model.forward, backend="aot_eager")
        compiled = compiled_model(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_half_precision_compressed_model_matches_float32(dtype, tolerance):
    model = compressed("llama")
    inputs = tiny.inputs("llama")
    with torch.no_grad():
        reference = model(**inputs).logits
        half = copy.deepcopy(model).to(dtype)
        output = half(**inputs).logits
    assert {p.dtype for p in half.parameters()} == {dtype}
    assert output.dtype == dtype
    assert torch.isfinite(output).all()
    assert relative_error(output, reference) < tolerance


def test_bf16_load_of_compressed_checkpoint(tmp_path):
    model = compressed("llama")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    layers = [m for m in loaded.modules() if isinstance(m, FactorizedLinear)]
    assert layers and all(m.up.weight.dtype == m.down.weight.dtype == torch.bfloat16 for m in layers)
    inputs = tiny.inputs("llama")
    with torch.no_grad():
        reference = model(**inputs).logits
        output = loaded(**inputs).logits
    assert relative_error(output, reference) < 5e-2


# ------------------------------------------------------------------- max_kept_ratio_for_speed


@pytest.mark.parametrize("value", [0, -0.1, 1.5, True, "0.5", float("nan")])
def test_max_kept_ratio_for_speed_is_validated(value):
    with pytest.raises(ValueError, match="max_kept_ratio_for_speed"):
        WSVDConfig(max_kept_ratio_for_speed=value)


def test_max_kept_ratio_for_speed_round_trips():
    config = WSVDConfig(max_kept_ratio_for_speed=1)
    assert config.max_kept_ratio_for_speed == 1.0 and isinstance(config.max_kept_ratio_for_speed, float)
    assert WSVDConfig.from_dict(config.to_dict()).max_kept_ratio_for_speed == 1.0
    assert WSVDConfig().max_kept_ratio_for_speed is None


@pytest.mark.parametrize("value", [{"384": 0.5}, {"0x384": 0.5}, {"384x384": 1.5}, {"384x384": -0.1},
                                   {"384x384": "0.5"}, {"384x384": True}])
def test_per_shape_speed_limits_are_validated(value):
    with pytest.raises(ValueError, match="max_kept_ratio_for_speed"):
        WSVDConfig(max_kept_ratio_for_speed=value)


def test_per_shape_speed_limits_round_trip_and_apply_to_their_shape_only():
    config = WSVDConfig(max_kept_ratio_for_speed={"384x384": 0, "384x1536": 1})
    restored = WSVDConfig.from_dict(json.loads(config.to_json_string()))
    assert restored.max_kept_ratio_for_speed == {"384x384": 0.0, "384x1536": 1.0}
    shapes = {"attention": (384, 384), "up": (384, 1536), "down": (1536, 384)}
    ranks = uniform_ranks(shapes, 0.5)
    assert uniform_ranks(shapes, 0.5, max_kept_ratio=config.max_kept_ratio_for_speed) == {
        "up": ranks["up"], "down": ranks["down"]}  # 0: always dense; a shape not listed: no limit
    assert uniform_ranks(shapes, 0.5, max_kept_ratio={"1536x384": 0.4}) == {
        "attention": ranks["attention"], "up": ranks["up"]}


def test_cli_reads_per_shape_speed_limits_from_a_layer_speed_json(tmp_path):
    measured = tmp_path / "layer_speed_gpu.json"
    measured.write_text(json.dumps({"threshold": 0.25, "by_shape": {"4096x4096": 0.25, "4096x11008": 0.83}}))
    args = build_parser().parse_args(["compress", "m", "out", "--max-kept-ratio-for-speed", str(measured)])
    assert args.max_kept_ratio_for_speed == {"4096x4096": 0.25, "4096x11008": 0.83}
    plain = tmp_path / "limits.json"
    plain.write_text(json.dumps({"384x384": 0.7}))
    args = build_parser().parse_args(["compress", "m", "out", "--max-kept-ratio-for-speed", str(plain)])
    assert args.max_kept_ratio_for_speed == {"384x384": 0.7}
    # the same mapping given inline
    args = build_parser().parse_args(["compress", "m", "out", "--max-kept-ratio-for-speed", ' {"384x384": 0.7}'])
    assert args.max_kept_ratio_for_speed == {"384x384": 0.7}
    for bad in (tmp_path / "missing.json", tmp_path / "runs.json", '{"384x384": }'):
        if getattr(bad, "name", None) == "runs.json":
            bad.write_text(json.dumps({"runs": [{"by_shape": {"384x384": 0.7}}]}))
        with pytest.raises(SystemExit):
            build_parser().parse_args(["compress", "m", "out", "--max-kept-ratio-for-speed", str(bad)])


def test_uniform_ranks_drop_layers_above_the_speed_threshold():
    shapes = {"attention": (384, 384), "ffn": (384, 1536)}
    ranks = uniform_ranks(shapes, 0.5)
    ratios = {name: kept_ratio(*shapes[name], rank) for name, rank in ranks.items()}
    assert set(ranks) == set(shapes) and all(0.49 < r <= 0.5 for r in ratios.values())
    assert uniform_ranks(shapes, 0.5, max_kept_ratio=0.5) == ranks
    assert uniform_ranks(shapes, 0.5, max_kept_ratio=0.4) == {}
    cut = (ratios["attention"] + ratios["ffn"]) / 2
    kept = uniform_ranks(shapes, 0.5, max_kept_ratio=cut)
    assert kept == {n: r for n, r in ranks.items() if ratios[n] <= cut} and len(kept) == 1


def test_compressor_keeps_slow_layers_dense_with_greedy_allocation():
    # Exact ranks (rank_multiple=1): on tiny layers rounding to 8 would give every layer one ratio.
    base = compressed("bert", allocation="greedy", rank_multiple=1)
    recipe_ranks = base.config.wsvd["ranks"]
    shapes = {}
    for name, module in base.named_modules():
        if isinstance(module, FactorizedLinear):
            shapes[name.removeprefix("bert.")] = (module.in_features, module.out_features)
    ratios = {n: kept_ratio(*shapes[n], r) for n, r in recipe_ranks.items()}
    cut = sorted(ratios.values())[len(ratios) // 2]
    model, report = tiny.compressed("bert", allocation="greedy", rank_multiple=1, max_kept_ratio_for_speed=cut)
    assert report.ranks and all(kept_ratio(*shapes.get(n, (0, 0)), r) <= cut + 1e-12 for n, r in report.ranks.items())
    slow = sorted(n for n in recipe_ranks if ratios[n] > cut and n not in report.ranks)
    assert slow and set(slow) <= set(report.dense_targets)
    for name in slow:
        assert type(model.bert.get_submodule(name)) is torch.nn.Linear
    # The budget is spent around the limit (not by dropping layers after allocation, which would keep
    # more weights than param_ratio allows): the compressed model is no larger than the uncapped one.
    params = sum(p.numel() for p in model.parameters())
    assert params <= sum(p.numel() for p in base.parameters()) + sum(in_ + out for in_, out in shapes.values())


def test_greedy_ranks_cap_ranks_at_the_speed_limit_and_spend_the_budget_elsewhere():
    shapes = {"fast": (64, 64), "slow": (64, 256), "square": (128, 128)}
    spectra = {n: torch.linspace(2.0, 0.1, min(s)) for n, s in shapes.items()}
    dense = {n: i * o for n, (i, o) in shapes.items()}
    free = greedy_ranks(shapes, spectra, 0.6)
    capped = greedy_ranks(shapes, spectra, 0.6, max_kept_ratio={"128x128": 0.3, "64x256": 0})
    assert "slow" not in capped  # no rank allowed: dense, its weights inside the budget
    assert kept_ratio(128, 128, capped["square"]) <= 0.3 < kept_ratio(128, 128, free["square"])
    def kept(ranks, names):  # weights kept by ``names`` under ``ranks`` (dense where unranked)
        return sum(ranks[n] * sum(shapes[n]) if n in ranks else dense[n] for n in names)

    assert kept(capped, shapes) <= 0.6 * sum(dense.values())
    # The others pay for the layer the limit keeps dense.
    assert kept(capped, ["fast", "square"]) < kept(free, ["fast", "square"])
    with pytest.raises(ValueError, match="max_kept_ratio_for_speed"):
        greedy_ranks(shapes, spectra, 0.2, max_kept_ratio={"64x256": 0, "128x128": 0})


def test_compressor_refuses_when_every_layer_is_too_slow():
    with pytest.raises(ValueError, match="max_kept_ratio_for_speed=0.5"):
        tiny.compressed("bert", param_ratio=0.7, max_kept_ratio_for_speed=0.5, rank_multiple=1)


def test_cli_passes_max_kept_ratio_for_speed():
    args = build_parser().parse_args(["compress", "m", "out", "--max-kept-ratio-for-speed", "0.7"])
    assert args.max_kept_ratio_for_speed == 0.7
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "m", "out", "--max-kept-ratio-for-speed", "1.5"])


def test_a_speed_table_naming_no_target_shape_is_refused_and_unused_entries_are_said():
    """A typo in a shape, or another model's table, would otherwise limit nothing, silently."""
    with pytest.raises(ValueError, match=r"names no shape of the 12 target layers \(INxOUT: 32x32, 32x64, 64x32\)"):
        tiny.compressed("bert", max_kept_ratio_for_speed={"32x33": 0.5})
    _, report = tiny.compressed("bert", max_kept_ratio_for_speed={"32x64": 0.4, "4096x4096": 0.25})
    assert any("no target layer has the shape 4096x4096" in notice for notice in report.notices)
    assert not any("32x64" in notice for notice in report.notices)


def test_a_speed_table_entry_matching_only_pruned_layers_is_said():
    """An MLP that pruning cuts is never factorized: a limit keyed by its shapes alone limits nothing."""
    data = [{**tiny.inputs("bert", batch=4, length=8, seed=seed), "labels": torch.tensor([0, 1, 0, 1])}
            for seed in range(3)]
    _, report = tiny.compressed("bert", data=data, mlp_pruning=True, method="whiten", max_kept_ratio_for_speed={
        "32x32": 0.9, "32x64": 0.4, "64x32": 0.4})
    assert report.pruned
    said = [notice for notice in report.notices if "only layers that pruning cuts" in notice]
    assert len(said) == 1 and "32x64, 64x32 (INxOUT)" in said[0], report.notices
    _, report = tiny.compressed("bert", data=data, method="whiten", max_kept_ratio_for_speed={"32x64": 0.9})
    assert not report.pruned and not any("pruning cuts" in notice for notice in report.notices)
