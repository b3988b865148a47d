"""The recommended recipe by default: WSVDConfig fields left None resolved from the model and data."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

import hf_wsvd
import tiny
from hf_wsvd import WSVDConfig, compress
from hf_wsvd.recipes import ACCELERATOR_BLOCK_REFINE_STEPS, CPU_BLOCK_REFINE_STEPS, resolve
from stats_worker import case_inputs


def _unlabelled(loader) -> list[dict]:
    return [{k: v for k, v in batch.items() if k != "labels"} for batch in loader]


def test_the_default_recipe_is_unset():
    config = WSVDConfig()
    assert (config.method, config.allocation, config.sequential) == (None, None, None)


def test_labelled_classifier_data_gets_fisher_whiten_and_greedy_ranks(tmp_path, caplog):
    model, loader, _, _ = case_inputs("bert_classification", 6, 3)
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        model, report = compress(model, WSVDConfig(param_ratio=0.5), loader, show_progress=False)
    assert (report.method, report.allocation, report.pipeline) == ("fisher_whiten", "greedy", "whole_model")
    assert report.notices == [] and not caplog.records
    assert report.importance_examples == 6  # the first batch was only peeked at, not consumed
    # The checkpoint stores the resolved recipe.
    model.save_pretrained(tmp_path)
    recipe = transformers.AutoConfig.from_pretrained(tmp_path).wsvd
    assert (recipe["method"], recipe["allocation"], recipe["sequential"]) == ("fisher_whiten", "greedy", False)


def test_causal_lm_text_gets_the_sequential_fisher_recipe():
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    model, report = compress(model, WSVDConfig(param_ratio=0.5), loader, show_progress=False)
    assert (report.method, report.allocation, report.pipeline) == ("fisher_whiten", "greedy", "sequential")
    assert model.config.wsvd["sequential"] is True and report.notices == []


@pytest.mark.parametrize("arch, pruned", [("llama", True), ("qwen2", True), ("gpt2", False)])
def test_mlp_pruning_is_on_where_the_model_has_an_mlp_it_can_cut(arch, pruned):
    """GPT-2's MLP is Conv1D, which MLP pruning cannot cut: the recipe records it off there."""
    model = tiny.build(arch)
    data = [{"input_ids": torch.ones(2, 8, dtype=torch.long), "labels": torch.ones(2, 8, dtype=torch.long)}]
    config, _ = resolve(WSVDConfig(), model, data, torch.device("cpu"))
    assert config.sequential and config.mlp_pruning is pruned
    assert resolve(WSVDConfig(mlp_pruning=True), model, data, torch.device("cpu"))[0].mlp_pruning  # as asked


def test_unlabelled_data_falls_back_to_whiten_with_one_notice(caplog):
    model, loader, _, _ = case_inputs("bert_classification", 6, 3)
    # A one-shot iterator: its first batch is read for labels and still takes part in the pass.
    batches = iter(_unlabelled(loader))
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        model, report = compress(model, WSVDConfig(param_ratio=0.5), batches, show_progress=False)
    assert (report.method, report.allocation) == ("whiten", "greedy")
    assert len(report.notices) == 1 and "no labels" in report.notices[0] and "--label-column" in report.notices[0]
    assert [r.getMessage() for r in caplog.records] == report.notices
    assert model.config.wsvd["method"] == "whiten"


def test_no_data_gets_svd_with_uniform_ranks_and_a_notice():
    _, report = compress(tiny.build("bert"), WSVDConfig(param_ratio=0.5), show_progress=False)
    assert (report.method, report.allocation, report.pipeline) == ("svd", "uniform", "whole_model")
    assert len(report.notices) == 1 and "no data" in report.notices[0]


def test_explicit_values_are_kept():
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    _, report = compress(model, WSVDConfig(method="fwsvd", allocation="uniform", sequential=False), loader,
                         show_progress=False)
    assert (report.method, report.allocation, report.pipeline) == ("fwsvd", "uniform", "whole_model")
    assert report.notices == []  # an explicit method is never second-guessed


