"""Attention pruning: each attention keeps d' of its head dimensions (whole rotary pairs for queries
and keys, a weighted subspace per key/value head for values and outputs), its projections plain
(smaller) linears, its cache smaller."""

from __future__ import annotations

import copy
import logging
import json

import pytest
import torch
import transformers
from transformers import DynamicCache, StaticCache

import tiny
from helpers import run_without_hf_wsvd
from hf_wsvd import WSVDConfig, compress
from hf_wsvd.methods.attention_pruning import (AttentionGroup, attention_groups, cut_attention, cut_bias, head_spectrum,
                                              unsupported)
from hf_wsvd.cli import main
from hf_wsvd.integrations.export import densify
from hf_wsvd.runtime.modeling_wsvd import _cut_rotary, cut_heads
from hf_wsvd.solvers import LayerProblem

GEOMETRY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _data(seed: int = 0, batches: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 23, (2 * batches, 16), generator=generator)
    return [{"input_ids": ids[i:i + 2], "attention_mask": torch.ones_like(ids[i:i + 2]), "labels": ids[i:i + 2]}
            for i in range(0, 2 * batches, 2)]


def _compressed(arch: str = "llama", **config):
    dense = tiny.build(arch, **GEOMETRY)
    options = {"param_ratio": 0.7, "allocation": "uniform", "rank_multiple": 2, "attention_pruning": True, **config}
    model, report = compress(copy.deepcopy(dense), WSVDConfig(**options), _data(), show_progress=False)
    return dense, model, report


