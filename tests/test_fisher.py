"""gradient_statistics (per-entry Fisher): equal to brute-force per-example autograd, leaves the model as it found it, and
gives the same result in two processes as in one."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import transformers
from torch.utils.data import DataLoader

from stats_worker import (
    fisher_of,
    CASES,
    DISTRIBUTED_CASES,
    DISTRIBUTED_EXAMPLES,
    SINGLE_BATCH_EXAMPLES,
    build_model,
    case_inputs,
    make_examples,
    make_loader,
    target_modules,
)
from hf_wsvd.statistics import default_accelerator
from hf_wsvd.runtime.factorized_linear import linear_shape
from hf_wsvd.tasks import per_example_loss, task_of

EXPECTED_TASK = {
    "bert_classification": "classification",
    "bert_regression": "regression",
    "llama_causal_lm": "causal_lm",
    "gpt2_causal_lm": "causal_lm",
}


def is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"


def brute_force_fisher(model, examples, modules, loss_fn) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient of each weight, one example per backward pass,
    in nn.Linear layout (out × in)."""
    model.eval()
    sums = {name: torch.zeros(linear_shape(m)[::-1], dtype=torch.float64) for name, m in modules.items()}
    for example in examples:
        batch = {key: value[None] for key, value in example.items()}
        model.zero_grad()
        loss_fn(model, batch).sum().backward()
        for name, module in modules.items():
            grad = module.weight.grad.double()
            sums[name] += (grad.t() if is_conv1d(module) else grad) ** 2
    model.zero_grad()
    return {name: total / len(examples) for name, total in sums.items()}


def max_relative_difference(actual: dict, expected: dict) -> float:
    """max |a − e| / max |e| over the modules."""
    return max(
        ((actual[name].double() - expected[name].double()).abs().max() / expected[name].double().abs().max()).item()
        for name in expected
    )


@pytest.mark.parametrize("case", list(CASES))
def test_matches_per_example_autograd_and_restores_model(case):
    model = build_model(case, torch.float64)
    task = task_of(model)
    assert task == EXPECTED_TASK[case]
    modules = target_modules(model)
    assert modules
    if case.startswith("gpt2"):
        # Conv1D stores (in, out); a non-square one checks the Fisher's out × in layout.
        assert all(is_conv1d(m) for m in modules.values())
        assert any(m.weight.shape[0] != m.weight.shape[1] for m in modules.values())
    examples = make_examples(task, 5)
    loss_fn = per_example_loss(task)

    # compute_fisher must evaluate in eval mode (these models have dropout, except Llama), and put
    # back training mode, requires_grad flags (some frozen here) and the weights afterwards.
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)
    next(iter(modules.values())).weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert not all(flags.values()) and any(flags.values())

    result, examples_seen = fisher_of(model, make_loader(examples, 2), modules, loss_fn)

    assert examples_seen == 5
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
    for module in [*modules.values(), model.get_input_embeddings()]:
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert set(result) == set(modules)

    model.requires_grad_(True)
    expected = brute_force_fisher(model, examples, modules, loss_fn)
    for name, module in modules.items():
        fisher = result[name]
        in_features, out_features = linear_shape(module)
        assert fisher.shape == (out_features, in_features)
        # computed on the accelerator and left there (the model, on the CPU, stays there)
        assert fisher.dtype == torch.float32 and fisher.device.type == default_accelerator().device.type
        assert expected[name].abs().max() > 0, name
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(fisher.double().cpu(), expected[name], rtol=1e-4, atol=1e-6 * scale, msg=name)

    # Eval mode is put back too.
    fisher_of(model, make_loader(examples, 3), modules, loss_fn)
    assert not any(m.training for m in model.modules())


def _seq2seq_loss(model, batch):
    """Each example's mean token loss of an encoder-decoder model (labels of -100 not predicted)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100,
                                              reduction="none")
    return token.sum(1) / (batch["labels"] != -100).sum(1)


def _bert2bert():
    """A BERT → BERT ``EncoderDecoderModel``: the decoder's token table is its own."""
    import transformers

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=64)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.BertConfig(**common), transformers.BertConfig(is_decoder=True, add_cross_attention=True, **common))
    config.decoder_start_token_id, config.pad_token_id = 2, 0
    torch.manual_seed(0)
    return transformers.EncoderDecoderModel(config=config)


