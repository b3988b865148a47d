"""MLP pruning: each MLP keeps its most useful intermediate channels, the consumer refitted on them."""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest
import torch
import transformers

import tiny
from helpers import run_without_hf_wsvd
from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd.allocation import kept_channels
from hf_wsvd.cli import main
from hf_wsvd.integrations.export import densify
from hf_wsvd.integrations.healing import HealConfig, heal
from hf_wsvd.methods.mlp_pruning import ORDER_STEPS, MlpPair, _channel_order, channel_spectrum, find_pairs, select_channels
from hf_wsvd.statistics import GRAM, default_accelerator, input_statistics
from stats_worker import case_inputs


def _gram_and_cross(channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gram = channels.T @ channels / len(channels)
    return gram, gram


def test_pairs_are_found_by_layout_and_matching_sizes():
    shapes = {"layers.0.mlp.gate_proj": (8, 20), "layers.0.mlp.up_proj": (8, 20), "layers.0.mlp.down_proj": (20, 8),
              "layers.0.fc1": (8, 16), "layers.0.fc2": (16, 8),
              "layers.1.mlp.up_proj": (8, 20), "layers.1.mlp.down_proj": (20, 8),  # no gate_proj: not a pair
              "layers.2.mlp.gate_proj": (8, 12), "layers.2.mlp.up_proj": (8, 20),  # sizes differ
              "layers.2.mlp.down_proj": (20, 8), "layers.0.self_attn.o_proj": (8, 8)}
    assert find_pairs(shapes) == [MlpPair(("layers.0.fc1",), "layers.0.fc2", 16),
                                  MlpPair(("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"), "layers.0.mlp.down_proj", 20)]


@pytest.mark.parametrize("channels, ratio, multiple, kept", [(64, 0.8, 1, 51), (64, 0.8, 8, 48), (64, 0.01, 8, 8),
                                                             (6, 0.5, 8, 6)])
def test_kept_channels_round_down_to_the_multiple_within_the_mlp(channels, ratio, multiple, kept):
    assert kept_channels(channels, ratio, multiple) == kept


def test_the_refit_carries_a_removed_channels_contribution():
    """Channel 3 is channel 0 + channel 1: keeping three channels that span the four loses nothing
    once the consumer is refitted."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    channels = torch.cat([base, base[:, :1] + base[:, 1:2]], dim=1)
    weight = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    kept, refit = select_channels(weight, *_gram_and_cross(channels), keep=3, ridge=1e-9)
    assert 2 in kept.tolist()  # the only channel carrying base[:, 2]
    torch.testing.assert_close(channels[:, kept] @ refit.T, channels @ weight.T, rtol=1e-6, atol=1e-6)
    # Dropping channels without the refit leaves the removed channel's part out.
    assert (channels[:, kept] @ weight[:, kept].T - channels @ weight.T).abs().max() > 0.1


def test_dead_channels_go_first_and_rank_deficient_statistics_stay_finite():
    generator = torch.Generator().manual_seed(1)
    channels = torch.zeros(50, 6, dtype=torch.float64)
    channels[:, [1, 4]] = torch.randn(50, 2, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    kept, refit = select_channels(weight, *_gram_and_cross(channels), keep=2, ridge=0.1)
    assert kept.tolist() == [1, 4] and torch.isfinite(refit).all()
    kept, refit = select_channels(weight, torch.zeros(6, 6), None, keep=3, ridge=0.1)  # no signal at all
    largest = weight.square().sum(dim=0).topk(3).indices.sort().values  # the consumer's largest columns, kept as is
    assert kept.tolist() == largest.tolist()
    torch.testing.assert_close(refit, weight[:, largest], rtol=1e-12, atol=0)


def _swiglu_channels(seed: int = 0, tokens: int = 3000, hidden: int = 24, channels: int = 96):
    """SwiGLU activations of random data and a consumer whose columns differ widely in size."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    gate, up = (torch.randn(channels, hidden, generator=generator, dtype=torch.float64) / hidden ** 0.5 for _ in "gu")
    h = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    scale = torch.logspace(0, 1.5, channels, dtype=torch.float64)[torch.randperm(channels, generator=generator)]
    return h, torch.randn(hidden, channels, generator=generator, dtype=torch.float64) * scale


def test_the_channel_spectrum_predicts_the_output_error_of_the_kept_channels():
    """What greedy allocation reads (the tail of the channel spectrum) is the refitted MLP's error."""
    h, weight = _swiglu_channels()
    gram = h.T @ h / len(h)
    energy = channel_spectrum(weight, gram, ridge=1e-9).square()
    assert energy.tolist() == sorted(energy.tolist(), reverse=True)
    total = torch.trace(weight @ gram @ weight.T)
    assert float(energy.sum()) == pytest.approx(float(total), rel=1e-3)
    for keep in (24, 48, 72):
        kept, refit = select_channels(weight, gram, None, keep, ridge=1e-9)
        error = (h @ weight.T - h[:, kept] @ refit.T).square().sum(dim=1).mean()
        assert float(energy[keep:].sum()) == pytest.approx(float(error), rel=0.02, abs=1e-6 * float(total)), keep


def _reference_order(weight: torch.Tensor, gram: torch.Tensor, lam: float) -> list[int]:
    """The greedy channel order as its docstring states it, on the whole n × n residual every step."""
    size = len(gram)
    residual = gram + lam * torch.eye(size, dtype=torch.float64)
    projected = weight @ residual
    free, block, order = torch.ones(size, dtype=torch.bool), -(-size // ORDER_STEPS), []
    while len(order) < size:
        score = projected.square().sum(dim=0) / residual.diagonal()
        score[~free] = -torch.inf
        chosen = torch.sort(score, descending=True, stable=True).indices[:min(block, size - len(order))]
        update = torch.linalg.solve(residual[chosen][:, chosen], residual[chosen])
        residual = residual - residual[:, chosen] @ update
        projected = projected - projected[:, chosen] @ update
        free[chosen] = False
        order += chosen.tolist()
    return order


def test_the_channel_order_takes_several_channels_a_step_as_the_whole_residual_would():
    """Above ORDER_STEPS channels each step takes several; the order, computed on the channels still
    free only, is the one the whole residual gives, ties to the lower channel."""
    h, weight = _swiglu_channels(channels=2 * ORDER_STEPS + 89)  # 601 channels: 3 a step, 1 the last
    gram = h.T @ h / len(h)
    lam = 1e-3 * float(gram.diagonal().mean())
    order, gains = _channel_order(weight, gram.clone(), lam, gains=True)
    assert sorted(order.tolist()) == list(range(len(gram)))
    assert order.tolist() == _reference_order(weight, gram, lam)
    # Each channel's gain is its column of the Cholesky factor of C + λI in that order, read by W.
    factor = torch.linalg.cholesky(gram[order[:, None], order] + lam * torch.eye(len(gram), dtype=torch.float64))
    expected = (weight[:, order] @ factor).square().sum(dim=0)
    torch.testing.assert_close(gains, expected, rtol=1e-10, atol=1e-12 * float(expected.max()))
    # Every channel dead and read alike: all tied at every step, taken in channel order.
    tied, none = _channel_order(torch.ones(4, 601, dtype=torch.float64), torch.zeros(601, 601, dtype=torch.float64), 0.1)
    assert tied.tolist() == list(range(601)) and none is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_channel_order_on_cuda_is_the_whole_residual_order():
    """The in-place updates of strided blocks, the swaps and the gains, on the GPU (cuBLAS, CUDA
    indexing and factorizations)."""
    h, weight = _swiglu_channels(channels=2 * ORDER_STEPS + 89)
    gram = h.T @ h / len(h)
    lam = 1e-3 * float(gram.diagonal().mean())
    order, gains = _channel_order(weight.cuda(), gram.cuda(), lam, gains=True)
    assert order.device.type == "cuda" and order.tolist() == _reference_order(weight, gram, lam)
    _, expected = _channel_order(weight, gram.clone(), lam, gains=True)  # the CPU's (checked above)
    torch.testing.assert_close(gains.cpu(), expected, rtol=1e-10, atol=1e-12 * float(expected.max()))


def test_the_consumers_weights_choose_the_channels():
    """Of two equally active, independent channel sets, the one the consumer reads is kept."""
    h, weight = _swiglu_channels(channels=32)
    weight[:, :16] *= 1e-3
    kept, _ = select_channels(weight, h.T @ h / len(h), None, 16, ridge=1e-3)
    assert kept.tolist() == list(range(16, 32))


def _pruned_model(compensate: bool = True, ratio: float = 0.6, allocation: str = "uniform"):
    model, loader, _, _ = case_inputs("llama_causal_lm", 12, 4)
    # Pruning alone: block refinement would train the kept rows away from the dense ones.
    config = WSVDConfig(method="fisher_whiten", param_ratio=ratio, sequential=True, compensate=compensate,
                        rank_multiple=1, mlp_pruning=True, allocation=allocation, block_refine_steps=0,
                        attention_pruning=False)
    dense = copy.deepcopy(model)
    model, report = compress(model, config, loader, show_progress=False)
    return dense, model, report, loader


@pytest.mark.parametrize("compensate", [True, False])
def test_mlps_are_cut_to_param_ratio_of_their_channels_and_attention_is_factorized(compensate):
    dense, model, report, _ = _pruned_model(compensate)
    keep = kept_channels(64, 0.6, 1)
    for layer in model.model.layers:
        assert (layer.mlp.gate_proj.out_features, layer.mlp.up_proj.out_features, layer.mlp.down_proj.in_features) \
            == (keep, keep, keep)
        assert isinstance(layer.self_attn.q_proj, FactorizedLinear)
    assert set(report.pruned) == {f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    assert report.pruned["layers.0.mlp.down_proj"] == {"shape": [keep, 32], "dense_shape": [64, 32]}
    assert not set(report.ranks) & set(report.pruned) and report.dense_targets == []
    assert report.params_after == sum(p.numel() for p in model.parameters()) < report.params_before
    # Producers keep their rows: the kept channels of the first MLP compute what they did.
    first, reference = model.model.layers[0].mlp, dense.model.layers[0].mlp
    rows = [(first.gate_proj.weight[i] == reference.gate_proj.weight).all(dim=1).nonzero().item()
            for i in range(keep)]
    assert rows == sorted(rows) and len(set(rows)) == keep


def test_the_pipeline_installs_what_select_channels_chooses_on_the_whole_models_gram():
    """The ``mlp_pruning`` modifier in the whole-model pipeline, against the maths called by hand:
    the producers keep the rows ``select_channels`` chooses on the consumer's input Gram, the
    consumer its refitted weight, to the bit."""
    model, loader, _, _ = case_inputs("llama_causal_lm", 12, 4)
    # where the pipeline computes (the CPU here): the maths by hand there too, to the bit
    dense = copy.deepcopy(model).to(default_accelerator().device)
    config = WSVDConfig(method="whiten", param_ratio=0.6, pipeline="whole_model", rank_multiple=1, mlp_pruning=True,
                        allocation="uniform", compute_dtype="float64")
    model, report = compress(model, config, loader, show_progress=False)
    keep = kept_channels(64, 0.6, 1)
    for index in range(2):
        mlp, reference = model.model.layers[index].mlp, dense.model.layers[index].mlp
        gram = input_statistics(dense, loader, {"down": reference.down_proj}, {GRAM}, show_progress=False).get("down", GRAM)
        kept, refit = select_channels(reference.down_proj.weight.double(), gram, None, keep, config.compensation_ridge)
        assert torch.equal(mlp.gate_proj.weight, reference.gate_proj.weight[kept].cpu())
        assert torch.equal(mlp.up_proj.weight, reference.up_proj.weight[kept].cpu())
        assert torch.equal(mlp.down_proj.weight, refit.float().cpu())
    assert len(report.pruned) == 6


def test_greedy_allocation_spends_one_budget_on_ranks_and_channels():
    dense, model, report, _ = _pruned_model(allocation="greedy", ratio=0.5)
    targets = [*report.ranks, *report.pruned]
    before = {n: m.weight.numel() for n, m in dense.model.named_modules() if n in targets}
    after = {n: sum(p.numel() for p in m.parameters()) for n, m in model.model.named_modules() if n in targets}
    assert sum(after.values()) <= 0.5 * sum(before.values())
    kept = {n: e["shape"][0] for n, e in report.pruned.items() if n.endswith("down_proj")}
    assert kept and all(0 < k < 64 for k in kept.values())


def test_an_mlp_below_one_step_of_rank_multiple_stays_whole():
    _, loader, _, _ = case_inputs("llama_causal_lm", 8, 4)
    model = tiny.build("llama", intermediate_size=6)  # 6 channels: not one step of rank_multiple=8
    config = WSVDConfig(method="fisher_whiten", param_ratio=0.6, sequential=True, mlp_pruning=True, rank_multiple=8,
                        attention_pruning=False)
    model, report = compress(model, config, loader, show_progress=False)
    assert not report.pruned and report.ranks
    assert model.model.layers[0].mlp.down_proj.in_features == 6


def test_uniform_pruning_ignores_the_factorization_speed_limit():
    """max_kept_ratio_for_speed keeps slow factorized layers dense; it says nothing of pruned MLPs."""
    model, loader, _, _ = case_inputs("llama_causal_lm", 8, 4)
    config = WSVDConfig(method="fisher_whiten", param_ratio=0.8, allocation="uniform", sequential=True,
                        mlp_pruning=True, rank_multiple=1, max_kept_ratio_for_speed=0.5, attention_pruning=False)
    _, report = compress(model, config, loader, show_progress=False)
    assert len(report.pruned_mlps) == 2 and not report.ranks


def test_pruning_beats_dropping_channels_without_the_refit():
    dense, model, _, loader = _pruned_model()
    batch = {k: v for k, v in next(iter(loader)).items() if k != "labels"}
    crude = copy.deepcopy(model)
    for pruned, original in zip(crude.model.layers, dense.model.layers):  # the same channels, the dense consumer
        rows = [(pruned.mlp.gate_proj.weight[i] == original.mlp.gate_proj.weight).all(dim=1).nonzero().item()
                for i in range(pruned.mlp.gate_proj.out_features)]
        pruned.mlp.down_proj.weight.data = original.mlp.down_proj.weight[:, rows].clone()
    with torch.no_grad():
        reference = dense(**batch).logits
        refitted = (model(**batch).logits - reference).square().mean()
        dropped = (crude(**batch).logits - reference).square().mean()
    assert refitted < dropped


def test_a_pruned_checkpoint_reloads_with_and_without_hf_wsvd_and_exports_dense(tmp_path):
    _, model, report, _ = _pruned_model()
    inputs = tiny.inputs("llama")
    with torch.no_grad():
        reference = model(**inputs).logits
    tiny.save(model, tmp_path / "pruned")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, reference, rtol=1e-5, atol=1e-5)
    assert reloaded.config.wsvd["pruned"] == report.pruned
    densify(reloaded)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert reloaded.config.intermediate_size == kept_channels(64, 0.6, 1)
    reloaded.save_pretrained(tmp_path / "dense")
    torch.save({"inputs": inputs, "reference": reference}, tmp_path / "ref.pt")
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        saved = torch.load("{tmp_path}/ref.pt")
        for folder, remote in (("pruned", True), ("dense", False)):
            model = transformers.AutoModelForCausalLM.from_pretrained("{tmp_path}/" + folder, trust_remote_code=remote)
            with torch.no_grad():
                diff = (model(**saved["inputs"]).logits - saved["reference"]).abs().max().item()
            assert diff <= 1e-5, (folder, diff)
            print(folder, "ok", model.model.layers[0].mlp.down_proj.in_features)
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    keep = kept_channels(64, 0.6, 1)
    assert result.stdout.split() == ["pruned", "ok", str(keep), "dense", "ok", str(keep)]


def _edit_pruned(folder, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config["wsvd"]["pruned"])
    path.write_text(json.dumps(config))


def test_a_deleted_pruned_record_fails_even_with_ignore_mismatched_sizes(tmp_path):
    _, model, _, _ = _pruned_model()
    tiny.save(model, tmp_path)
    _edit_pruned(tmp_path, lambda p: p.pop("layers.1.mlp.down_proj"))
    with pytest.raises(ValueError, match="wrong shape"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.pop("layers.1.mlp.down_proj"), "has the wrong shape|mismatch|size"),
    (lambda p: p["layers.0.mlp.up_proj"].update(shape=[32, 70]), "shape <= dense_shape"),
    (lambda p: p.update({"layers.0.mlp.nothing": {"shape": [2, 2], "dense_shape": [2, 2]}}), "no module"),
    (lambda p: p["layers.0.mlp.gate_proj"].update(dense_shape=[32, 48]), "records a linear"),
])
def test_a_hand_edited_pruned_record_never_loads_silently(tmp_path, edit, message):
    _, model, _, _ = _pruned_model()
    tiny.save(model, tmp_path)
    _edit_pruned(tmp_path, edit)
    with pytest.raises((ValueError, RuntimeError), match=message):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_dense_export_refuses_mlps_of_different_sizes():
    _, model, _, _ = _pruned_model()
    layer = model.model.layers[1].mlp
    layer.gate_proj = torch.nn.Linear(32, 64, bias=False)  # as if this MLP had stayed whole
    layer.up_proj = torch.nn.Linear(32, 64, bias=False)
    layer.down_proj = torch.nn.Linear(64, 32, bias=False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        model.config.wsvd["pruned"].pop(f"layers.1.mlp.{name}")
    with pytest.raises(ValueError, match="every MLP pruned to the same size"):
        densify(model)


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_healing_trains_the_pruned_linears_and_keeps_their_shapes(lora_rank):
    dense, model, _, _ = _pruned_model()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(len(tiny.SPECIALS), tiny.VOCAB_SIZE, (12, 10), generator=generator)
    blocks = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    pruned = [n for n in shapes if ".mlp." in n]
    healed, report = heal(model, dense, blocks[:8], blocks[8:],
                          HealConfig(steps=3, learning_rate=1e-2, batch_size=4, lora_rank=lora_rank), show_progress=False)
    assert {n: tuple(p.shape) for n, p in healed.named_parameters()} == shapes  # LoRA merged, shapes kept
    compressed = sum(shapes[n][0] * shapes[n][1] for n in shapes if ".mlp." in n or ".up." in n or ".down." in n)
    if lora_rank is None:
        assert report.trainable_parameters == compressed
    else:  # adapters on every pruned linear and factor: r·(in + out) each
        layers = [n for n in shapes if ".mlp." in n or ".up." in n or ".down." in n]
        assert report.trainable_parameters == sum(lora_rank * sum(shapes[n]) for n in layers)
    assert pruned


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="asvd", sequential=True, compensate=False, mlp_pruning=True), "only whiten and fisher_whiten"),
    (dict(mlp_pruning="yes"), "mlp_pruning='yes'"),
])
def test_mlp_pruning_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WSVDConfig(**kwargs)


