"""The scale layout: collectors gather only what a method needs, the Fisher pass backpropagates one
block at a time, both pipelines are registered, a model dispatched by accelerate (blocks offloaded)
compresses like a plain one, and two processes compress like one."""

from __future__ import annotations

import copy

import pytest
import torch

import tiny
from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd.pipelines import PIPELINES, get_pipeline
from hf_wsvd.statistics import COLLECTORS, FISHER, FISHER_COLS, FISHER_ROWS, GRAM, MEAN_ABS, gradient_statistics
from stats_worker import DISTRIBUTED_BATCH, MODIFIERS_RECIPE, WHOLE_BATCH, case_inputs, offload_one_block


def test_every_statistic_has_a_collector():
    assert set(COLLECTORS) == {FISHER, FISHER_ROWS, FISHER_COLS, GRAM, MEAN_ABS}
    assert set(PIPELINES) == {"whole_model", "sequential"}
    with pytest.raises(ValueError, match="unknown pipeline 'bogus'"):
        get_pipeline("bogus")


def test_summed_fisher_equals_the_sums_of_the_entries_and_nothing_else_is_collected():
    model, loader, modules, loss_fn = case_inputs("llama_causal_lm", 5, 2)
    every = gradient_statistics(model, loader, modules, {FISHER, FISHER_ROWS, FISHER_COLS}, loss_fn, show_progress=False)
    rows = gradient_statistics(model, loader, modules, {FISHER_ROWS}, loss_fn, show_progress=False)
    for name, module in modules.items():
        entry = every.values[name][FISHER]
        assert entry.abs().max() > 0
        torch.testing.assert_close(every.values[name][FISHER_ROWS], entry.sum(dim=1), rtol=1e-5, atol=0)
        torch.testing.assert_close(every.values[name][FISHER_COLS], entry.sum(dim=0), rtol=1e-5, atol=0)
        # Only the row sums were asked for: O(out) memory, no out × in accumulator.
        assert set(rows.values[name]) == {FISHER_ROWS}
        assert rows.values[name][FISHER_ROWS].shape == (module.out_features,)
        torch.testing.assert_close(rows.values[name][FISHER_ROWS], entry.sum(dim=1), rtol=1e-5, atol=0)


def test_blockwise_backward_equals_the_whole_backward():
    """With a module outside the blocks (the head) the pass falls back to one whole backward; the
    blocks' Fisher is the same either way."""
    model, loader, modules, loss_fn = case_inputs("llama_causal_lm", 5, 2)
    blockwise = gradient_statistics(model, loader, modules, {FISHER}, loss_fn, show_progress=False)
    whole = gradient_statistics(model, loader, {**modules, "lm_head": model.lm_head}, {FISHER}, loss_fn,
                                show_progress=False)
    for name in modules:
        scale = whole.values[name][FISHER].abs().max()
        torch.testing.assert_close(blockwise.values[name][FISHER], whole.values[name][FISHER], rtol=1e-4, atol=1e-6 * scale)
    assert all(not getattr(b, "forward").__qualname__.startswith("BlockwiseBackward") for b in model.model.layers)


def _products(model) -> dict[str, torch.Tensor]:
    """up @ down of every factorized layer (offloaded factors read where they are executed)."""
    from accelerate.utils import align_module_device

    products = {}
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear):
            with align_module_device(module.up), align_module_device(module.down):
                products[name] = (module.up.weight @ module.down.weight).detach().cpu()
    return products


