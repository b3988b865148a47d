"""FactorizedEmbedding, tied output heads, and the embedding options of WSVDConfig / compress / CLI,
including save/load with and without hf_wsvd installed."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import tiny
from helpers import main_output, run_without_hf_wsvd
from hf_wsvd import FactorizedEmbedding, FactorizedLinear, WSVDConfig, parameter_counts
from hf_wsvd.cli import main as cli_main
from hf_wsvd.statistics import TOKEN_COUNTS, Statistics, default_accelerator, token_counts
from hf_wsvd.runtime.factorized_embedding import FactorizedTiedHead
from hf_wsvd.solvers import LayerProblem, get_solver

# arch, Auto class, embedding name (relative to the base model), tied head (full name) or None
TIED = {
    "llama": ("AutoModelForCausalLM", "embed_tokens", "lm_head"),
    "gpt2": ("AutoModelForCausalLM", "wte", "lm_head"),
    "bert": ("AutoModelForMaskedLM", "embeddings.word_embeddings", "cls.predictions.decoder"),
    "t5": ("AutoModelForSeq2SeqLM", "shared", "lm_head"),
}


def _compress_embeddings(arch: str, auto_class: str | None = None, ratio=0.5, **overrides):
    overrides.setdefault("rank_multiple", 1)  # the exact ranks of the tiny 64 × 32 tables
    return tiny.compressed(arch, auto_class, param_ratio=1.0, embeddings=True, embedding_ratio=ratio, **overrides)


# --------------------------------------------------------------------------- the module


def test_factorized_embedding_computes_the_product_of_its_factors():
    g = torch.Generator().manual_seed(0)
    table, projection = torch.randn(50, 6, generator=g), torch.randn(16, 6, generator=g)
    layer = FactorizedEmbedding.from_factors(table, projection, padding_idx=0)
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    assert torch.allclose(layer(ids), (table @ projection.T)[ids], atol=1e-6)
    assert torch.allclose(layer.to_dense()(ids), layer(ids), atol=1e-6)
    assert (layer.rank, layer.num_embeddings, layer.embedding_dim) == (6, 50, 16)
    assert layer.num_parameters() == 50 * 6 + 16 * 6
    layer(ids).sum().backward()
    assert layer.weight.grad[0].abs().max() == 0  # padding_idx keeps its nn.Embedding meaning
    assert layer.weight.grad[3].abs().max() > 0


@pytest.mark.parametrize("rank", [16, 17, 0])
def test_rank_at_least_hidden_is_a_clear_error(rank):
    with pytest.raises(ValueError, match=rf"rank={rank} is invalid for a 50x16 embedding"):
        FactorizedEmbedding(50, 16, rank)


def test_factor_shapes_must_chain():
    with pytest.raises(ValueError, match="do not chain"):
        FactorizedEmbedding.from_factors(torch.randn(50, 6), torch.randn(16, 5))


# --------------------------------------------------------------------------- compress


def test_embeddings_only_compression_of_a_classifier():
    dense = tiny.build("bert")
    before = sum(p.numel() for p in dense.parameters())
    table = dense.bert.embeddings.word_embeddings.weight.detach().clone()
    with torch.no_grad():
        reference = main_output(dense(**tiny.inputs("bert")))
    model, report = _compress_embeddings("bert", ratio=0.5)
    assert report.ranks == {"embeddings.word_embeddings": 10}  # ⌊0.5·64·32/96⌋
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())
    assert isinstance(model.bert.embeddings.word_embeddings, FactorizedEmbedding)
    assert report.params_before - report.params_after == 64 * 32 - 10 * (64 + 32)
    assert parameter_counts(model) == (report.params_after, before)
    u, sv, vh = torch.linalg.svd(table.double(), full_matrices=False)
    best = (u[:, :10] * sv[:10]) @ vh[:10]  # Eckart–Young: the rank-10 SVD reconstruction
    assert torch.allclose(model.bert.embeddings.word_embeddings.to_dense().weight.double(), best, atol=1e-5)
    with torch.no_grad():
        out = main_output(model(**tiny.inputs("bert")))
    assert (out - reference).abs().max() > 0


def test_linear_and_embedding_compression_combine():
    model, report = tiny.compressed("llama", method="lp", p=1.25, embeddings=True)
    assert "embed_tokens" in report.ranks and len(report.ranks) > 1
    assert sum(isinstance(m, FactorizedLinear) for m in model.modules()) == len(report.ranks) - 1
    assert model.config.wsvd["ranks"] == report.ranks and model.config.wsvd["p"] == 1.25


@pytest.mark.parametrize("arch", list(TIED))
def test_tied_head_shares_the_factors(arch):
    auto, embedding_name, head_name = TIED[arch]
    model, _ = _compress_embeddings(arch, auto)
    embedding, head = model.get_input_embeddings(), model.get_submodule(head_name)
    assert isinstance(embedding, FactorizedEmbedding) and isinstance(head, FactorizedTiedHead)
    assert head.weight is embedding.weight and head.proj.weight is embedding.proj.weight
    dense_head = embedding.weight.detach() @ embedding.proj.weight.detach().T
    x = torch.randn(3, embedding.embedding_dim)
    expected = x @ dense_head.T + (head.bias.detach() if head.bias is not None else 0)
    assert torch.allclose(head(x), expected, atol=1e-5)


def test_a_head_declared_tied_that_holds_a_weight_of_its_own_is_refused_not_retied():
    """Rebuilt on the embeddings' factors, the head would lose its own values silently."""
    from hf_wsvd import compress

    model = tiny.build("llama", "AutoModelForCausalLM", seed=0)
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach() * 2)  # untied by hand
    ids = tiny.inputs("llama")["input_ids"]
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    recipe = WSVDConfig(method="svd", param_ratio=1.0, embeddings=True, embedding_ratio=0.9)
    with pytest.raises(ValueError, match="the model declares 'lm_head' tied to the input embeddings "
                                         "'model.embed_tokens' .*, but holds a weight of its own there"):
        compress(model, recipe, data, show_progress=False)
    model.config.tie_word_embeddings = False  # as the message says: its own head, kept
    head = model.lm_head.weight.detach().clone()
    compressed, _ = compress(model, recipe, data, show_progress=False)
    assert isinstance(compressed.get_input_embeddings(), FactorizedEmbedding)
    assert type(compressed.lm_head) is torch.nn.Linear and torch.equal(compressed.lm_head.weight, head)


