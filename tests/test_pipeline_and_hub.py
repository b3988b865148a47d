"""pipeline() on factorized checkpoints, and push_to_hub through a substituted Hub API."""

from __future__ import annotations

import pytest
import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from transformers import pipeline

import tiny
from helpers import FolderHub, main_output, run_without_hf_wsvd
from hf_wsvd import FactorizedLinear


def _n_factorized(model) -> int:
    return sum(isinstance(m, FactorizedLinear) for m in model.modules())


def test_text_classification_pipeline(tmp_path, tokenizer):
    model, _ = tiny.save_compressed(tmp_path, "bert")
    classify = pipeline("text-classification", model=str(tmp_path), top_k=None)
    assert _n_factorized(classify.model) == 12
    scores = classify(["the movie was great"])[0]
    with torch.no_grad():
        probs = main_output(model(**tokenizer("the movie was great", return_tensors="pt"))).softmax(-1)[0]
    by_label = {s["label"]: s["score"] for s in scores}
    assert by_label["LABEL_1"] == pytest.approx(probs[1].item(), abs=1e-5)


def test_fill_mask_pipeline(tmp_path, tokenizer):
    model, _ = tiny.save_compressed(tmp_path, "bert", "AutoModelForMaskedLM")
    fill = pipeline("fill-mask", model=str(tmp_path))
    assert _n_factorized(fill.model) == 12
    predictions = fill("the movie was [MASK]")
    encoded = tokenizer("the movie was [MASK]", return_tensors="pt")
    position = encoded["input_ids"][0].tolist().index(tokenizer.mask_token_id)
    with torch.no_grad():
        expected = main_output(model(**encoded))[0, position].argmax().item()
    assert len(predictions) == 5 and predictions[0]["token"] == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_text_generation_pipeline(tmp_path, tokenizer, arch):
    model, _ = tiny.save_compressed(tmp_path, arch, "AutoModelForCausalLM")
    generate = pipeline("text-generation", model=str(tmp_path))
    assert _n_factorized(generate.model) == _n_factorized(model) > 0
    out = generate("the movie", max_new_tokens=5, do_sample=False, return_tensors=True)[0]
    ids = tokenizer("the movie", return_tensors="pt", add_special_tokens=False)
    expected = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert list(out["generated_token_ids"]) == expected[0].tolist()


def test_push_to_hub_uploads_a_loadable_checkpoint(tmp_path, monkeypatch):
    hub = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", hub)
    # No Hub here: the card transformers would fetch from the repo starts empty.
    monkeypatch.setattr(transformers.utils.hub, "create_and_tag_model_card",
                        lambda repo_id, tags=None, token=None: ModelCard.from_template(ModelCardData()))
    model, _ = tiny.compressed("llama")
    model.push_to_hub("user/tiny-llama-wsvd")
    uploaded = set(hub.commits[0])
    assert {"config.json", "model.safetensors", "modeling_wsvd.py", "factorized_linear.py"} <= uploaded
    repo = tmp_path / "hub" / "user" / "tiny-llama-wsvd"
    inputs = tiny.inputs("llama")
    with torch.no_grad():
        reference = main_output(model(**inputs))
        loaded = transformers.AutoModelForCausalLM.from_pretrained(repo)
        assert (main_output(loaded(**inputs)) - reference).abs().max().item() <= 1e-6
    torch.save({"inputs": inputs, "reference": reference}, tmp_path / "ref.pt")
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        saved = torch.load("{tmp_path}/ref.pt")
        model = transformers.AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
        with torch.no_grad():
            diff = (model(**saved["inputs"]).logits - saved["reference"]).abs().max().item()
        assert diff <= 1e-6, diff
        print("remote ok")
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout
