"""WSVDConfig: serialization round trips and validation with messages naming the bad value."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import datasets
import pytest
import torch

import hf_wsvd
import tiny
from hf_wsvd.config import RECIPE_VERSION, CalibrationConfig, WSVDConfig
from hf_wsvd.runtime.factorized_linear import FactorizedLinear
from hf_wsvd.statistics import TOKEN_COUNTS, Statistics
from hf_wsvd.solvers.options import ElementwiseOptions, FwsvdOptions, RescueOptions


CUSTOM = dict(
        method="svd",
        param_ratio=0.3,
        target_modules=["query", "value"],
        exclude_modules=r".*\.layer\.0\..*",
        fisher_axis="input",
        num_samples=64,
        batch_size=4,
        max_length=32,
        compute_dtype="float64",
        seed=7,
        ranks={"encoder.layer.0.attention.self.query": 4, "encoder.layer.1.attention.self.value": 3},
        asvd_alpha=1.0,
        allocation="greedy",
        sequential=True,
)


def _custom() -> WSVDConfig:
    return WSVDConfig(**CUSTOM)


@pytest.mark.parametrize("make", [WSVDConfig, _custom], ids=["default", "custom"])
def test_json_file_round_trip(make, tmp_path):
    config = make()
    path = tmp_path / "wsvd.json"
    config.to_json_file(path)
    loaded = WSVDConfig.from_json_file(path)
    assert loaded == config
    assert loaded.to_dict() == config.to_dict()
    # The file is plain JSON holding every field and the recipe's version.
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) == {f.name for f in dataclasses.fields(WSVDConfig)} | {"recipe_version"}
    assert data["method"] == config.method
    assert data["ranks"] == config.ranks


@pytest.mark.parametrize("make", [WSVDConfig, _custom], ids=["default", "custom"])
def test_dict_round_trip(make):
    config = make()
    data = config.to_dict()
    assert isinstance(data, dict)
    loaded = WSVDConfig.from_dict(data)
    assert loaded == config
    assert loaded.to_dict() == data
    # to_dict is a copy: mutating it does not touch the config.
    data["ranks"]["new"] = 1
    assert "new" not in config.ranks


def test_json_string_round_trip():
    config = _custom()
    assert WSVDConfig.from_dict(json.loads(config.to_json_string())) == config


def test_custom_values_differ_from_defaults():
    # Guards the round-trip tests against comparing two default configs.
    custom, default = _custom(), WSVDConfig()
    assert len(CUSTOM) >= 14
    for name in CUSTOM:
        assert getattr(custom, name) != getattr(default, name), name


def test_tuple_targets_become_lists_and_round_trip(tmp_path):
    config = WSVDConfig(target_modules=("query", "key"), exclude_modules=("key",))
    assert config.target_modules == ["query", "key"]
    assert config.exclude_modules == ["key"]
    config.to_json_file(tmp_path / "c.json")
    assert WSVDConfig.from_json_file(tmp_path / "c.json") == config


@pytest.mark.parametrize("ratio", [1, 1.0, 0.5, 1e-3])
def test_valid_param_ratios_are_accepted(ratio):
    # 1 keeps every target layer whole: a recipe only when the embeddings are compressed
    config = WSVDConfig(param_ratio=ratio, embeddings=ratio == 1, embedding_method="svd")
    assert config.param_ratio == ratio
    assert isinstance(config.param_ratio, float)


def test_numpy_numbers_are_taken_as_the_python_numbers_they_hold(tmp_path):
    import numpy as np

    config = WSVDConfig(param_ratio=np.float32(0.8), num_samples=np.int64(64), seed=np.uint32(3),
                        block_refine_steps=np.int16(8), sequential=np.bool_(True), compensation_ridge=np.float64(0.3))
    assert (config.param_ratio, config.num_samples, config.seed, config.block_refine_steps) == (0.8, 64, 3, 8)
    assert (config.sequential, config.compensation_ridge) == (True, 0.3)
    assert [type(v) for v in (config.param_ratio, config.num_samples, config.seed, config.sequential)] == [
        float, int, int, bool]
    config.to_json_file(tmp_path / "c.json")  # numpy integers are not JSON
    assert WSVDConfig.from_json_file(tmp_path / "c.json") == config
    assert CalibrationConfig(num_samples=np.int32(8)).num_samples == 8
    with pytest.raises(ValueError, match=r"param_ratio=1.5 must be in \(0, 1\]"):
        WSVDConfig(param_ratio=np.float32(1.5))
    # inside a dict too: a per-shape speed limit, a checkpoint's ranks
    config = WSVDConfig(max_kept_ratio_for_speed={"32x64": np.float32(0.5)}, ranks={"layers.0.q": np.int64(3)})
    assert config.max_kept_ratio_for_speed == {"32x64": 0.5} and config.ranks == {"layers.0.q": 3}
    assert type(config.max_kept_ratio_for_speed["32x64"]) is float and type(config.ranks["layers.0.q"]) is int


def test_param_ratio_1_without_embeddings_is_refused_as_nothing_to_compress():
    with pytest.raises(ValueError, match="param_ratio=1 keeps every parameter .* nothing to compress"):
        WSVDConfig(param_ratio=1)


def _assert_rejected(value_repr: str, field: str | None = None, **kwargs):
    with pytest.raises(ValueError) as info:
        WSVDConfig(**kwargs)
    message = str(info.value)
    assert value_repr in message, message
    if field is not None:
        assert field in message, message


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, "0.5", True, 0.0, float("nan")])
def test_bad_param_ratio(ratio):
    _assert_rejected(f"={ratio!r}", "param_ratio", param_ratio=ratio)


def test_bad_method():
    _assert_rejected("'nope'", "method", method="nope")
    _assert_rejected("['svd']", "method", method=["svd"])  # a list is no name (not an unhashable-type TypeError)
    _assert_rejected("{'name': 'svd'}", "method", method={"name": "svd"})


def test_bad_fisher_axis():
    _assert_rejected("'rows'", "fisher_axis", fisher_axis="rows")


def test_bad_compute_dtype():
    _assert_rejected("'float16'", "compute_dtype", compute_dtype="float16")


@pytest.mark.parametrize(
    "field, value",
    [("num_samples", 0), ("num_samples", -3), ("batch_size", -1), ("batch_size", 0), ("max_length", 0),
     ("batch_size", 2.0), ("num_samples", True)],
)
def test_bad_counts(field, value):
    _assert_rejected(f"={value!r}", field, **{field: value})


@pytest.mark.parametrize("ranks", [{"a": 0}, {"a": -2}, {"a": 1.5}])
def test_bad_ranks(ranks):
    (name, value), = ranks.items()
    _assert_rejected(repr(value), "ranks", ranks=ranks)
    _assert_rejected(repr(name), ranks=ranks)


@pytest.mark.parametrize("field", ["ranks", "pruned", "attention", "experts", "refined", "residual"])
@pytest.mark.parametrize("value", [None, [1], "q_proj"])
def test_recorded_entries_must_be_dicts(field, value):
    _assert_rejected(f"{field}={value!r} must be a dict", **{field: value})


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("value", [[], 5, [""], ["query", 3], "(", "[a-"])
def test_bad_module_patterns(field, value):
    _assert_rejected(f"={value!r}", field, **{field: value})


def test_a_comma_separated_string_of_names_gets_a_hint():
    with pytest.raises(ValueError, match="matches no linear layer .*for several names pass a list"):
        hf_wsvd.compress(tiny.build("bert"), WSVDConfig(method="svd", target_modules="query,value"))


@pytest.mark.parametrize("seed", ["0", -1, 2**32, 2**70, 1.0])
def test_seed_must_be_an_integer_that_every_generator_takes(seed):
    _assert_rejected(f"seed={seed!r} must be an integer in [0, 2**32)", seed=seed)


@pytest.mark.parametrize("ridge", [0, -1, float("inf"), float("nan"), "0.1"])
def test_compensation_ridge_must_be_finite_and_positive(ridge):
    _assert_rejected(f"compensation_ridge={ridge!r} must be a finite number > 0", compensation_ridge=ridge)


def test_a_compensation_ridge_below_float64_s_rounding_is_refused():
    """1e-300 passed as > 0 and then failed in MLP pruning's Cholesky of a rank-deficient Gram."""
    _assert_rejected("compensation_ridge=1e-300 must be at least 1e-06: a smaller ridge leaves a rank-deficient Gram "
                     "singular in float64", compensation_ridge=1e-300)
    assert WSVDConfig(compensation_ridge=1e-6).compensation_ridge == 1e-6