@pytest.mark.parametrize("arch, where", [("t5", "everywhere"), ("t5", "decoder"), ("bert2bert", "everywhere")])
def test_an_encoder_decoder_model_gets_the_fisher_of_a_loss_given_for_it(arch, where):
    """T5's encoder and decoder each look the tokens up through a module of their own sharing the
    table (BERT → BERT: a table of its own), and the decoder's cross-attention reads the encoder's
    output: every layer's Fisher (decoder targets alone too) equals per-example autograd."""
    import tiny

    model = (tiny.build("t5", "AutoModelForSeq2SeqLM") if arch == "t5" else _bert2bert()).double()
    modules = {name: module for name, module in target_modules(model).items()
               if where == "everywhere" or name.startswith("decoder.")}
    examples = make_examples("causal_lm", 5)
    for example in examples:
        example["labels"] = example["labels"][:4]  # a target shorter than the input, padded by -100
    result, examples_seen = fisher_of(model, make_loader(examples, 2), modules, _seq2seq_loss)
    assert examples_seen == 5 and set(result) == set(modules)
    model.requires_grad_(True)
    expected = brute_force_fisher(model, examples, modules, _seq2seq_loss)
    for name in modules:
        assert expected[name].abs().max() > 0, name
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(result[name].double().cpu(), expected[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_batching_does_not_change_the_fisher():
    model, _, modules, loss_fn = case_inputs("llama_causal_lm", 5, 2)
    examples = make_examples("causal_lm", 5)
    by_two, two = fisher_of(model, make_loader(examples, 2), modules, loss_fn)
    by_one, one = fisher_of(model, make_loader(examples, 1), modules, loss_fn)
    assert two == one == 5
    assert max_relative_difference(by_two, by_one) < 1e-5
    # A different subset of the data gives a different Fisher: the comparison can fail.
    by_three, three = fisher_of(model, make_loader(examples[:3], 2), modules, loss_fn)
    assert three == 3
    assert max_relative_difference(by_three, by_one) > 1e-3


@pytest.mark.parametrize("case", ["bert_classification", "llama_causal_lm"])
def test_data_that_gives_the_loss_no_target_raises(case):
    """Labels all ignored (-100): every Fisher would be 0 and the allocation a matter of ties."""
    model, _, modules, loss_fn = case_inputs(case, 4, 2)
    examples = make_examples(task_of(model), 4)
    for example in examples:
        example["labels"] = torch.full_like(torch.as_tensor(example["labels"]), -100)
    with pytest.raises(ValueError, match="Fisher information of all .* layers is zero: none of the 4 examples"):
        fisher_of(model, make_loader(examples, 2), modules, loss_fn)


def test_empty_dataloader_raises():
    model, _, modules, loss_fn = case_inputs("bert_classification", 1, 1)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="empty"):
        fisher_of(model, DataLoader([], batch_size=2), modules, loss_fn)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks for m in modules.values())


def test_two_processes_equal_one(two_process_results, one_process_result):
    ranks = two_process_results
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 for r in ranks) and one_process_result["num_processes"] == 1
    for case in DISTRIBUTED_CASES:
        # The shards are uneven (4 + 3 examples) and together hold every example once.
        assert sorted(r[f"{case}/local_examples"] for r in ranks) == [3, 4]
        single, examples = one_process_result[case]["fisher"], one_process_result[case]["num_examples"]
        assert examples == DISTRIBUTED_EXAMPLES
        for r in ranks:
            assert r[case]["num_examples"] == DISTRIBUTED_EXAMPLES
            assert set(r[case]["fisher"]) == set(single)
            difference = max_relative_difference(r[case]["fisher"], single)
            print(f"{case} rank {r['rank']}: max relative difference 1 vs 2 processes {difference:.3g}")
            assert difference < 1e-5, (case, difference)


