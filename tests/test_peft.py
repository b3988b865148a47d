"""LoRA on factorized models: on the inner linears, and on whole FactorizedLinear modules through
the registered custom layer (exact merge by concatenating factors)."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import tiny
from hf_wsvd import FactorizedLinear
from hf_wsvd.integrations.peft_lora import (
    FactorizedLoraLayer,
    factorized_module_names,
    load_adapter,
    merge_and_unload,
    register_factorized_lora,
)

AUTO = transformers.AutoModelForSequenceClassification


def _compressed_dir(tmp_path):
    _, report = tiny.save_compressed(tmp_path / "base", "bert", with_tokenizer=False)
    return tmp_path / "base", report.ranks


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tiny.inputs("bert")).logits


def _ranks(model) -> dict[str, int]:
    return {n.removeprefix("bert.").removesuffix(".base_layer"): m.rank
            for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def test_lora_on_inner_linears_saves_reloads_and_merges_at_the_same_rank(tmp_path):
    base_dir, ranks = _compressed_dir(tmp_path)
    plain = _logits(AUTO.from_pretrained(base_dir))
    peft_model = get_peft_model(AUTO.from_pretrained(base_dir),
                                LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False))
    adapted = _logits(peft_model)
    assert (adapted - plain).abs().max() > 1e-4  # the adapters do something
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(AUTO.from_pretrained(base_dir), tmp_path / "adapter")
    assert torch.allclose(_logits(reloaded), adapted, atol=1e-6)
    merged = merge_and_unload(reloaded)
    assert _ranks(merged) == ranks and merged.config.wsvd["ranks"] == ranks
    assert torch.allclose(_logits(merged), adapted, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    assert torch.allclose(_logits(AUTO.from_pretrained(tmp_path / "merged")), adapted, atol=1e-5)


def test_lora_on_whole_factorized_modules_merges_exactly_into_higher_rank(tmp_path):
    base_dir, ranks = _compressed_dir(tmp_path)
    model = AUTO.from_pretrained(base_dir)
    targets = factorized_module_names(model)
    assert len(targets) == 12
    config = register_factorized_lora(LoraConfig(r=3, lora_alpha=6, target_modules=targets, init_lora_weights=False))
    peft_model = get_peft_model(model, config)
    wrapped = [m for m in peft_model.modules() if isinstance(m, FactorizedLoraLayer)]
    assert len(wrapped) == 12
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    adapted = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")

    # The custom mapping is not saved with the adapter: plain peft cannot load it back...
    with pytest.raises(ValueError, match="not supported"):
        PeftModel.from_pretrained(AUTO.from_pretrained(base_dir), tmp_path / "adapter")
    # ...re-registering the layer (load_adapter) onto a freshly loaded base can.
    reloaded = load_adapter(AUTO.from_pretrained(base_dir), tmp_path / "adapter")
    assert torch.allclose(_logits(reloaded), adapted, atol=1e-6)
    # the dense model has layers of the same names and shapes: refused, not loaded onto the wrong base
    with pytest.raises(ValueError, match="was trained on a model compressed by hf_wsvd .*not onto the dense"):
        load_adapter(tiny.build("bert"), tmp_path / "adapter")
    # with a task type peft records no base class: the base folder's config says it instead
    typed = get_peft_model(AUTO.from_pretrained(base_dir), register_factorized_lora(
        LoraConfig(r=2, target_modules=targets, task_type="SEQ_CLS")))
    typed.save_pretrained(tmp_path / "typed")
    with pytest.raises(ValueError, match="model_type 'hf_wsvd'.*not onto the dense"):
        load_adapter(tiny.build("bert"), tmp_path / "typed")
    assert isinstance(load_adapter(AUTO.from_pretrained(base_dir), tmp_path / "typed"), PeftModel)

    # merge / unmerge in place: rank r -> r + 3 -> r, outputs unchanged
    reloaded.merge_adapter()
    assert _ranks(reloaded.base_model.model) == {k: r + 3 for k, r in ranks.items()}
    assert torch.allclose(_logits(reloaded), adapted, atol=1e-5)
    reloaded.unmerge_adapter()
    assert _ranks(reloaded.base_model.model) == ranks
    assert torch.allclose(_logits(reloaded), adapted, atol=1e-5)

    merged = merge_and_unload(reloaded)
    assert not any(isinstance(m, FactorizedLoraLayer) for m in merged.modules())
    expected = {k: r + 3 for k, r in ranks.items()}
    assert _ranks(merged) == expected and merged.config.wsvd["ranks"] == expected
    assert torch.allclose(_logits(merged), adapted, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = AUTO.from_pretrained(tmp_path / "merged")
    assert _ranks(again) == expected
    assert torch.allclose(_logits(again), adapted, atol=1e-5)


def test_peft_s_own_merge_and_unload_saves_a_checkpoint_that_reloads(tmp_path):
    """Stock ``PeftModel.merge_and_unload`` (not hf_wsvd's) changes the ranks without telling the
    config: ``save_pretrained`` records the ranks the saved factors have."""
    base_dir, ranks = _compressed_dir(tmp_path)
    model = AUTO.from_pretrained(base_dir)
    config = register_factorized_lora(LoraConfig(r=2, target_modules=factorized_module_names(model), init_lora_weights=False))
    peft_model = get_peft_model(model, config)
    adapted = _logits(peft_model)
    merged = peft_model.merge_and_unload()
    assert merged.config.wsvd["ranks"] == ranks  # stale: peft knows nothing of it
    merged.save_pretrained(tmp_path / "merged")
    expected = {k: r + 2 for k, r in ranks.items()}
    again = AUTO.from_pretrained(tmp_path / "merged")
    assert _ranks(again) == expected and again.config.wsvd["ranks"] == expected
    assert torch.allclose(_logits(again), adapted, atol=1e-5)


def test_a_merge_beyond_full_rank_is_refused(tmp_path):
    base_dir, _ = _compressed_dir(tmp_path)
    model = AUTO.from_pretrained(base_dir)
    name = "bert.encoder.layer.0.attention.self.query"  # 32x32 at rank 8
    config = register_factorized_lora(LoraConfig(r=30, target_modules=[name], init_lora_weights=False))
    peft_model = get_peft_model(model, config)
    with pytest.raises(ValueError, match="above min"):
        peft_model.merge_and_unload()


def test_the_docs_lora_examples_run(tmp_path, monkeypatch):
    """The two LoRA code blocks of docs/training.md, as written, on a tiny compressed classifier."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    section = page.split("## LoRA adapters (peft)", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    _, report = tiny.save_compressed(tmp_path / "sst2-fwsvd", "bert", with_tokenizer=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/training.md (LoRA, inner linears)", "exec"), {})
    assert _ranks(AUTO.from_pretrained("sst2-fwsvd-merged")) == report.ranks
    whole = {}
    exec(compile(blocks[1], "docs/training.md (LoRA, whole modules)", "exec"), whole)
    assert _ranks(whole["reloaded"]) == {k: r + 8 for k, r in report.ranks.items()}


def test_lora_on_factorized_modules_and_hf_wsvd_peft_paths_warn_nothing_users_cannot_act_on(tmp_path):
    """No "Unsupported layer type FactorizedLinear ... at your own risk" from peft (the layer tells
    peft its sizes), and no transformers FutureWarning about is_gradient_checkpointing (which peft
    reads) from hf_wsvd's own peft calls: load_adapter and healing with LoRA."""
    import warnings

    from hf_wsvd.integrations.healing import HealConfig, heal

    base, _ = _compressed_dir(tmp_path)
    model = AUTO.from_pretrained(base)
    config = register_factorized_lora(LoraConfig(r=2, target_modules=factorized_module_names(model)))
    with warnings.catch_warnings(record=True) as user_call:
        warnings.simplefilter("always")
        get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    assert not [w for w in user_call if "Unsupported layer type" in str(w.message)], [str(w.message) for w in user_call]
    student, _ = tiny.compressed("llama")
    blocks = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in torch.randint(7, 60, (6, 8))]
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        load_adapter(AUTO.from_pretrained(base), tmp_path / "adapter")
        heal(student, tiny.build("llama"), blocks[:4], blocks[4:], HealConfig(steps=1, lora_rank=2), show_progress=False)
    noise = [str(w.message) for w in ours if "Unsupported layer type" in str(w.message)
             or "is_gradient_checkpointing" in str(w.message)]
    assert not noise, noise


