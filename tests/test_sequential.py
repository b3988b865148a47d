"""Sequential (block-by-block) compression of causal LMs."""

from __future__ import annotations

import copy

import pytest
import torch

import tiny
from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd import sequential as sequential_module
from stats_worker import case_inputs


def _factors(model) -> dict[str, torch.Tensor]:
    return {n: m.up.weight @ m.down.weight for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


@pytest.mark.parametrize("refit", [False, True])
@pytest.mark.parametrize("case", ["llama_causal_lm", "gpt2_causal_lm"])
def test_full_rank_reproduces_the_logits(case, refit, monkeypatch):
    model, loader, _, _ = case_inputs(case, 6, 3)
    arch = case.split("_")[0]
    with torch.no_grad():
        reference = model(**tiny.inputs(arch)).logits
    monkeypatch.setattr(sequential_module, "uniform_ranks", lambda shapes, ratio: {n: min(s) for n, s in shapes.items()})
    # float64 decompositions: the tiny calibration set leaves the Gram nearly singular, and undoing
    # the whitening amplifies a float32 SVD's rounding in the directions the data never excites.
    config = WSVDConfig(method="whiten", sequential=True, refit=refit, compute_dtype="float64")
    model, report = compress(model, config, loader, show_progress=False)
    assert len(report.ranks) == len(_factors(model)) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny.inputs(arch)).logits, reference, rtol=1e-4, atol=1e-4)


def test_statistics_come_from_the_compressed_blocks():
    """Block 0 sees the same inputs either way; later blocks see the compressed model's outputs."""
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    config = WSVDConfig(method="whiten", param_ratio=0.5)
    whole, whole_report = compress(copy.deepcopy(model), config, loader, show_progress=False)
    seq, seq_report = compress(model, WSVDConfig(method="whiten", param_ratio=0.5, sequential=True), loader,
                               show_progress=False)
    assert seq_report.ranks == whole_report.ranks
    a, b = _factors(whole), _factors(seq)
    for name in a:
        same = torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5)
        assert same == (".layers.0." in name), name
    assert seq.config.wsvd["sequential"] is True
    with torch.no_grad():
        assert torch.isfinite(seq(**tiny.inputs("llama")).logits).all()


def test_refit_pairs_dense_and_compressed_inputs_token_by_token(monkeypatch):
    """The cross Gram of a block-1 layer is E[x_dense xᵀ]: the dense model's input of that layer
    against the input it gets once block 0 is compressed, over the same real tokens."""
    from hf_wsvd import compressor

    model, loader, _, _ = case_inputs("llama_causal_lm", 8, 4)
    dense = copy.deepcopy(model)
    problems = {}
    factorize = compressor.factorize_layers

    def spy(model, solver, block_problems, names, show_progress):
        problems.update(block_problems)
        return factorize(model, solver, block_problems, names, show_progress)

    monkeypatch.setattr(compressor, "factorize_layers", spy)
    config = WSVDConfig(method="whiten", param_ratio=0.4, sequential=True, refit=True)
    compressed, _ = compress(model, config, loader, show_progress=False)
    assert compressed.config.wsvd["refit"] is True

    def inputs_of(net, name):
        seen = []
        handle = net.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        with torch.no_grad():
            for batch in loader:
                net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
        masks = [b["attention_mask"].bool() for b in loader]
        return torch.cat([x[m] for x, m in zip(seen, masks)]).double()

    name = "model.layers.1.self_attn.q_proj"
    x_dense, x = inputs_of(dense, name), inputs_of(compressed, name)
    assert not torch.allclose(x_dense, x)  # block 0's compression changed the inputs
    key = next(k for k in problems if k.endswith("layers.1.self_attn.q_proj"))
    torch.testing.assert_close(problems[key].cross_gram, x_dense.T @ x / len(x), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(problems[key].gram, x.T @ x / len(x), rtol=1e-6, atol=1e-8)
    assert problems[next(k for k in problems if k.startswith("layers.0."))].cross_gram is not None


def test_greedy_ranks_are_planned_on_the_dense_model():
    """Sequential mode with greedy allocation keeps the ranks the dense statistics allocate."""
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    config = WSVDConfig(method="fisher_whiten", param_ratio=0.5, allocation="greedy")
    _, whole = compress(copy.deepcopy(model), config, loader, show_progress=False)
    seq, report = compress(model, WSVDConfig(method="fisher_whiten", param_ratio=0.5, allocation="greedy",
                                             sequential=True, refit=True), loader, show_progress=False)
    assert report.ranks == whole.ranks and len(set(report.ranks.values())) > 1
    assert report.params_after == whole.params_after
    assert seq.config.wsvd["ranks"] == report.ranks


def test_sequential_refuses_what_it_cannot_do():
    model, loader, _, _ = case_inputs("bert_classification", 4, 2)
    with pytest.raises(ValueError, match="causal LM"):
        compress(model, WSVDConfig(method="whiten", sequential=True), loader, show_progress=False)
    with pytest.raises(ValueError, match="refit=True needs sequential=True"):
        WSVDConfig(method="whiten", refit=True)
    with pytest.raises(ValueError, match="method='fwsvd'"):
        WSVDConfig(method="fwsvd", sequential=True, refit=True)
