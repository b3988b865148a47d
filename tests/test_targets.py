"""select_targets on tiny BERT (nn.Linear), GPT-2 (Conv1D, tied head) and Llama (GQA, tied head)."""

from __future__ import annotations

import re

import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

import tiny
from hf_wsvd.runtime.factorized_linear import FactorizedLinear, linear_shape
from hf_wsvd.argtypes import names
from hf_wsvd.targets import select_targets

BERT_LINEARS = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
GPT2_LINEARS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
LLAMA_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


@pytest.fixture(scope="module")
def bert():
    return tiny.build("bert", "AutoModelForSequenceClassification")


@pytest.fixture(scope="module")
def gpt2():
    return tiny.build("gpt2", "AutoModelForCausalLM")


@pytest.fixture(scope="module")
def llama():
    return tiny.build("llama", "AutoModelForCausalLM")


def _bert_names(suffixes=BERT_LINEARS, layers=(0, 1)):
    return {f"encoder.layer.{i}.{s}" for i in layers for s in suffixes}


# --------------------------------------------------------------------------- defaults


def test_bert_defaults_are_the_six_block_linears(bert):
    targets = select_targets(bert)
    assert set(targets) == _bert_names()
    assert len(targets) == 12
    for name, full_name in targets.items():
        assert not name.startswith("bert.")
        assert full_name == "bert." + name
        assert type(bert.get_submodule(full_name)) is nn.Linear
    # Heads and the pooler are outside the blocks: never selected by default.
    selected = set(targets) | set(targets.values())
    for head in ("classifier", "pooler.dense", "bert.pooler.dense"):
        assert head not in selected
    assert not any("pooler" in n or "classifier" in n for n in selected)
    # ... although they are linears the model has.
    assert isinstance(bert.classifier, nn.Linear)
    assert isinstance(bert.bert.pooler.dense, nn.Linear)


def test_bert_bare_model_gives_the_same_names(bert):
    bare = tiny.build("bert", "AutoModel")
    targets = select_targets(bare)
    assert set(targets) == set(select_targets(bert))
    assert all(full == name for name, full in targets.items())


def test_gpt2_defaults_are_the_conv1d_layers_not_the_tied_head(gpt2):
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # the head really is tied
    targets = select_targets(gpt2)
    assert set(targets) == {f"h.{i}.{s}" for i in (0, 1) for s in GPT2_LINEARS}
    for name, full_name in targets.items():
        assert full_name == "transformer." + name
        assert isinstance(gpt2.get_submodule(full_name), Conv1D)
    assert "lm_head" not in targets and "lm_head" not in targets.values()
    assert linear_shape(gpt2.get_submodule(targets["h.0.attn.c_attn"])) == (32, 96)
    assert linear_shape(gpt2.get_submodule(targets["h.0.mlp.c_proj"])) == (128, 32)


def test_llama_defaults_include_gqa_projections_not_the_head(llama):
    targets = select_targets(llama)
    assert set(targets) == {f"layers.{i}.{s}" for i in (0, 1) for s in LLAMA_LINEARS}
    for name, full_name in targets.items():
        assert full_name == "model." + name
    assert "lm_head" not in targets and "lm_head" not in targets.values()
    for i in (0, 1):
        for proj in ("k_proj", "v_proj"):
            module = llama.get_submodule(targets[f"layers.{i}.self_attn.{proj}"])
            assert linear_shape(module) == (32, 16)  # in=32, out=16 (2 KV heads of 8)
        assert linear_shape(llama.get_submodule(targets[f"layers.{i}.self_attn.q_proj"])) == (32, 32)


@pytest.mark.parametrize("model_name, embedding", [("gpt2", "wte"), ("llama", "embed_tokens")])
def test_naming_a_tied_head_raises(model_name, embedding, request):
    model = request.getfixturevalue(model_name)
    with pytest.raises(ValueError, match=rf"'lm_head', which is one with '[\w.]*{embedding}'"):
        select_targets(model, ["lm_head"])