@pytest.mark.parametrize("method, allocation", [("whiten", "greedy"), ("lp", "uniform"), ("tfwsvd", "uniform")])
def test_allocation_is_greedy_only_for_methods_with_a_spectrum(method, allocation):
    model, loader, _, _ = case_inputs("bert_classification", 6, 3)
    _, report = compress(model, WSVDConfig(method=method, param_ratio=0.5, max_iterations=1), loader,
                         show_progress=False)
    assert report.allocation == allocation


def test_a_third_party_method_is_accepted_by_the_api():
    from hf_wsvd.solvers import SOLVERS, get_solver, register_solver

    register_solver("third_party_svd")(get_solver("svd").solve)
    try:
        _, report = compress(tiny.build("bert"), WSVDConfig(method="third_party_svd", param_ratio=0.5),
                             show_progress=False)
        assert report.method == "third_party_svd" and report.ranks
    finally:
        del SOLVERS["third_party_svd"]


def test_a_third_party_methods_attributes_decide_embeddings_and_refinement():
    from hf_wsvd.solvers import SOLVERS, get_solver, register_solver

    register_solver("third_party_rows", embeddable=True)(get_solver("svd").solve)
    register_solver("third_party_entries", needs=("fisher",), elementwise=True)(get_solver("svd").solve)
    try:
        assert WSVDConfig(method="third_party_rows", embeddings=True).resolved_embedding_method == "third_party_rows"
        with pytest.raises(ValueError, match="'third_party_entries' already is one"):
            WSVDConfig(method="third_party_entries", refine=True)
        with pytest.raises(ValueError, match=r"embedding_method='fwsvd' is not one of \[.*'third_party_rows'\]"):
            WSVDConfig(embedding_method="fwsvd")
    finally:
        del SOLVERS["third_party_rows"], SOLVERS["third_party_entries"]


def test_the_method_lists_that_left_the_config_still_import_with_a_warning():
    from hf_wsvd.solvers import SOLVERS

    with pytest.warns(DeprecationWarning, match="hf_wsvd.solvers.SOLVERS"):
        from hf_wsvd.config import METHODS
    with pytest.warns(DeprecationWarning, match="embeddable"):
        from hf_wsvd.config import EMBEDDING_METHODS
    assert METHODS == tuple(SOLVERS) and EMBEDDING_METHODS == ("lp", "svd")


def test_the_recipe_names_its_pipeline_and_the_registry_runs_a_registered_one():
    from hf_wsvd.pipelines import PIPELINES, get_pipeline, register_pipeline

    cpu = torch.device("cpu")
    assert resolve(WSVDConfig(method="svd", allocation="uniform"), tiny.build("bert"), None, cpu)[0].pipeline == \
        "whole_model"
    assert resolve(WSVDConfig(method="whiten", allocation="uniform", pipeline="sequential"), tiny.build("llama"),
                   None, cpu)[0].sequential is True
    with pytest.raises(ValueError, match="pipeline='sequential' contradicts sequential=False"):
        WSVDConfig(pipeline="sequential", sequential=False)
    with pytest.raises(ValueError, match="pipeline='nope' is not one of"):
        WSVDConfig(pipeline="nope")
    calls = []

    @register_pipeline("logged_whole_model")
    def logged(job):
        calls.append(sorted(job.targets))
        return get_pipeline("whole_model")(job)

    try:
        _, report = compress(tiny.build("bert"), WSVDConfig(method="svd", param_ratio=0.5, pipeline="logged_whole_model"),
                             show_progress=False)
        assert report.pipeline == "logged_whole_model" and report.ranks and set(report.ranks) <= set(*calls)
    finally:
        del PIPELINES["logged_whole_model"]


def test_block_refinement_takes_more_steps_where_the_blocks_compute_on_an_accelerator():
    # Resolved, not run: no GPU is needed to see which step count a GPU run would get.
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    steps = {device: resolve(WSVDConfig(param_ratio=0.5), model, loader, torch.device(device))[0].block_refine_steps
             for device in ("cpu", "cuda", "xpu")}
    assert steps == {"cpu": CPU_BLOCK_REFINE_STEPS, "cuda": ACCELERATOR_BLOCK_REFINE_STEPS,
                     "xpu": ACCELERATOR_BLOCK_REFINE_STEPS}
    assert CPU_BLOCK_REFINE_STEPS < ACCELERATOR_BLOCK_REFINE_STEPS
    given = resolve(WSVDConfig(param_ratio=0.5, block_refine_steps=8), model, loader, torch.device("cuda"))[0]
    assert given.block_refine_steps == 8