def test_lora_on_a_checkpoint_quantized_at_load_trains_and_refuses_to_merge_into_quantized_factors(tmp_path):
    from hf_wsvd.integrations.quantization import quantization_config

    model, _ = tiny.compressed("llama", method="svd", param_ratio=0.5)
    model.save_pretrained(tmp_path)
    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization_config("int4", 32))

    quantized = load()
    kept = [name for name, m in quantized.named_modules() if type(m).__name__ == "FullPrecisionLinear"]
    assert kept  # factors whose input size the groups do not divide stay in the model's dtype
    inner = get_peft_model(quantized, register_factorized_lora(LoraConfig(r=2, target_modules=["up", "down"])))
    x = tiny.inputs("llama")
    inner(**x, labels=x["input_ids"]).loss.backward()
    lora = {type(m).__name__ for m in inner.modules()}
    assert "FullPrecisionLoraLayer" in lora
    assert all(p.grad is not None for n, p in inner.named_parameters() if "lora_" in n and any(k in n for k in kept))
    quantized = load()
    whole = get_peft_model(quantized, register_factorized_lora(LoraConfig(r=2, target_modules=factorized_module_names(quantized))))
    with pytest.raises(ValueError, match="cannot merge LoRA into quantized factors"):
        merge_and_unload(whole)


