"""Block refinement (``block_refine_steps``): each compressed block trained toward the dense block's
outputs in compensated sequential mode."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch.utils.data import DataLoader

import tiny
from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd.evaluation import perplexity
from hf_wsvd.integrations.checkpoint import refinement_summary
from hf_wsvd.pipelines import sequential as sequential_module
from hf_wsvd.pipelines import step as step_module
from hf_wsvd.recipes import default_block_refine_steps
from hf_wsvd.statistics import default_accelerator
from stats_worker import case_inputs, offload_one_block

# Strong compression of a tiny trained model: the blocks' errors are large enough to train away.
RECIPE = dict(method="fisher_whiten", param_ratio=0.3, compute_dtype="float64", block_refine_learning_rate=1e-2)


def _language(count: int, seed: int, length: int = 16) -> list[dict[str, torch.Tensor]]:
    """Sequences of a fixed Markov chain over the tiny vocabulary's words: each word is followed by
    one word with probability 0.8, by another one otherwise."""
    words, low = len(tiny.WORDS), len(tiny.SPECIALS)
    chain = torch.Generator().manual_seed(99)
    likely, other = torch.randperm(words, generator=chain), torch.randperm(words, generator=chain)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.empty(count, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, words, (count,), generator=generator)
    for t in range(1, length):
        coin = torch.rand(count, generator=generator) < 0.8
        ids[:, t] = torch.where(coin, likely[ids[:, t - 1]], other[ids[:, t - 1]])
    ids += low
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained on the chain (dense perplexity near the chain's), its calibration data
    and held-out sequences."""
    model = tiny.build("llama", "AutoModelForCausalLM", seed=0).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(6):
        for batch in DataLoader(_language(512, seed=1), batch_size=32, shuffle=True,
                                generator=torch.Generator().manual_seed(0)):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval(), DataLoader(_language(32, seed=2), batch_size=4), DataLoader(_language(64, seed=3), batch_size=16)


def _block_outputs(model, loader) -> list[torch.Tensor]:
    """Each block's output hidden states over ``loader``, concatenated."""
    outputs = [[] for _ in model.model.layers]
    handles = [block.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(
        (out[0] if isinstance(out, tuple) else out).detach())) for i, block in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in loader:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    return [torch.cat(o) for o in outputs]


def _relative_errors(dense, compressed, loader) -> list[float]:
    """Per block: the mean over tokens of ‖y − ŷ‖² / ‖y‖², the compressed model's block outputs
    against the dense model's."""
    return [float(((got - want).square().sum(-1) / want.square().sum(-1)).mean())
            for want, got in zip(_block_outputs(dense, loader), _block_outputs(compressed, loader))]