def test_the_hidden_states_stay_in_cpu_memory_where_the_blocks_compute_on_an_accelerator():
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    offload = {device: resolve(WSVDConfig(param_ratio=0.5), model, loader, torch.device(device))[0].offload_activations
               for device in ("cpu", "cuda", "xpu")}
    assert offload == {"cpu": False, "cuda": True, "xpu": False}  # pinned memory, and the measured trade: CUDA
    assert resolve(WSVDConfig(param_ratio=0.5, offload_activations=False), model, loader,
                   torch.device("cuda"))[0].offload_activations is False
    bert, bert_loader, _, _ = case_inputs("bert_classification", 4, 2)  # not sequential: nothing to offload
    assert resolve(WSVDConfig(param_ratio=0.5), bert, bert_loader, torch.device("cuda"))[0].offload_activations is False


@pytest.mark.parametrize("fields, multiple", [({}, 8), ({"quantize": "nf4"}, 8), ({"quantize": "int8"}, 16),
                                              ({"quantize": "int4"}, 64), ({"quantize": "int3", "quantize_group_size": 32}, 32),
                                              ({"quantize": "int4", "rank_multiple": 8}, 8)])
def test_ranks_step_by_what_the_quantization_needs_to_take_every_factor(fields, multiple):
    config = resolve(WSVDConfig(method="svd", allocation="uniform", **fields), tiny.build("llama"), None,
                     torch.device("cpu"))[0]
    assert config.rank_multiple == multiple


def test_a_compressed_model_quantizes_whole_with_the_resolved_rank_multiple(caplog):
    """int3 in groups of 16 with rank_multiple unset: every rank steps by 16, so every factor is
    quantized (with 8, half the up factors would stay in the model's dtype)."""
    from hf_wsvd.integrations.quantization import quantization_config, quantize

    model, report = compress(tiny.build("llama"), WSVDConfig(method="svd", param_ratio=0.8, quantize="int3",
                                                             quantize_group_size=16), None, show_progress=False)
    assert report.ranks and all(rank % 16 == 0 for rank in report.ranks.values())
    assert model.config.wsvd["rank_multiple"] == 16
    with caplog.at_level(logging.WARNING):
        quantized = quantize(model, quantization_config("int3", 16))
    assert not [r for r in caplog.records if "stay unquantized" in r.getMessage()]
    factors = [m for layer in quantized.modules() if isinstance(layer, hf_wsvd.FactorizedLinear) for m in (layer.up, layer.down)]
    assert factors and all(type(m.weight).__name__ == "IntxUnpackedToInt8Tensor" for m in factors)


def test_a_result_far_above_the_budget_is_said():
    """Uniform allocation at a tiny ratio: every pruned MLP keeps a step of channels, the attentions stay
    dense; the report says so instead of a silent 42% for param_ratio=0.01."""
    model, loader, _, _ = case_inputs("llama_causal_lm", 4, 2)
    _, report = compress(model, WSVDConfig(param_ratio=0.01, allocation="uniform", block_refine_steps=0), loader,
                         show_progress=False)
    assert report.target_kept > 0.3
    assert any(n.startswith(f"kept {report.target_kept:.1%} of the target layers' parameters for param_ratio=0.01")
               and n.endswith("; lower rank_multiple, or use allocation='greedy', which meets the budget")
               for n in report.notices), report.notices
    # at rank_multiple=1 there is no lower one to advise
    _, report = compress(case_inputs("llama_causal_lm", 4, 2)[0], WSVDConfig(
        param_ratio=0.01, allocation="uniform", block_refine_steps=0, rank_multiple=1), loader, show_progress=False)
    assert [n for n in report.notices if n.startswith("kept ")] and not any("lower rank_multiple" in n
                                                                            for n in report.notices), report.notices
    _, report = compress(case_inputs("llama_causal_lm", 4, 2)[0], WSVDConfig(param_ratio=0.5), loader,
                         show_progress=False)
    assert report.target_kept <= 0.5 and report.notices == []