def test_a_folder_holding_a_peft_adapter_is_refused_by_every_command_before_any_work(tmp_path, capsys):
    """transformers would load an adapter saved beside a model onto it (counted by inspect, applied
    by eval, failing compress and heal only where they save): each command refuses the folder in one
    line; a folder of the adapter alone is named as one, not as a model."""
    from hf_wsvd.cli import main

    base_dir, _ = _compressed_dir(tmp_path)
    get_peft_model(AUTO.from_pretrained(base_dir), LoraConfig(r=2, target_modules=["up", "down"])).save_pretrained(
        tmp_path / "adapter")
    beside = tmp_path / "beside"
    beside.mkdir()
    for folder in (base_dir, tmp_path / "adapter"):
        for item in folder.iterdir():
            (beside / item.name).write_bytes(item.read_bytes())
    dense = tiny.save(tiny.build("bert"), tmp_path / "dense")
    (dense / "adapter_config.json").write_bytes((tmp_path / "adapter" / "adapter_config.json").read_bytes())
    data = tmp_path / "text.tsv"
    data.write_text("sentence\tlabel\n" + "the movie was great\t1\nthe plot was bad\t0\n" * 10)
    commands = {"inspect": ["inspect", str(beside)], "export": ["export", str(beside), str(tmp_path / "out")],
                "eval": ["eval", str(beside), "--data", str(data), "--max-length", "8"],
                "compress": ["compress", str(dense), str(tmp_path / "out"), "--method", "svd"],
                "push": ["push", str(beside), "user/x"]}
    for command, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 2, command
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "holds a peft adapter beside the model (adapter_config.json, for the base " \
            "model " in errors[0] and "merge_and_unload" in errors[0], (command, errors)
    assert not (tmp_path / "out").exists()
    assert main(["inspect", str(tmp_path / "adapter")]) == 2
    assert f"{str(tmp_path / 'adapter')!r} holds a peft adapter (adapter_config.json, for the base model " \
        f"{str(base_dir)!r}), not a model" in capsys.readouterr().err


def test_compress_refuses_a_model_holding_peft_adapter_layers():
    """Its target layers would be peft's wrappers, left dense, and its save would not reload."""
    from hf_wsvd import WSVDConfig, compress

    wrapped = get_peft_model(tiny.build("bert"), LoraConfig(r=2, target_modules=["query"])).base_model.model
    with pytest.raises(ValueError, match="peft adapter layers \\(the first: 'bert.encoder.layer.0.attention.self."
                                         "query'\\): merge them first"):
        compress(wrapped, WSVDConfig(method="svd", param_ratio=0.9))