def test_refinement_lowers_the_block_errors_and_the_heldout_perplexity_reproducibly(trained):
    dense, calibration, heldout = trained
    plain, plain_report = compress(copy.deepcopy(dense), WSVDConfig(**RECIPE, block_refine_steps=0), calibration,
                                   show_progress=False)
    config = WSVDConfig(**RECIPE, block_refine_steps=32)
    start = time.perf_counter()
    refined, report = compress(copy.deepcopy(dense), config, calibration, show_progress=False)
    # Refinement's time is a stage of its own, not counted again in "factorize"; so are the walks' data
    # passes and the MLP cuts.
    assert all(report.seconds[stage] > 0 for stage in ("statistics", "allocate", "factorize", "prune", "refine"))
    assert sum(report.seconds.values()) <= time.perf_counter() - start
    again, again_report = compress(copy.deepcopy(dense), config, calibration, show_progress=False)
    # Shapes and ranks are the allocation's; MLPs stay pruned to the same channels.
    assert report.ranks == plain_report.ranks and report.pruned == plain_report.pruned and report.pruned_mlps
    assert report.params_after == plain_report.params_after
    assert plain_report.refined == {} and plain.config.wsvd["block_refine_steps"] == 0
    # Every block was refined and its error on the calibration data fell.
    assert sorted(report.refined) == ["0", "1"]
    assert all(after < 0.95 * before for before, after in report.refined.values()), report.refined
    assert refined.config.wsvd["refined"] == report.refined and refined.config.wsvd["block_refine_steps"] == 32
    # The reported errors are the models' own: block 0 sees the same inputs with or without refinement.
    plain_errors, errors = _relative_errors(dense, plain, calibration), _relative_errors(dense, refined, calibration)
    assert report.refined["0"][0] == pytest.approx(plain_errors[0], rel=1e-4)
    for index, error in enumerate(errors):
        assert report.refined[str(index)][1] == pytest.approx(error, rel=1e-4)
    assert errors[-1] < 0.8 * plain_errors[-1]
    # Held-out sequences of the same language: closer to the dense model's perplexity.
    dense_ppl, plain_ppl, refined_ppl = (perplexity(m, heldout) for m in (dense, plain, refined))
    assert refined_ppl < plain_ppl - 0.5 * (plain_ppl - dense_ppl), (dense_ppl, plain_ppl, refined_ppl)
    # The same seed gives the very same model.
    assert again_report.refined == report.refined
    for (name, a), b in zip(refined.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_step_reading_several_batches_takes_the_mean_gradient_of_their_tokens(cpu_accelerator):
    """``block_refine_batches=2`` over batches of 4 takes the steps that one batch of 8 a step takes
    (the same sequences, the same gradient: padded sequences of different lengths, so a mean of the
    batches' means would differ), and other steps than one batch of 4 a step."""
    model = tiny.build("llama", "AutoModelForCausalLM", seed=0).eval()
    data = _language(32, seed=2)
    for index, example in enumerate(data):  # 6 to 16 real tokens, padding after them
        example["attention_mask"][6 + index * 5 % 11:] = 0
        example["labels"][example["attention_mask"] == 0] = -100

    def refined(batch_size: int, batches: int):  # float32 on the CPU: what is compared is the steps, not bf16 rounding
        config = WSVDConfig(**RECIPE, block_refine_steps=6, block_refine_batches=batches)
        compressed, report = compress(copy.deepcopy(model), config, DataLoader(data, batch_size=batch_size),
                                      accelerator=cpu_accelerator, show_progress=False)
        assert compressed.config.wsvd["block_refine_batches"] == batches
        return compressed.state_dict(), report.refined

    (pairs, pairs_errors), (eights, eights_errors), (fours, _) = refined(4, 2), refined(8, 1), refined(4, 1)
    assert pairs_errors.keys() == eights_errors.keys() == {"0", "1"}
    for block, errors in eights_errors.items():
        assert pairs_errors[block] == pytest.approx(errors, rel=1e-5), block
    # float32 Adam steps: the summation order of the batches' gradients moves weights by ~1e-7 of their scale
    distance = {name: float((pairs[name] - weight).abs().max() / weight.abs().max().clamp_min(1e-30))
                for name, weight in eights.items() if weight.is_floating_point()}
    assert max(distance.values()) < 1e-5, max(distance.items(), key=lambda item: item[1])
    assert max(float((pairs[name] - weight).abs().max() / weight.abs().max().clamp_min(1e-30))
               for name, weight in fours.items() if weight.is_floating_point()) > 1e-3


def test_the_summary_names_the_batches_of_a_step_where_there_are_several():
    refined = {"0": [1.0, 0.5], "1": [1.0, 0.9]}
    assert refinement_summary(refined, 8).startswith("2 blocks refined (8 steps each): ")
    assert refinement_summary(refined, 8, 4).startswith("2 blocks refined (8 steps of 4 batches each): ")
    assert "median 30% (least 10%, most 50%)" in refinement_summary(refined, 8, 4)
    # a hand-edited record is shown without it, not compared with 1
    assert refinement_summary(refined, 8, "4").startswith("2 blocks refined (8 steps each): ")


def test_the_summary_says_which_refinements_were_kept():
    """A block whose training did not lower its error keeps its compensated weights ([e, e]): the
    summary does not count it as refined, and says when none was kept."""
    assert refinement_summary({"0": [1.0, 0.5], "1": [1.0, 1.0], "2": [1.0, 0.7]}, 8) == (
        "3 blocks refined (8 steps each), 2 kept (training did not lower the others' error): relative output error "
        "fell by a median 40% (least 30%, most 50%)")  # of the blocks kept
    assert refinement_summary({"0": [1.0, 1.0], "1": [2.0, 2.0]}, 8) == (
        "2 blocks refined (8 steps each), none kept: training lowered no block's error (a smaller "
        "block_refine_learning_rate may)")
    # exact blocks (no error to lower) are not training that failed
    assert refinement_summary({"0": [0.0, 0.0], "1": [1.0, 0.5]}, 8).startswith("2 blocks refined (8 steps each): ")


def test_refinement_that_would_raise_the_error_is_undone(trained, monkeypatch):
    """At full rank the compressed blocks are the dense blocks: training can only add error, so the
    compensated factors stay."""
    def full_ranks(job, shapes):
        return {n: min(s) for n, s in shapes.items()}

    monkeypatch.setattr(sequential_module, "uniform", full_ranks)
    monkeypatch.setattr(step_module, "uniform", full_ranks)
    dense, calibration, _ = trained
    config = WSVDConfig(**RECIPE, allocation="uniform", mlp_pruning=False, block_refine_steps=8)
    model, report = compress(copy.deepcopy(dense), config, calibration, show_progress=False)
    assert report.ranks and sorted(report.refined) == ["0", "1"]
    assert all(before == after < 1e-8 for before, after in report.refined.values()), report.refined
    batch = next(iter(calibration))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, dense(input_ids=batch["input_ids"]).logits,
                                   rtol=1e-4, atol=1e-4)