def test_from_dict_rejects_an_unknown_key():
    data = WSVDConfig().to_dict()
    data["rank_ratio"] = 0.5
    with pytest.raises(ValueError, match="rank_ratio"):
        WSVDConfig.from_dict(data)


def test_from_dict_validates_values():
    data = WSVDConfig().to_dict()
    data["fisher_axis"] = "columns"
    with pytest.raises(ValueError, match="columns"):
        WSVDConfig.from_dict(data)


def test_from_dict_accepts_a_partial_dict():
    config = WSVDConfig.from_dict({"method": "svd", "param_ratio": 0.25})
    assert config.method == "svd"
    assert config.param_ratio == 0.25
    assert config.fisher_axis == WSVDConfig().fisher_axis


def test_a_recipe_from_a_newer_release_loads_without_its_new_keys_and_says_which():
    data = {**WSVDConfig(method="svd").to_versioned_dict(), "recipe_version": RECIPE_VERSION + 1, "rank_schedule": "cosine",
            "dither": True}
    with pytest.warns(UserWarning, match=r"newer hf_wsvd release.*\['dither', 'rank_schedule'\] are ignored") as caught:
        config = WSVDConfig.from_dict(data)
    assert len(caught) == 1 and config == WSVDConfig(method="svd")


def test_a_saved_recipe_records_its_version_and_an_unversioned_old_one_loads_unchanged():
    saved = WSVDConfig(method="fwsvd", num_samples=64).to_versioned_dict()
    assert saved["recipe_version"] == RECIPE_VERSION and WSVDConfig(**WSVDConfig().to_dict()) == WSVDConfig()
    old = {key: value for key, value in saved.items() if key != "recipe_version"}
    assert WSVDConfig.from_dict(old) == WSVDConfig.from_dict(saved) == WSVDConfig(method="fwsvd", num_samples=64)
    with pytest.raises(ValueError, match="recipe_version='1' must be a positive integer"):
        WSVDConfig.from_dict({**old, "recipe_version": "1"})
    # a version-1 recipe (before offload_activations) loads with the field unset, i.e. resolved at compression
    first = {key: value for key, value in saved.items() if key != "offload_activations"}
    assert WSVDConfig.from_dict({**first, "recipe_version": 1}).offload_activations is None
    # a version-2 recipe (before block_refine_batches) refines one batch a step, as that release did
    second = {key: value for key, value in saved.items() if key != "block_refine_batches"}
    assert WSVDConfig.from_dict({**second, "recipe_version": 2}).block_refine_batches == 1
    # a version-3 recipe (before generated_samples) calibrated on real text only
    third = {key: value for key, value in saved.items() if key != "generated_samples"}
    assert WSVDConfig.from_dict({**third, "recipe_version": 3}).generated_samples == 0