def test_two_processes_one_batch(two_process_results, one_process_result):
    """One process gets no batch; it still joins the reduction with zeros."""
    ranks = two_process_results
    assert sorted(r["single_batch/local_examples"] for r in ranks) == [0, SINGLE_BATCH_EXAMPLES]
    single = one_process_result["single_batch"]["fisher"]
    for r in ranks:
        assert r["single_batch"]["num_examples"] == SINGLE_BATCH_EXAMPLES
        assert max_relative_difference(r["single_batch"]["fisher"], single) < 1e-5


def test_two_processes_ignore_an_accelerator_that_evens_out_batches(two_process_results, one_process_result):
    """An Accelerator built with even_batches=True (accelerate's default) would repeat examples to even
    out the last batch: its setting is not used, and every example counts once."""
    case = DISTRIBUTED_CASES[0]
    single = one_process_result[case]["fisher"]
    for r in two_process_results:
        assert r["even_batches_accelerator"] == {"num_processes": 2, "even_batches": True}
        assert r["even_batches"]["num_examples"] == DISTRIBUTED_EXAMPLES
        assert max_relative_difference(r["even_batches"]["fisher"], single) < 1e-5


def test_a_pass_that_fails_in_one_process_ends_in_every_process(two_process_results, one_process_result):
    """A bad example in one process's share: that process raises its own error, the other one says
    that a process failed, instead of waiting in the reduction of the sums until the timeout."""
    own = {"fisher": "ValueError: the importance loss is NaN or infinite for importance batch 1",
           "activations": "IndexError: index out of range", "token_counts": "ValueError: token id 64 of the data",
           "capture": "ValueError: block 0 failed in this process",
           "block_statistics": "ValueError: block 0 failed in this process"}
    desc = {"fisher": "Fisher", "activations": "activations", "token_counts": "token counts", "capture": "capture",
            "block_statistics": "block statistics"}
    bad, good = sorted(two_process_results, key=lambda r: r["rank"], reverse=True)  # rank 1 holds example 3
    for name, message in own.items():
        if name not in ("capture", "block_statistics"):  # those fail in process 1 only, whatever the data
            assert one_process_result["one_failing"][name].startswith(message)
        assert bad["one_failing"][name].startswith(message), bad["one_failing"]
        assert good["one_failing"][name] == f"OtherProcessFailed: the {desc[name]} pass failed in 1 other process(es); their error says why"


def test_processes_that_disagree_are_refused_in_every_process_before_any_pass(two_process_results, one_process_result):
    """Another recipe or another model in one process: said in both, instead of collectives that no
    longer match waiting until the timeout. One process alone runs both."""
    assert one_process_result["disagreeing"] == {"recipe": None, "model": None}
    for result in two_process_results:
        assert result["disagreeing"]["recipe"].startswith("the processes of this run differ in their recipe (process 1 "
                                                          "against process 0)")
        assert result["disagreeing"]["model"].startswith("the processes of this run differ in their model's weights")
        assert result["generator_error"] == "several processes split a torch DataLoader among them; got a generator"
    assert one_process_result["generator_error"] is None


@pytest.mark.parametrize("returned, message", [(None, "loss_fn returned None"),
                                               (torch.ones(2), "loss_fn returned a tensor without gradient")])
def test_a_loss_fn_that_returns_no_loss_of_the_model_is_named(returned, message):
    model, _, modules, _ = case_inputs("bert_classification", 4, 2)
    with pytest.raises(ValueError, match=message):
        fisher_of(model, make_loader(make_examples(task_of(model), 4), 2), modules, lambda model, batch: returned)


@pytest.mark.parametrize("reduce, shape", [(lambda losses: losses.mean(), "()"), (lambda losses: losses[:1], "(1,)"),
                                           (lambda losses: losses[None], "(1, 2)"),
                                           (lambda losses: losses[:, None].expand(2, 3), "(2, 3)")])
