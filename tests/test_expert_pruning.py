"""MLP pruning of mixture-of-experts experts: each expert keeps its own k channels (as many in each),
chosen on the tokens routed to it, its down slice refitted; recorded, rebuilt and checked at load."""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers import (AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from helpers import run_without_hf_wsvd
from hf_wsvd import WSVDConfig, compress
from hf_wsvd.allocation import kept_channels
from hf_wsvd.integrations.checkpoint import structure, target_counts
from hf_wsvd.methods.expert_pruning import cut_experts, find_experts, intermediate, routed_grams, select_experts
from hf_wsvd.pipelines.modifiers.mlp_pruning import EXPERTS_MULTIPLE
from hf_wsvd.runtime.modeling_wsvd import set_experts

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, num_experts_per_tok=2)
MODELS = {
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(intermediate_size=48, num_local_experts=4, **COMMON)),
    "olmoe": lambda: OlmoeForCausalLM(OlmoeConfig(intermediate_size=48, num_experts=4, **COMMON)),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=48, intermediate_size=64,
                                                            num_experts=4, head_dim=8, **COMMON)),
    # a shared expert beside the routed ones: an ordinary MLP, pruned as such
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(moe_intermediate_size=48, intermediate_size=64,
                                                            shared_expert_intermediate_size=64, num_experts=4,
                                                            **COMMON)),
}
CHANNELS = 48


def _model(kind: str = "mixtral"):
    torch.manual_seed(0)
    return MODELS[kind]().eval()


