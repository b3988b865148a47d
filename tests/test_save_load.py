"""The save/load contract on tiny BERT, RoBERTa, DistilBERT, GPT-2 (Conv1D), Llama (GQA), Qwen2 (GQA, q/k/v biases, untied head) and T5."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import tiny
from helpers import main_output, run_without_hf_wsvd
import hf_wsvd
from hf_wsvd import FactorizedLinear

ARCHS = list(tiny.CONFIGS)


def _compressed(arch: str, path):
    model, report = tiny.save_compressed(path, arch, with_tokenizer=False)
    with torch.no_grad():
        reference = main_output(model(**tiny.inputs(arch)))
    return model, report, reference


def _factorized(model) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


@pytest.mark.parametrize("arch", ARCHS)
def test_stock_auto_classes_rebuild_factorized_layers(arch, tmp_path):
    model, report, reference = _compressed(arch, tmp_path)
    assert report.params_after < report.params_before
    for i, auto_name in enumerate(tiny.AUTO_CLASSES[arch]):
        loaded = getattr(transformers, auto_name).from_pretrained(tmp_path).eval()
        assert len(_factorized(loaded)) == len(report.ranks), auto_name
        assert loaded.config.model_type == "hf_wsvd"
        with torch.no_grad():
            if i == 0:  # the saved class reproduces the outputs
                out = main_output(loaded(**tiny.inputs(arch)))
                assert (out - reference).abs().max().item() <= 1e-6
            elif auto_name == "AutoModel":  # the bare model reproduces the base model's hidden states
                base = model.get_encoder() if arch == "t5" else model.base_model
                inputs = {k: v for k, v in tiny.inputs(arch).items() if arch != "t5" or k != "decoder_input_ids"}
                expected = base(**inputs).last_hidden_state
                out = (loaded.get_encoder() if arch == "t5" else loaded)(**inputs).last_hidden_state
                assert (out - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_dtype_and_device_map(arch, tmp_path):
    _, _, reference = _compressed(arch, tmp_path)
    auto = getattr(transformers, tiny.AUTO_CLASSES[arch][0])
    half = auto.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = main_output(half(**tiny.inputs(arch))).float()
    assert (out - reference).abs().max().item() < 0.1 * reference.abs().max().item() + 0.05
    mapped = auto.from_pretrained(tmp_path, device_map="auto")
    assert len(_factorized(mapped)) > 0
    assert mapped.device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # where accelerate places it
    with torch.no_grad():
        out = main_output(mapped(**{k: v.to(mapped.device) for k, v in tiny.inputs(arch).items()})).cpu()
    # On a GPU the same float32 model runs other kernels (other summation orders) than the reference on the CPU.
    tolerance = 1e-6 if mapped.device.type == "cpu" else 1e-5 * reference.abs().max().item()
    assert (out - reference).abs().max().item() <= tolerance


def test_disk_offload_loads_and_a_tensor_without_values_is_refused(tmp_path):
    """Offloaded tensors wait on "meta" behind accelerate's hooks and load fine; a tensor on "meta"
    that nothing will fill is refused, whatever the load's report says."""
    from hf_wsvd.runtime.modeling_wsvd import check_loaded

    model, _, reference = _compressed("llama", tmp_path / "ckpt")
    layers = {f"model.layers.{i}": "disk" if i else "cpu" for i in range(model.config.num_hidden_layers)}
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu", **layers}
    offloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=tmp_path / "offload", output_loading_info=True)
    assert any(p.is_meta for p in offloaded.parameters())  # the disk layers' weights wait in the folder
    with torch.no_grad():
        assert (main_output(offloaded(**tiny.inputs("llama"))) - reference).abs().max().item() <= 1e-6
    check_loaded(offloaded, info)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    name, factor = next((n, m) for n, m in loaded.named_modules() if isinstance(m, FactorizedLinear))
    factor.up.weight = torch.nn.Parameter(torch.empty_like(factor.up.weight, device="meta"))
    with pytest.raises(ValueError, match=rf"the tensor '{name}.up.weight' was not filled by the checkpoint's weights"):
        check_loaded(loaded, info)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_checkpoint_files_and_resave(arch, tmp_path):
    _, report, reference = _compressed(arch, tmp_path / "a")
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"model.safetensors", "config.json", "modeling_wsvd.py", "factorized_linear.py"} <= names
    assert not any(n.endswith(".bin") for n in names)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_type"] == "hf_wsvd" and config["wsvd_base_model_type"] == arch
    assert config["wsvd"]["ranks"] == report.ranks
    assert config["auto_map"]["AutoConfig"] == f"modeling_wsvd.Wsvd{type(transformers.AutoConfig.for_model(arch)).__name__}"
    auto = getattr(transformers, tiny.AUTO_CLASSES[arch][0])
    auto.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    again = auto.from_pretrained(tmp_path / "b")
    with torch.no_grad():
        assert (main_output(again(**tiny.inputs(arch))) - reference).abs().max().item() <= 1e-6


