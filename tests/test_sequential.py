"""Sequential (block-by-block) compression of causal LMs."""

from __future__ import annotations

import copy
import re
from dataclasses import replace

import pytest
import torch
import transformers

import tiny
from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd.pipelines import sequential as sequential_module
from hf_wsvd.pipelines import step as step_module
from stats_worker import case_inputs


def _factors(model) -> dict[str, torch.Tensor]:
    return {n: m.up.weight @ m.down.weight for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


@pytest.mark.parametrize("case", ["llama_causal_lm", "gpt2_causal_lm"])
def test_full_rank_reproduces_the_logits(case, monkeypatch):
    model, loader, _, _ = case_inputs(case, 6, 3)
    arch = case.split("_")[0]
    with torch.no_grad():
        reference = model(**tiny.inputs(arch)).logits
    def full_ranks(job, shapes):
        return {n: min(s) for n, s in shapes.items()}

    monkeypatch.setattr(sequential_module, "uniform", full_ranks)
    monkeypatch.setattr(step_module, "uniform", full_ranks)
    # float64 decompositions: the tiny calibration set leaves the Gram nearly singular, and undoing
    # the whitening amplifies a float32 SVD's rounding in the directions the data never excites.
    config = WSVDConfig(method="whiten", allocation="uniform", sequential=True, compute_dtype="float64",
                        mlp_pruning=False, attention_pruning=False)
    model, report = compress(model, config, loader, show_progress=False)
    assert len(report.ranks) == len(_factors(model)) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny.inputs(arch)).logits, reference, rtol=1e-4, atol=1e-4)


def test_statistics_come_from_the_compressed_blocks():
    """Block 0 sees the same inputs either way; later blocks see the compressed model's outputs."""
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    config = WSVDConfig(method="whiten", param_ratio=0.5, allocation="uniform", sequential=False)
    whole, whole_report = compress(copy.deepcopy(model), config, loader, show_progress=False)
    seq, seq_report = compress(model, replace(config, sequential=True, compensate=False, mlp_pruning=False, attention_pruning=False), loader,
                               show_progress=False)
    assert seq_report.ranks == whole_report.ranks
    a, b = _factors(whole), _factors(seq)
    for name in a:
        same = torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5)
        assert same == (".layers.0." in name), name
    assert seq.config.wsvd["sequential"] is True
    with torch.no_grad():
        assert torch.isfinite(seq(**tiny.inputs("llama")).logits).all()


def test_uniform_ranks_are_rounded_before_the_speed_limit_as_in_whole_model_mode():
    """Rounding down can bring a layer under max_kept_ratio_for_speed: both modes must see that."""
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    options = dict(method="whiten", param_ratio=0.601, max_kept_ratio_for_speed=0.55, rank_multiple=8, allocation="uniform")
    _, whole = compress(copy.deepcopy(model), WSVDConfig(**options, sequential=False), loader, show_progress=False)
    _, seq = compress(model, WSVDConfig(**options, sequential=True, mlp_pruning=False, attention_pruning=False), loader, show_progress=False)
    assert seq.ranks == whole.ranks and whole.ranks and all(r % 8 == 0 for r in whole.ranks.values())


def test_greedy_ranks_are_planned_on_the_dense_model():
    """Sequential mode with greedy allocation keeps the ranks the dense statistics allocate."""
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    config = WSVDConfig(method="fisher_whiten", param_ratio=0.5, allocation="greedy", sequential=False)
    _, whole = compress(copy.deepcopy(model), config, loader, show_progress=False)
    seq, report = compress(model, replace(config, sequential=True, mlp_pruning=False, attention_pruning=False), loader,
                           show_progress=False)
    assert report.ranks == whole.ranks and report.dense_targets == whole.dense_targets
    # allocated by importance: one projection gets different ranks (or stays dense) in different blocks
    kept = {}
    for name in [*report.ranks, *report.dense_targets]:
        kept.setdefault(name.split(".", 2)[2], set()).add(report.ranks.get(name))
    assert any(len(ranks) > 1 for ranks in kept.values()), kept
    assert report.params_after == whole.params_after
    assert seq.config.wsvd["ranks"] == report.ranks