@pytest.mark.parametrize("arch", list(TIED))
def test_tied_round_trip_is_exact(arch, tmp_path):
    auto_name, embedding_name, head_name = TIED[arch]
    model, report = _compress_embeddings(arch, auto_name)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reference = main_output(model(**tiny.inputs(arch)))
    assert (tmp_path / "factorized_embedding.py").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["wsvd"]["ranks"] == report.ranks and config["tie_word_embeddings"] is not False
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    # The factors are stored once, under the embedding's names.
    assert not any(k.startswith(head_name + ".") and not k.endswith("bias") for k in keys), sorted(keys)
    assert any(k.endswith(embedding_name + ".proj.weight") for k in keys)
    loaded = getattr(transformers, auto_name).from_pretrained(tmp_path).eval()
    head = loaded.get_submodule(head_name)
    assert head.weight is loaded.get_input_embeddings().weight
    assert head.proj.weight is loaded.get_input_embeddings().proj.weight
    with torch.no_grad():
        assert (main_output(loaded(**tiny.inputs(arch))) - reference).abs().max().item() <= 1e-6
    # A re-save of the loaded model loads back the same.
    loaded.save_pretrained(tmp_path / "again")
    again = getattr(transformers, auto_name).from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert (main_output(again(**tiny.inputs(arch))) - reference).abs().max().item() <= 1e-6