def test_the_cli_prints_and_inspect_shows_the_pruned_mlps(tmp_path, capsys):
    tiny.save(tiny.build("llama"), tmp_path / "dense")
    words = tiny.WORDS
    (tmp_path / "text.txt").write_text("\n".join(" ".join(words[(i * 3 + j) % len(words)] for j in range(9))
                                                 for i in range(30)))
    code = main(["compress", str(tmp_path / "dense"), str(tmp_path / "out"), "--param-ratio", "0.5",
                 "--data", str(tmp_path / "text.txt"), "--num-samples", "8", "--max-length", "8", "--batch-size", "4",
                 "--rank-multiple", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert re.search(r"\d+ layers factorized, 2 MLPs pruned to 64 -> \d+(-\d+)? channels", printed), printed
    assert main(["inspect", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "layers.0.mlp.down_proj" in table and "pruned" in table


def test_a_consumer_that_cannot_be_refitted_is_named_in_the_error():
    generator = torch.Generator().manual_seed(2)
    channels = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    weight[0, 2] = float("inf")  # a hand-edited checkpoint
    with pytest.raises(FloatingPointError, match=r"^the refitted 'layers.1.mlp.down_proj' is not finite: .*"
                                                 r"compensation_ridge$"):
        select_channels(weight, *_gram_and_cross(channels), keep=3, ridge=0.1, name="layers.1.mlp.down_proj")


def test_mlp_pruning_says_once_when_it_finds_no_mlp_it_can_cut(caplog):
    """GPT-2's MLP (Conv1D c_fc -> c_proj) is no layout MLP pruning knows: factorized, and said."""
    from stats_worker import case_inputs

    model, loader, _, _ = case_inputs("gpt2_causal_lm", 4, 2)
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        model, report = compress(model, WSVDConfig(method="whiten", param_ratio=0.6, mlp_pruning=True,
                                                   block_refine_steps=0), loader, show_progress=False)
    assert not report.pruned and any(".mlp.c_fc" in name for name in report.ranks)
    said = [r.message for r in caplog.records if "mlp_pruning finds no layers" in r.message]
    assert said == ["mlp_pruning finds no layers of a layout it knows among the targets of GPT2LMHeadModel: they "
                    "are factorized instead"]
    assert said[0] in report.notices


def test_an_mlp_whose_channels_are_read_together_is_not_pruned():
    """BitNet normalizes the intermediate channels (ffn_sub_norm), Gemma 3n thresholds them by their
    mean and spread (activation sparsity): dropping channels would change the kept ones, so these
    MLPs are factorized instead; StableLM's q/k layer norms and BitNet's attn_sub_norm keep their
    attentions whole the same way."""
    import transformers

    from hf_wsvd.methods.attention_pruning import unsupported
    from hf_wsvd.methods.mlp_pruning import element_wise, find_pairs
    from hf_wsvd.runtime.factorized_linear import linear_shape as shape_of
    from hf_wsvd.targets import select_targets

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    bitnet = transformers.AutoModelForCausalLM.from_config(transformers.BitNetConfig(**common)).eval()
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    compressed, report = compress(bitnet, WSVDConfig(param_ratio=0.6), [{"input_ids": ids, "labels": ids}],
                                  show_progress=False)
    assert report.pruned == {} and torch.isfinite(compressed(input_ids=ids).logits).all()
    torch.manual_seed(0)
    dense_bitnet = transformers.AutoModelForCausalLM.from_config(transformers.BitNetConfig(**common))
    assert "attn_sub_norm" in unsupported(dense_bitnet.model.layers[0].self_attn)

    llama = tiny.build("llama", "AutoModelForCausalLM")
    targets = select_targets(llama)
    pairs = find_pairs({name: shape_of(llama.get_submodule(full)) for name, full in targets.items()})
    assert pairs and all(element_wise(llama, targets, pair) for pair in pairs)
    llama.model.layers[0].mlp.activation_sparsity = 0.95
    assert [element_wise(llama, targets, pair) for pair in pairs] == [False, True]

    stablelm = transformers.AutoModelForCausalLM.from_config(
        transformers.StableLmConfig(**common, qk_layernorm=True, partial_rotary_factor=1.0))
    assert "q_layernorm" in unsupported(stablelm.model.layers[0].self_attn)


def test_an_opt_model_with_its_mlps_pruned_to_one_size_exports_dense():
    """OPT calls its MLPs' width ffn_dim: the dense export sets it, as intermediate_size elsewhere."""
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    compressed, report = compress(model, WSVDConfig(method="whiten", param_ratio=0.6, mlp_pruning=True,
                                                    allocation="uniform", sequential=True, rank_multiple=1),
                                  [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}],
                                  show_progress=False)
    kept = compressed.model.decoder.layers[0].fc2.in_features
    assert report.pruned and kept < 64
    with torch.no_grad():
        reference = compressed(input_ids=ids).logits
    densify(compressed)
    assert type(compressed).__name__ == "OPTForCausalLM" and compressed.config.ffn_dim == kept
    with torch.no_grad():
        torch.testing.assert_close(compressed(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5)