def test_sequential_refuses_what_it_cannot_do():
    model, loader, _, _ = case_inputs("bert_classification", 4, 2)
    with pytest.raises(ValueError, match="causal LM"):
        compress(model, WSVDConfig(method="whiten", sequential=True), loader, show_progress=False)


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_sequential_mode_refuses_other_models_and_missing_data_before_any_statistics(allocation, monkeypatch):
    def no_statistics(*args, **kwargs):
        raise AssertionError("statistics were gathered before the inputs were checked")

    monkeypatch.setattr(sequential_module, "gradient_pass", no_statistics)
    monkeypatch.setattr(sequential_module, "_stream", no_statistics)
    config = WSVDConfig(method="whiten", sequential=True, allocation=allocation)
    _, loader, _, _ = case_inputs("bert_classification", 6, 3)
    with pytest.raises(ValueError, match="sequential mode is for causal LMs; BertForSequenceClassification"):
        compress(tiny.build("bert"), config, loader, show_progress=False)
    ids = torch.randint(5, tiny.VOCAB_SIZE, (2, 6))
    with pytest.raises(ValueError, match="sequential mode is for causal LMs; T5ForConditionalGeneration"):
        compress(tiny.build("t5", "AutoModelForSeq2SeqLM"), config, [{"input_ids": ids, "labels": ids}],
                 show_progress=False)
    with pytest.raises(ValueError, match="sequential mode needs calibration data"):
        compress(tiny.build("llama", "AutoModelForCausalLM"), config, None, show_progress=False)


def _layer_output_errors(dense, compressed, loader) -> dict[str, float]:
    """Per factorized layer: ‖W·x_dense − W'·x_compressed‖² / ‖W·x_dense‖² over the calibration
    tokens, each model run on its own inputs (the error compensation minimizes)."""
    names = [n for n, m in compressed.named_modules() if isinstance(m, FactorizedLinear)]
    outputs = {"dense": {}, "compressed": {}}

    def keep(side, name):
        def hook(module, args, output):
            outputs[side].setdefault(name, []).append(output.detach())
        return hook

    handles = [dense.get_submodule(n).register_forward_hook(keep("dense", n)) for n in names]
    handles += [compressed.get_submodule(n).register_forward_hook(keep("compressed", n)) for n in names]
    with torch.no_grad():
        for batch in loader:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            dense(**inputs)
            compressed(**inputs)
    for handle in handles:
        handle.remove()
    errors = {}
    for name in names:
        target, got = torch.cat(outputs["dense"][name]), torch.cat(outputs["compressed"][name])
        errors[name] = float((target - got).square().sum() / target.square().sum())
    return errors