def test_ranks_that_disagree_with_the_weights_fail_loudly(tmp_path):
    _compressed("bert", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    name = next(iter(config["wsvd"]["ranks"]))
    config["wsvd"]["ranks"][name] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="(?i)size|shape"):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_remote_code_loads_without_hf_wsvd(tmp_path):
    """(b): trust_remote_code=True rebuilds every architecture from the code saved with it."""
    expected = {}
    for arch in ARCHS:
        _, report, reference = _compressed(arch, tmp_path / arch)
        torch.save({"inputs": tiny.inputs(arch), "reference": reference, "n": len(report.ranks)},
                   tmp_path / f"{arch}.pt")
        expected[arch] = tiny.AUTO_CLASSES[arch][0]
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        try:
            import hf_wsvd
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("hf_wsvd should not be importable here")
        for arch, auto_name in {expected!r}.items():
            saved = torch.load("{tmp_path}/" + arch + ".pt")
            model = getattr(transformers, auto_name).from_pretrained("{tmp_path}/" + arch, trust_remote_code=True)
            n = sum(type(m).__name__ == "FactorizedLinear" for m in model.modules())
            assert n == saved["n"], (arch, n)
            with torch.no_grad():
                out = model(**saved["inputs"])
            out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            diff = (out - saved["reference"]).abs().max().item()
            assert diff <= 1e-6, (arch, diff)
            model.save_pretrained("{tmp_path}/resaved-" + arch)
            again = getattr(transformers, auto_name).from_pretrained("{tmp_path}/resaved-" + arch, trust_remote_code=True)
            print(arch, "ok", type(model).__name__)
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok ") == len(ARCHS)