def test_lora_on_all_linear_layers_leaves_a_tied_factorized_embedding_alone_and_merges_exactly():
    """A dense embedding is no linear layer to peft's "all-linear"; nor is its factorization: an adapter
    on the projection the tied head shares would reach the head only once merged."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny.compressed("llama", TIED["llama"][0], embeddings=True, embedding_ratio=0.5, rank_multiple=1)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    wrapped = {n for n, m in adapted.named_modules() if hasattr(m, "lora_A")}
    assert wrapped and not any("embed_tokens" in n or "lm_head" in n for n in wrapped), sorted(wrapped)
    inputs = tiny.inputs("llama")
    with torch.no_grad():
        before = adapted(**inputs).logits
        after = adapted.merge_and_unload()(**inputs).logits
    # float32 sums in another order once merged: 2.6e-6 on 2 cores, 2.8e-5 on a 16-core GPU host, where
    # the random adapters move the logits by 0.5
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_tie_survives_training():
    model, _ = _compress_embeddings("llama")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = tiny.inputs("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = model.lm_head.proj.weight.detach().clone()
    assert model.model.embed_tokens.proj.weight.grad is not None
    assert torch.equal(model.model.embed_tokens.proj.weight, before)


def test_generate_with_a_factorized_tied_head(tmp_path):
    model, _ = _compress_embeddings("llama")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tiny.inputs("llama")["input_ids"][:1]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), loaded.generate(ids, **kwargs))


def test_resizing_a_factorized_table_is_refused_and_a_dense_one_still_resizes():
    """transformers' resize copies rows of an nn.Embedding: a factorized table gets a one-line error
    saying what to do, unless the size stays (a getter, or len(tokenizer) in a fine-tuning script); a
    compressed model whose embeddings stayed dense resizes as a stock one."""
    model, _ = tiny.compressed("llama", embeddings=True, embedding_ratio=0.5)
    table = model.get_input_embeddings()
    assert model.resize_token_embeddings() is table
    assert model.resize_token_embeddings(tiny.VOCAB_SIZE) is table
    assert model.resize_token_embeddings(tiny.VOCAB_SIZE - 3, pad_to_multiple_of=8) is table
    with pytest.raises(ValueError, match=r"resize_token_embeddings cannot resize a factorized embedding table .*: "
                                         r"resize the dense model before compressing it"):
        model.resize_token_embeddings(80)
    assert model.get_input_embeddings().num_embeddings == tiny.VOCAB_SIZE
    dense_table, _ = tiny.compressed("llama")
    dense_table.resize_token_embeddings(80)
    assert dense_table.get_input_embeddings().num_embeddings == dense_table.config.vocab_size == 80


def test_remote_code_loads_factorized_embeddings_without_hf_wsvd(tmp_path):
    cases = {}
    for arch in ("llama", "bert"):
        auto_name = TIED[arch][0]
        model, _ = _compress_embeddings(arch, auto_name)
        model.save_pretrained(tmp_path / arch)
        with torch.no_grad():
            torch.save({"inputs": tiny.inputs(arch), "reference": main_output(model(**tiny.inputs(arch)))},
                       tmp_path / f"{arch}.pt")
        cases[arch] = (auto_name, TIED[arch][2])
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        for arch, (auto_name, head_name) in {cases!r}.items():
            saved = torch.load("{tmp_path}/" + arch + ".pt")
            model = getattr(transformers, auto_name).from_pretrained("{tmp_path}/" + arch, trust_remote_code=True)
            embedding, head = model.get_input_embeddings(), model.get_submodule(head_name)
            assert type(embedding).__name__ == "FactorizedEmbedding", type(embedding)
            assert type(head).__name__ == "FactorizedTiedHead", type(head)
            assert head.weight is embedding.weight and head.proj.weight is embedding.proj.weight
            with torch.no_grad():
                diff = (model(**saved["inputs"]).logits - saved["reference"]).abs().max().item()
            assert diff <= 1e-6, (arch, diff)
            print(arch, "ok")
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok") == 2


def _scaled_embedding_model(kind: str):
    """A tiny model whose input embedding multiplies its output (transformers' ``*ScaledWordEmbedding``):
    Gemma 3 (a tensor scale, rounded to the weights' dtype) or mBART (a float), its table of rank 4."""
    torch.manual_seed(0)
    if kind == "gemma3":
        config = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                               max_position_embeddings=64, pad_token_id=0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        config = transformers.MBartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                          decoder_ffn_dim=64, max_position_embeddings=64, scale_embedding=True,
                                          pad_token_id=0)
        model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.randn(64, 4) @ torch.randn(4, 32))
    return model.eval()