def test_a_methods_options_and_the_calibration_settings_are_written_once():
    # the recipe's field carries the very metadata of the options class that owns it
    for owner in (FwsvdOptions, ElementwiseOptions, RescueOptions, CalibrationConfig):
        for f in dataclasses.fields(owner):
            mine = {g.name: g for g in dataclasses.fields(WSVDConfig)}[f.name]
            assert mine.metadata["help"] is f.metadata["help"] and mine.default == f.default
    config = WSVDConfig(num_samples=7, batch_size=3, max_length=9, seed=4)
    assert config.calibration == CalibrationConfig(num_samples=7, batch_size=3, max_length=9, seed=4)
    with pytest.raises(ValueError, match="batch_size=0 must be an integer from 1 to 2147483647"):
        CalibrationConfig(batch_size=0)


def test_the_shared_type_checks_refuse_bools_which_python_counts_as_ints():
    from hf_wsvd.fields import is_integer, is_number

    assert is_integer(3) and is_integer(0) and not any(map(is_integer, (True, 3.0, "3", None)))
    assert is_number(2.5) and is_number(2) and not any(map(is_number, (False, "2.5", None, 1j)))
    with pytest.raises(ValueError, match=r"^rank_multiple=True "):
        WSVDConfig(rank_multiple=True)


