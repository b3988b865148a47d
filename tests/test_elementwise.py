"""Element-wise weighted low-rank solvers (tfwsvd, rescue) and the predicted loss that rescue thresholds."""

from __future__ import annotations

import pytest
import torch

from hf_wsvd import WSVDConfig
from hf_wsvd.solvers import LayerProblem, get_solver
from hf_wsvd.statistics import FISHER
from hf_wsvd.solvers import risk
from hf_wsvd.solvers.elementwise import (
    SOLVER_NAMES, prepare_importance, solve_elementwise, weighted_loss, weighted_row_update,
)
from hf_wsvd.linalg import truncated_svd

OUT, IN, RANK = 30, 20, 4


def _problem(seed=0, out_features=OUT, in_features=IN, dtype=torch.float64):
    """A random weight and a heavy-tailed positive importance (log-normal, like real Fisher)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g, dtype=dtype)
    fisher = torch.exp(2 * torch.randn(out_features, in_features, generator=g, dtype=torch.float64)).to(dtype)
    return weight, fisher


def _config(**kw):
    return WSVDConfig(method="tfwsvd", **kw)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_each_solver_lowers_the_weighted_loss_from_its_fwsvd_start(solver):
    for seed in range(3):
        weight, fisher = _problem(seed)
        result = solve_elementwise(weight, fisher, RANK, solver=solver, max_iterations=10, tolerance=0)
        start = get_solver("fwsvd").solve(LayerProblem("m", weight, RANK, fisher=fisher))
        importance = prepare_importance(fisher)
        assert result.history[0] == pytest.approx(weighted_loss(weight, importance, *start), rel=1e-9)
        final = weighted_loss(weight, importance, result.up, result.down)
        assert final == pytest.approx(result.best_loss, rel=1e-6)
        assert final < 0.99 * result.start_loss
        assert len(result.history) == len(result.phases) == len(result.times) == 11


def test_hybrid_switches_from_adam_to_als():
    weight, fisher = _problem(1)
    result = solve_elementwise(weight, fisher, RANK, solver="hybrid", max_iterations=8, tolerance=0)
    assert result.phases[1] == "adam" and result.phases[-1] == "als"
    als = solve_elementwise(weight, fisher, RANK, solver="als", max_iterations=8, tolerance=0)
    assert result.best_loss < 1.05 * als.best_loss


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("value", [1.0, 2.5e-5])
def test_uniform_importance_keeps_the_truncated_svd_optimum(solver, value):
    weight, _ = _problem(2)
    fisher = torch.full_like(weight, value)
    result = solve_elementwise(weight, fisher, RANK, solver=solver, max_iterations=5)
    up, down = truncated_svd(weight, RANK)
    tail = float(torch.linalg.svdvals(weight)[RANK:].square().sum())
    assert float((weight - result.up @ result.down).square().sum()) == pytest.approx(tail, rel=1e-6)
    torch.testing.assert_close(result.up @ result.down, up @ down, rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_zero_importance_entries_stay_finite(solver):
    weight, fisher = _problem(3)
    fisher[::2] = 0  # whole rows without importance
    fisher[:, 3] = 0  # and a whole column
    fisher[5, 7] = 1e-30  # and a denormal-ish entry
    result = solve_elementwise(weight, fisher, RANK, solver=solver, max_iterations=6)
    assert torch.isfinite(result.up).all() and torch.isfinite(result.down).all()
    assert result.best_loss <= result.start_loss
    # Zero-importance weights are still (weakly) fitted: no blow-up of the product.
    assert float((result.up @ result.down).abs().max()) < 10 * float(weight.abs().max())


def test_all_zero_importance_gives_the_svd():
    weight, _ = _problem(4)
    result = solve_elementwise(weight, torch.zeros_like(weight), RANK, solver="als", max_iterations=3)
    up, down = truncated_svd(weight, RANK)
    torch.testing.assert_close(result.up @ result.down, up @ down, rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("rank", [1, IN])
def test_rank_one_and_full_rank(solver, rank):
    weight, fisher = _problem(5)
    result = solve_elementwise(weight, fisher, rank, solver=solver, max_iterations=4)
    assert result.up.shape == (OUT, rank) and result.down.shape == (rank, IN)
    assert result.best_loss <= result.start_loss
    if rank == IN:
        torch.testing.assert_close(result.up @ result.down, weight, rtol=0, atol=1e-8)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_float16_inputs_return_float16_factors(solver):
    weight, fisher = _problem(6, dtype=torch.float16)
    result = solve_elementwise(weight, fisher, RANK, solver=solver, max_iterations=3)
    assert result.up.dtype == result.down.dtype == torch.float16
    assert torch.isfinite(result.up).all() and torch.isfinite(result.down).all()
    assert result.best_loss <= result.start_loss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_solvers_run_on_cuda_and_match_cpu_start(solver):
    weight, fisher = _problem(14, out_features=96, in_features=64, dtype=torch.float32)
    cpu = solve_elementwise(weight, fisher, 8, solver=solver, max_iterations=4, tolerance=0)
    gpu = solve_elementwise(weight.cuda(), fisher.cuda(), 8, solver=solver, max_iterations=4, tolerance=0)
    assert gpu.up.device.type == gpu.down.device.type == "cuda"
    assert gpu.history[0] == pytest.approx(cpu.history[0], rel=1e-4)
    assert gpu.best_loss < 0.99 * gpu.start_loss
    assert gpu.best_loss == pytest.approx(cpu.best_loss, rel=0.05)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_invalid_importance_raises_a_clear_error(bad):
    weight, fisher = _problem(7)
    fisher[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf|negative"):
        solve_elementwise(weight, fisher, RANK, solver="als")
    with pytest.raises(ValueError, match="NaN or inf|negative"):
        get_solver("tfwsvd").solve(LayerProblem("m", weight, RANK, _config().method_options(), fisher=fisher))


def test_stops_on_tolerance_and_time_budget():
    weight, fisher = _problem(8)
    loose = solve_elementwise(weight, fisher, RANK, solver="als", max_iterations=50, tolerance=0.5)
    assert loose.stopped == "tolerance" and len(loose.history) < 51
    timed = solve_elementwise(weight, fisher, RANK, solver="adam", max_iterations=10_000, tolerance=0, time_budget=1e-9)
    assert timed.stopped == "time" and len(timed.history) == 2


def test_solvers_are_deterministic():
    weight, fisher = _problem(9)
    for solver in SOLVER_NAMES:
        a = solve_elementwise(weight.clone(), fisher.clone(), RANK, solver=solver, max_iterations=4)
        b = solve_elementwise(weight.clone(), fisher.clone(), RANK, solver=solver, max_iterations=4)
        assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down)


def test_chunked_row_update_matches_unchunked(monkeypatch):
    import hf_wsvd.solvers.elementwise as elementwise

    weight, fisher = _problem(10)
    generator = torch.Generator().manual_seed(10)  # not the global generator: other tests must not change the case
    basis = torch.linalg.qr(torch.randn(IN, RANK, dtype=torch.float64, generator=generator))[0].T
    importance = prepare_importance(fisher)
    whole = weighted_row_update(weight, importance, basis)
    monkeypatch.setattr(elementwise, "ALS_CHUNK_ELEMENTS", RANK * IN * 3)  # 3 rows per chunk
    torch.testing.assert_close(weighted_row_update(weight, importance, basis), whole, rtol=1e-10, atol=1e-12)
    # Each row is its own weighted least-squares optimum, with the ridge the solver adds (RIDGE times
    # the normal matrix's mean diagonal), to float64 precision; and within the ridge's bias of the
    # unridged optimum (over 200 random bases: up to 3.5e-4 of the row's largest coefficient).
    for row in range(weight.shape[0]):
        normal = (basis * importance[row]) @ basis.T
        ridged = normal + elementwise.RIDGE * normal.diagonal().mean() * torch.eye(RANK, dtype=torch.float64)
        expected = torch.linalg.solve(ridged, (basis * importance[row]) @ weight[row])
        torch.testing.assert_close(whole[row], expected, rtol=1e-9, atol=1e-12)
        sqrt_w = importance[row].sqrt()
        unridged = torch.linalg.lstsq((basis * sqrt_w).T, weight[row] * sqrt_w).solution
        assert (whole[row] - unridged).abs().max() <= 1e-3 * unridged.abs().max()


def test_registered_methods_and_config_options():
    for method in ("tfwsvd", "rescue"):
        assert FISHER in get_solver(method).needs_for(get_solver(method).options())
    for solver in SOLVER_NAMES:
        config = _config(solver=solver, max_iterations=2)
        weight, fisher = _problem(11)
        up, down = get_solver("tfwsvd").solve(LayerProblem("m", weight, RANK, config.method_options(), fisher=fisher))
        assert up.shape == (OUT, RANK) and down.shape == (RANK, IN)
    for bad in (dict(solver="lbfgs"), dict(max_iterations=-1), dict(tolerance=-1.0), dict(time_budget=0),
                dict(importance_power=0), dict(importance_power=1.5), dict(risk_threshold=float("nan"))):
        with pytest.raises(ValueError, match=str(next(iter(bad)))):
            _config(**bad)
    assert WSVDConfig.from_dict(_config(solver="em", time_budget=3).to_dict()).solver == "em"


def test_rescue_refines_only_risky_matrices():
    weight, fisher = _problem(12)
    fwsvd = get_solver("fwsvd").solve(LayerProblem("m", weight, RANK, fisher=fisher))
    never = get_solver("rescue").solve(LayerProblem("m", weight, RANK, WSVDConfig(
        method="rescue", risk_threshold=1e9, solver="als").method_options(), fisher=fisher))
    torch.testing.assert_close(never[0] @ never[1], fwsvd[0] @ fwsvd[1])
    always = get_solver("rescue").solve(LayerProblem("m", weight, RANK, WSVDConfig(
        method="rescue", risk_threshold=0.0, solver="als").method_options(), fisher=fisher))
    importance = prepare_importance(fisher)
    assert weighted_loss(weight, importance, *always) < 0.99 * weighted_loss(weight, importance, *fwsvd)


def test_predicted_loss():
    weight, fisher = _problem(13)
    assert risk.predicted_loss(weight, fisher, *truncated_svd(weight, IN)) == pytest.approx(0.0, abs=1e-20)
    assert (risk.predicted_loss(weight, fisher, *truncated_svd(weight, 1))
            > risk.predicted_loss(weight, fisher, *truncated_svd(weight, RANK)) > 0)
    # A constant Fisher c weighs every entry alike: c/2 times the energy the truncated SVD drops.
    tail = float(torch.linalg.svdvals(weight)[RANK:].square().sum())
    constant = torch.full_like(fisher, 3.0)
    assert risk.predicted_loss(weight, constant, *truncated_svd(weight, RANK)) == pytest.approx(1.5 * tail, rel=1e-9)