def test_without_hf_wsvd_or_remote_code_loading_fails_clearly(tmp_path):
    """(c): never a dense model with random weights."""
    _compressed("bert", tmp_path / "bert")
    _compressed("llama", tmp_path / "llama")
    result = run_without_hf_wsvd(f"""
        import transformers
        for arch, auto in [("bert", transformers.AutoModelForSequenceClassification),
                           ("bert", transformers.AutoModel), ("llama", transformers.AutoModelForCausalLM)]:
            try:
                auto.from_pretrained("{tmp_path}/" + arch)
            except ValueError as error:
                assert "trust_remote_code" in str(error), str(error)
                print("refused", arch)
            else:
                raise SystemExit("loaded a factorized checkpoint without its code")
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("refused") == 3


def test_loading_into_another_task_class_leaves_the_config_as_asked(tmp_path):
    """The missing-tensor check builds the saved class from a copy of the config: GPT2DoubleHeadsModel's
    __init__ sets num_labels = 1, which must not reach a classifier loaded with num_labels=3."""
    dense = transformers.GPT2DoubleHeadsModel(tiny.CONFIGS["gpt2"]()).eval()
    model, _ = hf_wsvd.compress(dense, hf_wsvd.WSVDConfig(method="svd", param_ratio=0.5), show_progress=False)
    model.save_pretrained(tmp_path / "double-heads")
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "double-heads", num_labels=3)
    assert classifier.score.out_features == classifier.config.num_labels == 3
    classifier.save_pretrained(tmp_path / "classifier")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")
    assert torch.equal(again.score.weight, classifier.score.weight)


def test_a_config_object_shared_with_another_model_stays_the_callers(tmp_path):
    """Models built from one config object hold that object: compressing one (in place) gives it its
    own config, held by all of its modules, and leaves the other model dense, compressible, saved as
    a stock checkpoint."""
    shared = tiny.CONFIGS["llama"]()
    student, teacher = (transformers.LlamaForCausalLM(shared).eval() for _ in range(2))
    model, _ = hf_wsvd.compress(student, hf_wsvd.WSVDConfig(method="svd", param_ratio=0.5), show_progress=False)
    assert type(shared) is transformers.LlamaConfig and shared.model_type == "llama" and not hasattr(shared, "wsvd")
    assert teacher.config is shared and type(teacher).__name__ == "LlamaForCausalLM"
    assert model.config is not shared and model.config.model_type == "hf_wsvd"
    assert all(m.config is model.config for m in model.modules() if hasattr(m, "config"))
    teacher.save_pretrained(tmp_path / "teacher")
    assert json.loads((tmp_path / "teacher" / "config.json").read_text())["model_type"] == "llama"
    model.save_pretrained(tmp_path / "student")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    ids = tiny.inputs("llama")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)
    hf_wsvd.compress(teacher, hf_wsvd.WSVDConfig(method="svd", param_ratio=0.5), show_progress=False)


@pytest.mark.parametrize("recipe", [dict(mlp_pruning=True, attention_pruning=True, rank_multiple=2, allocation="uniform",
                                         param_ratio=0.7), dict(mlp_pruning=False, param_ratio=0.5)])
def test_a_disk_offloaded_model_compresses_saves_and_reloads_as_the_same_model_in_memory(tmp_path, recipe,
                                                                                       cpu_accelerator):
    """Layers replaced in offloaded blocks get one offload hook each, as device_map dispatch makes them:
    cpu_offload's pair of hooks on a pruned linear broke save_pretrained, and hid the layer's weights
    from the attention cut's refit. Both runs compute on the CPU: where a GPU is present, the blocks
    this device map offloads still run where their hooks say (the CPU), those of the model in memory
    would visit the GPU, and refinement trains there under bf16 autocast."""
    from accelerate.hooks import AlignDevicesHook

    from hf_wsvd import WSVDConfig, compress

    dense = tiny.build("llama", "AutoModelForCausalLM", seed=0, hidden_size=64, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16)
    dense.save_pretrained(tmp_path / "dense")
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            for ids in (tiny.inputs("llama", batch=2, length=16, seed=s)["input_ids"] for s in range(2))]
    config = WSVDConfig(block_refine_steps=2, **recipe)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "disk"}
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map,
                                                                 offload_folder=tmp_path / "offload")
    offloaded, report = compress(offloaded, config, data, show_progress=False, accelerator=cpu_accelerator)
    plain, plain_report = compress(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), config, data,
                                   show_progress=False, accelerator=cpu_accelerator)
    assert report.ranks == plain_report.ranks and report.pruned == plain_report.pruned
    assert report.attention == plain_report.attention and bool(report.pruned) == recipe["mlp_pruning"]
    assert bool(report.attention) == recipe.get("attention_pruning", False)
    hooks = [m._hf_hook for m in offloaded.model.layers[1].modules() if hasattr(m, "_hf_hook")]
    assert hooks and all(type(h) is AlignDevicesHook for h in hooks)
    inputs = tiny.inputs("llama")
    with torch.no_grad():
        reference = plain(**inputs).logits
        assert (offloaded(**inputs).logits - reference).abs().max().item() <= 1e-5
    offloaded.save_pretrained(tmp_path / "compressed")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")
    with torch.no_grad():
        assert (reloaded(**inputs).logits - reference).abs().max().item() <= 1e-5