@pytest.mark.parametrize("argument, value, message", [
    ("data", "train.txt", "data is a str: pass an iterable of tokenized batches"),
    ("data", {"input_ids": torch.ones(2, 3, dtype=torch.long)}, "data is one batch (a dict): pass an iterable of "
                                                                "batches, e.g. [batch]"),
    ("data", torch.ones(2), "data is a Tensor"),
    ("data", datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}),
     "data is a DatasetDict of splits ['train']: pass tokenized batches of one split"),
    ("data", 5, "data is a int"),
    ("config", {"method": "svd"}, "config is a dict: pass a WSVDConfig"),
    ("config", None, "config is a NoneType"),
    ("accelerator", "cpu", "accelerator='cpu': pass an accelerate.Accelerator"),
    ("loss_fn", "cross_entropy", "loss_fn='cross_entropy': pass a function loss_fn(model, batch) returning"),
    ("model", torch.nn.Linear(2, 2), "model is a Linear: compress takes a transformers PreTrainedModel"),
])
def test_compress_refuses_arguments_of_the_wrong_kind(argument, value, message):
    arguments = {"model": tiny.build("bert"), "config": WSVDConfig(method="svd"), argument: value}
    with pytest.raises(TypeError, match=re.escape(message)):
        hf_wsvd.compress(**arguments, show_progress=False)


def test_data_holding_no_batch_is_refused_and_a_loss_fn_no_method_reads_is_said(caplog):
    """An exhausted generator is an empty list: said as such, not as data without labels."""
    batch = {**tiny.inputs("bert", batch=4, length=8), "labels": torch.tensor([0, 1, 1, 0])}
    used = iter([batch])
    list(used)
    for empty in ([], used):
        with pytest.raises(ValueError, match=re.escape("data holds no batch (an empty list, or a generator already "
                                                       "consumed)")):
            hf_wsvd.compress(tiny.build("bert"), WSVDConfig(param_ratio=0.5), empty, show_progress=False)
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        _, report = hf_wsvd.compress(tiny.build("bert"), WSVDConfig(method="whiten", param_ratio=0.5), [batch],
                                     loss_fn=lambda model, batch: pytest.fail("called"), show_progress=False)
    said = "loss_fn is not used: method='whiten' reads no gradient statistics"
    assert any(said in notice for notice in report.notices) and any(said in r.message for r in caplog.records)