def test_a_diverging_refinement_is_undone(trained):
    """A step size that blows the weights up (to NaN or worse errors) leaves the compensated model."""
    dense, calibration, _ = trained
    plain, _ = compress(copy.deepcopy(dense), WSVDConfig(**RECIPE, block_refine_steps=0), calibration,
                        show_progress=False)
    diverged, report = compress(copy.deepcopy(dense), WSVDConfig(**{**RECIPE, "block_refine_learning_rate": 1e4},
                                                                 block_refine_steps=4), calibration, show_progress=False)
    assert sorted(report.refined) == ["0", "1"] and all(b == a for b, a in report.refined.values()), report.refined
    for (name, a), b in zip(plain.state_dict().items(), diverged.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_recommended_recipe_refines_compensated_sequential_runs_only():
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    _, report = compress(copy.deepcopy(model), WSVDConfig(param_ratio=0.5), loader, show_progress=False)
    assert report.compensated and report.refined
    lm, _ = compress(copy.deepcopy(model), WSVDConfig(param_ratio=0.5, compensate=False), loader, show_progress=False)
    assert lm.config.wsvd["block_refine_steps"] == 0 and lm.config.wsvd["refined"] == {}
    default, _ = compress(copy.deepcopy(model), WSVDConfig(param_ratio=0.5), loader, show_progress=False)
    assert default.config.wsvd["block_refine_steps"] == default_block_refine_steps(default_accelerator().device)
    classifier, loader, _, _ = case_inputs("bert_classification", 6, 3)
    classifier, _ = compress(classifier, WSVDConfig(param_ratio=0.5), loader, show_progress=False)
    assert classifier.config.wsvd["block_refine_steps"] == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_refine_steps=-1), "block_refine_steps=-1"),
    (dict(block_refine_steps=True), "block_refine_steps=True"),
    (dict(block_refine_steps=2.5), "block_refine_steps=2.5"),
    (dict(block_refine_batches=2**31), "block_refine_batches=2147483648 must be an integer from 1 to 2147483647"),
    (dict(block_refine_steps=2**63), "block_refine_steps=9223372036854775808 must be an integer from 0 .off. to 2147483647"),
    (dict(block_refine_learning_rate=0), "block_refine_learning_rate=0"),
    (dict(block_refine_learning_rate=float("nan")), "block_refine_learning_rate=nan"),
    (dict(block_refine_batches=0), "block_refine_batches=0"),
    (dict(block_refine_batches=1.5), "block_refine_batches=1.5"),
    (dict(block_refine_batches=True), "block_refine_batches=True"),
    (dict(method="whiten", sequential=True, compensate=False, block_refine_steps=8), "needs compensate=True"),
    (dict(method="whiten", sequential=False, block_refine_steps=8), "needs compensate=True"),
    (dict(refined={"0": [0.5]}), "refined="),
    (dict(refined={"0": [0.5, -1.0]}), "refined="),
])
def test_refinement_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WSVDConfig(**kwargs)


def test_refinement_is_refused_where_compensation_resolves_off():
    """Explicit steps on a model whose recipe resolves to no compensation (a classifier)."""
    classifier, loader, _, _ = case_inputs("bert_classification", 6, 3)
    with pytest.raises(ValueError, match="needs compensate=True"):
        compress(classifier, WSVDConfig(param_ratio=0.5, block_refine_steps=8), loader, show_progress=False)