def _scaled_inputs(model) -> dict:
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, **({"decoder_input_ids": ids} if model.config.is_encoder_decoder else {})}


@pytest.mark.parametrize("kind", ["gemma3", "mbart"])
def test_a_scaled_embedding_keeps_its_scale_through_compress_save_load_and_export(kind, tmp_path):
    """Gemma 3, BART, mBART, ... multiply the looked-up rows by ``embed_scale`` inside the embedding
    module: its factorized replacement must too, in every place the model is rebuilt (a lossless
    rank here, so the outputs stay the dense ones)."""
    from hf_wsvd import compress
    from hf_wsvd.integrations.export import densify

    model = _scaled_embedding_model(kind)
    scaled_type = type(model.get_input_embeddings())
    assert scaled_type is not torch.nn.Embedding and model.get_input_embeddings().embed_scale is not None
    inputs = _scaled_inputs(model)
    with torch.no_grad():
        dense = model(**inputs).logits
    compressed, _ = compress(model, WSVDConfig(method="svd", param_ratio=1.0, embeddings=True, embedding_ratio=0.5,
                                               rank_multiple=1), None, show_progress=False)
    assert isinstance(compressed.get_input_embeddings(), FactorizedEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(compressed(**inputs).logits, dense, atol=1e-4, rtol=0)
    compressed.save_pretrained(tmp_path / "ckpt")
    auto = transformers.AutoModelForCausalLM if kind == "gemma3" else transformers.AutoModelForSeq2SeqLM
    loaded = auto.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, dense, atol=1e-4, rtol=0)
    torch.save({"inputs": inputs, "dense": dense}, tmp_path / "saved.pt")
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        saved = torch.load("{tmp_path}/saved.pt")
        model = transformers.{auto.__name__}.from_pretrained("{tmp_path}/ckpt", trust_remote_code=True).eval()
        assert type(model.get_input_embeddings()).__name__ == "FactorizedEmbedding"
        with torch.no_grad():
            print((model(**saved["inputs"]).logits - saved["dense"]).abs().max().item())
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) <= 1e-4
    exported = densify(loaded)
    assert type(exported.get_input_embeddings()) is scaled_type
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, dense, atol=1e-4, rtol=0)


def test_a_tensor_scale_is_rounded_to_the_weights_dtype_as_the_scaled_embedding_does():
    """Gemma 3 holds its scale as a tensor cast to the weights' dtype before the product: in bfloat16
    the factorized embedding's output equals the dense one bit for bit."""
    from hf_wsvd.swap import replace_embedding_with_factors

    model = _scaled_embedding_model("gemma3").to(torch.bfloat16)
    table, projection = torch.randn(64, 4).bfloat16(), torch.randn(32, 4).bfloat16()
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(table @ projection.T)
        ids = _scaled_inputs(model)["input_ids"]
        dense = model.get_input_embeddings()(ids)
        replace_embedding_with_factors(model, "model.embed_tokens", table, projection)
        assert torch.equal(model.get_input_embeddings()(ids), dense)


def _without(folder, dropped: str, into):
    """A copy of the checkpoint ``folder`` in ``into`` whose weights lack the tensor ``dropped``."""
    import shutil
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, into)
    tensors = load_file(into / "model.safetensors")
    del tensors[dropped]
    save_file(tensors, into / "model.safetensors", metadata={"format": "pt"})
    return into


