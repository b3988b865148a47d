"""FactorizedLinear, the linear-shape helpers and the uniform rank allocation."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_wsvd.allocation import rank_for_ratio, uniform_ranks
from hf_wsvd.runtime.factorized_linear import (
    FactorizedLinear,
    linear_shape,
    linear_weight,
    saves_parameters,
)


def _factors(out_features=6, in_features=5, rank=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out_features, rank, generator=g, dtype=dtype)
    down = torch.randn(rank, in_features, generator=g, dtype=dtype)
    bias = torch.randn(out_features, generator=g, dtype=dtype)
    return up, down, bias


# --------------------------------------------------------------------------- forward / from_factors


@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_is_x_times_product_transposed_plus_bias(with_bias):
    up, down, bias = _factors()
    layer = FactorizedLinear.from_factors(up, down, bias if with_bias else None)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    expected = x @ (up @ down).T
    if with_bias:
        expected = expected + bias
    out = layer(x)
    assert out.shape == (2, 4, 6)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert (layer.bias is not None) == with_bias


def test_from_factors_copies_the_factors():
    up, down, bias = _factors()
    layer = FactorizedLinear.from_factors(up, down, bias)
    assert torch.equal(layer.up.weight, up)
    assert torch.equal(layer.down.weight, down)
    assert torch.equal(layer.up.bias, bias)
    assert layer.down.bias is None
    # A copy, not a view: editing the source tensors does not change the layer.
    up.zero_()
    assert layer.up.weight.abs().sum() > 0


def test_from_factors_casts_down_and_bias_to_the_up_dtype():
    up, down, bias = _factors(dtype=torch.float32)
    layer = FactorizedLinear.from_factors(up, down.double(), bias.double())
    assert layer.down.weight.dtype == torch.float32
    assert layer.up.bias.dtype == torch.float32
    torch.testing.assert_close(layer.down.weight, down)


@pytest.mark.parametrize(
    "up_shape, down_shape",
    [
        ((6, 3), (2, 5)),  # inner dimensions differ
        ((6, 3), (5, 3)),  # down transposed
        ((6, 3, 1), (3, 5)),  # up not a matrix
        ((6, 3), (3,)),  # down not a matrix
    ],
)
def test_from_factors_rejects_shapes_that_do_not_chain(up_shape, down_shape):
    with pytest.raises(ValueError, match="chain"):
        FactorizedLinear.from_factors(torch.randn(*up_shape), torch.randn(*down_shape))


def test_from_factors_takes_tensors_and_names_a_layer_given_instead():
    up, down = torch.nn.Linear(3, 6), torch.nn.Linear(5, 3)
    with pytest.raises(TypeError, match="up is a Linear: from_factors takes tensors"):
        FactorizedLinear.from_factors(up, down)
    with pytest.raises(TypeError, match="bias is a Linear"):
        FactorizedLinear.from_factors(up.weight, down.weight, up)


@pytest.mark.parametrize("bias_shape", [(5,), (7,), (1, 6), (6, 1), ()])
def test_from_factors_rejects_a_bias_of_the_wrong_shape(bias_shape):
    up, down, _ = _factors()
    with pytest.raises(ValueError, match="bias"):
        FactorizedLinear.from_factors(up, down, torch.randn(bias_shape, dtype=torch.float64))


# --------------------------------------------------------------------------- to_dense


@pytest.mark.parametrize("with_bias", [True, False])
def test_to_dense_is_an_equivalent_linear(with_bias):
    up, down, bias = _factors()
    layer = FactorizedLinear.from_factors(up, down, bias if with_bias else None)
    dense = layer.to_dense()
    assert type(dense) is nn.Linear
    assert (dense.in_features, dense.out_features) == (5, 6)
    assert dense.weight.dtype == torch.float64
    assert (dense.bias is not None) == with_bias
    torch.testing.assert_close(dense.weight, up @ down, rtol=0, atol=1e-12)
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(dense(x), layer(x), rtol=0, atol=1e-12)
    # Independent storage: changing the dense copy leaves the factorized layer alone.
    with torch.no_grad():
        dense.weight.zero_()
    torch.testing.assert_close(linear_weight(layer), up @ down, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- weight / bias stand-ins


def test_weight_and_bias_are_read_only():
    up, down, bias = _factors()
    layer = FactorizedLinear.from_factors(up, down, bias)
    with pytest.raises((AttributeError, KeyError, TypeError)):
        layer.weight = nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
    with pytest.raises((AttributeError, KeyError, TypeError)):
        layer.weight = torch.zeros(6, 5, dtype=torch.float64)
    with pytest.raises((AttributeError, KeyError, TypeError)):
        layer.bias = nn.Parameter(torch.zeros(6, dtype=torch.float64))
    # Nothing was registered or replaced by the failed assignments.
    assert sorted(name for name, _ in layer.named_parameters()) == ["down.weight", "up.bias", "up.weight"]
    assert torch.equal(layer.up.weight, up)
    assert torch.equal(layer.bias, bias)
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (up @ down).T + bias, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weight_and_bias_report_the_factor_dtype(dtype):
    up, down, bias = _factors(dtype=dtype)
    layer = FactorizedLinear.from_factors(up, down, bias)
    assert layer.weight.dtype == dtype
    assert layer.bias.dtype == dtype
    assert layer.weight.device == up.device
    assert layer.bias.device == up.device
    layer = layer.to(torch.float16)
    assert layer.weight.dtype == torch.float16
    assert layer.bias.dtype == torch.float16


def test_weight_reports_the_factor_device():
    layer = FactorizedLinear(8, 4, 2, device="meta", dtype=torch.float16)
    assert layer.weight.device.type == "meta"
    assert layer.bias.device.type == "meta"
    assert layer.weight.dtype == torch.float16
    assert layer.down.weight.device.type == "meta"


def test_bias_is_none_without_bias():
    layer = FactorizedLinear(8, 4, 2, bias=False)
    assert layer.bias is None
    assert layer.up.bias is None


# --------------------------------------------------------------------------- sizes and ranks


@pytest.mark.parametrize(
    "in_features, out_features, rank",
    [(5, 6, 3), (32, 64, 1), (64, 16, 16), (7, 7, 7)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_rank_features_and_num_parameters(in_features, out_features, rank, with_bias):
    layer = FactorizedLinear(in_features, out_features, rank, bias=with_bias)
    assert layer.rank == rank
    assert layer.in_features == in_features
    assert layer.out_features == out_features
    assert tuple(layer.down.weight.shape) == (rank, in_features)
    assert tuple(layer.up.weight.shape) == (out_features, rank)
    expected = rank * (in_features + out_features) + (out_features if with_bias else 0)
    assert layer.num_parameters() == expected
    assert layer.num_parameters() == sum(p.numel() for p in layer.parameters())
    assert f"rank={rank}" in repr(layer)


@pytest.mark.parametrize("rank", [0, -1, 5, 7, 2.5, True])
def test_invalid_rank_raises_naming_the_rank(rank):
    # A 4 x 6 layer: ranks must be in 1..4.
    with pytest.raises(ValueError) as info:
        FactorizedLinear(6, 4, rank)
    message = str(info.value)
    assert "rank" in message
    assert re.search(rf"(?<![\d.-]){re.escape(str(rank))}(?![\d.])", message), message


def test_from_factors_with_a_too_large_rank_raises():
    # up (3 x 4) @ down (4 x 5) chains but rank 4 > min(5, 3).
    with pytest.raises(ValueError, match="rank"):
        FactorizedLinear.from_factors(torch.randn(3, 4), torch.randn(4, 5))


@pytest.mark.parametrize("rank", [1, 4])
def test_extreme_valid_ranks_are_accepted(rank):
    layer = FactorizedLinear(6, 4, rank)
    assert layer.rank == rank


# --------------------------------------------------------------------------- saves_parameters


@pytest.mark.parametrize(
    "in_features, out_features, below, at",
    [
        (32, 32, 15, 16),  # 16 * 64 == 32 * 32 exactly: the threshold itself saves nothing
        (64, 32, 21, 22),  # 21 * 96 = 2016 < 2048 <= 22 * 96 = 2112
        (10, 40, 7, 8),  # 7 * 50 = 350 < 400 == 8 * 50
        (3, 2, 1, 2),  # 1 * 5 < 6 < 2 * 5
    ],
)
def test_saves_parameters_boundary(in_features, out_features, below, at):
    assert below * (in_features + out_features) < in_features * out_features
    assert at * (in_features + out_features) >= in_features * out_features
    assert saves_parameters(in_features, out_features, below)
    assert not saves_parameters(in_features, out_features, at)
    assert not saves_parameters(in_features, out_features, at + 1)
    assert saves_parameters(in_features, out_features, 1)


def test_saves_parameters_matches_the_exact_condition_everywhere():
    for in_features in range(1, 13):
        for out_features in range(1, 13):
            for rank in range(1, min(in_features, out_features) + 1):
                expected = rank * (in_features + out_features) < in_features * out_features
                assert saves_parameters(in_features, out_features, rank) == expected


# --------------------------------------------------------------------------- linear_shape / linear_weight


def test_linear_shape_and_weight_of_nn_linear():
    linear = nn.Linear(5, 7)
    assert linear_shape(linear) == (5, 7)
    assert linear_weight(linear) is linear.weight


def test_linear_shape_and_weight_of_conv1d():
    torch.manual_seed(0)
    conv = Conv1D(7, 5)  # nf=out=7, nx=in=5
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    assert tuple(conv.weight.shape) == (5, 7)  # stored (in, out)
    assert linear_shape(conv) == (5, 7)
    weight = linear_weight(conv)
    assert tuple(weight.shape) == (7, 5)  # nn.Linear layout (out, in)
    torch.testing.assert_close(weight, conv.weight.T, rtol=0, atol=0)
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(nn.functional.linear(x, weight, conv.bias), conv(x))


def test_linear_shape_and_weight_of_a_non_square_conv1d_distinguish_in_and_out():
    conv = Conv1D(96, 32)  # GPT-2 c_attn: in 32, out 96
    assert linear_shape(conv) == (32, 96)
    assert tuple(linear_weight(conv).shape) == (96, 32)


def test_linear_shape_and_weight_of_factorized_linear():
    up, down, bias = _factors()
    layer = FactorizedLinear.from_factors(up, down, bias)
    assert linear_shape(layer) == (5, 6)
    torch.testing.assert_close(linear_weight(layer), up @ down, rtol=0, atol=1e-12)


@pytest.mark.parametrize("module", [nn.LayerNorm(4), nn.Conv2d(2, 3, 1), nn.Embedding(4, 3)])
def test_linear_shape_and_weight_reject_other_modules(module):
    with pytest.raises(TypeError):
        linear_shape(module)
    with pytest.raises(TypeError):
        linear_weight(module)


# --------------------------------------------------------------------------- allocation


def test_uniform_ranks_drops_layers_whose_rank_saves_nothing():
    shapes = {"square": (32, 32), "wide": (64, 32), "tiny": (2, 2), "thin": (1, 50)}
    # ratio 1: square gets rank 16 (16 * 64 == 1024, nothing saved), wide gets rank 21 (saves).
    ranks = uniform_ranks(shapes, 1.0)
    assert ranks == {"wide": 21}
    ranks = uniform_ranks(shapes, 0.5)
    assert ranks == {"square": 8, "wide": 10}
    for name, rank in ranks.items():
        assert saves_parameters(*shapes[name], rank)


def test_uniform_ranks_uses_rank_for_ratio():
    shapes = {f"layer{i}": (in_f, out_f) for i, (in_f, out_f) in enumerate([(32, 32), (32, 64), (64, 32), (16, 48)])}
    for ratio in (0.1, 0.25, 0.3, 0.5, 0.9):
        ranks = uniform_ranks(shapes, ratio)
        assert ranks, ratio
        for name, (in_f, out_f) in shapes.items():
            rank = rank_for_ratio(in_f, out_f, ratio)
            if saves_parameters(in_f, out_f, rank):
                assert ranks[name] == rank
            else:
                assert name not in ranks


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.7, 0.9, 1.0])
def test_rank_for_ratio_keeps_at_most_ratio_of_the_parameters(ratio):
    for in_features in (8, 16, 32, 48, 64, 100):
        for out_features in (8, 16, 32, 48, 64, 100):
            dense = in_features * out_features
            rank = rank_for_ratio(in_features, out_features, ratio)
            assert 1 <= rank <= min(in_features, out_features)
            if ratio * dense / (in_features + out_features) >= 1:
                assert rank * (in_features + out_features) <= ratio * dense + 1e-9, (in_features, out_features)
            # ... and it is the largest such rank.
            assert (rank + 1) * (in_features + out_features) > ratio * dense - 1e-9, (in_features, out_features)


def test_rank_for_ratio_is_at_least_one():
    assert rank_for_ratio(4, 4, 0.01) == 1
    assert rank_for_ratio(1000, 1000, 1e-6) == 1


def test_ranks_round_down_to_the_rank_multiple():
    from hf_wsvd import WSVDConfig
    import tiny
    from hf_wsvd.allocation import round_rank

    assert [round_rank(r, 8) for r in (1, 7, 8, 15, 1228)] == [0, 0, 8, 8, 1224]
    shapes = {"a": (4096, 4096), "b": (4096, 11008), "c": (16, 16)}
    exact, aligned = uniform_ranks(shapes, 0.6), uniform_ranks(shapes, 0.6, multiple=8)
    # "c" would get rank 4 < 8: it stays dense rather than take an unaligned rank.
    assert exact == {"a": 1228, "b": 1791, "c": 4} and aligned == {"a": 1224, "b": 1784}
    _, report = tiny.compressed("bert", param_ratio=0.6)
    assert report.ranks and all(r % 8 == 0 for r in report.ranks.values())
    _, report = tiny.compressed("bert", param_ratio=0.6, rank_multiple=1)
    assert any(r % 8 for r in report.ranks.values())
    with pytest.raises(ValueError, match="rank_multiple=0"):
        WSVDConfig(rank_multiple=0)