def test_statistics_without_data_need_the_method_they_were_computed_for():
    """The recommended recipe is read from the data; without it, given statistics would be dropped for svd."""
    data = [{**tiny.inputs("bert", batch=4, length=8), "labels": torch.tensor([0, 1, 1, 0])}]
    recipe = WSVDConfig(method="fwsvd", allocation="greedy", param_ratio=0.5)
    model, report = hf_wsvd.compress(tiny.build("bert"), recipe, data, show_progress=False)
    with pytest.raises(ValueError, match="statistics given without data: .* name the one the statistics were "):
        hf_wsvd.compress(tiny.build("bert"), WSVDConfig(param_ratio=0.3), statistics=report.statistics)
    again, _ = hf_wsvd.compress(tiny.build("bert"), recipe, statistics=report.statistics, show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # statistics of no target layer (the embeddings' token counts) leave the recipe to resolve: svd for the layers
    counts = Statistics({"embeddings.word_embeddings": {TOKEN_COUNTS: torch.arange(1.0, 65.0)}})
    _, report = hf_wsvd.compress(tiny.build("bert"), WSVDConfig(param_ratio=0.5, embeddings=True, embedding_method="lp",
                                                                embedding_weighting="frequency"),
                                 statistics=counts, show_progress=False)
    assert report.method == "svd" and report.ranks


def test_statistics_given_again_allocate_as_the_data_did():
    """Statistics given without data stand for the data they came from: the recipe's allocation
    resolves as it did with the data (greedy), and the result is the same model."""
    data = [{**tiny.inputs("bert", batch=4, length=8), "labels": torch.tensor([0, 1, 1, 0])}]
    model, report = hf_wsvd.compress(tiny.build("bert"), WSVDConfig(method="whiten", param_ratio=0.5), data,
                                     show_progress=False)
    again, second = hf_wsvd.compress(tiny.build("bert"), WSVDConfig(method="whiten", param_ratio=0.5),
                                     statistics=report.statistics, show_progress=False)
    assert report.allocation == second.allocation == "greedy" and second.ranks == report.ranks
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_batches_given_as_they_are_are_recorded_by_their_examples():
    """The recipe's num_samples says how many examples the calibration held: batches given to
    compress hold theirs (a one-shot iterator's too), not the sample size data_loader would draw."""
    batch = {**tiny.inputs("bert", batch=3, length=8), "labels": torch.tensor([0, 1, 1])}
    model, _ = hf_wsvd.compress(tiny.build("bert"), WSVDConfig(method="whiten", param_ratio=0.5), [batch, batch],
                                show_progress=False)
    assert model.config.wsvd["num_samples"] == 6
    model, _ = hf_wsvd.compress(tiny.build("bert"), WSVDConfig(method="whiten", param_ratio=0.5), iter([batch]),
                                show_progress=False)
    assert model.config.wsvd["num_samples"] == 3


@pytest.mark.parametrize("method, dtype, error, message", [
    ("svd", torch.float16, ValueError, "dtype=torch.float16: only method='quantized_residual' reads it"),
    (None, torch.bfloat16, ValueError, "method=None factorizes the model in its own dtype: cast the result"),
    ("svd", "float16", TypeError, "dtype='float16': pass a floating-point torch.dtype"),
    ("svd", torch.int8, TypeError, "dtype=torch.int8: pass a floating-point torch.dtype"),
])
def test_compress_refuses_a_dtype_it_would_not_apply(method, dtype, error, message):
    model = tiny.build("bert")
    with pytest.raises(error, match=re.escape(message)):
        hf_wsvd.compress(model, WSVDConfig(method=method, param_ratio=0.5), dtype=dtype, show_progress=False)
    assert not isinstance(model.bert.encoder.layer[0].attention.self.query, FactorizedLinear)  # before any work


def test_statistics_of_another_model_are_named_by_layer():
    data = [{**tiny.inputs("bert", batch=4, length=8), "labels": torch.tensor([0, 1, 1, 0])}]
    recipe = WSVDConfig(method="fisher_whiten", allocation="greedy", param_ratio=0.5)
    _, report = hf_wsvd.compress(tiny.build("bert"), recipe, data, show_progress=False)
    wide = tiny.build("bert", hidden_size=48, intermediate_size=96)
    with pytest.raises(ValueError, match=r"statistics of 'encoder\.layer\.0\.[^']*': \w+ has shape .* takes .*: "
                                         "statistics of another model"):
        hf_wsvd.compress(wide, recipe, statistics=report.statistics, show_progress=False)


def test_statistics_that_hold_none_of_the_targets_are_said_to_be_unused():
    data = [{**tiny.inputs("bert", batch=4, length=8), "labels": torch.tensor([0, 1, 1, 0])}]
    recipe = WSVDConfig(method="fisher_whiten", allocation="greedy", param_ratio=0.5)
    _, report = hf_wsvd.compress(tiny.build("bert"), recipe, data, show_progress=False)
    batch = tiny.inputs("llama", batch=4, length=8)
    _, other = hf_wsvd.compress(tiny.build("llama"), recipe, [{**batch, "labels": batch["input_ids"]}],
                                statistics=report.statistics, show_progress=False)
    assert any(n.startswith("the statistics given hold none of this recipe's target layers (they hold "
                            f"{len(report.statistics.values)}, such as 'encoder.layer.0.") and "computed anew" in n
               for n in other.notices), other.notices
    _, same = hf_wsvd.compress(tiny.build("bert"), recipe, data, statistics=report.statistics, show_progress=False)
    assert not any("statistics given" in n for n in same.notices), same.notices


def test_data_left_unread_by_reused_statistics_is_said_and_not_recorded():
    """Statistics holding all a whole-model method needs leave the data unread: the recipe records the
    examples they were taken on, and a notice says the data was not read."""
    labels = torch.tensor([0, 1, 1, 0])
    recipe = WSVDConfig(method="fisher_whiten", allocation="greedy", param_ratio=0.5)
    model, report = hf_wsvd.compress(tiny.build("bert"), recipe, [{**tiny.inputs("bert", batch=4, length=8),
                                                                   "labels": labels}], show_progress=False)
    other = [{**tiny.inputs("bert", batch=4, length=8, seed=2), "labels": labels}] * 3
    again, second = hf_wsvd.compress(tiny.build("bert"), recipe, other, statistics=report.statistics,
                                     show_progress=False)
    assert again.config.wsvd["num_samples"] == report.importance_examples == second.importance_examples == 4
    assert any(n.startswith("the data was not read: the given statistics hold everything method='fisher_whiten' "
                            "needs for every target layer (taken on 4 examples)") for n in second.notices), second.notices
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # statistics of some layers only: the data is read for the rest, and recorded
    some = Statistics({n: v for n, v in report.statistics.values.items() if n.startswith("encoder.layer.0.")},
                      report.statistics.examples, weights=report.statistics.weights)
    partly, third = hf_wsvd.compress(tiny.build("bert"), recipe, other, statistics=some, show_progress=False)
    assert partly.config.wsvd["num_samples"] == 12 and not any("not read" in n for n in third.notices)
    with pytest.raises(ValueError, match=r"^the statistics given hold \w.* for \d+ of the \d+ target layers, not for "
                                         r"'encoder\.layer\.1\.[^']*': pass data too, or the target_modules they were "):
        hf_wsvd.compress(tiny.build("bert"), recipe, statistics=some, show_progress=False)
    # statistics of activations alone (no Fisher pass) count their examples too, and what the model wrote among them
    whitened, report = hf_wsvd.compress(tiny.build("bert"), WSVDConfig(method="whiten", param_ratio=0.5), other,
                                        show_progress=False)
    assert report.statistics.examples == 12 and report.statistics.generated == 0
    report.statistics.generated = 4  # as if 4 of the 12 had been written by the model (data_loader's loaders say so)
    for data in (None, [{**tiny.inputs("bert", batch=2, length=8), "labels": labels[:2]}]):
        again, _ = hf_wsvd.compress(tiny.build("bert"), WSVDConfig(method="whiten", param_ratio=0.5), data,
                                    statistics=report.statistics, show_progress=False)
        assert (again.config.wsvd["num_samples"], again.config.wsvd["generated_samples"]) == (8, 4)


def test_statistics_of_other_weights_of_the_same_shapes_are_refused():
    """Statistics record a sample of the weights they were taken on: another model of the same
    architecture is refused; the same model, even loaded in bf16, is not."""
    data = [{**tiny.inputs("bert", batch=4, length=8), "labels": torch.tensor([0, 1, 1, 0])}]
    recipe = WSVDConfig(method="fisher_whiten", allocation="greedy", param_ratio=0.5)
    _, report = hf_wsvd.compress(tiny.build("bert"), recipe, data, show_progress=False)
    assert set(report.statistics.weights) == set(report.statistics.values)
    with pytest.raises(ValueError, match=r"statistics of 'encoder\.layer\.0\.[^']*' were taken on other weights than "
                                         r"this model's: statistics of another model"):
        hf_wsvd.compress(tiny.build("bert", seed=1), recipe, statistics=report.statistics, show_progress=False)
    rounded = tiny.build("bert").to(torch.bfloat16).float()
    _, again = hf_wsvd.compress(rounded, recipe, statistics=report.statistics, show_progress=False)
    assert again.ranks


@pytest.mark.parametrize("statistics", [{"a": 1}, [1, 2], "stats"])
def test_statistics_of_the_wrong_kind_are_a_type_error(statistics):
    with pytest.raises(TypeError, match=f"statistics is a {type(statistics).__name__}: pass the report.statistics of "):
        hf_wsvd.compress(tiny.build("bert"), WSVDConfig(method="svd", param_ratio=0.5), statistics=statistics)


def test_a_checkpoints_recipe_given_again_compresses_anew_and_says_so(caplog):
    """ranks, pruned, ... record what an earlier compress did: given back to compress (a checkpoint's
    recipe), they are not read, and a notice says so."""
    model, _ = hf_wsvd.compress(tiny.build("bert"), WSVDConfig(method="svd", param_ratio=0.5, rank_multiple=1))
    again = WSVDConfig.from_dict({**model.config.wsvd, "param_ratio": 0.3})
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        _, report = hf_wsvd.compress(tiny.build("bert"), again, show_progress=False)
    assert report.ranks != again.ranks and max(report.ranks.values()) < max(again.ranks.values())
    notes = [r.getMessage() for r in caplog.records if "config.ranks" in r.getMessage()]
    assert len(notes) == 1 and "not an input; compress ignores it and records its own" in notes[0]


def test_a_model_without_weights_is_refused():
    with torch.device("meta"):
        model = tiny.build("bert")
    with pytest.raises(ValueError, match=r"the model's weights are not loaded \('[^']+' is on the meta device\): load "
                                         "it with from_pretrained"):
        hf_wsvd.compress(model, WSVDConfig(method="svd", param_ratio=0.5))


@pytest.mark.parametrize("data", [[1, 2], "recipe.json", 3])
def test_from_dict_takes_a_mapping(data):
    with pytest.raises(TypeError, match=f"WSVDConfig.from_dict takes a mapping of recipe fields, not a "
                                        f"{type(data).__name__}"):
        WSVDConfig.from_dict(data)


def test_weight_samples_stay_inside_a_weight_of_more_than_2_to_the_24_entries():
    """Float positions past 2**24 round up to the end (a 7B MLP has 45M entries): the places are integers."""
    from hf_wsvd.compressor import _weight_samples

    layer = torch.nn.Linear(4097, 4097, bias=False)
    samples = _weight_samples(torch.nn.Sequential(layer), {"0": "0"})["0"]
    flat = layer.weight.detach().reshape(-1)
    assert samples.shape == (16,) and samples[0] == flat[0] and samples[-1] == flat[-1]



def test_a_ratio_given_as_text_is_named_as_not_a_number():
    with pytest.raises(ValueError, match=re.escape("param_ratio='0.5' is not a number: pass one in (0, 1]")):
        WSVDConfig(param_ratio="0.5")


def test_an_option_of_another_method_is_said_not_read():
    """p, solver, ... set for a method that is not the one run were recorded as if they had shaped the result."""
    _, report = hf_wsvd.compress(tiny.build("bert"), WSVDConfig(method="svd", param_ratio=0.5, p=1.5, solver="als"),
                                 show_progress=False)
    assert "p=1.5 is an option of lp; solver='als' is an option of rescue, tfwsvd, refine=True: this recipe " \
           "(method='svd') does not read them" in report.notices
    # the options of a part of the recipe that is off
    assert WSVDConfig(method="svd", embedding_ratio=0.3, embedding_method="lp", quantize_group_size=32,
                      residual_rank=4).unread_options() == {
        "embedding_ratio": ["embeddings=True"], "embedding_method": ["embeddings=True"],
        "quantize_group_size": ["quantize"], "residual_rank": ["quantized_residual"]}
    assert WSVDConfig(method="svd", embeddings=True, embedding_ratio=0.3, quantize="int4",
                      quantize_group_size=32).unread_options() == {}
    # quantized_residual reads its own option only: its residual method runs with that method's defaults
    assert WSVDConfig(method="quantized_residual", quantize="int8", p=1.7,
                      residual_method="whiten").unread_options() == {"p": ["lp"]}
    assert WSVDConfig(method="svd", residual_method="whiten").unread_options() == {"residual_method": ["quantized_residual"]}
    data = [{**tiny.inputs("bert", batch=4, length=8), "labels": torch.tensor([0, 1, 1, 0])}]
    for recipe in (WSVDConfig(method="lp", param_ratio=0.5, p=1.5),
                   WSVDConfig(method="fwsvd", refine=True, solver="als", max_iterations=1, param_ratio=0.5),
                   WSVDConfig(method="svd", param_ratio=0.5, embeddings=True, embedding_method="lp", p=1.5)):
        _, report = hf_wsvd.compress(tiny.build("bert"), recipe, data, show_progress=False)
        assert not any("is an option of" in n for n in report.notices), (recipe, report.notices)


def test_counts_are_bounded_at_c_int_and_the_bound_itself_is_taken():
    """2**31 - 1 is the largest count; a truncation length is not bounded (tokenizers that record no
    limit report 1e30 as their model_max_length)."""
    import numpy as np

    from hf_wsvd.integrations.healing import HealConfig

    config = WSVDConfig(num_samples=2**31 - 1, block_refine_steps=2**31 - 1, max_length=int(1e30))
    assert config.num_samples == config.block_refine_steps == 2**31 - 1
    with pytest.raises(ValueError, match="num_samples=2147483648 must be an integer from 1 to 2147483647"):
        WSVDConfig(num_samples=2**31)
    assert HealConfig(steps=np.int64(200), evaluations=2**31 - 1).steps == 200  # a numpy count is a count
    with pytest.raises(ValueError, match="steps=2147483648 must be an integer from 1 to 2147483647"):
        HealConfig(steps=2**31)