def test_a_loss_fn_that_returns_other_than_one_loss_per_example_is_refused(reduce, shape):
    """A batch mean would scale the Fisher by 1/batch², fewer losses would drop examples, per-token
    losses (or logits) summed would reweigh them: all silently. One loss per example passes, as a row
    or a column, and so does a batch of one's scalar."""
    model, _, modules, _ = case_inputs("bert_classification", 4, 2)
    loader = make_loader(make_examples(task_of(model), 4), 2)

    def loss_fn(model, batch):
        return reduce(per_example_loss(task_of(model))(model, batch))

    with pytest.raises(ValueError, match=re.escape(f"loss_fn returned a tensor of shape {shape} for importance batch 0 "
                                                   "of 2 examples: it must return one loss per example")):
        fisher_of(model, loader, modules, loss_fn)
    reference = fisher_of(model, loader, modules, per_example_loss(task_of(model)))[0]
    loss = per_example_loss(task_of(model))
    rows = fisher_of(model, loader, modules, lambda model, batch: loss(model, batch)[:, None])[0]
    alone = fisher_of(model, make_loader(make_examples(task_of(model), 4), 1), modules,
                      lambda model, batch: loss(model, batch)[0])[0]
    for name in modules:
        torch.testing.assert_close(rows[name], reference[name])
        torch.testing.assert_close(alone[name], reference[name], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_loss_that_is_not_finite_for_one_example_is_named_by_batch(bad):
    model, _, modules, _ = case_inputs("bert_classification", 4, 2)

    def loss_fn(model, batch):  # the second batch's first example goes bad
        losses = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.sum(dim=-1)
        calls.append(1)
        return torch.cat([losses[:1] * bad, losses[1:]]) if len(calls) == 2 else losses

    calls = []
    with pytest.raises(ValueError, match=r"the importance loss is NaN or infinite for importance batch 1 \(of this "
                                         r"process\): check that batch's labels"):
        fisher_of(model, make_loader(make_examples(task_of(model), 4), 2), modules, loss_fn)


def test_target_layers_the_forward_pass_does_not_use_are_named_with_what_to_do():
    """LED's global-attention projections run only with a global_attention_mask: the recipe's Fisher pass
    named them in a RuntimeError the CLI did not report in one line."""
    import hf_wsvd
    import tiny

    model = tiny.build("llama")
    for layer in model.model.layers:
        layer.unused = torch.nn.Linear(32, 32)  # a linear of every block that the forward never calls
    batch = tiny.inputs("llama", batch=2, length=8)
    with pytest.raises(ValueError, match=re.escape("no gradient reached ['layers.0.unused', 'layers.1.unused'] (2 "
                                                   "target layers): the forward pass does not call them; ")
                       + r".*leave them out: exclude_modules=\['unused'\] \(--exclude-modules unused\)$"):
        hf_wsvd.compress(model, hf_wsvd.WSVDConfig(method="fisher_whiten", sequential=False, param_ratio=0.5),
                         [{**batch, "labels": batch["input_ids"]}], show_progress=False)


@pytest.mark.parametrize("method", ["fisher_whiten", "whiten"])
def test_a_layer_whose_weight_the_model_reads_itself_is_named_with_the_exclusion_that_compresses_the_rest(method):
    """Mamba multiplies by dt_proj.weight without calling dt_proj: no factorized layer can stand in for it."""
    import hf_wsvd

    config = transformers.MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2,
                                      intermediate_size=64, time_step_rank=8)
    model = transformers.MambaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    # the sequential pipeline (whiten's default) names the first block's; the whole-model passes all
    with pytest.raises(ValueError, match=r"reached \['layers\.0\.mixer\.dt_proj'(, 'layers\.1\.mixer\.dt_proj'\] \(2 "
                                         r"target layers|\] \(1 target layers of this block)\): .*"
                                         r"exclude_modules=\['dt_proj'\] \(--exclude-modules dt_proj\)$"):
        hf_wsvd.compress(copy.deepcopy(model), hf_wsvd.WSVDConfig(method=method, param_ratio=0.6), data,
                         show_progress=False)
    compressed, report = hf_wsvd.compress(model, hf_wsvd.WSVDConfig(method=method, param_ratio=0.6,
                                                                    exclude_modules=["dt_proj"]), data, show_progress=False)
    assert report.ranks and not any("dt_proj" in name for name in report.ranks)
    assert torch.isfinite(compressed(input_ids=ids).logits).all()
