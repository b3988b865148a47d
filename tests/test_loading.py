"""Loading models and tokenizers from what the CLI accepts (folders, Hub ids, .gguf files): the dense
baseline of a GGUF model, one-line errors for missing folders and tokenizers, and a tokenizer load
that needs no remote code."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from helpers import run_without_hf_wsvd
from hf_wsvd import WSVDConfig, compress
from hf_wsvd.cli import main
from hf_wsvd.evaluation import evaluate_model
from hf_wsvd.cli.workflow import data_loader, load_model_and_tokenizer

TEXT = "abc de ab\nc d e ab abc\n" * 40


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a q/k projection (transformers undoes it when loading a GGUF)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path) -> torch.nn.Module:
    """A float32 GGUF of a tiny random Llama with a byte-level BPE tokenizer; returns the model."""
    import gguf

    torch.manual_seed(0)
    model = tiny.build("llama", bos_token_id=1, eos_token_id=2)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)] + ["Ġ", "ab", "abc"]
    tokens += [f"t{i}" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_scores([0.0] * len(tokens))
    # two merges: transformers 5.17 reads an array of one string as the string itself
    writer.add_token_merges(["a b", "ab c"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    state = model.state_dict()
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            weight = state[f"model.layers.{layer}.{ours}.weight"]
            if theirs in ("attn_q", "attn_k"):
                weight = _permute(weight, config.num_attention_heads if theirs == "attn_q" else config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{theirs}.weight", weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_eval_gives_the_dense_baseline_of_a_gguf_file(tmp_path, capsys):
    dense = write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["eval", str(tmp_path / "tiny.gguf"), "--data", str(tmp_path / "text.txt"), "--max-length", "8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # The same number as the original model's, on the GGUF's own tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    loader = data_loader(dense, tokenizer, str(tmp_path / "text.txt"), WSVDConfig(max_length=8, batch_size=32),
                         shuffle=False)
    assert printed["perplexity"] == pytest.approx(evaluate_model(dense, loader)["perplexity"], rel=1e-5)
    # The loaded model is a plain dense one: it casts, and saves.
    model, _ = load_model_and_tokenizer(str(tmp_path / "tiny.gguf"))
    assert model.half().dtype == torch.float16 and not getattr(model, "is_quantized", False)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float16)
    torch.testing.assert_close(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_model_folder_without_tokenizer_is_named_and_eval_takes_one(tmp_path, tokenizer, capsys):
    """The API example's save_pretrained writes no tokenizer: eval names the folder and the fix."""
    model, _ = compress(tiny.build("bert"), WSVDConfig(method="svd", param_ratio=0.5), show_progress=False)
    model.save_pretrained(tmp_path / "compressed")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nthe movie was great\t1\nawful plot\t0\n")
    data = ["--data", str(tmp_path / "dev.tsv")]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "compressed"), *data]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"model folder '{tmp_path / 'compressed'}' has no tokenizer" in error
    assert "save_pretrained" in error and error.endswith("(--tokenizer PATH)")
    assert main(["eval", str(tmp_path / "compressed"), *data, "--tokenizer", str(tmp_path / "tokenizer")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] in (0.0, 0.5, 1.0)
    # compress takes the model's own tokenizer only: its hint names no option
    assert main(["compress", str(tmp_path / "compressed"), str(tmp_path / "out"), *data]) == 2
    error = capsys.readouterr().err.strip()
    assert "has no tokenizer: save one there with tokenizer.save_pretrained(" in error and "--tokenizer" not in error


@pytest.mark.parametrize("path", ["missing-folder/", "my model", "a/b/c", "./nothing", "missing.gguf"])
def test_a_missing_local_model_is_reported_as_missing(tmp_path, monkeypatch, capsys, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    assert main(["eval", path, "--data", "dev.tsv"]) == 2
    error = capsys.readouterr().err.strip()
    kind = "file" if path.endswith(".gguf") else "folder"
    assert error == f"hf-wsvd eval: error: model {kind} {path!r} does not exist"


def test_an_unreachable_hub_id_says_both_readings(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    assert main(["eval", "hf-wsvd-tests/no-such-model", "--data", "dev.tsv"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert "model folder 'hf-wsvd-tests/no-such-model' does not exist, and as a Hub id it could not be loaded" in error


def test_the_tokenizer_of_a_compressed_folder_loads_without_remote_code(tmp_path, tokenizer, monkeypatch):
    """config.json's auto_map names the checkpoint's config class as custom code, and AutoTokenizer
    always reads the model config: without hf_wsvd it asks to run that code. The tokenizer itself
    is stock: with hf_wsvd imported nothing is asked, and trust_remote_code=False loads it without."""
    model, _ = compress(tiny.build("bert"), WSVDConfig(method="svd", param_ratio=0.5), show_progress=False)
    model.save_pretrained(tmp_path / "out")
    tokenizer.save_pretrained(tmp_path / "out")
    assert "AutoConfig" in json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]

    def no_prompt(*args):
        raise AssertionError(f"asked: {args}")

    monkeypatch.setattr("builtins.input", no_prompt)
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert loaded("the movie")["input_ids"] == tokenizer("the movie")["input_ids"]
    result = run_without_hf_wsvd(f"""
        import builtins
        from transformers import AutoTokenizer
        def no_prompt(*args):
            raise SystemExit("asked to run custom code")
        builtins.input = no_prompt
        tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=False)
        print(tokenizer("the movie")["input_ids"])
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(tokenizer("the movie")["input_ids"])
    assert sys.modules.get("hf_wsvd") is not None


def test_load_factorized_reads_a_subfolder_and_names_a_folder_without_config(tmp_path):
    """The model type is read from the file before AutoConfig (never the folder's own code), in the
    subfolder given; a folder without config.json is named as such."""
    from hf_wsvd.integrations.checkpoint import load_factorized

    model, _ = tiny.compressed("llama")
    model.save_pretrained(tmp_path / "repo" / "sub")
    loaded = load_factorized(str(tmp_path / "repo"), subfolder="sub")
    assert loaded.config.model_type == "hf_wsvd" and loaded.config.wsvd["ranks"] == model.config.wsvd["ranks"]
    with pytest.raises(FileNotFoundError, match="holds no config.json: not a checkpoint folder"):
        load_factorized(str(tmp_path / "repo"))
