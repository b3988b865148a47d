"""The solver registry and the svd / fwsvd solvers against their closed-form optima."""

from __future__ import annotations

import pytest
import torch

from hf_wsvd import WSVDConfig

from hf_wsvd.pipelines.step import layer_spectrum
from hf_wsvd.solvers import SOLVERS, LayerProblem, get_solver
from hf_wsvd.statistics import FISHER, FISHER_COLS, FISHER_ROWS

OUT, IN, RANK = 24, 16, 5


def _weight(out_features=OUT, in_features=IN, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g, dtype=dtype)


def _fisher(axis: str, seed=1, out_features=OUT, in_features=IN):
    """Positive per-entry Fisher whose row (axis="output") or column (axis="input") sums vary over
    four orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(out_features, in_features, generator=g, dtype=torch.float64) + 0.05
    if axis == "output":
        scale = torch.logspace(-2, 2, out_features, dtype=torch.float64)
        return base * scale[torch.randperm(out_features, generator=g)][:, None]
    scale = torch.logspace(-2, 2, in_features, dtype=torch.float64)
    return base * scale[torch.randperm(in_features, generator=g)][None, :]


def _solve(method, weight, rank=RANK, fisher=None, axis="output"):
    return get_solver(method).solve(LayerProblem("layer", weight, rank, WSVDConfig(method=method, fisher_axis=axis).method_options(), fisher=fisher))


def _importance(fisher, axis):
    """d² per row (output) or column (input)."""
    return fisher.sum(dim=1 if axis == "output" else 0)


def _weighted_error(weight, approx, d2, axis):
    residual = (weight - approx) ** 2
    per = residual.sum(dim=1) if axis == "output" else residual.sum(dim=0)
    return float((d2 * per).sum())


def _direct_weighted_optimum(weight, d2, axis, rank):
    """The optimum of Σ d² ‖residual‖² computed independently: Eckart–Young on D W (or W D)."""
    d = d2.sqrt()
    scaled = d[:, None] * weight if axis == "output" else weight * d[None, :]
    u, s, vh = torch.linalg.svd(scaled, full_matrices=False)
    best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    best = best / d[:, None] if axis == "output" else best / d[None, :]
    return best, float((s[rank:] ** 2).sum())


# --------------------------------------------------------------------------- registry


def test_registry_holds_svd_and_fwsvd():
    assert {"svd", "fwsvd"} <= set(SOLVERS)
    assert get_solver("svd") is SOLVERS["svd"]
    assert get_solver("fwsvd").name == "fwsvd"
    fwsvd = get_solver("fwsvd")
    # FWSVD reads only the summed Fisher of its axis: O(out) or O(in), never the per-entry matrix.
    assert fwsvd.needs_for(WSVDConfig(method="fwsvd", fisher_axis="output").method_options()) == {FISHER_ROWS}
    assert fwsvd.needs_for(WSVDConfig(method="fwsvd", fisher_axis="input").method_options()) == {FISHER_COLS}
    assert FISHER in get_solver("tfwsvd").needs_for(get_solver("tfwsvd").options())
    assert not get_solver("svd").needs_for(get_solver("svd").options())
    assert all(callable(solver.solve) for solver in SOLVERS.values())


def test_unknown_solver_raises_naming_it():
    with pytest.raises(ValueError, match="nope"):
        get_solver("nope")


# --------------------------------------------------------------------------- svd


@pytest.mark.parametrize("shape", [(OUT, IN), (IN, OUT), (12, 12)])
def test_svd_at_full_rank_reproduces_the_weight(shape):
    weight = _weight(*shape)
    up, down = _solve("svd", weight, rank=min(shape))
    assert up.shape == (shape[0], min(shape)) and down.shape == (min(shape), shape[1])
    torch.testing.assert_close(up @ down, weight, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 3, RANK, IN - 1])
def test_svd_error_is_the_eckart_young_tail(rank):
    weight = _weight()
    up, down = _solve("svd", weight, rank=rank)
    assert up.shape == (OUT, rank) and down.shape == (rank, IN)
    assert up.dtype == down.dtype == torch.float64
    sigma = torch.linalg.svdvals(weight)
    tail = float(sigma[rank:].pow(2).sum().sqrt())
    error = float(torch.linalg.matrix_norm(weight - up @ down))
    assert error == pytest.approx(tail, rel=1e-10, abs=1e-12)
    assert error > 0


def test_svd_keeps_the_weight_dtype():
    weight = _weight(dtype=torch.float32)
    up, down = _solve("svd", weight)
    assert up.dtype == down.dtype == torch.float32


# --------------------------------------------------------------------------- fwsvd


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("value", [1.0, 3.7e-4])
def test_fwsvd_with_uniform_fisher_equals_svd(axis, value):
    weight = _weight()
    fisher = torch.full_like(weight, value)
    up, down = _solve("fwsvd", weight, fisher=fisher, axis=axis)
    svd_up, svd_down = _solve("svd", weight)
    assert up.shape == svd_up.shape and down.shape == svd_down.shape
    torch.testing.assert_close(up @ down, svd_up @ svd_down, rtol=0, atol=1e-10)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_fwsvd_beats_svd_on_the_weighted_error_and_is_its_optimum(axis):
    weight = _weight()
    fisher = _fisher(axis)
    d2 = _importance(fisher, axis)
    assert d2.max() / d2.min() > 1e3  # strongly varying importance

    up, down = _solve("fwsvd", weight, fisher=fisher, axis=axis)
    assert up.shape == (OUT, RANK) and down.shape == (RANK, IN)
    svd_up, svd_down = _solve("svd", weight)

    fw_error = _weighted_error(weight, up @ down, d2, axis)
    svd_error = _weighted_error(weight, svd_up @ svd_down, d2, axis)
    assert fw_error < 0.9 * svd_error

    best, best_error = _direct_weighted_optimum(weight, d2, axis, RANK)
    assert fw_error == pytest.approx(best_error, rel=1e-9)
    torch.testing.assert_close(up @ down, best, rtol=0, atol=1e-8)
    # And the plain Frobenius error is worse than svd's (svd is optimal there).
    assert torch.linalg.matrix_norm(weight - up @ down) > torch.linalg.matrix_norm(weight - svd_up @ svd_down)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_fwsvd_weighted_optimum_is_local_minimum(axis):
    """Small perturbations of the fwsvd factors never lower the weighted objective."""
    weight = _weight(seed=3)
    fisher = _fisher(axis, seed=4)
    d2 = _importance(fisher, axis)
    up, down = _solve("fwsvd", weight, fisher=fisher, axis=axis)
    base = _weighted_error(weight, up @ down, d2, axis)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        du = 1e-3 * torch.randn(up.shape, generator=g, dtype=up.dtype)
        dd = 1e-3 * torch.randn(down.shape, generator=g, dtype=down.dtype)
        assert _weighted_error(weight, (up + du) @ (down + dd), d2, axis) >= base - 1e-12


@pytest.mark.parametrize("axis", ["output", "input"])
def test_fwsvd_uses_the_axis_it_is_given(axis):
    # A Fisher that varies only along the other axis has uniform sums along this one: plain svd.
    weight = _weight()
    if axis == "output":
        fisher = torch.ones(OUT, 1, dtype=torch.float64) * torch.logspace(-2, 2, IN, dtype=torch.float64)
    else:
        fisher = torch.logspace(-2, 2, OUT, dtype=torch.float64)[:, None] * torch.ones(1, IN, dtype=torch.float64)
    up, down = _solve("fwsvd", weight, fisher=fisher, axis=axis)
    svd_up, svd_down = _solve("svd", weight)
    torch.testing.assert_close(up @ down, svd_up @ svd_down, rtol=0, atol=1e-10)
    # The varying axis gives a different answer, the optimum of its own objective.
    other = "input" if axis == "output" else "output"
    up2, down2 = _solve("fwsvd", weight, fisher=fisher, axis=other)
    assert not torch.allclose(up2 @ down2, svd_up @ svd_down, atol=1e-3)
    best, _ = _direct_weighted_optimum(weight, _importance(fisher, other), other, RANK)
    torch.testing.assert_close(up2 @ down2, best, rtol=0, atol=1e-8)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_fwsvd_with_zero_importance_rows_is_finite(axis):
    weight = _weight()
    fisher = _fisher(axis)
    if axis == "output":
        fisher[[0, 5, 11]] = 0
    else:
        fisher[:, [0, 5, 11]] = 0
    up, down = _solve("fwsvd", weight, fisher=fisher, axis=axis)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    approx = up @ down
    assert torch.isfinite(approx).all()
    # The important rows/columns are still fitted at least as well as by plain svd.
    d2 = _importance(fisher, axis)
    svd_up, svd_down = _solve("svd", weight)
    assert _weighted_error(weight, approx, d2, axis) < _weighted_error(weight, svd_up @ svd_down, d2, axis)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_fwsvd_with_all_zero_fisher_is_finite(axis):
    weight = _weight()
    up, down = _solve("fwsvd", weight, fisher=torch.zeros_like(weight), axis=axis)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    svd_up, svd_down = _solve("svd", weight)
    torch.testing.assert_close(up @ down, svd_up @ svd_down, rtol=0, atol=1e-10)


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_fwsvd_rejects_non_finite_fisher(axis, bad):
    weight = _weight()
    fisher = _fisher(axis)
    fisher[3, 2] = bad
    with pytest.raises(ValueError, match="NaN|inf"):
        _solve("fwsvd", weight, fisher=fisher, axis=axis)


def test_fwsvd_factors_take_the_weight_dtype():
    weight = _weight(dtype=torch.float32)
    up, down = _solve("fwsvd", weight, fisher=_fisher("output"))  # float64 Fisher
    assert up.dtype == down.dtype == torch.float32
    assert torch.isfinite(up).all() and torch.isfinite(down).all()


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("method, axis", [("svd", "output"), ("fwsvd", "output"), ("fwsvd", "input")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solvers_are_deterministic(method, axis, dtype):
    weight = _weight(dtype=dtype)
    fisher = _fisher(axis).to(dtype) if method == "fwsvd" else None
    first = _solve(method, weight.clone(), fisher=None if fisher is None else fisher.clone(), axis=axis)
    second = _solve(method, weight.clone(), fisher=None if fisher is None else fisher.clone(), axis=axis)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])


def test_solvers_do_not_modify_their_inputs():
    weight = _weight()
    fisher = _fisher("output")
    weight_copy, fisher_copy = weight.clone(), fisher.clone()
    _solve("fwsvd", weight, fisher=fisher)
    _solve("svd", weight)
    assert torch.equal(weight, weight_copy)
    assert torch.equal(fisher, fisher_copy)


def test_a_solver_error_about_a_layer_names_the_layer():
    """The activation Gram check inside whitening knows no layer name; the solve says which."""
    weight = torch.randn(6, 4, dtype=torch.float64)
    gram = torch.eye(4, dtype=torch.float64)
    gram[1, 1] = float("nan")
    problem = LayerProblem("layers.3.self_attn.q_proj", weight, 2, get_solver("whiten").options(), gram=gram)
    with pytest.raises(ValueError, match=r"^'layers.3.self_attn.q_proj': the activation Gram matrix contains NaN or inf"):
        get_solver("whiten").finite_solve(problem)
    with pytest.raises(ValueError, match=r"^'layers.3.self_attn.q_proj': the activation Gram"):  # what allocation reads
        layer_spectrum(get_solver("whiten"), problem)
    fisher_rows = torch.full((6,), float("nan"), dtype=torch.float64)  # fwsvd names the layer itself: not twice
    problem = LayerProblem("layers.3.mlp.up_proj", weight, 2, get_solver("fwsvd").options(), fisher_rows=fisher_rows)
    with pytest.raises(ValueError, match=r"^layers.3.mlp.up_proj: the Fisher information contains NaN or inf values$"):
        get_solver("fwsvd").finite_solve(problem)


def test_an_error_that_takes_more_than_a_message_passes_unchanged():
    from hf_wsvd.solvers.registry import naming_the_layer

    error = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    with pytest.raises(UnicodeDecodeError) as raised:
        with naming_the_layer("layers.0.mlp.down_proj"):
            raise error
    assert raised.value is error