@pytest.mark.parametrize("arch", list(TIED))
def test_a_stored_factor_of_a_tied_embedding_missing_is_refused(arch, tmp_path):
    """The file stores a tied factor once, under the embedding's name: without it neither end of the
    tie has values, and the load must say so (it once loaded, the factor left on "meta")."""
    auto_name, embedding_name, _ = TIED[arch]
    model, _ = _compress_embeddings(arch, auto_name)
    model.save_pretrained(tmp_path / "ok")
    with safe_open(tmp_path / "ok" / "model.safetensors", "pt") as f:
        stored = sorted(k for k in f.keys() if k.endswith((embedding_name + ".weight", embedding_name + ".proj.weight")))
    assert len(stored) == 2, stored
    for key in stored:
        bad = _without(tmp_path / "ok", key, tmp_path / key)
        with pytest.raises(ValueError, match=rf"the tensor '{key}' is missing from the checkpoint's weights"):
            getattr(transformers, auto_name).from_pretrained(bad)
    result = run_without_hf_wsvd(f"""
        import transformers
        for key in {stored!r}:
            try:
                transformers.{auto_name}.from_pretrained("{tmp_path}/" + key, trust_remote_code=True)
            except ValueError as error:
                assert "is missing from the checkpoint's weights" in str(error) and key in str(error), error
                print(key, "refused")
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" refused") == 2, result.stdout


# --------------------------------------------------------------------------- row weights


def test_token_frequencies_skip_padding():
    batches = [{"input_ids": torch.tensor([[5, 5, 0], [7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])},
               {"input_ids": torch.tensor([[7, 9]])}]
    counts = token_counts(batches, 12, default_accelerator())
    assert counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 2, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="token id 12 of the data is outside the embeddings' vocabulary of 12"):
        token_counts([{"input_ids": torch.tensor([[3, 12]])}], 12, default_accelerator())


def test_frequency_weighting_reads_token_counts_from_the_statistics():
    """The row weights are a statistic like the others: counted on the data once (and kept in the
    job's statistics), or given precomputed, with the same factors either way."""
    from hf_wsvd import compress

    data = [tiny.inputs("bert", batch=4, length=12)]
    recipe = dict(param_ratio=1.0, embeddings=True, embedding_ratio=0.3, embedding_method="lp",
                  embedding_weighting="frequency", rank_multiple=1)
    counted, _ = compress(tiny.build("bert"), WSVDConfig(**recipe), data, show_progress=False)
    counts = token_counts(data, tiny.build("bert").config.vocab_size, default_accelerator())
    given, _ = compress(tiny.build("bert"), WSVDConfig(**recipe), None,
                        statistics=Statistics({"embeddings.word_embeddings": {TOKEN_COUNTS: counts}}), show_progress=False)
    assert torch.equal(counted.bert.embeddings.word_embeddings.weight, given.bert.embeddings.word_embeddings.weight)
    other, _ = compress(tiny.build("bert"), WSVDConfig(**recipe), None, show_progress=False,
                        statistics=Statistics({"embeddings.word_embeddings": {TOKEN_COUNTS: counts.flip(0)}}))
    assert not torch.equal(other.bert.embeddings.word_embeddings.weight, given.bert.embeddings.word_embeddings.weight)


def test_frequency_weighting_needs_data_and_changes_the_factors():
    with pytest.raises(ValueError, match="embedding_weighting='frequency' needs importance data"):
        _compress_embeddings("bert", embedding_method="lp", embedding_weighting="frequency")
    frequent = tiny.inputs("bert", batch=8, length=12)
    frequent["input_ids"][:] = 9  # one token dominates the data
    batches = [frequent]
    uniform, _ = _compress_embeddings("bert", ratio=0.2, embedding_method="lp")
    weighted, _ = _compress_embeddings("bert", ratio=0.2, embedding_method="lp", embedding_weighting="frequency",
                                       data=batches)
    dense = tiny.build("bert").bert.embeddings.word_embeddings.weight.detach()

    def error(model, row):
        return (model.bert.embeddings.word_embeddings.to_dense().weight[row] - dense[row]).norm().item()

    assert error(weighted, 9) < 0.5 * error(uniform, 9)


def test_the_embeddings_modifier_installs_what_the_solver_computes():
    """After the pipeline, the ``embeddings`` modifier factorizes the table its solver's way, to the
    bit: lp on the frequency-weighted rows, the factors in the model's dtype."""
    data = [tiny.inputs("bert", batch=4, length=12)]
    model, report = _compress_embeddings("bert", ratio=0.3, embedding_method="lp", embedding_weighting="frequency",
                                         data=data, compute_dtype="float64")
    dense = tiny.build("bert").bert.embeddings.word_embeddings.weight.detach()
    config = WSVDConfig(param_ratio=1.0, embeddings=True, embedding_ratio=0.3, embedding_method="lp",
                        embedding_weighting="frequency", rank_multiple=1, compute_dtype="float64")
    rank = report.ranks["embeddings.word_embeddings"]
    solver = get_solver("lp")
    table, down = solver.solve(LayerProblem("embeddings.word_embeddings", dense.double(), rank,
                                            solver.options.from_recipe(config),
                                            row_weights=1 + token_counts(data, dense.shape[0], default_accelerator())))
    factorized = model.bert.embeddings.word_embeddings
    assert torch.equal(factorized.weight, table.float()) and torch.equal(factorized.proj.weight, down.T.float())
    assert "embeddings" in report.seconds


# --------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize("kwargs, message", [
    (dict(embedding_ratio=1.0), "embedding_ratio=1.0"),
    (dict(embedding_ratio=0), "embedding_ratio=0"),
    (dict(embedding_method="fwsvd"), "embedding_method='fwsvd'"),
    (dict(embeddings=True, method="fwsvd"), "embeddings=True with method='fwsvd'"),
    (dict(embeddings="yes"), "embeddings='yes'"),
    (dict(embedding_weighting="tfidf"), "embedding_weighting='tfidf'"),
    (dict(p=0.9), "p=0.9"),
])
def test_config_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        WSVDConfig(**kwargs)