@pytest.mark.parametrize("sequential", [False, True])
def test_a_model_with_offloaded_blocks_compresses_like_a_plain_one(sequential):
    """accelerate's CPU offload keeps block 1's weights on the meta device outside forward: the
    statistics read them where they are executed, and the factors are offloaded the same way."""
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    # factorized layers (the prunings could take the whole budget of a tiny model)
    config = WSVDConfig(method="fisher_whiten", allocation="greedy", sequential=sequential, param_ratio=0.5,
                        compute_dtype="float64", mlp_pruning=False, attention_pruning=False)
    plain, plain_report = compress(copy.deepcopy(model), config, loader, show_progress=False)
    device = offload_one_block(model)
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    offloaded, report = compress(model, config, loader, show_progress=False)
    assert offloaded.model.layers[1].self_attn.q_proj.up.weight.device.type == "meta"  # still offloaded
    assert report.ranks == plain_report.ranks
    expected = _products(plain)
    for name, product in _products(offloaded).items():
        torch.testing.assert_close(product, expected[name], rtol=1e-6, atol=1e-8, msg=name)
    inputs = tiny.inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**{k: v.to(device) for k, v in inputs.items()}).logits.cpu(),
                                   plain(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_two_processes_compress_like_one(two_process_results, one_process_result):
    """Each process takes its share of the calibration data and solves its share of the layers;
    both end with the factors one process computes, block refinement's steps included (its
    gradients summed across processes)."""
    single = one_process_result["pipeline"]
    assert sorted(single["refined"]) == ["0", "1"]
    assert all(after < before for before, after in single["refined"].values()), single["refined"]
    for process in two_process_results[1]["pipeline"]["products"]:  # the very same weights in both processes
        assert torch.equal(two_process_results[0]["pipeline"]["products"][process],
                           two_process_results[1]["pipeline"]["products"][process]), process
    for result in two_process_results:
        multi = result["pipeline"]
        assert multi["ranks"] == single["ranks"] and multi["examples"] == single["examples"]
        assert multi["refined"].keys() == single["refined"].keys()
        # The statistics summed in another order differ by float32 rounding (~1e-7), which refinement's
        # float32 Adam steps carry to ~4e-6 of a product's largest entry (measured across CPU kernels:
        # ATEN_CPU_CAPABILITY default against avx2); the steps themselves move the products by ~20%.
        for block, errors in single["refined"].items():
            assert multi["refined"][block] == pytest.approx(errors, rel=1e-4), block
        for name, product in single["products"].items():
            scale = product.abs().max().item()
            torch.testing.assert_close(multi["products"][name], product, rtol=0, atol=1e-4 * scale, msg=name)


def test_two_processes_plan_three_blocks_like_one(two_process_results, one_process_result):
    """Greedy planning in two processes takes two blocks' solves at once, then the third's alone: the
    ranks and factors one process computes."""
    single = one_process_result["pipeline3"]
    assert {name.split(".")[1] for name in single["ranks"]} == {"0", "1", "2"}  # layers factorized in every block
    for result in two_process_results:
        assert result["pipeline3"]["ranks"] == single["ranks"]
        for name, product in single["products"].items():
            torch.testing.assert_close(result["pipeline3"]["products"][name], product, rtol=0,
                                       atol=1e-4 * product.abs().max().item(), msg=name)


def test_processes_take_a_slice_of_every_batch_where_it_divides_evenly_else_whole_batches(two_process_results):
    """7 examples: in batches of 2 each process holds half of every batch (block refinement's steps,
    one batch each, then run in both); in batches of 3, whole batches in turn."""
    first, second = two_process_results
    assert first[f"shard/{DISTRIBUTED_BATCH}"] == [1, 1, 1, 1] and second[f"shard/{DISTRIBUTED_BATCH}"] == [1, 1, 1]
    assert first[f"shard/{WHOLE_BATCH}"] == [3, 1] and second[f"shard/{WHOLE_BATCH}"] == [3]


def test_several_processes_refuse_a_loader_already_split_or_over_an_iterable_dataset():
    """Either would lose or repeat examples silently: accelerate's loader is split again, an iterable
    dataset's last batch is padded with repeated examples."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, IterableDataset

    from hf_wsvd.statistics.passes import shard

    class Stream(IterableDataset):
        def __iter__(self):
            yield from ({"input_ids": torch.tensor([i])} for i in range(7))

    accelerator = SimpleNamespace(num_processes=2, process_index=0, even_batches=False)
    prepared = DataLoader([{"input_ids": torch.tensor([i])} for i in range(7)], batch_size=2)
    prepared._is_accelerate_prepared = True  # what accelerator.prepare marks
    with pytest.raises(ValueError, match="already prepared by accelerate"):
        shard(prepared, accelerator)
    with pytest.raises(ValueError, match="map-style dataset.*Stream"):
        shard(DataLoader(Stream(), batch_size=2), accelerator)


def test_compensation_with_a_process_without_data_is_refused_in_every_process(two_process_results):
    for result in two_process_results:
        assert "needs calibration data in every process" in result["no_data_error"], result["no_data_error"]


@pytest.mark.parametrize("key", ["experts", "experts_alone"])
def test_two_processes_cut_experts_like_one(two_process_results, one_process_result, key):
    """Each experts module is solved by one process and broadcast: both processes end with the same
    weights, the experts one process cuts (the Grams summed across processes: float64 rounding);
    also experts named alone under a loss-scaled method, whose spectra carry no loss weight."""
    single = one_process_result[key]
    assert any(e["channels"] < e["dense_channels"] for e in single["experts"].values())
    first, second = (result[key] for result in two_process_results)
    assert all(torch.equal(first["weights"][name], second["weights"][name]) for name in first["weights"])
    assert first["experts"] == single["experts"]
    for name, weight in single["weights"].items():
        torch.testing.assert_close(first["weights"][name], weight, rtol=1e-5, atol=1e-6 * float(weight.abs().max()))


def test_two_processes_run_every_modifier_like_one(two_process_results, one_process_result):
    """Both prunings, compensation, refinement and the embeddings, each solved by one process and
    shared: both processes end with the very same weights, those one process computes."""
    single = one_process_result["modifiers"]
    assert single["pruned"] and single["attention"] and single["refined"] and "embed_tokens" in single["ranks"]
    first, second = (result["modifiers"] for result in two_process_results)
    assert all(torch.equal(first["weights"][name], second["weights"][name]) for name in first["weights"])
    for key in ("ranks", "pruned", "attention"):
        assert first[key] == single[key], key
    # Whole batches in turn (batches of 3, two a step: batches 0 and 1 held by one process each, then 2
    # and 0 both held by the first): each batch's gradient computed where it is held, then summed.
    assert first["refined"].keys() == single["refined"].keys()
    for block, errors in single["refined"].items():
        assert first["refined"][block] == pytest.approx(errors, rel=1e-4), block
    assert first["weights"].keys() == single["weights"].keys()
    # Refinement trains in float32 with Adam, which scales each element's step to about lr × RMS
    # whatever its gradient: where a gradient is a near-cancellation, the summation order that the
    # process count changes can move the element by a fraction of a step. Allowed: a tenth of the
    # refinement's own steps (a process missing the other's gradients would be off by whole steps).
    steps, rate = MODIFIERS_RECIPE["block_refine_steps"], WSVDConfig.block_refine_learning_rate
    for name, weight in single["weights"].items():
        if not (weight.is_floating_point() and weight.numel()):
            assert torch.equal(first["weights"][name], weight), name
            continue
        step = rate * float(weight.double().square().mean().sqrt())
        atol = max(1e-6 * weight.abs().max().item(), 0.1 * steps * step)
        torch.testing.assert_close(first["weights"][name], weight, rtol=1e-5, atol=atol, msg=name)


def test_layers_reading_one_tensor_share_their_sums_and_a_diverging_layer_splits_off_exactly():
    """``SharedSums`` keeps one copy for layers given the same contributions (q/k/v) and gives each
    layer exactly the sums of its own contributions, also when one layer's inputs diverge."""
    from hf_wsvd.statistics.shared import SharedSums

    generator = torch.Generator().manual_seed(0)
    batches = [
        [("q", 0), ("k", 0), ("v", 0), ("o", 1)],
        [("q", 0), ("k", 0), ("v", 0), ("o", 1)],
        [("q", 0), ("k", 0), ("v", 1), ("o", 2), ("o", 2)],  # v reads another tensor, o runs twice
        [("q", 0), ("k", 0), ("v", 0)],  # o not reached
    ]
    sums, expected = SharedSums(), {}
    for batch in batches:
        contributions = {}
        for name, source in batch:
            if source not in contributions:
                contributions[source] = {"gram": torch.randn(3, 3, generator=generator, dtype=torch.float64),
                                         "tokens": torch.tensor(1.0, dtype=torch.float64)}
            sums.add(name, contributions[source])
            expected[name] = [*expected.get(name, []), contributions[source]["gram"].clone()]  # the sums may own it
        if batch is batches[1]:
            assert sums.totals("q") is sums.totals("k") is sums.totals("v")  # one copy for q/k/v
            assert sums.totals("o") is not sums.totals("q")
        sums.finish()
    for name, parts in expected.items():
        total = parts[0]
        for part in parts[1:]:
            total += part
        assert torch.equal(sums.totals(name)["gram"], total), name
        assert float(sums.totals(name)["tokens"]) == len(parts)
    assert sums.totals("q") is sums.totals("k") and sums.totals("v") is not sums.totals("q")
    stats = sums.statistics(["q", "k", "v", "o"])
    assert stats.values["q"]["gram"] is stats.values["k"]["gram"] and stats.tokens == {"q": 4, "k": 4, "v": 4, "o": 4}
