"""Activation-aware methods (whiten, asvd, fisher_whiten), guarded Cholesky, rank allocation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import tiny
from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd.allocation import greedy_ranks, max_saving_rank
from hf_wsvd.linalg import gram_square_root, singular_values, truncated_svd
from hf_wsvd.solvers import LayerProblem, get_solver
from stats_worker import case_inputs


def _problem(out=12, inp=8, tokens=40, rank=8, singular=False, seed=0, **config):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, inp, dtype=torch.float64)
    if singular:
        x[:, -3:] = 0  # three input features never fire: a singular Gram matrix
    fisher = torch.rand(out, inp, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, out, dtype=torch.float64)[:, None]
    options = WSVDConfig(**config).method_options() if "method" in config else None  # None: the solver's defaults
    return LayerProblem("layer", weight, rank, options, fisher=fisher,
                        gram=x.T @ x / tokens, mean_abs=x.abs().mean(0)), x


@pytest.mark.parametrize("method", ["whiten", "asvd", "fisher_whiten"])
def test_full_rank_reproduces_the_layer(method):
    problem, _ = _problem(rank=8)
    up, down = get_solver(method).solve(problem)
    torch.testing.assert_close(up @ down, problem.weight, rtol=1e-9, atol=1e-9)


def test_whitening_minimizes_the_output_error():
    problem, x = _problem(rank=3)
    errors = {}
    for method in ["svd", "whiten", "asvd"]:
        up, down = get_solver(method).solve(problem)
        errors[method] = ((problem.weight - up @ down) @ x.T).norm().item()
    assert errors["whiten"] < errors["asvd"] and errors["whiten"] < errors["svd"]
    # Eckart–Young in the whitened norm: the error is the tail of the whitened spectrum.
    tail = get_solver("whiten").spectrum(problem)[3:].square().sum().sqrt().item()
    assert errors["whiten"] == pytest.approx(tail * len(x) ** 0.5, rel=1e-6)


@pytest.mark.parametrize("method", ["whiten", "fisher_whiten", "asvd"])
def test_singular_gram_gives_finite_factors(method):
    problem, x = _problem(rank=4, singular=True)
    up, down = get_solver(method).solve(problem)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    # Still a good fit on the inputs that occur.
    assert ((problem.weight - up @ down) @ x.T).norm() < (problem.weight @ x.T).norm()


def test_gram_square_root_falls_back_for_indefinite_matrices():
    g = torch.diag(torch.tensor([4.0, 1.0, -1e-3], dtype=torch.float64))
    root, lower = gram_square_root(g)
    assert not lower and torch.isfinite(root).all()
    torch.testing.assert_close(root @ root.T, g.clamp_min(0) + torch.diag(torch.tensor([0, 0, 4e-8], dtype=torch.float64)), atol=1e-7, rtol=0)
    root, lower = gram_square_root(torch.eye(3, dtype=torch.float64) * 2)
    assert lower
    with pytest.raises(ValueError, match="NaN"):
        gram_square_root(torch.full((2, 2), float("nan")))


@pytest.mark.parametrize("method", ["whiten", "fisher_whiten", "asvd", None])
def test_a_layer_that_never_gets_an_input_is_factorized_unweighted(method):
    """An all-zero Gram (BERT layer 0's intermediate zeroed: its output layer reads GELU(0) = 0):
    whitening weighs every direction alike instead of dividing by ~0 (its factors were inf)."""
    model = tiny.build("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight.zero_()
        model.bert.encoder.layer[0].intermediate.dense.bias.zero_()
    data = [{**tiny.inputs("bert", batch=4, length=8), "labels": torch.tensor([0, 1, 1, 0])}]
    compressed, report = compress(model, WSVDConfig(method=method, param_ratio=0.5), data, show_progress=False)
    assert all(torch.isfinite(p).all() for p in compressed.parameters()) and report.ranks
    layer = compressed.bert.encoder.layer[0].output.dense
    assert report.ranks["encoder.layer.0.output.dense"] == min(report.ranks.values())  # no rank loses anything there
    assert max(float(p.detach().abs().max()) for p in layer.parameters()) < 10  # not split 1e-10 / 1e8 between the factors
    if method == "whiten":  # the best rank-r factors of W itself
        assert isinstance(layer, FactorizedLinear)
        up, down = truncated_svd(tiny.build("bert").bert.encoder.layer[0].output.dense.weight.detach().double(),
                                 layer.rank)
        torch.testing.assert_close((layer.up.weight @ layer.down.weight).double(), up @ down, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_truncated_svd_is_the_optimal_balanced_truncation(shape, dtype):
    g = torch.Generator().manual_seed(1)
    matrix = (torch.randn(*shape, generator=g, dtype=torch.float64) * torch.logspace(0, -3, shape[1], dtype=torch.float64)).to(dtype)
    reference = torch.linalg.svdvals(matrix.double())
    torch.testing.assert_close(singular_values(matrix), reference, rtol=1e-6, atol=1e-12)
    for rank in (1, 5, 12):
        up, down = truncated_svd(matrix, rank)
        assert up.dtype == down.dtype == dtype and up.shape == (shape[0], rank) and down.shape == (rank, shape[1])
        error = (matrix.double() - up.double() @ down.double()).norm().square()
        optimum = reference[rank:].square().sum()
        assert float(error) <= float(optimum) * (1 + 1e-5) + (1e-9 if dtype == torch.float64 else 1e-5)
        torch.testing.assert_close(up.double().norm(dim=0), down.double().norm(dim=1), rtol=1e-5, atol=1e-7)


def test_truncated_svd_of_rank_deficient_and_zero_matrices_is_finite_and_exact():
    g = torch.Generator().manual_seed(2)
    low = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 10, generator=g, dtype=torch.float64)
    for matrix in (low, low.T, torch.zeros(6, 4, dtype=torch.float64)):
        up, down = truncated_svd(matrix, min(matrix.shape))  # more rank than the matrix has
        assert torch.isfinite(up).all() and torch.isfinite(down).all()
        torch.testing.assert_close(up @ down, matrix, rtol=0, atol=1e-10)
        assert up.abs().max() < 1e3 and down.abs().max() < 1e3  # σ ≈ 0 directions stay bounded
        assert torch.isfinite(singular_values(matrix)).all()


def test_greedy_allocation_meets_the_budget_exactly_and_is_deterministic():
    shapes = {"a": (64, 64), "b": (64, 16), "c": (128, 32), "d": (32, 96)}
    g = torch.Generator().manual_seed(0)
    spectra = {n: torch.rand(min(s), generator=g).sort(descending=True).values ** (i + 1)
               for i, (n, s) in enumerate(shapes.items())}
    ratio = 0.4
    ranks = greedy_ranks(shapes, spectra, ratio)
    assert ranks == greedy_ranks(shapes, {n: s.clone() for n, s in spectra.items()}, ratio)
    budget = ratio * sum(i * o for i, o in shapes.values())
    spent = sum(r * (i + o) for r, (i, o) in zip(ranks.values(), shapes.values()))
    assert spent <= budget
    growable = [sum(shapes[n]) for n, r in ranks.items() if r < max_saving_rank(*shapes[n])]
    assert not growable or budget - spent < min(growable)  # no further rank fits
    for name, (i, o) in shapes.items():
        assert 1 <= ranks[name] and ranks[name] * (i + o) < i * o  # never a rank that saves nothing
    # Rank goes where the spectrum decays slowly: the flattest layer gets the largest share.
    flat = {n: torch.ones(min(s)) for n, s in shapes.items()}
    flat["b"] = torch.tensor([1.0] + [1e-6] * 15)
    assert greedy_ranks(shapes, flat, ratio)["b"] == 1


@pytest.mark.parametrize("method", ["fwsvd", "fisher_whiten"])
def test_fisher_methods_allocate_by_predicted_loss(method):
    """Two identical layers, one with 100× the Fisher information: with a loss scale the budget
    goes to the important one; a method without one (normalized spectra) splits it evenly."""
    from dataclasses import replace

    from hf_wsvd.pipelines.step import layer_spectrum

    def allocate(solver, problems):
        spectra = {n: layer_spectrum(solver, p) for n, p in problems.items()}
        weights = {n: w for n, (_, w) in spectra.items()} if solver.loss_scale else None
        return greedy_ranks({n: (16, 16) for n in problems}, {n: s for n, (s, _) in spectra.items()}, 0.5, weights)

    problem, _ = _problem(out=16, inp=16, tokens=64, rank=0, method=method)
    problems = {"a": problem, "b": replace(problem, fisher=problem.fisher * 100)}
    ranks = allocate(get_solver(method), problems)
    assert ranks["b"] > ranks["a"]
    plain = {n: replace(p, options=None) for n, p in problems.items()}
    even = allocate(get_solver("whiten"), plain)
    assert even["a"] == even["b"]
    # A layer the loss does not depend on (zero Fisher) is the least important, never the most.
    zero = allocate(get_solver(method), {"a": problem, "b": replace(problem, fisher=problem.fisher * 0)})
    assert zero["b"] < zero["a"]


def test_greedy_ranks_are_positive_multiples_of_rank_multiple():
    """Steps of ``multiple`` ranks: every rank a positive multiple, the budget met with no step
    left that fits; a layer where no multiple saves parameters stays dense (left out)."""
    shapes = {"a": (256, 256), "b": (256, 64), "c": (512, 128), "d": (128, 384), "tiny": (8, 8)}
    g = torch.Generator().manual_seed(0)
    spectra = {n: torch.rand(min(s), generator=g).sort(descending=True).values ** (i + 1)
               for i, (n, s) in enumerate(shapes.items())}
    ratio = 0.4
    ranks = greedy_ranks(shapes, spectra, ratio, multiple=8)
    assert set(ranks) == {"a", "b", "c", "d"}  # 8 × (8 + 8) ≥ 8 × 8: "tiny" saves nothing at rank 8
    assert all(r > 0 and r % 8 == 0 and r * sum(shapes[n]) < shapes[n][0] * shapes[n][1] for n, r in ranks.items())
    budget = ratio * sum(shapes[n][0] * shapes[n][1] for n in ranks)
    spent = sum(r * sum(shapes[n]) for n, r in ranks.items())
    assert spent <= budget
    growable = [8 * sum(shapes[n]) for n, r in ranks.items() if r + 8 <= max_saving_rank(*shapes[n])]
    assert not growable or budget - spent < min(growable)
    assert len(set(ranks.values())) > 1  # still allocated by importance, not uniform
    with pytest.raises(ValueError, match="rank_multiple=256"):  # no layer saves parameters at rank 256
        greedy_ranks(shapes, spectra, ratio, multiple=256)


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_every_factorized_rank_is_a_positive_multiple_of_rank_multiple(allocation):
    """Under the default rank_multiple=8 no layer gets an unaligned rank: the GQA k/v projections
    (32 → 16), whose uniform rank at 0.5 would be 5, stay dense instead."""
    dense = tiny.build("llama")
    targets = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    target_params = sum(p.numel() for n in targets for p in dense.get_submodule(n).parameters())
    model, report = compress(tiny.build("llama"), WSVDConfig(method="svd", param_ratio=0.5, allocation=allocation),
                             show_progress=False)
    # the target layers' parameters, the dense ones included, before and after
    assert report.target_params_before == target_params
    assert report.target_params_after == sum(p.numel() for n in targets for p in model.get_submodule(n).parameters())
    if allocation == "greedy":  # one budget for all, the dense layers included
        assert report.target_kept <= 0.5
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert layers and len(layers) == len(report.ranks)
    assert all(m.rank > 0 and m.rank % 8 == 0 for m in layers.values())
    assert all(r > 0 and r % 8 == 0 for r in report.ranks.values())
    if allocation == "uniform":
        assert report.dense_targets and all(n.endswith(("k_proj", "v_proj")) for n in report.dense_targets)


def test_greedy_keeps_a_layer_dense_where_that_removes_the_most_loss_per_parameter():
    """Keeping a layer dense is one of greedy's steps (after its largest rank that saves
    parameters): a budget of all the weights keeps every layer whole, MLPs keep all their
    channels, and a nearly full budget goes to whole layers where the spectrum is flat."""
    from hf_wsvd.allocation import Budgeted

    shapes = {"flat": (64, 64), "steep": (64, 64)}
    spectra = {"flat": torch.ones(64), "steep": torch.logspace(0, -8, 64)}
    mlp = {"mlp": Budgeted(96, 96 * 40, 40)}
    spectra["mlp"] = torch.linspace(1, 0.1, 40)
    for multiple in (1, 8):
        assert greedy_ranks(shapes, spectra, 1.0, multiple=multiple, extra=mlp) == {"mlp": 40}  # all channels
        ranks = greedy_ranks(shapes, spectra, 0.8, multiple=multiple)
        assert "flat" not in ranks and ranks["steep"] < max_saving_rank(64, 64)  # dense where nothing is cheap
    # the budget holds with the dense layer counted whole
    ranks = greedy_ranks(shapes, spectra, 0.6)
    assert sum(r * 128 if n in ranks else 64 * 64 for n, r in ranks.items()) <= 0.6 * 2 * 64 * 64


@pytest.mark.parametrize("multiple", [1, 4, 12])
def test_greedy_moves_a_stepped_group_in_steps_of_its_own_and_the_allocations_multiple(multiple):
    """A group with ``Budgeted.step`` (an experts module: 8) keeps a multiple of its step and of
    the allocation's multiple (their lcm), and the budget is spent in those steps rather than
    rounded after: what is left is less than the cheapest step still open."""
    import math

    from hf_wsvd.allocation import Budgeted

    shapes = {"layer": (96, 96)}
    spectra = {"layer": torch.logspace(0, -3, 96), "experts": torch.logspace(0, -2, 200)}
    experts = {"experts": Budgeted(50, 50 * 200, 200, step=8)}
    step = math.lcm(multiple, 8)
    for ratio in (0.3, 0.45, 0.6):
        units = greedy_ranks(shapes, spectra, ratio, multiple=multiple, extra=experts)
        assert units["experts"] % step == 0 and 0 < units["experts"] < 200, (ratio, units)
        spent = units["experts"] * 50 + (units["layer"] * 192 if "layer" in units else 96 * 96)
        budget = ratio * (96 * 96 + 50 * 200)
        assert spent <= budget
        open_steps = [50 * step] * (units["experts"] + step < 200) + [192 * multiple] * ("layer" in units)
        assert budget - spent < max(open_steps), (ratio, units, budget - spent)


@pytest.mark.parametrize("sequential", [False, True])
def test_the_recommended_recipe_near_ratio_1_leaves_whole_layers_untouched(sequential):
    """Under greedy allocation a layer kept dense is the dense layer, bit for bit; and a ratio of
    1 is refused before anything is touched."""
    import copy

    model, loader, _, _ = case_inputs("llama_causal_lm" if sequential else "bert_classification", 6, 3)
    dense = copy.deepcopy(model)
    config = WSVDConfig(param_ratio=0.95, rank_multiple=1, **({"mlp_pruning": False} if sequential else {}))
    compressed, report = compress(model, config, loader, show_progress=False)
    assert report.allocation == "greedy" and report.dense_targets and (report.ranks or report.pruned or report.attention)
    for name in report.dense_targets:
        full = next(n for n, _ in dense.named_modules() if n.endswith(name))
        assert torch.equal(compressed.get_submodule(full).weight, dense.get_submodule(full).weight), name
    with pytest.raises(ValueError, match="param_ratio=1 keeps every parameter .* nothing to compress"):
        WSVDConfig(param_ratio=1, allocation="greedy")


def test_greedy_refuses_a_budget_below_rank_one():
    with pytest.raises(ValueError, match="param_ratio=0.01"):
        greedy_ranks({"a": (64, 64)}, {"a": torch.ones(64)}, 0.01)


@pytest.mark.parametrize("method", ["whiten", "asvd", "fisher_whiten"])
@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_compress_llama_with_activation_methods(method, allocation):
    """GQA k/v projections (32 → 16) get valid ranks; the budget holds; the model runs. (Exact
    ranks: rank_multiple=8 would leave the k/v projections dense.)"""
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    dense_params = sum(p.numel() for p in model.parameters())
    # Factorized layers are the subject: the prunings the recipe turns on for a causal LM are off.
    config = WSVDConfig(method=method, param_ratio=0.5, allocation=allocation, rank_multiple=1, mlp_pruning=False,
                        attention_pruning=False)
    model, report = compress(model, config, loader, show_progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert layers and all(m.rank * (m.in_features + m.out_features) < m.in_features * m.out_features
                          for m in layers.values())
    k_proj = layers.get("model.layers.0.self_attn.k_proj")
    if k_proj is None:  # greedy may keep it whole: its largest saving rank saves 32 of its 512 weights
        assert allocation == "greedy" and "layers.0.self_attn.k_proj" in report.dense_targets
    else:
        assert (k_proj.out_features, k_proj.in_features) == (16, 32)
    assert report.params_after < dense_params
    with torch.no_grad():
        assert torch.isfinite(model(**tiny.inputs("llama")).logits).all()


@pytest.mark.parametrize("method", ["whiten", "fisher_whiten", "svd"])
def test_refine_lowers_the_elementwise_loss_from_the_method(method):
    from hf_wsvd.solvers import solver_for
    from hf_wsvd.solvers.elementwise import weighted_loss

    config = WSVDConfig(method=method, refine=True, solver="als", max_iterations=5)
    problem, _ = _problem(rank=3, method=method, refine=True, solver="als", max_iterations=5)
    solver = solver_for(config)
    assert solver.name == f"{method}+refine" and "fisher" in solver.needs_for(config.method_options())
    start = get_solver(method).solve(replace(problem, options=None))
    up, down = solver.solve(problem)
    assert weighted_loss(problem.weight, problem.fisher, up, down) < weighted_loss(problem.weight, problem.fisher, *start)


def test_refine_through_compress_and_its_validation():
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    # factorized layers to refine: the prunings could take the whole budget of a tiny model
    config = WSVDConfig(method="whiten", param_ratio=0.5, refine=True, max_iterations=2, mlp_pruning=False,
                        attention_pruning=False)
    model, report = compress(model, config, loader, show_progress=False)
    assert report.ranks and report.importance_examples == 6  # Fisher was computed for the refinement
    assert model.config.wsvd["refine"] is True
    with pytest.raises(ValueError, match="method='tfwsvd' already is one"):
        WSVDConfig(method="tfwsvd", refine=True)