def _data(examples: int = 12, batch: int = 4):
    ids = torch.randint(5, 64, (examples, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0  # padding: left out of the statistics
    return [{"input_ids": ids[i:i + batch], "attention_mask": mask[i:i + batch], "labels": ids[i:i + batch]}
            for i in range(0, examples, batch)]


def _experts(model):
    return [layer.mlp.experts for layer in model.model.layers]


def _routed(experts, tokens: int = 256, seed: int = 2):
    """Token rows, their top-2 experts and routing weights, as a router hands them (skewed)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, experts.down_proj.shape[1], generator=generator)
    logits = torch.randn(tokens, experts.down_proj.shape[0], generator=generator) * 2
    weights, index = logits.softmax(-1).topk(2, dim=-1)
    return hidden, index, weights / weights.sum(-1, keepdim=True)


def test_at_full_width_the_cut_experts_compute_the_dense_outputs():
    experts = _experts(_model())[0]
    hidden, index, weights = _routed(experts)
    dense = experts(hidden, index, weights)
    grams = routed_grams(experts, hidden, index, weights, None) / len(hidden)
    kept, refit = select_experts(experts.down_proj.detach().double(), grams, CHANNELS, 0.1, "experts")
    cut_experts(experts, kept, refit)
    assert kept.tolist() == [list(range(CHANNELS))] * 4
    torch.testing.assert_close(experts(hidden, index, weights), dense, rtol=1e-5, atol=1e-6)


def _output_error(experts, state, hidden, index, weights) -> float:
    trial = copy.deepcopy(experts)
    set_experts(trial, state["gate_up_proj"], state["down_proj"])
    with torch.no_grad():
        return float((trial(hidden, index, weights) - experts(hidden, index, weights)).norm())


def test_the_routed_choice_and_refit_beat_the_first_and_the_largest_channels():
    experts = _experts(_model())[0]
    with torch.no_grad():  # channels of unequal scales, as trained experts have
        experts.gate_up_proj.mul_(torch.linspace(0.2, 3, CHANNELS).repeat(2)[None, :, None])
    hidden, index, weights = _routed(experts)
    grams = routed_grams(experts, hidden, index, weights, None) / len(hidden)
    down, keep = experts.down_proj.detach(), 16
    kept, refit = select_experts(down.double(), grams, keep, 1e-3, "experts")
    first = torch.arange(keep).expand(4, keep)
    largest = down.norm(dim=1).topk(keep, dim=1).indices.sort(dim=1).values

    def state(chosen, new_down):
        rows = torch.cat([chosen, chosen + CHANNELS], dim=1)
        gate_up = torch.stack([experts.gate_up_proj[e, rows[e]] for e in range(4)]).detach()
        return {"gate_up_proj": gate_up, "down_proj": new_down}

    plain = lambda chosen: torch.stack([down[e][:, chosen[e]] for e in range(4)])  # noqa: E731
    ours = _output_error(experts, state(kept, refit.float()), hidden, index, weights)
    assert ours < 0.9 * _output_error(experts, state(first, plain(first)), hidden, index, weights)
    assert ours < 0.9 * _output_error(experts, state(largest, plain(largest)), hidden, index, weights)
    # the refit alone helps on its own channels too
    assert ours < _output_error(experts, state(kept, plain(kept)), hidden, index, weights)


def test_routed_grams_weight_each_token_by_its_routing_weight_squared():
    experts = _experts(_model())[0]
    hidden, index, weights = _routed(experts, tokens=6)
    real = torch.tensor([True, True, False, True, True, True])
    grams = routed_grams(experts, hidden, index, weights, real)
    expected = torch.zeros_like(grams)
    for t in real.nonzero().flatten().tolist():
        for slot in range(2):
            h = intermediate(experts, int(index[t, slot]), hidden[t:t + 1]).double()[0]
            expected[int(index[t, slot])] += float(weights[t, slot]) ** 2 * torch.outer(h, h)
    torch.testing.assert_close(grams, expected)


def _compress(kind: str = "mixtral", **recipe):
    model, data = _model(kind), _data()
    dense = copy.deepcopy(model)
    recipe = {"param_ratio": 0.6, "rank_multiple": 1, **recipe}
    model, report = compress(model, WSVDConfig(**recipe), data, show_progress=False)
    return dense, model.eval(), report, data


def _relative_error(model, dense, data) -> float:
    with torch.no_grad():
        ids = data[1]["input_ids"]
        return float((model(ids).logits - dense(ids).logits).norm() / dense(ids).logits.norm())


@pytest.mark.parametrize("kind", ["mixtral", "olmoe", "qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("pipeline", ["sequential", "whole_model"])
def test_each_experts_module_keeps_k_channels_per_expert_within_the_budget(kind, pipeline):
    dense, model, report, data = _compress(kind, allocation="uniform", pipeline=pipeline, mlp_pruning=True,
                                           block_refine_steps=0,
                                           method="fisher_whiten" if pipeline == "sequential" else "whiten")
    keep = kept_channels(CHANNELS, 0.6, 1) // EXPERTS_MULTIPLE * EXPERTS_MULTIPLE
    assert report.experts == {f"layers.{i}.mlp.experts": {"channels": keep, "dense_channels": CHANNELS}
                              for i in range(2)}
    for experts in _experts(model):
        assert experts.gate_up_proj.shape == (4, 2 * keep, 32) and experts.down_proj.shape == (4, 32, keep)
    experts_params = sum(p.numel() for e in _experts(model) for p in e.parameters())
    assert experts_params == 2 * 3 * 4 * 32 * keep
    # the experts are in the budget: the target counts hold them, cut and dense
    after, before = target_counts(model)
    assert before - after >= 2 * 3 * 4 * 32 * (CHANNELS - keep)
    assert report.target_kept <= 0.6 + 1e-9
    assert not any("stay dense" in notice or "dense (first" in notice for notice in report.notices)
    assert "2 experts modules pruned to 48 -> 24 channels per expert" in structure(model)
    if kind == "qwen2_moe":  # its shared expert: an ordinary MLP
        assert "layers.0.mlp.shared_expert.down_proj" in report.pruned_mlps
    assert _relative_error(model, dense, data) < 1.0


def test_an_expert_no_token_reaches_adds_no_loss_to_its_module():
    """A dead expert's Gram is 0: only the ridge would price its channels, a loss the data never
    shows, which outweighed the reached experts' and kept the whole module dense."""
    from hf_wsvd.methods.expert_pruning import experts_gains

    experts = _experts(_model())[0]
    hidden, index, weights = _routed(experts)
    index[index == 3] = 0  # expert 3 reached by no token
    grams = routed_grams(experts, hidden, index, weights, None) / len(hidden)
    assert not grams[3].any() and grams[:3].diagonal(dim1=1, dim2=2).gt(0).all()
    down = experts.down_proj.detach().double()
    torch.testing.assert_close(experts_gains(down, grams, 0.1), experts_gains(down[:3], grams[:3], 0.1))


def test_experts_modules_the_budget_keeps_whole_are_recorded_and_counted():
    """The budget spans the experts: one it keeps whole is recorded with all its channels, so the
    target counts (report, card, inspect) hold what param_ratio budgeted, and the structure says it."""
    _, model, report, _ = _compress(param_ratio=0.97, method="whiten", block_refine_steps=0)
    names = {f"layers.{i}.mlp.experts" for i in range(2)}
    assert set(report.experts) == names
    whole = {n for n, e in report.experts.items() if e["channels"] == e["dense_channels"] == CHANNELS}
    assert whole, report.experts  # at 0.97 the budget leaves some module whole
    after, before = target_counts(model)
    linears = sum(p.numel() for layer in model.model.layers for p in layer.self_attn.parameters())
    assert before == linears + 2 * 3 * 4 * 32 * CHANNELS  # every experts module counted, cut or whole
    assert f"{len(whole)} experts module{'s' if len(whole) > 1 else ''} kept whole" in structure(model)


def test_uniform_allocation_cuts_experts_whose_block_leaves_its_o_proj_dense():
    """Uniform allocation prices nothing: a Fisher-weighted method needs no o_proj to cut experts."""
    _, _, report, _ = _compress(method="fisher_whiten", allocation="uniform", block_refine_steps=0,
                                exclude_modules=["o_proj"])
    assert set(report.experts) == {f"layers.{i}.mlp.experts" for i in range(2)}
    assert all(e["channels"] < e["dense_channels"] for e in report.experts.values())


def test_three_d_experts_outside_transformers_experts_modules_are_said_to_stay_dense():
    """Llama 4's experts are 3-D weights of no experts module mlp_pruning reads: said, not silent."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
        max_position_embeddings=64, pad_token_id=0, moe_layers=[0, 1], interleave_moe_layer_step=1)).eval()
    _, report = compress(model, WSVDConfig(param_ratio=0.6, method="whiten", mlp_pruning=True, block_refine_steps=0),
                         _data(), show_progress=False)
    assert any("3-D tensors of a layout mlp_pruning does not know: they stay dense" in n for n in report.notices)


@pytest.mark.parametrize("selection, cut", [({"exclude_modules": ["experts"]}, set()),
                                            ({"exclude_modules": r"layers\.0\.mlp\.experts"}, {"layers.1.mlp.experts"}),
                                            ({"target_modules": ["q_proj", "o_proj"]}, set()),
                                            ({"target_modules": ["o_proj", "experts"]}, {f"layers.{i}.mlp.experts"
                                                                                        for i in range(2)})])
def test_target_and_exclude_modules_choose_the_experts_modules_too(selection, cut):
    """An experts module is no target layer, but the names that choose the layers choose it too: an
    exclusion that names only experts is no typo."""
    _, model, report, _ = _compress(method="whiten", block_refine_steps=0, **selection)
    assert {n for n, e in report.experts.items() if e["channels"] < e["dense_channels"]} == cut
    for index, layer in enumerate(model.model.layers):
        assert (layer.mlp.experts.down_proj.shape[2] < CHANNELS) == (f"layers.{index}.mlp.experts" in cut)


def test_the_recommended_recipe_prices_the_experts_with_the_other_layers():
    dense, model, report, data = _compress(param_ratio=0.5)  # fisher_whiten, greedy, sequential, compensation
    assert report.pipeline == "sequential" and report.allocation == "greedy" and report.compensated
    kept = {name: entry["channels"] for name, entry in report.experts.items()}
    assert kept and all(0 < k < CHANNELS and k % EXPERTS_MULTIPLE == 0 for k in kept.values())
    assert report.target_kept <= 0.5 + 1e-9
    assert _relative_error(model, dense, data) < 0.5


def test_block_refinement_trains_the_cut_experts_with_the_blocks_other_layers():
    """The cut experts are among the layers block refinement trains: the first block (whose inputs
    refinement does not change) keeps the same channels with other weights, its router as it was,
    and its recorded error falls."""
    dense, plain, _, data = _compress(allocation="uniform", block_refine_steps=0)
    _, refined, report, _ = _compress(allocation="uniform", block_refine_steps=8)
    before, after = report.refined["0"]
    assert after < before
    ours, theirs = refined.model.layers[0].mlp, plain.model.layers[0].mlp
    for name in ("gate_up_proj", "down_proj"):
        assert getattr(ours.experts, name).shape == getattr(theirs.experts, name).shape
        assert not torch.equal(getattr(ours.experts, name), getattr(theirs.experts, name)), name
        # trainable (or frozen) as the model's weights were before
        assert getattr(ours.experts, name).requires_grad == getattr(theirs.experts, name).requires_grad
    torch.testing.assert_close(ours.gate.weight, dense.model.layers[0].mlp.gate.weight, rtol=0, atol=0)
    assert _relative_error(refined, dense, data) < _relative_error(plain, dense, data)


@pytest.mark.parametrize("recipe", [dict(target_modules=["experts"]),  # the recommended recipe: sequential, greedy
                                    dict(exclude_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),  # every linear layer
                                    dict(target_modules=r".*mlp\.experts", method="whiten", pipeline="whole_model",
                                         mlp_pruning=True)])
def test_target_modules_naming_only_experts_cuts_them_alone(tmp_path, recipe):
    """Experts modules named alone: MLP pruning cuts them, every linear layer stays as it was, and
    the checkpoint reloads. In the compensated walk the dense stream still passes each block's dense
    experts (block refinement starts from a real error and lowers it)."""
    dense, model, report, data = _compress(**recipe)
    assert not report.ranks and not report.pruned
    assert all(e["channels"] < e["dense_channels"] for e in report.experts.values()) and len(report.experts) == 2
    kept = dict(model.named_parameters())
    for name, weight in dense.named_parameters():
        if "experts" not in name:
            assert torch.equal(kept[name], weight), name
    assert all(0 < after < before for before, after in report.refined.values())
    assert _relative_error(model, dense, data) < 0.05
    model.save_pretrained(tmp_path)
    ids = data[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits, model(ids).logits)


def test_experts_named_alone_and_partly_excluded_cut_the_others():
    _, model, report, _ = _compress(target_modules=["experts"], exclude_modules=["layers.0.mlp.experts"],
                                    block_refine_steps=0)
    assert {n for n, e in report.experts.items() if e["channels"] < e["dense_channels"]} == {"layers.1.mlp.experts"}
    assert model.model.layers[0].mlp.experts.down_proj.shape[2] == CHANNELS


@pytest.mark.parametrize("recipe, message", [
    (dict(target_modules=["experts"], mlp_pruning=False, method="whiten"),
     "target_modules=['experts'] leaves only mixture-of-experts modules, which mlp_pruning cuts: set mlp_pruning=True"),
    (dict(exclude_modules=["q_proj", "k_proj", "v_proj", "o_proj"], mlp_pruning=False, method="whiten"),
     "exclude_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'] excludes every target layer of MixtralForCausalLM: "
     "nothing is left to compress"),
    (dict(target_modules=["experts"], mlp_pruning=True, method="whiten", exclude_modules=["layers.0.mlp.experts",
                                                                                         "layers.1.mlp.experts"]),
     "excludes every layer target_modules=['experts'] selects: nothing is left to compress"),
])
def test_experts_named_alone_that_cannot_be_cut_are_refused(recipe, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _compress(**recipe)


def test_cut_experts_save_and_reload_with_hf_wsvd_and_with_the_saved_code(tmp_path):
    _, model, report, data = _compress(allocation="uniform", block_refine_steps=0)
    model.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())["wsvd"]
    assert recorded["experts"] == report.experts and recorded["recipe_version"] == 5
    ids = data[0]["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
        back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(back(ids).logits, expected)
    assert back.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    result = run_without_hf_wsvd(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            assert torch.equal(model(expected["ids"]).logits, expected["logits"])
        print(type(model).__name__, tuple(model.model.layers[0].mlp.experts.down_proj.shape))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    keep = report.experts["layers.0.mlp.experts"]["channels"]
    assert result.stdout.split() == ["WsvdMixtralForCausalLM", f"(4,", "32,", f"{keep})"]


@pytest.mark.parametrize("mlp_pruning", [True, False])
def test_a_model_loaded_from_the_hub_layout_saves_what_its_checkpoint_class_reloads(tmp_path, mlp_pruning):
    """A Hub Mixtral stores each expert's weights on their own (w1/w2/w3), which transformers fuses
    at load and would write back so at save; the compressed checkpoint keeps the layout it holds,
    which its class (no conversion of its own) reloads, experts cut or not."""
    _model().save_pretrained(tmp_path / "dense")
    stored = load_file(tmp_path / "dense" / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in stored  # the Hub's layout, fused at load
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    data = _data()
    model, report = compress(dense, WSVDConfig(param_ratio=0.7, method="whiten", mlp_pruning=mlp_pruning,
                                               block_refine_steps=0), data, show_progress=False)
    assert bool(report.experts) == mlp_pruning
    model.save_pretrained(tmp_path / "compressed")
    assert "model.layers.0.mlp.experts.down_proj" in load_file(tmp_path / "compressed" / "model.safetensors")
    ids = data[0]["input_ids"]
    with torch.no_grad():
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed").eval()
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_a_checkpoint_saved_in_the_hub_s_per_expert_layout_is_refused_in_one_line(tmp_path):
    """Before recipe_version 5, a compressed model loaded from the Hub saved its experts one weight
    each, which the checkpoint class never fuses: said, not a missing-tensor puzzle."""
    _, model, _, _ = _compress(mlp_pruning=False, block_refine_steps=0)
    model.save_pretrained(tmp_path)
    per_expert = {}
    for key, tensor in load_file(tmp_path / "model.safetensors").items():
        if key.endswith("experts.down_proj"):
            per_expert.update({key.replace("mlp.experts.down_proj", f"block_sparse_moe.experts.{e}.w2.weight"): w
                               for e, w in enumerate(tensor)})
        elif key.endswith("experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            for e in range(len(tensor)):
                stem = key.replace("mlp.experts.gate_up_proj", f"block_sparse_moe.experts.{e}")
                per_expert.update({f"{stem}.w1.weight": gate[e], f"{stem}.w3.weight": up[e]})
        else:
            per_expert[key] = tensor
    save_file({k: v.contiguous() for k, v in per_expert.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="stores each expert's weights on their own .*compress the dense model again"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    _, model, _, _ = _compress(allocation="uniform", block_refine_steps=0)
    folder = tmp_path_factory.mktemp("cut_experts")
    model.save_pretrained(folder)
    return folder


def _copy(saved, tmp_path):
    for path in saved.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path


def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config["wsvd"])
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["experts"]["layers.0.mlp.experts"].update(channels=16), r"'model\.layers\.0\.mlp\.experts\.\w+' has "
     r"the wrong shape .*: \(4, (32, 24|48, 32)\) in the file, \(4, (32, 16|32, 32)\) in the model"),
    (lambda r: r["experts"]["layers.0.mlp.experts"].update(dense_channels=64), r"records experts of 64 intermediate "
     r"channels, but MixtralExperts there has 48"),
    (lambda r: r["experts"]["layers.0.mlp.experts"].update(channels=0), r"'channels': k, 'dense_channels': n"),
    (lambda r: r["experts"].update({"layers.0.mlp.gate": r["experts"]["layers.0.mlp.experts"]}),
     r"names a module whose experts cannot be cut \(MixtralTopKRouter is no experts module\)"),
    (lambda r: r["experts"].pop("layers.1.mlp.experts"), r"'model\.layers\.1\.mlp\.experts\.\w+' has the wrong shape"),
])
def test_a_hand_edited_experts_record_is_refused_in_one_line(saved, tmp_path, edit, message):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(ValueError, match=message) as error:
        AutoModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("model.layers.0.mlp.experts.down_proj"), r"'model\.layers\.0\.mlp\.experts\.down_proj' is "
     r"missing from the checkpoint's weights"),
    (lambda t: t.update({"model.layers.1.mlp.experts.gate_up_proj": t["model.layers.1.mlp.experts.gate_up_proj"][:, :8]}),
     r"'model\.layers\.1\.mlp\.experts\.gate_up_proj' has the wrong shape .*: \(4, 8, 32\) in the file"),
])
def test_a_missing_or_truncated_expert_tensor_is_refused_in_one_line(saved, tmp_path, damage, message):
    folder = _copy(saved, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    damage(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message) as error:
        AutoModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(error.value)


def test_a_checkpoint_without_the_experts_key_loads_as_before(tmp_path):
    """A recipe of before experts pruning (version 4, no 'experts'): its experts were dense."""
    _, model, report, data = _compress(mlp_pruning=False, block_refine_steps=0)
    assert not report.experts and any("which only mlp_pruning cuts: they stay dense" in n for n in report.notices)
    model.save_pretrained(tmp_path)

    def older(recipe):
        del recipe["experts"]
        recipe["recipe_version"] = 4
    _edit_config(tmp_path, older)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(data[0]["input_ids"]).logits, model(data[0]["input_ids"]).logits)
    assert back.model.layers[0].mlp.experts.down_proj.shape == (4, 32, CHANNELS)


class OwnGateExperts(MixtralExperts):
    """Experts whose class defines its gate (GPT-OSS clamps it): what the cut assumes may not hold."""

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def test_an_unsupported_experts_layout_is_left_dense_with_its_notice(caplog):
    model, data = _model(), _data()
    model.model.layers[0].mlp.experts.__class__ = OwnGateExperts  # a layout it does not cut
    with caplog.at_level(logging.WARNING):
        model, report = compress(model, WSVDConfig(param_ratio=0.6, rank_multiple=1, allocation="uniform"), data,
                                 show_progress=False)
    assert list(report.experts) == ["layers.1.mlp.experts"]
    assert model.model.layers[0].mlp.experts.down_proj.shape == (4, 32, CHANNELS)
    notice = next(n for n in report.notices if "leaves the experts of" in n)
    assert "model.layers.0.mlp.experts: OwnGateExperts has a gate of its own (_apply_gate)" in notice


def test_an_experts_forward_computing_otherwise_is_left_dense():
    model = _model()
    experts = model.model.layers[1].mlp.experts
    forward = experts.forward
    experts.forward = lambda *args: 2 * forward(*args)  # e.g. a scale of its own
    found, refused = find_experts(model)
    assert list(found) == ["layers.0.mlp.experts"]
    assert refused == ["model.layers.1.mlp.experts: MixtralExperts's forward computes other than the routed "
                       "act(gate)*up -> down experts"]


def test_a_dense_export_of_cut_experts_is_refused(saved):
    from hf_wsvd.integrations.export import densify

    with pytest.raises(ValueError, match="experts were cut by mlp_pruning, which a dense export does not support"):
        densify(AutoModelForCausalLM.from_pretrained(saved))


def _jamba():
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(0)
    return JambaForCausalLM(JambaConfig(intermediate_size=CHANNELS, num_experts=4, attn_layer_period=2,
                                        attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                                        mamba_d_state=4, mamba_dt_rank=4, use_mamba_kernels=False, **COMMON)).eval()


def test_a_layer_the_model_never_calls_is_named_by_the_compensated_walk_too():
    """Jamba's Mamba reads dt_proj's weight itself: uniform allocation plans no pass over the blocks,
    so the compensated walk's paired run is the first to miss it, and names it (no AttributeError)."""
    recipe = dict(param_ratio=0.6, rank_multiple=1, method="whiten", allocation="uniform", mlp_pruning=True,
                  block_refine_steps=0)
    with pytest.raises(ValueError, match=r"reached \['layers\.0\.mamba\.dt_proj'\] \(1 target layers of this "
                                         r"block\): .*exclude_modules=\['dt_proj'\] \(--exclude-modules dt_proj\)$"):
        compress(_jamba(), WSVDConfig(**recipe), _data(), show_progress=False)
    _, report = compress(_jamba(), WSVDConfig(**recipe, exclude_modules=["dt_proj"]), _data(), show_progress=False)
    assert report.compensated and not any("dt_proj" in name for name in report.ranks)
    assert {n: e["channels"] < e["dense_channels"] for n, e in report.experts.items()} == {
        f"layers.{i}.feed_forward.experts": True for i in range(2)}


def test_a_hybrid_block_without_o_proj_prices_its_experts_through_its_out_proj():
    """LFM2's blocks write the residual stream through a short convolution's or an attention's
    out_proj (Qwen3-Next's, MiniMax's linear attention, Granite-4's Mamba too): no o_proj to price the
    experts by, which left them dense under a Fisher-weighted greedy allocation."""
    from transformers import Lfm2MoeConfig, Lfm2MoeForCausalLM

    torch.manual_seed(0)
    model = Lfm2MoeForCausalLM(Lfm2MoeConfig(moe_intermediate_size=CHANNELS, num_experts=4, num_dense_layers=0,
                                             layer_types=["conv", "full_attention"], **COMMON)).eval()
    _, report = compress(model, WSVDConfig(param_ratio=0.6, rank_multiple=1, block_refine_steps=0), _data(),
                         show_progress=False)
    assert report.allocation == "greedy" and report.method == "fisher_whiten"
    assert set(report.experts) == {f"layers.{i}.feed_forward.experts" for i in range(2)}
    assert not any("dense (first" in notice for notice in report.notices)


def test_blocks_handing_each_other_more_than_hidden_states_are_refused_by_the_sequential_walk_in_one_line():
    """Zaya's blocks return (hidden states, router states), the next block's input: the walk's stand-in
    for a block returns the hidden states alone, which the model's loop failed to unpack."""
    from transformers import ZayaConfig, ZayaForCausalLM

    torch.manual_seed(0)
    model = ZayaForCausalLM(ZayaConfig(moe_intermediate_size=CHANNELS, num_experts=4, head_dim=8,
                                       **{**COMMON, "num_experts_per_tok": 1})).eval()
    recipe = dict(param_ratio=0.6, rank_multiple=1, method="whiten", allocation="uniform", mlp_pruning=True,
                  block_refine_steps=0)
    with pytest.raises(ValueError, match=r"^the sequential pipeline cannot walk ZayaForCausalLM's blocks: .*use "
                                         r"pipeline='whole_model'$"):
        compress(copy.deepcopy(model), WSVDConfig(**recipe), _data(), show_progress=False)
    _, report = compress(model, WSVDConfig(**recipe, pipeline="whole_model"), _data(), show_progress=False)
    assert all(e["channels"] < e["dense_channels"] for e in report.experts.values()) and len(report.experts) == 2