def test_config_round_trips_the_embedding_fields():
    config = WSVDConfig(method="fwsvd", embeddings=True, embedding_ratio=0.72, embedding_method="lp", p=1.25,
                        embedding_weighting="frequency")
    again = WSVDConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config and again.resolved_embedding_method == "lp"
    assert WSVDConfig(method="lp", embeddings=True).resolved_embedding_method == "lp"


def test_cli_compresses_embeddings_with_lp(tmp_path, capsys):
    source = tiny.save(tiny.build("bert"), tmp_path / "dense")
    out = tmp_path / "out"
    code = cli_main(["compress", str(source), str(out), "--method", "lp", "--p", "1.25", "--param-ratio", "1",
                     "--embeddings", "--embedding-ratio", "0.5"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["wsvd"]["ranks"] == {"embeddings.word_embeddings": 8}  # ⌊0.5·64·32/96⌋ = 10 → --rank-multiple 8
    assert config["wsvd"]["p"] == 1.25 and config["wsvd"]["method"] == "lp"
    assert "kept dense (--param-ratio 1 keeps them whole)" in capsys.readouterr().out  # not "they would save nothing"
    assert cli_main(["inspect", str(out)]) == 0
    assert "embeddings.word_embeddings" in capsys.readouterr().out
    code = cli_main(["compress", str(source), str(tmp_path / "bad"), "--method", "lp", "--p", "3"])
    assert code == 2 and "p=3.0" in capsys.readouterr().err


@pytest.mark.parametrize("rank", [2.5, True, 0])
def test_a_factorized_embedding_refuses_a_rank_that_is_no_count(rank):
    with pytest.raises(ValueError, match=f"rank={rank} is invalid for a 10x4 embedding"):
        FactorizedEmbedding(10, 4, rank)


def test_a_factorized_embedding_takes_padding_idx_as_nn_embedding_does():
    stock = torch.nn.Embedding(10, 4, padding_idx=-1)
    assert FactorizedEmbedding(10, 4, 2, padding_idx=-1).padding_idx == stock.padding_idx == 9
    for index in (10, -11):
        with pytest.raises(ValueError, match=f"padding_idx={index} is outside the 10 embeddings"):
            FactorizedEmbedding(10, 4, 2, padding_idx=index)


def test_offloaded_input_embeddings_are_refused_before_any_pass(tmp_path):
    from hf_wsvd import compress

    tiny.build("llama", "AutoModelForCausalLM", seed=0).save_pretrained(tmp_path / "dense")
    device_map = {"model.embed_tokens": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk",
                  "model.layers.0": "cpu", "model.layers.1": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map,
                                                             offload_folder=tmp_path / "offload")
    with pytest.raises(ValueError, match="embeddings=True factorizes the input embeddings, which this model keeps "
                                         r"offloaded \('model.embed_tokens', by accelerate\): keep them in memory"):
        compress(model, WSVDConfig(method="svd", param_ratio=0.5, embeddings=True), None, show_progress=False)


def test_a_tied_factorized_head_offloaded_to_disk_computes_with_its_weights(tmp_path):
    """The head uses its projection transposed, so the projection's own forward (which accelerate's
    offload hook wraps) never ran: offloaded, it computed with a weight left on "meta"."""
    model, _ = _compress_embeddings("llama", "AutoModelForCausalLM")
    model.save_pretrained(tmp_path / "ckpt")
    device_map = {"model.embed_tokens": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk",
                  "model.layers.0": "cpu", "model.layers.1": "cpu"}
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map,
                                                                 offload_folder=tmp_path / "offload")
    assert offloaded.lm_head.proj.weight.is_meta  # waits in the offload folder
    with torch.no_grad():
        expected = model(**tiny.inputs("llama")).logits
        assert (offloaded(**tiny.inputs("llama")).logits - expected).abs().max().item() <= 1e-6
    assert offloaded.lm_head.proj.weight.is_meta  # and goes back there


def test_a_seq2seq_model_s_token_counts_hold_what_its_decoder_reads_through_the_same_embeddings():
    """T5's decoder reads the shared embeddings too (the decoder start token, then the labels one place
    right; -100 is padding): the frequency weighting counts those tokens beside the encoder's."""
    config = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    labels = torch.tensor([[10, 11, 12, 1], [13, 1, -100, -100]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
    counts = token_counts([batch], 32, default_accelerator(), model=model)
    decoder_reads = torch.tensor([0, 10, 11, 12, 0, 13])  # start + labels[:-1] where a label is real
    expected = torch.bincount(ids[ids != 0], minlength=32) + torch.bincount(decoder_reads, minlength=32)
    assert torch.equal(counts, expected.double())
    assert torch.equal(token_counts([batch], 32, default_accelerator()), torch.bincount(ids[ids != 0], minlength=32).double())
    from hf_wsvd import compress

    _, report = compress(model, WSVDConfig(method="whiten", param_ratio=1.0, embeddings=True, embedding_method="svd",
                                           embedding_weighting="frequency", rank_multiple=1), [batch],
                         show_progress=False)
    assert torch.equal(report.statistics.get("shared", TOKEN_COUNTS), expected.double())


@pytest.mark.parametrize("given", ["nothing", "decoder ids"])
def test_bart_s_token_counts_hold_what_its_decoder_reads(given):
    """BART without labels shifts the input ids into its decoder; decoder ids given are read as they are
    (both checked against the ids its decoder's embedding lookup receives)."""
    config = transformers.BartConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                     decoder_ffn_dim=16, max_position_embeddings=32)
    model = transformers.BartForConditionalGeneration(config).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if given == "decoder ids":
        batch["decoder_input_ids"] = torch.tensor([[2, 13, 14], [2, 15, 16]])
    read = []
    model.get_decoder().embed_tokens.register_forward_hook(lambda module, args, output: read.append(args[0]))
    with torch.no_grad():
        model(**batch)
    expected = torch.bincount(ids.reshape(-1), minlength=32) + torch.bincount(read[0].reshape(-1), minlength=32)
    assert torch.equal(token_counts([batch], 32, default_accelerator(), model=model), expected.double())