def _problems(model, layer: int = 0):
    """Problems of the four projections of ``layer``'s attention with the Grams of their inputs on
    random token sequences."""
    attention = model.model.layers[layer].self_attn
    seen = {}
    handles = [getattr(attention, f"{short}_proj").register_forward_pre_hook(
        lambda module, args, short=short: seen.setdefault(short, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for short in "qo"]
    ids = torch.randint(7, 23, (8, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    grams = {short: torch.cat(rows).double().T @ torch.cat(rows).double() / len(torch.cat(rows))
             for short, rows in seen.items()}
    return [LayerProblem(short, getattr(attention, f"{short}_proj").weight.detach().double(), 0,
                         gram=grams["o" if short == "o" else "q"]) for short in "qkvo"]


def _group(model) -> AttentionGroup:
    name = "layers.0.self_attn"
    return AttentionGroup(name, *(f"{name}.{p}_proj" for p in "qkvo"), 4, 2, 16, True)


def _apply(attention: torch.nn.Module, cut) -> None:
    for short in "qkvo":
        old = getattr(attention, f"{short}_proj")
        weight = getattr(cut, short)
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=old.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
        setattr(attention, f"{short}_proj", layer)
    cut_heads(attention, cut.head_dim, cut.rotary)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_attentions_of_llama_and_qwen2_are_found(arch):
    model = tiny.build(arch, **GEOMETRY)
    targets = {f"layers.{i}.self_attn.{p}": f"model.layers.{i}.self_attn.{p}"
               for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert attention_groups(model, targets) == [
        AttentionGroup(f"layers.{i}.self_attn", *(f"layers.{i}.self_attn.{p}_proj" for p in "qkvo"), 4, 2, 16, True)
        for i in range(2)]
    del targets["layers.1.self_attn.o_proj"]  # a projection that is not a target: the attention is left alone
    assert [g.name for g in attention_groups(model, targets)] == ["layers.0.self_attn"]


@pytest.mark.parametrize("config, reason", [
    (lambda: transformers.CohereConfig(partial_rotary_factor=1.0), "its rotary pairs are not (i, i + d/2)"),
    (lambda: transformers.StableLmConfig(partial_rotary_factor=0.5), "it rotates part of each head only"),
    (lambda: transformers.Qwen3Config(), "it normalizes queries/keys over the head dimension"),
    (lambda: transformers.LlamaConfig(), None),
])
def test_attentions_whose_rotary_layout_the_cut_cannot_keep_are_refused(config, reason):
    """Cohere rotates interleaved pairs (2i, 2i + 1) and StableLM part of each head: the kept pairs
    (i, i + d/2) would rotate other features (the cut model changed with a shift of positions), or
    the cut failed in the middle of compress."""
    settings = config()
    settings.update(dict(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, head_dim=16))
    model = transformers.AutoModelForCausalLM.from_config(settings)
    attention = model.model.layers[0].self_attn
    found = unsupported(attention)
    assert (found is None) if reason is None else (reason in found), found
    targets = {f"layers.0.self_attn.{p}": f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert len(attention_groups(model, targets)) == (reason is None)


def test_asked_to_cut_an_attention_it_cannot_the_recipe_factorizes_it_and_says_why(caplog):
    config = transformers.StableLmConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, partial_rotary_factor=0.5)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            for ids in (tiny.inputs("llama", batch=2, length=16, seed=s)["input_ids"] for s in range(2))]
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        model, report = compress(model, WSVDConfig(param_ratio=0.5, attention_pruning=True, block_refine_steps=2),
                                 data, show_progress=False)
    assert not report.attention and any(n.endswith("self_attn.q_proj") for n in report.ranks)
    assert ("attention_pruning finds no attention it can cut (StableLmAttention: it rotates part of each head only "
            "(partial_rotary_factor))") in caplog.text
    model(**data[0])  # the model still runs


def test_keeping_every_dimension_is_exact():
    model = tiny.build("llama", **GEOMETRY).double()
    attention = model.model.layers[0].self_attn
    q, k, v, o = _problems(model)
    cut = cut_attention(_group(model), q, k, v, o, 16, (1.0, 1.0, 1.0))
    x = tiny.inputs("llama")
    with torch.no_grad():
        before = model(**x).logits
        _apply(attention, cut)
        after = model(**x).logits
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)


def test_values_in_a_small_subspace_and_dead_pairs_lose_nothing():
    """Values of rank 12 per key/value head keep 12 dimensions exactly; query/key pairs that are
    zero are the ones dropped, so the logits do not change."""
    model = tiny.build("llama", **GEOMETRY).double()
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for g in range(2):  # each key/value head's values span 12 directions
            rows = attention.v_proj.weight[g * 16:(g + 1) * 16]
            basis = torch.randn(16, 12, generator=generator, dtype=torch.float64)
            rows.copy_(basis @ torch.linalg.lstsq(basis, rows).solution)
        for proj, heads in ((attention.q_proj, 4), (attention.k_proj, 2)):  # pairs 1 and 5 are dead
            view = proj.weight.view(heads, 16, -1)
            view[:, [1, 9, 5, 13]] = 0
    q, k, v, o = _problems(model)
    cut = cut_attention(_group(model), q, k, v, o, 12, (1.0, 1.0, 1.0))
    assert cut.rotary == [0, 2, 3, 4, 6, 7]
    x = tiny.inputs("llama")
    with torch.no_grad():
        before = model(**x).logits
        _apply(attention, cut)
        after = model(**x).logits
    torch.testing.assert_close(after, before, rtol=1e-8, atol=1e-8)


def test_the_spectrum_is_non_increasing_and_prices_both_halves():
    model = tiny.build("llama", **GEOMETRY).double()
    q, k, v, o = _problems(model)
    spectrum = head_spectrum(_group(model), q, k, o, (1.0, 1.0, 1.0))
    assert spectrum.shape == (16,) and torch.isfinite(spectrum).all()
    assert spectrum.tolist() == sorted(spectrum.tolist(), reverse=True)
    zero_o = LayerProblem("o", torch.zeros_like(o.weight), 0, gram=o.gram)
    assert (head_spectrum(_group(model), q, k, zero_o, (1.0, 1.0, 1.0)) <= spectrum + 1e-12).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("compensate", [True, False])
def test_asked_the_recipe_cuts_the_attentions(arch, compensate):
    dense, model, report = _compressed(arch, compensate=compensate)
    assert set(report.attention) == {"layers.0.self_attn", "layers.1.self_attn"}
    for i, layer in enumerate(model.model.layers):
        entry = report.attention[f"layers.{i}.self_attn"]
        keep = entry["head_dim"]
        assert keep < 16 and keep % 2 == 0 and len(entry["rotary"]) == keep // 2
        attention = layer.self_attn
        assert attention.head_dim == keep and type(attention.q_proj) is torch.nn.Linear
        assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features,
                attention.o_proj.in_features) == (4 * keep, 2 * keep, 2 * keep, 4 * keep)
        assert (attention.q_proj.bias is not None) == (arch == "qwen2")
    assert not report.ranks and report.dense_targets == []
    assert report.params_after == sum(p.numel() for p in model.parameters()) < report.params_before
    x = tiny.inputs(arch)
    with torch.no_grad():
        error = (model(**x).logits - dense(**x).logits).abs().max()
    assert torch.isfinite(error) and error < dense(**x).logits.abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_cut_attention_decodes_with_dynamic_and_static_caches(arch):
    _, model, report = _compressed(arch)
    sequence = torch.randint(7, 23, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(sequence).logits
        for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=16)):
            steps = [model(sequence[:, :6], past_key_values=cache, cache_position=torch.arange(6)).logits]
            steps += [model(sequence[:, t:t + 1], past_key_values=cache, cache_position=torch.tensor([t])).logits
                      for t in range(6, 12)]
            torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
            keep = report.attention["layers.0.self_attn"]["head_dim"]
            assert cache.layers[0].keys.shape[-1] == keep  # the cache shrinks with the heads


def _reloads_both_ways(model, folder, auto_class: str):
    """``model`` saved to ``folder`` and reloaded with ``auto_class``, with hf_wsvd and through
    ``trust_remote_code`` without it, each giving the same logits on tiny Qwen2 inputs; the first reload."""
    tiny.save(model, folder)
    x = tiny.inputs("qwen2")
    with torch.no_grad():
        expected = model(**x).logits
    reloaded = getattr(transformers, auto_class).from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(reloaded(**x).logits, expected)
    torch.save(x, folder / "x.pt")
    torch.save(expected, folder / "expected.pt")
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        model = transformers.{auto_class}.from_pretrained("{folder}", trust_remote_code=True)
        x, expected = torch.load("{folder}/x.pt"), torch.load("{folder}/expected.pt")
        with torch.no_grad():
            assert torch.equal(model(**x).logits, expected)
        print("remote ok")
    """, folder)
    assert "remote ok" in result.stdout, result.stderr[-3000:]
    return reloaded


def test_a_cut_checkpoint_reloads_with_and_without_hf_wsvd_and_exports_dense(tmp_path):
    _, model, _ = _compressed("qwen2")
    reloaded = _reloads_both_ways(model, tmp_path / "cut", "AutoModelForCausalLM")
    dense = densify(reloaded)
    assert type(dense) is transformers.Qwen2ForCausalLM and dense.model.layers[0].self_attn.head_dim == 16
    assert dense.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
    x = tiny.inputs("qwen2")
    with torch.no_grad():
        torch.testing.assert_close(dense(**x).logits, model(**x).logits, rtol=1e-5, atol=1e-5)


def test_a_cut_sequence_classifier_reloads_and_a_cut_lm_loads_as_a_task_model(tmp_path):
    # transformers' generic task heads build their base model through AutoModel, whose own post_init
    # cuts the attentions before the task model's does: the second pass must not refuse them.
    dense = tiny.build("qwen2", "AutoModelForSequenceClassification", **GEOMETRY)
    data = [{**batch, "labels": batch["input_ids"][:, 0] % 2} for batch in _data()]
    model, report = compress(dense, WSVDConfig(param_ratio=0.7, allocation="uniform", rank_multiple=2,
                                               attention_pruning=True), data, show_progress=False)
    assert report.attention
    _reloads_both_ways(model, tmp_path / "classifier", "AutoModelForSequenceClassification")

    _, lm, _ = _compressed("qwen2")
    tiny.save(lm, tmp_path / "lm")
    x = tiny.inputs("qwen2")
    with torch.no_grad():
        hidden = lm.model(**x).last_hidden_state
    for auto_class in (transformers.AutoModelForSequenceClassification, transformers.AutoModelForTokenClassification):
        task = auto_class.from_pretrained(tmp_path / "lm")
        with torch.no_grad():
            assert torch.equal(task.model(**x).last_hidden_state, hidden)


@pytest.mark.parametrize("edit, message", [
    (lambda recipe: recipe.pop("attention"), "wrong shape"),  # as an older hf_wsvd would
    (lambda recipe: recipe["attention"]["layers.0.self_attn"].update(rotary=[0, 1, 2, 3, 4, 5, 6][:len(
        recipe["attention"]["layers.0.self_attn"]["rotary"])]), "wsvd_rotary_index does not hold"),
    (lambda recipe: recipe["attention"]["layers.0.self_attn"].update(head_dim=3), "both even"),
    (lambda recipe: recipe["attention"]["layers.0.self_attn"].update(dense_head_dim=32), "head dimension 32"),
])
def test_an_edited_attention_record_never_loads_silently(tmp_path, edit, message):
    _, model, _ = _compressed("llama")
    tiny.save(model, tmp_path / "cut")
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    before = json.dumps(config["wsvd"]["attention"])
    edit(config["wsvd"])
    assert json.dumps(config["wsvd"].get("attention")) != before
    (tmp_path / "cut" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "cut")


def test_greedy_allocation_spends_one_budget_on_head_dimensions_and_channels():
    dense, model, report = _compressed("llama", allocation="greedy", param_ratio=0.6)
    targets = {n for n in dict(dense.model.named_modules()) if n.startswith("layers.") and n.count(".") == 3}
    before = sum(dense.model.get_submodule(n).weight.numel() for n in targets if "proj" in n)
    after = sum(model.model.get_submodule(n).weight.numel() for n in targets if "proj" in n)
    assert after <= 0.6 * before
    assert report.attention or report.pruned_mlps


def test_the_compressed_model_compiles_and_gives_the_eager_outputs():
    _, model, _ = _compressed("llama")
    x = tiny.inputs("llama")
    with torch.no_grad():
        eager = model(**x).logits
        compiled = torch.compile(model, backend="eager")(**x).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_attention_pruning_options_are_checked():
    with pytest.raises(ValueError, match="choose one of those or attention_pruning=False"):
        WSVDConfig(attention_pruning=True, method="svd")
    with pytest.raises(ValueError, match="attention_pruning='yes' must be True, False or None"):
        WSVDConfig(attention_pruning="yes")


@pytest.mark.parametrize("asked", [False, None])
def test_off_or_by_default_the_attentions_are_factorized(asked):
    _, model, report = _compressed("llama", attention_pruning=asked)
    assert not report.attention and any(n.endswith("q_proj") for n in report.ranks)
    assert model.config.wsvd["attention_pruning"] is False  # the resolved recipe says so


def test_inspect_lists_the_cut_projections(tmp_path, capsys):
    _, model, _ = _compressed("llama")
    tiny.save(model, tmp_path / "cut")
    assert main(["inspect", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    assert "layers.0.self_attn.q_proj" in out and "pruned" in out


def test_a_bert_attention_is_cut_without_rotary_and_reloads_and_exports(tmp_path):
    """BERT's attention (no rotary: queries and keys keep a subspace of their logits) in the
    whole-model pipeline: exact at full size, reloads by both paths, exports dense."""
    dense = tiny.build("bert", hidden_size=64, num_attention_heads=4, intermediate_size=128)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(7, 23, (16, 12), generator=generator)
    data = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4]),
             "labels": torch.randint(0, 2, (4,), generator=generator)} for i in range(0, 16, 4)]
    config = dict(method="fisher_whiten", allocation="uniform", attention_pruning=True, rank_multiple=2)
    with pytest.raises(ValueError, match="param_ratio=1 keeps every parameter"):  # every dimension kept: nothing to cut
        WSVDConfig(param_ratio=1.0, **config)
    model, report = compress(copy.deepcopy(dense), WSVDConfig(param_ratio=0.6, **config), data, show_progress=False)
    entry = report.attention["encoder.layer.0.attention.self"]
    assert "rotary" not in entry and entry["projections"][3] == "encoder.layer.0.attention.output.dense"
    attention = model.bert.encoder.layer[0].attention.self
    assert attention.attention_head_size == entry["head_dim"] < 16
    assert attention.query.out_features == 4 * entry["head_dim"]
    x = tiny.inputs("bert")
    with torch.no_grad():
        expected = model(**x).logits
    tiny.save(model, tmp_path / "cut")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cut")
    with torch.no_grad():
        assert torch.equal(reloaded(**x).logits, expected)
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "expected.pt")
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        model = transformers.AutoModelForSequenceClassification.from_pretrained("{tmp_path}/cut", trust_remote_code=True)
        x, expected = torch.load("{tmp_path}/x.pt"), torch.load("{tmp_path}/expected.pt")
        with torch.no_grad():
            assert torch.equal(model(**x).logits, expected)
        print("remote ok")
    """, tmp_path)
    assert "remote ok" in result.stdout, result.stderr[-3000:]
    exported = densify(reloaded)
    assert exported.bert.encoder.layer[0].attention.self.attention_head_size == 16
    with torch.no_grad():
        torch.testing.assert_close(exported(**x).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_bert_attention_at_full_size_is_exact():
    model = tiny.build("bert", hidden_size=64, num_attention_heads=4, intermediate_size=128).double()
    attention = model.bert.encoder.layer[0].attention
    seen = {}
    handles = [m.register_forward_pre_hook(lambda module, args, key=key: seen.setdefault(key, []).append(
        args[0].reshape(-1, args[0].shape[-1]))) for key, m in (("q", attention.self.query), ("o", attention.output.dense))]
    # continuous inputs: token ids of a 16-word vocabulary would leave the Grams singular
    embeds = torch.randn(8, 24, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        model(inputs_embeds=embeds)
    for handle in handles:
        handle.remove()
    grams = {k: torch.cat(v).T @ torch.cat(v) / len(torch.cat(v)) for k, v in seen.items()}
    linears = {"q": attention.self.query, "k": attention.self.key, "v": attention.self.value, "o": attention.output.dense}
    problems = [LayerProblem(r, linears[r].weight.detach().double(), 0, gram=grams["o" if r == "o" else "q"])
                for r in "qkvo"]
    group = AttentionGroup("encoder.layer.0.attention.self", *(f"q{r}" for r in "qkvo"), 4, 4, 16, False)
    cut = cut_attention(group, *problems, 16, (1.0, 1.0, 1.0))
    x = {"inputs_embeds": embeds[:2, :7]}
    with torch.no_grad():
        before = model(**x).logits
        for role, module in linears.items():
            module.weight.copy_(getattr(cut, role))
        for role in "qkv":
            linears[role].bias.copy_(cut_bias(group, cut, role, linears[role].bias))
        after = model(**x).logits
    torch.testing.assert_close(after, before, rtol=1e-8, atol=1e-8)


def test_an_attention_with_no_step_to_cut_is_factorized():
    """rank_multiple=16 at head size 16: no cut is possible, so the projections are factorized."""
    _, model, report = _compressed("llama", rank_multiple=16, param_ratio=0.5)
    assert not report.attention and any(n.endswith("self_attn.q_proj") for n in report.ranks)


def test_the_rotary_index_moves_once_to_the_tables_device():
    # A copy of the index in every step would sync each decode step and break CUDA-graph capture.
    _, model, report = _compressed("llama")
    name = next(n for n, r in report.attention.items() if r.get("rotary"))
    attention = model.get_submodule("model." + name)
    cos = torch.zeros(1, 4, attention.wsvd_dense_head_dim, device="meta")
    _, kwargs = _cut_rotary(attention, (), {"position_embeddings": (cos, cos)})
    assert attention.wsvd_rotary_index.device.type == "meta"  # the buffer itself moved
    assert kwargs["position_embeddings"][0].shape[-1] == attention.wsvd_rotary_index.numel()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device")
def test_a_cut_model_decodes_in_a_captured_cuda_graph():
    _, model, _ = _compressed("llama")
    model = model.cuda()
    sequence = torch.randint(7, 23, (1, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    step, position = sequence[:, 7:8].clone(), torch.tensor([7], device="cuda")

    def prefilled() -> StaticCache:
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(sequence[:, :7], past_key_values=cache, cache_position=torch.arange(7, device="cuda"))
        return cache

    # Each step on a cache of its own, 7 tokens in: a static cache's layers write either at
    # cache_position or where their own counter points (transformers 5.x releases differ), so no
    # step may see a slot another step wrote.
    with torch.no_grad():
        eager = model(step, past_key_values=prefilled(), cache_position=position).logits.clone()
        warm, cache = prefilled(), prefilled()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # the warm-up off the default stream that capture needs
            model(step, past_key_values=warm, cache_position=position)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(step, past_key_values=cache, cache_position=position).logits
        captured.zero_()  # the replay, not the capture, must write the logits
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=1e-4, atol=1e-4)


def test_attentions_no_wider_than_one_rank_step_are_factorized_and_said_once(caplog):
    """Head size 16 at rank_multiple 16 (as quantize=int8 resolves it) leaves nothing to cut."""
    with caplog.at_level(logging.WARNING):
        _, model, report = _compressed(rank_multiple=16, param_ratio=0.8)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention_pruning")]
    assert lines == ["attention_pruning finds no attention it can cut (every head size is at most rank_multiple=16, "
                     "which leaves no step to cut; a smaller rank_multiple cuts them) among the targets of "
                     "LlamaForCausalLM: they are factorized instead"]
    assert report.attention == {} and lines[0] in report.notices  # the report says it too
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, _, cut = _compressed()  # rank_multiple 2: cut, and nothing said
    assert cut.attention and not [r for r in caplog.records if r.getMessage().startswith("attention_pruning")]