def test_compensation_lowers_the_layers_output_error_against_the_dense_model():
    model, loader, _, _ = case_inputs("llama_causal_lm", 24, 4)
    plain_config = WSVDConfig(method="fisher_whiten", param_ratio=0.4, allocation="uniform", sequential=True,
                              compensate=False, mlp_pruning=False, rank_multiple=1, compute_dtype="float64")
    plain, plain_report = compress(copy.deepcopy(model), plain_config, loader, show_progress=False)
    # Compensation alone: block refinement (on with it by default) would also retrain the first stage.
    compensated, report = compress(copy.deepcopy(model), WSVDConfig(**{**plain_config.to_dict(), "compensate": True,
                                                                       "compensation_ridge": 1e-3,
                                                                       "block_refine_steps": 0}),
                                   loader, show_progress=False)
    assert report.ranks == plain_report.ranks
    before, after = _layer_output_errors(model, plain, loader), _layer_output_errors(model, compensated, loader)
    # The first block's first stage (q/k/v) sees the same inputs either way: the same fit up to the ridge.
    first = [n for n in before if ".layers.0.self_attn." in n and not n.endswith("o_proj")]
    for name in first:
        assert after[name] == pytest.approx(before[name], rel=0.05, abs=1e-6), name
    # Later layers absorb the error of the layers before them: the last one most, and the total falls.
    last = list(before)[-1]
    assert after[last] < 0.9 * before[last], (before[last], after[last])
    assert sum(after.values()) < 0.95 * sum(before.values()), (before, after)
    with torch.no_grad():
        batch = {k: v for k, v in next(iter(loader)).items() if k != "labels"}
        reference = model(**batch).logits
        error_plain = (plain(**batch).logits - reference).square().mean()
        error_compensated = (compensated(**batch).logits - reference).square().mean()
    assert error_compensated < error_plain


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="fisher_whiten", sequential=False, compensate=True), "needs sequential=True"),
    (dict(method="fwsvd", sequential=True, compensate=True), "reads the activation Gram"),
    (dict(method="whiten", sequential=True, compensate=True, compensation_ridge=0.0), "compensation_ridge=0.0"),
])
def test_compensation_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WSVDConfig(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pipelines move a CPU model only to a CUDA accelerator")
@pytest.mark.parametrize("sequential", [False, True])
def test_compress_gives_the_model_back_on_the_device_it_came_on(sequential):
    """The whole-model pipeline works with the model on the accelerator, the sequential one moves
    blocks there; either way a model given on the CPU comes back on the CPU and runs on CPU inputs."""
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    config = WSVDConfig(method="whiten", param_ratio=0.6, sequential=sequential)
    model, _ = compress(model, config, loader, show_progress=False)
    assert _device_types(model) == {"cpu"}
    assert torch.isfinite(model(**tiny.inputs("llama")).logits).all()


def _device_types(model) -> set[str]:
    return {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}


def test_given_back_restores_a_model_on_one_device_even_after_an_error_and_leaves_placements_alone():
    """What compress, the statistics passes and heal rely on, checked where there is no second device:
    the move back is asked for (after an error too), and never for a model spread over two devices
    or placed by accelerate."""
    from accelerate import cpu_offload

    from hf_wsvd.blocks import given_back

    moves = []

    class Spy(torch.nn.Sequential):
        def to(self, *args, **kwargs):
            moves.append(args)
            return super().to(*args, **kwargs)

    model = Spy(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="boom"), given_back(model):
        raise RuntimeError("boom")
    assert moves == [(torch.device("cpu"),)]

    class Stuck(torch.nn.Linear):  # a move back that fails too (a CUDA error sticks): the first error wins
        def to(self, *args, **kwargs):
            raise RuntimeError("the device is gone")

    with pytest.raises(RuntimeError, match="boom"), given_back(Stuck(2, 2)):
        raise RuntimeError("boom")
    moves.clear()
    spread = Spy(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to("meta"))
    with given_back(spread):
        pass
    placed = Spy(torch.nn.Linear(2, 2))
    cpu_offload(placed, execution_device=torch.device("cpu"))
    with given_back(placed):
        pass
    assert moves == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the passes move a CPU model only to a CUDA accelerator")
def test_the_statistics_passes_and_heal_give_a_cpu_model_back_on_the_cpu():
    """Each visits the GPU: the statistics stay there, the models come back (on the first GPU run of
    the suite these all left them on the GPU)."""
    from hf_wsvd.integrations.healing import HealConfig, heal
    from hf_wsvd.statistics import FISHER, GRAM, gradient_statistics, input_statistics
    from stats_worker import target_modules
    from test_healing import _blocks, _compressed

    model, loader, _, loss_fn = case_inputs("llama_causal_lm", 6, 3)
    modules = target_modules(model)
    everything = {**modules, "lm_head": model.lm_head}  # a module outside the blocks: the whole model moves
    for stats in (input_statistics(model, loader, modules, {GRAM}, show_progress=False),
                  gradient_statistics(model, loader, everything, {FISHER}, loss_fn, show_progress=False)):
        assert _device_types(model) == {"cpu"}
        assert {t.device.type for values in stats.values.values() for t in values.values()} == {"cuda"}
    teacher, student = _compressed()
    healed, _ = heal(student, teacher, _blocks(8, seed=1), _blocks(4, seed=2), HealConfig(steps=2, batch_size=4),
                     show_progress=False)
    assert _device_types(healed) == _device_types(teacher) == {"cpu"}


@pytest.mark.parametrize("recipe", [dict(mlp_pruning=True, block_refine_steps=2, embeddings=True, embedding_method="svd"),
                                    dict(sequential=False, method="whiten")])
def test_the_model_comes_back_in_its_training_mode_and_a_frozen_one_stays_frozen(recipe):
    """The passes run in eval mode without gradients on the weights; what the caller set is restored,
    and the layers swapped in take the frozen flag of those they replace."""
    model, loader, _, _ = case_inputs("llama_causal_lm", 4, 2)
    model.train().requires_grad_(False)
    model, report = compress(model, WSVDConfig(param_ratio=0.5, **recipe), loader, show_progress=False)
    assert report.ranks and (report.pruned or not recipe.get("mlp_pruning"))
    assert model.training and all(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    model, loader, _, _ = case_inputs("llama_causal_lm", 4, 2)
    model.eval()
    model, _ = compress(model, WSVDConfig(param_ratio=0.5, **recipe), loader, show_progress=False)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    # training, with its first block frozen in eval mode: each module as it came, a new layer as the one it replaced
    model, loader, _, _ = case_inputs("llama_causal_lm", 4, 2)
    model.train().model.layers[0].eval()
    model, _ = compress(model, WSVDConfig(param_ratio=0.5, **recipe), loader, show_progress=False)
    assert model.training and all(m.training != f"{name}.".startswith("model.layers.0.")
                                  for name, m in model.named_modules() if name.startswith("model.layers."))


@pytest.mark.parametrize("recipe, message", [
    (dict(param_ratio=0.01), "param_ratio=0.01 is below the cost of rank 8 (8 channels for a pruned MLP, "
                             "attention or experts module) for every target layer"),
    (dict(param_ratio=0.01, mlp_pruning=False), "is below the cost of rank 8 for every target layer (8,192 "
                                                "parameters for a budget of 184): raise param_ratio, or lower "
                                                "rank_multiple"),
    (dict(param_ratio=0.001, mlp_pruning=False, rank_multiple=1), "budget of 18): raise param_ratio"),
    (dict(param_ratio=0.5, rank_multiple=64), "below the cost of rank 64"),
    (dict(param_ratio=0.5, rank_multiple=10**9), "no target layer has a rank that is a multiple of rank_multiple"),
    (dict(param_ratio=0.5, sequential=False, rank_multiple=64), "rank_multiple=64"),
    (dict(param_ratio=0.5, embeddings=True, embedding_method="svd", embedding_ratio=0.01),
     "embedding_ratio=0.01 gives the 64x32 embeddings a rank below rank_multiple=8"),
])
def test_what_the_shapes_alone_rule_out_is_refused_before_any_pass(recipe, message):
    from hf_wsvd.tasks import per_example_loss, task_of

    model, loader, _, _ = case_inputs("llama_causal_lm", 4, 2)
    calls = []

    def loss_fn(model, batch):
        calls.append(batch)
        return per_example_loss(task_of(model))(model, batch)

    with pytest.raises(ValueError, match=re.escape(message)):
        compress(model, WSVDConfig(method="fisher_whiten", allocation="greedy", **recipe), loader, loss_fn=loss_fn,
                 show_progress=False)
    assert calls == []


def test_uniform_ranks_rounded_down_to_zero_ask_for_more_not_less():
    model, _, _, _ = case_inputs("llama_causal_lm", 4, 2)
    with pytest.raises(ValueError) as error:
        compress(model, WSVDConfig(method="svd", allocation="uniform", param_ratio=0.02), None, show_progress=False)
    assert ("param_ratio=0.02 rounds the rank of every one of the 14 target layers down to 0 (rank_multiple=8; first: "
            "'layers.0.self_attn.q_proj'); raise param_ratio or lower rank_multiple") in str(error.value)


def test_compress_leaves_the_callers_random_streams_as_they_were():
    model, loader, _, _ = case_inputs("llama_causal_lm", 4, 2)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    compress(model, WSVDConfig(param_ratio=0.5, block_refine_steps=2), loader, show_progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("mlp_pruning", [True, False])
def test_a_run_stopped_midway_leaves_a_model_that_saves_and_reloads_as_it_is(mlp_pruning, tmp_path, caplog):
    """Ctrl-C (or an out-of-memory error) in the second block: the first block's layers stay
    replaced, recorded in the recipe, so that a save reloads exactly (not a stock model whose dense
    weights are missing from the file and load random)."""
    from transformers import AutoModelForCausalLM

    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    calls = []

    def interrupt(module, args):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        compress(model, WSVDConfig(param_ratio=0.5, mlp_pruning=mlp_pruning), loader, show_progress=False)
    handle.remove()
    replaced = {n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    recipe = model.config.wsvd
    assert replaced and {f"model.{n}" for n in recipe["ranks"]} == replaced
    assert bool(recipe["pruned"]) == mlp_pruning
    assert any("compress stopped midway" in r.getMessage() for r in caplog.records)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    inputs = tiny.inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_a_run_stopped_before_any_layer_was_replaced_leaves_the_model_as_it_was():
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    dense = copy.deepcopy(model)

    def interrupt(module, args):
        raise RuntimeError("out of memory")

    handle = model.model.layers[0].register_forward_pre_hook(interrupt)
    with pytest.raises(RuntimeError, match="out of memory"):
        compress(model, WSVDConfig(param_ratio=0.5), loader, show_progress=False)
    handle.remove()
    assert type(model) is type(dense) and not hasattr(model.config, "wsvd")
    for (name, value), expected in zip(model.state_dict().items(), dense.state_dict().values()):
        assert torch.equal(value, expected), name


def test_each_block_is_handed_its_own_mask_and_rotary_tables_as_in_the_model_s_forward():
    """Gemma 3 gives its sliding-window layers and its full-attention layers masks and rotary tables
    of their own: block 1 (full attention) must see during compression what the model's own forward
    hands it, not block 0's sliding-window mask and local rotary table."""
    config = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                                           layer_types=["sliding_attention", "full_attention"],
                                           max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    seen = []
    model.model.layers[1].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["attention_mask"], kwargs["position_embeddings"])),
        with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False)
    (stock_mask, stock_rotary), = seen
    compress(model, WSVDConfig(method="whiten", sequential=True, param_ratio=0.5), [batch], show_progress=False)
    assert len(seen) > 1
    for mask, rotary in seen[1:]:  # (on the accelerator, where compress runs the blocks)
        torch.testing.assert_close(mask, stock_mask, check_device=False) if isinstance(mask, torch.Tensor) else None
        assert (mask is None) == (stock_mask is None)
        for table, stock in zip(rotary, stock_rotary):
            torch.testing.assert_close(table, stock, check_device=False)


def test_blocks_handed_the_same_arguments_hold_no_copies(monkeypatch):
    """Llama hands every block the same mask and rotary tables: nothing per block is held or put in
    place."""
    import hf_wsvd.pipelines.sequential as sequential_module

    made = []

    class Recorded(sequential_module.BlockArguments):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(sequential_module, "BlockArguments", Recorded)
    model, loader, _, _ = case_inputs("llama_causal_lm", 4, 2)
    compress(model, WSVDConfig(method="whiten", sequential=True, param_ratio=0.5), loader, show_progress=False)
    assert made and not any(arguments.differ for arguments in made)


def test_a_model_that_keeps_state_from_its_forward_compresses_with_compensation():
    """RecurrentGemma keeps its recurrent and convolution states as plain tensors set by each forward;
    after the Fisher pass they carry autograd history, which ``copy.deepcopy`` refuses. The dense
    copies compensation and refinement make take them detached, and the model compresses."""
    config = transformers.RecurrentGemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, lru_width=32,
                                               attention_window_size=8, conv1d_width=4,
                                               block_types=["recurrent", "recurrent", "attention"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * 2
    compressed, report = compress(model, WSVDConfig(param_ratio=0.5, allocation="uniform", block_refine_steps=2), batches,
                                  show_progress=False)
    assert report.params_after < report.params_before and any(isinstance(m, FactorizedLinear) for m in compressed.modules())
    # its gates are 3-D (one block-diagonal matrix per head), which are no mixture-of-experts weights
    assert any(p.dim() == 3 for p in compressed.parameters())
    assert not any("mixture-of-experts" in notice for notice in report.notices), report.notices
    with torch.no_grad():
        assert torch.isfinite(compressed(input_ids=ids).logits).all()


def test_a_module_copy_takes_state_with_autograd_history_detached_and_leaves_the_original_alone():
    from hf_wsvd.blocks import module_copy

    module = torch.nn.Linear(3, 3)
    module.state = module(torch.ones(1, 3))  # a forward's result, kept as a plain attribute
    copied = module_copy(module)
    assert copied.state.grad_fn is None and torch.equal(copied.state, module.state)
    assert module.state.grad_fn is not None and copied.weight is not module.weight
    with pytest.raises(RuntimeError, match="graph leaves"):  # what the plain deepcopy does
        copy.deepcopy(module)


def test_batches_of_input_embeddings_compress_as_the_ids_they_embed():
    """The sequential pipeline hands the model the batch as it is (but its labels): embeddings given
    instead of ids are what the blocks read."""
    model = tiny.build("llama", "AutoModelForCausalLM", seed=0)
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(7, tiny.VOCAB_SIZE, (2, 8), generator=generator) for _ in range(2)]
    by_ids = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    with torch.no_grad():
        by_embeddings = [{"inputs_embeds": model.get_input_embeddings()(i), "attention_mask": torch.ones_like(i),
                          "labels": i} for i in ids]
    expected, report = compress(copy.deepcopy(model), WSVDConfig(param_ratio=0.6), by_ids, show_progress=False)
    got, embedded_report = compress(model, WSVDConfig(param_ratio=0.6), by_embeddings, show_progress=False)
    assert report.pipeline == "sequential" and report.ranks == embedded_report.ranks
    for (name, weight), other in zip(expected.state_dict().items(), got.state_dict().values()):
        assert torch.equal(weight, other), name