def test_an_offloaded_block_refines_like_a_plain_one():
    """accelerate keeps block 1's weights off the model (meta) outside forward: refinement trains a
    copy of the real weights and installs its layers offloaded again."""
    from accelerate.utils import align_module_device

    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    config = WSVDConfig(method="fisher_whiten", param_ratio=0.5, compute_dtype="float64", block_refine_steps=8,
                        block_refine_learning_rate=1e-2)
    plain, plain_report = compress(copy.deepcopy(model), config, loader, show_progress=False)
    device = offload_one_block(model)
    offloaded, report = compress(model, config, loader, show_progress=False)
    # the same errors (to rounding: on a GPU the bf16 attention backward may sum in another order)
    assert report.refined.keys() == plain_report.refined.keys() and report.refined["1"][1] < report.refined["1"][0]
    for block, errors in plain_report.refined.items():
        assert report.refined[block] == pytest.approx(errors, rel=1e-5), block
    layer = offloaded.model.layers[1].self_attn.q_proj
    assert isinstance(layer, FactorizedLinear) and layer.up.weight.device.type == "meta"  # still offloaded
    for name, module in plain.named_modules():
        if isinstance(module, FactorizedLinear):
            other = offloaded.get_submodule(name)
            with align_module_device(other.up), align_module_device(other.down):
                torch.testing.assert_close((other.up.weight @ other.down.weight).cpu(),
                                           module.up.weight @ module.down.weight, rtol=1e-6, atol=1e-8, msg=name)
    inputs = tiny.inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**{k: v.to(device) for k, v in inputs.items()}).logits.cpu(),
                                   plain(**inputs).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_bf16_or_float64_model_refines_in_at_least_float32_and_keeps_its_dtype(dtype):
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3, dtype=dtype)
    config = WSVDConfig(method="fisher_whiten", param_ratio=0.5, block_refine_steps=8, block_refine_learning_rate=1e-2)
    model, report = compress(model, config, loader, show_progress=False)
    assert any(after < before for before, after in report.refined.values()), report.refined
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_a_refined_model_saves_loads_both_ways_and_heals(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers import run_without_hf_wsvd
    from hf_wsvd.integrations.healing import HealConfig, heal

    dense, calibration, heldout = trained
    model, report = compress(copy.deepcopy(dense), WSVDConfig(**RECIPE, block_refine_steps=16), calibration,
                             show_progress=False)
    tiny.save(model, tmp_path / "refined")
    inputs = tiny.inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save({"inputs": inputs, "logits": expected}, tmp_path / "expected.pt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "refined")
    assert loaded.config.wsvd["refined"] == report.refined
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-6)
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        model = transformers.AutoModelForCausalLM.from_pretrained("{tmp_path}/refined", trust_remote_code=True)
        saved = torch.load("{tmp_path}/expected.pt")
        with torch.no_grad():
            torch.testing.assert_close(model(**saved["inputs"]).logits, saved["logits"], rtol=1e-5, atol=1e-6)
        print("same logits")
    """, cwd=tmp_path)
    assert result.returncode == 0 and "same logits" in result.stdout, result.stderr[-3000:]
    blocks = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in heldout.dataset]
    shapes = {n: p.shape for n, p in loaded.named_parameters()}  # ranks and pruned shapes
    healed, heal_report = heal(loaded, dense, blocks[:48], blocks[48:],
                               HealConfig(steps=8, batch_size=8, learning_rate=1e-3), show_progress=False)
    assert heal_report.kept and heal_report.kl_after < heal_report.kl_before
    assert {n: p.shape for n, p in healed.named_parameters()} == shapes


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_refines_on_a_cpu(arch, dtype):
    """The block trains in float32 and takes its inputs in float32 where no autocast runs: a
    LayerNorm block (GPT-2) refused bf16 hidden states against its float32 weights."""
    model = tiny.build(arch, "AutoModelForCausalLM", seed=0).to(dtype)
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            for ids in (tiny.inputs("llama", batch=2, length=16, seed=s)["input_ids"] for s in range(2))]
    model, report = compress(model, WSVDConfig(param_ratio=0.5, block_refine_steps=4), data, show_progress=False)
    assert sorted(report.refined) == ["0", "1"]
    assert all(0 < after <= before for before, after in report.refined.values()), report.refined
    assert {p.dtype for p in model.parameters()} == {dtype}