def test_one_linear_in_two_places_stays_dense_and_shared_and_naming_it_raises():
    """A module reachable under two names is one layer: factorized under its first name it would leave
    the other place holding the dense original, the two no longer one."""
    model = tiny.build("llama", "AutoModelForCausalLM")
    shared = model.model.layers[0].mlp.up_proj
    model.model.layers[1].mlp.up_proj = shared
    targets = select_targets(model)
    assert "layers.0.mlp.up_proj" not in targets and "layers.1.mlp.up_proj" not in targets
    assert "layers.0.mlp.gate_proj" in targets
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.up_proj', which is one with 'layers\.1\.mlp\.up_proj'"):
        select_targets(model, ["up_proj"])


def test_the_layers_of_a_block_held_twice_are_targets_once():
    """Zamba shares one block between places: a layer inside it has one place (the block's), and a
    swap there reaches every place the block is."""
    model = tiny.build("llama", "AutoModelForCausalLM")
    model.model.layers[1] = model.model.layers[0]
    targets = select_targets(model)
    assert {n for n in targets if n.startswith("layers.0.")} == {f"layers.0.{n}" for n in LLAMA_LINEARS}
    assert not any(n.startswith("layers.1.") for n in targets)


def test_already_factorized_layers_are_skipped():
    model = tiny.build("bert", "AutoModelForSequenceClassification")
    full = "bert.encoder.layer.0.attention.self.query"
    model.set_submodule(full, FactorizedLinear(32, 32, 4))
    targets = select_targets(model)
    assert "encoder.layer.0.attention.self.query" not in targets
    assert set(targets) == _bert_names() - {"encoder.layer.0.attention.self.query"}
    assert not any(name.endswith((".up", ".down")) for name in targets)


# --------------------------------------------------------------------------- explicit targets


def test_list_targets_match_by_suffix(bert):
    targets = select_targets(bert, ["query", "value"])
    assert set(targets) == _bert_names(["attention.self.query", "attention.self.value"])
    assert all(full == "bert." + name for name, full in targets.items())


def test_list_suffixes_match_whole_name_components(bert):
    targets = select_targets(bert, ["output.dense"])
    assert set(targets) == _bert_names(["attention.output.dense", "output.dense"])
    with pytest.raises(ValueError, match="uery"):
        select_targets(bert, ["uery"])


def test_list_target_by_full_relative_name(bert):
    targets = select_targets(bert, ["encoder.layer.1.intermediate.dense"])
    assert targets == {"encoder.layer.1.intermediate.dense": "bert.encoder.layer.1.intermediate.dense"}


def test_regex_target(bert):
    targets = select_targets(bert, r".*\.attention\.self\.(query|key)")
    assert set(targets) == _bert_names(["attention.self.query", "attention.self.key"])


def test_regex_is_matched_against_the_whole_name(bert):
    # "query" alone fully matches no name; a regex is not a suffix.
    with pytest.raises(ValueError):
        select_targets(bert, r"query")


def test_regex_sweeping_non_linear_modules_keeps_only_linears(bert):
    targets = select_targets(bert, r"encoder\.layer\.0\..*")
    assert set(targets) == _bert_names(layers=(0,))


def test_explicit_targets_can_reach_outside_the_blocks(bert):
    targets = select_targets(bert, ["classifier", "pooler.dense"])
    assert targets == {"classifier": "classifier", "pooler.dense": "bert.pooler.dense"}


def test_exclude_modules_list(bert):
    targets = select_targets(bert, exclude_modules=["intermediate.dense", "key"])
    assert set(targets) == _bert_names() - _bert_names(["intermediate.dense", "attention.self.key"])


def test_exclude_modules_regex(bert):
    targets = select_targets(bert, exclude_modules=r"encoder\.layer\.1\..*")
    assert set(targets) == _bert_names(layers=(0,))


def test_exclude_with_explicit_targets(bert):
    targets = select_targets(bert, ["query", "value"], exclude_modules=["value"])
    assert set(targets) == _bert_names(["attention.self.query"])


def test_excluding_every_explicit_target_names_the_exclusion(bert):
    """Not "matches no linear layer": the targets did match, and the exclusion removed them all."""
    with pytest.raises(ValueError, match=re.escape("exclude_modules=['query'] excludes every layer "
                                                   "target_modules=['query'] selects")):
        select_targets(bert, ["query"], exclude_modules=["query"])


def test_listing_a_layernorm_raises(bert):
    with pytest.raises(ValueError, match="LayerNorm"):
        select_targets(bert, ["attention.output.LayerNorm"])
    with pytest.raises(ValueError, match="LayerNorm"):
        select_targets(bert, ["query", "output.LayerNorm"])


@pytest.mark.parametrize("pattern", [["nonexistent"], r".*\.nonexistent", ["quer"]])
def test_targets_matching_nothing_raise_naming_the_pattern(bert, pattern):
    with pytest.raises(ValueError) as info:
        select_targets(bert, pattern)
    assert repr(pattern) in str(info.value)


def test_default_selection_never_raises_on_an_empty_exclusion(bert):
    # Excluding everything by default selects nothing without an error (no explicit targets).
    assert select_targets(bert, exclude_modules=r".*") == {}


def test_compressing_with_every_target_excluded_names_the_exclusion(bert):
    """compress then has nothing to do, and says that the exclusion is why (not that the model has no linears)."""
    from hf_wsvd import WSVDConfig, compress

    with pytest.raises(ValueError, match=r"exclude_modules='\.\*' excludes every target layer of BertForSequenceClassification"):
        compress(bert, WSVDConfig(method="svd", param_ratio=0.5, exclude_modules=".*"), show_progress=False)


@pytest.mark.parametrize("pattern", [["quer"], ["q_proj"], r"encoder\.layer\.9\..*"])
def test_an_exclusion_matching_no_target_raises_naming_the_pattern(bert, pattern):
    """A typo in an exclusion would otherwise compress the layers it meant to keep."""
    with pytest.raises(ValueError, match=re.escape(f"exclude_modules={pattern!r} matches none of the 12 target")):
        select_targets(bert, exclude_modules=pattern)


@pytest.mark.parametrize("text, parsed", [
    ("query,value", ["query", "value"]), ("layers.0.mlp.down_proj", ["layers.0.mlp.down_proj"]), ("q_proj", ["q_proj"]),
    (r"encoder\.layer\.1\..*", r"encoder\.layer\.1\..*"), (".*_proj", ".*_proj"), ("(query|value)", "(query|value)"),
])
def test_the_command_line_reads_names_or_one_regex(text, parsed):
    assert names(text) == parsed
    assert set(select_targets(tiny.build("bert"), exclude_modules=names(r"encoder\.layer\.1\..*"))) == \
        _bert_names(layers=(0,))


@pytest.mark.parametrize("command", [["compress", "m", "out"], ["eval", "m", "--data", "d.tsv"]])
def test_column_names_are_never_read_as_a_regex(command):
    """Only the module options take a regex: a column may be named "review (en)"."""
    from hf_wsvd.cli.app import build_parser

    args = build_parser().parse_args([*command, "--text-columns", "review (en)"])
    assert args.text_columns == ["review (en)"]
    assert build_parser().parse_args([*command, "--text-columns", "a,b"]).text_columns == ["a", "b"]


def test_a_model_s_own_linear_subclass_that_computes_more_is_no_target():
    """Llama 4's router is an nn.Linear whose forward also picks the top experts: factorized, the
    routing would be gone."""
    import transformers

    config = transformers.Llama4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                           intermediate_size_mlp=64, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=16, num_local_experts=2,
                                           max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    routers = [name for name, module in model.named_modules() if type(module).__name__ == "Llama4Router"]
    assert routers and isinstance(model.get_submodule(routers[0]), nn.Linear)
    targets = set(select_targets(model).values())
    assert targets and not targets & set(routers)


def test_experts_stored_as_3d_weights_are_said_to_stay_dense(caplog):
    """Mixtral keeps its experts as (experts × out × in) parameters in transformers 5, which only MLP
    pruning cuts (tests/test_expert_pruning.py): without it (svd reads no Gram) compress says so, with
    their share of the model, instead of a smaller gain unexplained."""
    import logging

    import torch
    import transformers

    from hf_wsvd import WSVDConfig, compress

    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                        max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    experts = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 3)
    assert experts
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        _, report = compress(model, WSVDConfig(method="svd", param_ratio=0.5), None, show_progress=False)
    said = [notice for notice in report.notices if "mixture-of-experts" in notice]
    assert said and said[0].startswith(f"{experts:,} parameters")
    _, report = compress(tiny.build("llama", "AutoModelForCausalLM"), WSVDConfig(method="svd", param_ratio=0.5), None,
                         show_progress=False)
    assert not any("mixture-of-experts" in notice for notice in report.notices)
