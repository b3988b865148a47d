"""Healing: distillation of a compressed causal LM toward its dense teacher."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
import transformers
import torch.nn.functional as F

import tiny
from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd.data import teacher_samples
from hf_wsvd.integrations.healing import KL_CHUNK_ELEMENTS, HealConfig, heal, token_kl
from transformers import AutoModelForCausalLM


def _blocks(count: int, length: int = 12, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(tiny.SPECIALS), tiny.VOCAB_SIZE, (count, length), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]


def _compressed(arch: str = "llama"):
    # A larger initialization than the default: sharper next-token distributions to distill.
    teacher = tiny.build(arch, initializer_range=0.3)
    blocks = _blocks(16)
    loader = torch.utils.data.DataLoader([{**b, "labels": b["input_ids"]} for b in blocks], batch_size=4)
    # Factorized layers: healing of pruned ones is tested in test_mlp_pruning.py.
    student, _ = compress(copy.deepcopy(teacher), WSVDConfig(method="whiten", param_ratio=0.4, rank_multiple=1,
                                                             mlp_pruning=False, attention_pruning=False),
                          loader, show_progress=False)
    return teacher, student


def _ranks(model) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def test_token_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5)
    assert float(token_kl(logits, logits, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(token_kl(logits + torch.randn(2, 5, 11), logits, mask)) > 0
    # Padding positions do not count.
    noisy = logits.clone()
    noisy[:, -1] += 10 * torch.randn(2, 11)
    mask[:, -1] = 0
    assert float(token_kl(noisy, logits, mask)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("chunk_elements", [1, 33, 10**9])
def test_token_kl_in_chunks_equals_the_whole_batch_loss_and_its_gradient(chunk_elements):
    # chunks of 1 row (fewer elements than a row), of 3 rows (the last one shorter) and one chunk
    torch.manual_seed(0)
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    log_s, log_t = F.log_softmax(student / 2, dim=-1), F.log_softmax(teacher / 2, dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    expected = (per_token * mask).sum() / mask.sum() * 4
    (expected_grad,) = torch.autograd.grad(expected, student)
    loss = token_kl(student, teacher, mask, temperature=2.0, chunk_elements=chunk_elements)
    (grad,) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    with torch.no_grad():  # the evaluation path: no gradient computed, the same value
        torch.testing.assert_close(token_kl(student, teacher, mask, 2.0, chunk_elements), loss.detach())
    # the gradient is scaled in place, once: a second pass through the same graph is refused, not wrong
    loss = token_kl(student, teacher, mask, temperature=2.0, chunk_elements=chunk_elements)
    torch.testing.assert_close(torch.autograd.grad(3 * loss, student, retain_graph=True)[0], 3 * expected_grad)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, student)


def test_token_kl_gradient_reaches_half_precision_and_strided_logits():
    torch.manual_seed(0)
    teacher = torch.randn(3, 6, 50)
    mask = torch.ones(3, 6)
    wide = torch.randn(3, 6, 64, requires_grad=True)  # a strided view: the gradient goes back through reshape
    student = wide[..., :50]
    (grad,) = torch.autograd.grad(token_kl(student, teacher, mask, chunk_elements=70), wide)
    plain = student.detach().clone().requires_grad_()
    (plain_grad,) = torch.autograd.grad(token_kl(plain, teacher, mask, chunk_elements=10**9), plain)
    torch.testing.assert_close(grad[..., :50], plain_grad)
    assert not grad[..., 50:].any()
    # bfloat16 logits (mixed-precision training): a bfloat16 gradient of the float32 one's values
    low = student.detach().bfloat16().requires_grad_()
    (low_grad,) = torch.autograd.grad(token_kl(low, teacher, mask, chunk_elements=70), low)
    assert low_grad.dtype == torch.bfloat16
    torch.testing.assert_close(low_grad.float(), plain_grad, atol=1e-4, rtol=2e-2)
    # float16 under a loss scaler: gradients far below float16's range survive until the scale reaches them
    half = torch.randn(2, 4, 16).half().requires_grad_()
    near = half.detach().float() + 1e-6 * torch.randn(2, 4, 16)
    (half_grad,) = torch.autograd.grad(2.0**16 * token_kl(half, near, torch.ones(2, 4)), half)
    assert half_grad.dtype == torch.float16 and (half_grad != 0).float().mean() > 0.9


@pytest.mark.parametrize("chunk_elements", [0, -5, 1e9, True])
def test_token_kl_refuses_a_chunk_size_that_is_not_a_positive_whole_number(chunk_elements):
    logits = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match=f"chunk_elements={chunk_elements!r} must be a whole number"):
        token_kl(logits, logits, torch.ones(1, 2), chunk_elements=chunk_elements)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_token_kl_memory_does_not_grow_with_copies_of_a_large_vocabulary_batch():
    """Healing Qwen2.5 (151,936 tokens) at batch 32 × 512 ran out of an 80 GB GPU in this loss, which
    held about six float32 copies of the logits: now its gradient is the only tensor of the logits'
    size, the rest is one chunk's."""
    torch.manual_seed(0)
    shape = (32, 512, 151936)
    student = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(shape[:2], device="cuda")
    logits_bytes = student.numel() * student.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    token_kl(student, teacher, mask).backward()
    torch.cuda.synchronize()
    chunk_bytes = 6 * KL_CHUNK_ELEMENTS * 4  # a chunk's float32 intermediates
    assert torch.cuda.max_memory_allocated() - before <= logits_bytes + chunk_bytes + 2**26
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_heal_lowers_the_heldout_distillation_loss_and_keeps_the_ranks(lora_rank, tmp_path):
    teacher, student = _compressed()
    ranks = _ranks(student)
    config = HealConfig(steps=60, learning_rate=2e-2, batch_size=4, lora_rank=lora_rank)
    healed, report = heal(student, teacher, _blocks(32, seed=1), _blocks(8, seed=2), config, show_progress=False)
    assert report.kl_after < 0.9 * report.kl_before, report
    assert _ranks(healed) == ranks
    assert not any("lora" in name for name, _ in healed.named_modules())
    assert report.trainable_parameters > 0
    # The healed model is an ordinary factorized checkpoint: it saves and reloads unchanged.
    healed.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    inputs = tiny.inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, healed(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_heal_is_the_same_for_the_same_seed_whatever_the_random_state_before(lora_rank):
    """LoRA's initial weights come from HealConfig.seed (peft draws them from the global random state)."""
    healed = []
    for state in (1, 2):
        teacher, student = _compressed()
        torch.manual_seed(state)
        config = HealConfig(steps=4, learning_rate=2e-2, batch_size=4, lora_rank=lora_rank, evaluations=0)
        model, _ = heal(student, teacher, _blocks(8, seed=1), _blocks(4, seed=2), config, show_progress=False)
        healed.append(model.state_dict())
    for name, value in healed[0].items():
        assert torch.equal(value, healed[1][name]), name


def test_a_lora_rank_above_every_compressed_layer_is_refused():
    teacher, student = _compressed()
    largest = max(min(m.weight.shape) for n, m in student.named_modules() if n.endswith((".up", ".down")))
    with pytest.raises(ValueError, match=re.escape(f"lora_rank={largest + 1} (--lora-rank) exceeds every compressed "
                                                   f"layer's smaller side (at most {largest})")):
        heal(student, teacher, _blocks(4), _blocks(2), HealConfig(steps=1, lora_rank=largest + 1), show_progress=False)


def test_heal_trains_only_the_factors():
    teacher, student = _compressed()
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".up." not in n and ".down." not in n}
    healed, _ = heal(student, teacher, _blocks(16, seed=1), _blocks(4, seed=2),
                     HealConfig(steps=5, learning_rate=1e-2, batch_size=4), show_progress=False)
    for name, value in healed.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name


@pytest.mark.parametrize("field, value", [("steps", 0), ("learning_rate", -1.0), ("lora_rank", 0),
                                          ("temperature", 0.0), ("hidden_weight", -1.0), ("evaluations", -1),
                                          ("evaluations", 2.5)])
def test_bad_heal_options_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        HealConfig(**{field: value})


def test_an_offloaded_student_is_refused_by_name_and_an_offloaded_teacher_is_used():
    from accelerate import cpu_offload

    teacher, student = _compressed()
    offloaded = copy.deepcopy(student)
    cpu_offload(offloaded.model.layers[1], execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="'model.layers.1.self_attn.q_proj.down.weight' is offloaded"):
        heal(offloaded, teacher, _blocks(4), _blocks(2), HealConfig(steps=1), show_progress=False)
    # A teacher offloaded whole (its first weights on the meta device too) distills as it is, hooks and all.
    cpu_offload(teacher, execution_device=torch.device("cpu"))
    _, report = heal(student, teacher, _blocks(8, seed=1), _blocks(4, seed=2),
                     HealConfig(steps=2, batch_size=4, hidden_weight=0.5), show_progress=False)
    assert math.isfinite(report.kl_before) and math.isfinite(report.kl_after)
    assert teacher.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # still offloaded


def test_a_dense_model_is_refused():
    teacher = tiny.build("llama")
    with pytest.raises(ValueError, match="no factorized or pruned layers"):
        heal(copy.deepcopy(teacher), teacher, _blocks(4), _blocks(2), HealConfig(steps=1), show_progress=False)


def test_cli_heal_writes_a_factorized_checkpoint_with_its_card(tmp_path, monkeypatch, caplog):
    from hf_wsvd.cli import main
    from hf_wsvd.integrations import healing

    configs = []

    def spied(student, teacher, train, heldout, config):
        configs.append(config)
        return heal(student, teacher, train, heldout, config)

    monkeypatch.setattr(healing, "heal", spied)

    teacher, student = _compressed()
    tokenizer = tiny.tokenizer()
    teacher.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    student.save_pretrained(tmp_path / "compressed")
    tokenizer.save_pretrained(tmp_path / "compressed")
    words = tiny.WORDS
    text = "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(60))
    (tmp_path / "text.txt").write_text(text)
    out = tmp_path / "healed"
    code = main(["heal", str(tmp_path / "compressed"), str(out), "--teacher", str(tmp_path / "dense"),
                 "--data", str(tmp_path / "text.txt"), "--steps", "4", "--max-length", "8", "--batch-size", "4",
                 "--heldout-blocks", "4", "--hidden-weight", "0.5", "--teacher-samples", "3", "--teacher-batch-size", "2",
                 "--evaluations", "2"])
    assert code == 0
    assert [(c.steps, c.evaluations, c.hidden_weight) for c in configs] == [(4, 2, 0.5)]
    healed = AutoModelForCausalLM.from_pretrained(out)
    assert _ranks(healed) == _ranks(student)
    card = (out / "README.md").read_text()
    assert "## Healing" in card and "healed 4 steps" in card and "and 3 written by the teacher" in card
    assert not [r for r in caplog.records if "metadata block was not found" in r.getMessage()]  # no card: no noise
    # Nothing was written into the inputs, and the output refuses to be overwritten silently.
    assert not (tmp_path / "compressed" / "README.md").exists()
    assert main(["heal", str(tmp_path / "compressed"), str(out), "--teacher", str(tmp_path / "dense"),
                 "--data", str(tmp_path / "text.txt"), "--steps", "1"]) == 2


def _saved(tmp_path, **models) -> None:
    for folder, model in models.items():
        model.save_pretrained(tmp_path / folder)
        tiny.tokenizer().save_pretrained(tmp_path / folder)


def _heal(tmp_path, student: str, teacher: str, data: str = "text.txt", *extra: str) -> int:
    from hf_wsvd.cli import main

    return main(["heal", str(tmp_path / student), str(tmp_path / "out"), "--teacher", str(tmp_path / teacher),
                 "--data", str(tmp_path / data), *extra])


def _one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("hf-wsvd heal: error:"), errors
    return errors[0]


@pytest.mark.parametrize("teacher, message", [
    (lambda: tiny.build("llama", vocab_size=tiny.VOCAB_SIZE + 8), "has vocabulary size 72, the compressed model 64"),
    (lambda: tiny.build("llama", hidden_size=48), "has hidden size 48, the compressed model 32"),
    (lambda: tiny.build("llama", num_hidden_layers=3), "has layer count 3, the compressed model 2"),
    (lambda: tiny.build("qwen2"), "has model type 'qwen2', the compressed model 'llama'"),
    (lambda: tiny.build("llama", num_attention_heads=2, num_key_value_heads=1),
     "has attention head count 2, the compressed model 4"),
    (lambda: tiny.build("llama", intermediate_size=48), "has MLP width 48, the compressed model 64"),
    (lambda: tiny.build("llama", seed=7, initializer_range=0.3),
     "differs from the compressed model in 'model.embed_tokens.weight' (relative difference 1."),
], ids=["vocabulary", "hidden size", "depth", "architecture", "heads", "mlp width", "other weights"])
def test_cli_heal_refuses_a_teacher_of_another_architecture(tmp_path, capsys, monkeypatch, teacher, message):
    """The teacher must be the dense model the student was compressed from: checked up front (the
    hidden-state term would otherwise crash, the logit term distill from another model silently),
    its sizes (from its config, before its weights load: a large GGUF takes minutes) and then the
    tensors compression leaves as they were."""
    import hf_wsvd.cli.workflow as workflow

    _, student = _compressed()
    _saved(tmp_path, other=teacher(), compressed=student)
    (tmp_path / "text.txt").write_text("the movie was good\n" * 50)
    loaded, load_model = [], workflow.load_model
    monkeypatch.setattr(workflow, "load_model", lambda path, **kwargs: loaded.append(path) or load_model(path, **kwargs))
    assert _heal(tmp_path, "compressed", "other", "text.txt", "--hidden-weight", "1", "--max-length", "8") == 2
    error = _one_error(capsys)
    assert f"--teacher {str(tmp_path / 'other')!r} {message}" in error, error
    assert (str(tmp_path / "other") in loaded) == ("differs from the compressed model" in message), loaded
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=re.escape(message)):  # the API checks the same
        heal(student, teacher(), _blocks(4), _blocks(2), HealConfig(steps=1), show_progress=False)


def test_a_teacher_that_is_the_student_multiplied_out_or_no_causal_lm_is_refused():
    """The student's own dense export passes the check of unchanged tensors, and distilling it would
    change nothing; a model without a language-model head is named as such, not asked for a loss_fn."""
    from hf_wsvd.integrations.export import densify
    from hf_wsvd.integrations.healing import check_teacher

    teacher, student = _compressed()
    exported = densify(copy.deepcopy(student))
    with pytest.raises(ValueError, match=re.escape("the teacher holds the compressed model's own factors multiplied out "
                                                   "in every factorized layer (such as 'model.layers.0.self_attn.q_proj'")):
        heal(student, exported, _blocks(4), _blocks(2), HealConfig(steps=1), show_progress=False)
    with pytest.raises(ValueError, match=re.escape("the teacher holds the compressed model's own factors")):
        check_teacher(student, exported.to(torch.bfloat16))  # to bf16 rounding
    check_teacher(student, teacher)
    # one factorized layer whose teacher weight is the dense one: a teacher (the others are lossless)
    hybrid = copy.deepcopy(exported)
    hybrid.get_submodule("model.layers.1.mlp.down_proj").weight.data.copy_(
        teacher.get_submodule("model.layers.1.mlp.down_proj").weight)
    check_teacher(student, hybrid)
    with pytest.raises(TypeError, match=re.escape("train_blocks must be a sequence of blocks (a list of dicts, or a "
                                                  "Dataset), not a dict")):
        heal(student, teacher, _blocks(1)[0], _blocks(2), HealConfig(steps=1), show_progress=False)
    base = transformers.AutoModel.from_config(teacher.config)
    with pytest.raises(ValueError, match=re.escape("the teacher is a LlamaModel, not a causal LM")):
        check_teacher(student, base)
    with pytest.raises(ValueError, match=re.escape("heal works on causal LMs; LlamaModel is not one")):
        heal(base, teacher, _blocks(4), _blocks(2), HealConfig(steps=1), show_progress=False)


@pytest.mark.parametrize("arch, recipe", [
    ("llama", dict(param_ratio=0.5, block_refine_steps=4, attention_pruning=True)),  # pruned, compensated, refined
    ("qwen2", dict(method="svd", param_ratio=0.5, embeddings=True)),  # factorized embeddings, an untied head
], ids=["recommended recipe", "embeddings"])
def test_the_dense_model_is_accepted_as_teacher_in_its_own_and_in_another_precision(tmp_path, arch, recipe):
    """Compression leaves the tensors the check compares as they were: the teacher passes in float32
    and bfloat16, before and after the student is saved, reloaded and healed."""
    from hf_wsvd.integrations.healing import check_teacher

    teacher = tiny.build(arch, initializer_range=0.3)
    loader = torch.utils.data.DataLoader([{**b, "labels": b["input_ids"]} for b in _blocks(16)], batch_size=4)
    student, _ = compress(copy.deepcopy(teacher), WSVDConfig(rank_multiple=1, **recipe), loader, show_progress=False)
    student.save_pretrained(tmp_path / "student")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    healed, _ = heal(copy.deepcopy(reloaded), teacher, _blocks(8, seed=1), _blocks(4, seed=2),
                     HealConfig(steps=2, batch_size=4, learning_rate=1e-2), show_progress=False)
    for model in (student, reloaded, healed):
        for dense in (teacher, copy.deepcopy(teacher).to(torch.bfloat16)):
            check_teacher(model, dense)


@pytest.mark.parametrize("content", ["", "\n\n   \n\t\n"], ids=["empty", "blank lines"])
def test_cli_heal_names_a_text_file_without_text(tmp_path, capsys, content):
    teacher, student = _compressed()
    _saved(tmp_path, dense=teacher, compressed=student)
    (tmp_path / "blank.txt").write_text(content)
    assert _heal(tmp_path, "compressed", "dense", "blank.txt") == 2
    assert f"--data {str(tmp_path / 'blank.txt')!r} holds no text: its lines are empty or blank" in _one_error(capsys)


def test_cli_heal_refuses_a_compressed_teacher_and_unreadable_text_before_loading(tmp_path, capsys, monkeypatch):
    teacher, student = _compressed()
    _saved(tmp_path, dense=teacher, compressed=student)
    (tmp_path / "text.txt").write_text("the movie was good\n" * 50)
    assert _heal(tmp_path, "compressed", "compressed", "text.txt", "--max-length", "8") == 2
    assert f"--teacher {str(tmp_path / 'compressed')!r} is a compressed hf_wsvd checkpoint" in _one_error(capsys)
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 4)
    monkeypatch.setattr("hf_wsvd.cli.workflow.load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded a model"))
    assert _heal(tmp_path, "compressed", "dense", "binary.txt") == 2
    assert f"--data {str(tmp_path / 'binary.txt')!r} cannot be read as UTF-8 text" in _one_error(capsys)
    assert _heal(tmp_path, "compressed", "dense", "text.txt", "--max-length", "1") == 2
    assert "max_length=1 (--max-length) leaves a causal LM no token to predict" in _one_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content", [
    ("text.txt", "the movie was good\na bad plot\n"),
    ("text.jsonl", '{"text": "the movie was good", "id": 0}\n{"text": "a bad plot", "id": 1}\n'),
    ("text.tsv", "sentence\tlabel\nthe movie was good\t1\na bad plot\t0\n"),
], ids=["txt", "jsonl", "tsv"])
def test_cli_heal_reads_a_table_s_text_column_as_compress_does(tmp_path, capsys, monkeypatch, name, content):
    """The calibration file given to compress heals on its text, not on its JSON or TSV syntax."""
    import hf_wsvd.data

    teacher, student = _compressed()
    _saved(tmp_path, dense=teacher, compressed=student)
    (tmp_path / name).write_text(content)
    seen = []

    def spied(texts, *args, **kwargs):
        seen.append(list(texts))
        raise ValueError("stop here")

    monkeypatch.setattr(hf_wsvd.data, "text_blocks", spied)
    assert _heal(tmp_path, "compressed", "dense", name) == 2
    assert "stop here" in _one_error(capsys)
    assert seen == [["the movie was good", "a bad plot"]]


def test_cli_heal_takes_a_split_and_a_text_column_as_compress_does(tmp_path, capsys, monkeypatch):
    import hf_wsvd.data
    from datasets import Dataset, DatasetDict

    teacher, student = _compressed()
    _saved(tmp_path, dense=teacher, compressed=student)
    table = Dataset.from_dict({"title": ["A", "B"], "text": ["the movie was good", "a bad plot"], "score": [1, 2]})
    DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(tmp_path / "corpus")
    seen = []

    def spied(texts, *args, **kwargs):
        seen.append(list(texts))
        raise ValueError("stop here")

    monkeypatch.setattr(hf_wsvd.data, "text_blocks", spied)
    assert _heal(tmp_path, "compressed", "dense", "corpus") == 2
    assert "has splits ['test', 'train'] and no split is named: name one (split=..., --split)" in _one_error(capsys)
    assert _heal(tmp_path, "compressed", "dense", "corpus", "--split", "train", "--text-columns", "text") == 2
    assert "stop here" in _one_error(capsys) and seen == [["the movie was good", "a bad plot"]]
    assert _heal(tmp_path, "compressed", "dense", "corpus", "--split", "train", "--text-columns", "score") == 2
    assert f"column 'score' of --data {str(tmp_path / 'corpus')!r} is not text (row 1: 1)" in _one_error(capsys)
    (tmp_path / "text.txt").write_text("the movie was good\n")
    assert _heal(tmp_path, "compressed", "dense", "text.txt", "--split", "train") == 2
    assert "is a plain text file: --split and --text-columns name parts of a table" in _one_error(capsys)


def test_cli_heal_of_a_classifier_says_it_works_on_causal_lms(tmp_path, capsys):
    student, _ = tiny.compressed("bert")
    _saved(tmp_path, dense=tiny.build("bert"), compressed=student)
    (tmp_path / "text.txt").write_text("")  # said before the data is read (an empty file would be refused)
    assert _heal(tmp_path, "compressed", "dense", "text.txt", "--max-length", "8") == 2
    assert "heal works on causal LMs; WsvdBertForSequenceClassification is not one" in _one_error(capsys)
    with pytest.raises(ValueError, match="heal works on causal LMs"):
        heal(student, tiny.build("bert"), _blocks(4), _blocks(2), HealConfig(steps=1), show_progress=False)


def test_a_heal_that_raises_the_heldout_loss_keeps_the_compressed_weights(monkeypatch):
    from hf_wsvd.integrations import healing

    warned = []
    monkeypatch.setattr(healing.logger, "warning", warned.append)
    teacher, student = _compressed()
    before = {n: v.clone() for n, v in student.state_dict().items()}
    # A learning rate far too high for these factors: the held-out loss rises (measured at the end
    # only: measured during training, the lowest point would be the first step's, still warming up).
    healed, report = heal(student, teacher, _blocks(16, seed=1), _blocks(4, seed=2),
                          HealConfig(steps=5, learning_rate=10.0, batch_size=4, evaluations=0), show_progress=False)
    assert report.kl_after > report.kl_before and not report.kept
    # the message says which step size to try next
    assert "heal with a lower learning rate (this run: 10; try 3.3) or on more text" in warned[-1], warned
    for name, value in healed.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_heal_keeps_the_weights_where_the_heldout_loss_was_lowest(lora_rank):
    """Many epochs over two blocks overfit them: the held-out loss falls, then rises past where it
    began. The weights of its lowest measurement are returned, where the last step's would be undone."""
    teacher, student = _compressed()
    train, heldout = _blocks(2, seed=1), _blocks(8, seed=2)
    # float32 training (no bf16 autocast where there is a GPU): the mid-run losses are then measured in
    # the precision of kl_after
    config = HealConfig(steps=60, learning_rate=2e-2, batch_size=4, lora_rank=lora_rank, evaluations=30, bf16=False)
    healed, report = heal(copy.deepcopy(student), teacher, train, heldout, config, show_progress=False)
    assert sorted(report.losses) == list(range(2, 61, 2))
    lowest = min(report.losses, key=report.losses.get)
    assert report.kept and report.best_step == lowest and 0 < lowest < 60, report.losses
    assert report.losses[60] > report.kl_before > report.losses[lowest], report.losses  # the last step overfit
    # kl_after is measured on the returned model: the lowest point's weights
    assert report.kl_after == pytest.approx(report.losses[lowest], rel=1e-5) and report.kl_after < report.kl_before
    assert _ranks(healed) == _ranks(student)
    # Measured only at the last step, the overfit weights are the candidates, and they are undone.
    last = dataclasses.replace(config, evaluations=0)
    _, report = heal(copy.deepcopy(student), teacher, train, heldout, last, show_progress=False)
    assert not report.kept and report.best_step == 0 and report.losses == {}


@pytest.mark.parametrize("steps, evaluations, expected", [(10, 3, [3, 7, 10]), (19, 10, [2, 4, 6, 8, 10, 11, 13, 15, 17, 19]),
                                                      (5, 10, [1, 2, 3, 4, 5]), (7, 1, [7])])
def test_heal_measures_the_heldout_loss_as_often_as_asked_evenly_up_to_the_last_step(steps, evaluations, expected):
    teacher, student = _compressed()
    _, report = heal(student, teacher, _blocks(8, seed=1), _blocks(2, seed=2),
                     HealConfig(steps=steps, batch_size=4, evaluations=evaluations), show_progress=False)
    assert sorted(report.losses) == expected


def test_teacher_samples_continue_the_blocks_to_their_length_seeded():
    teacher = tiny.build("llama", initializer_range=0.3)
    blocks = [{k: v.tolist() for k, v in block.items()} for block in _blocks(6, length=12, seed=3)]
    state = torch.random.get_rng_state()
    written = teacher_samples(teacher, blocks, 5, prompt_length=4, batch_size=2, seed=7, show_progress=False)
    # The caller's random stream is untouched.
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(written) == 5
    for block in written:
        assert len(block["input_ids"]) == 12 and block["attention_mask"] == [1] * 12
        sources = [b["input_ids"] for b in blocks if b["input_ids"][:4] == block["input_ids"][:4]]
        assert sources, "each written block continues the start of a given block"
        # Written by the teacher, not copied: the continuation is not its source's, and the text
        # does not end before the block does.
        assert all(block["input_ids"][4:] != source[4:] for source in sources)
        assert teacher.config.eos_token_id not in block["input_ids"][4:]
    again = teacher_samples(teacher, blocks, 5, prompt_length=4, batch_size=2, seed=7, show_progress=False)
    assert again == written
    assert teacher_samples(teacher, blocks, 5, prompt_length=4, batch_size=2, seed=8, show_progress=False) != written
    assert teacher_samples(teacher, blocks, 0, show_progress=False) == []


def test_teacher_samples_ignore_the_checkpoint_generation_settings():
    teacher = tiny.build("llama", initializer_range=0.3)
    blocks = _blocks(4, length=10)
    plain = teacher_samples(teacher, blocks, 4, prompt_length=3, seed=1, show_progress=False)
    settings = dict(do_sample=False, repetition_penalty=5.0, max_new_tokens=2, min_p=0.5, no_repeat_ngram_size=1,
                    num_beams=2, suppress_tokens=[10, 11, 12], bad_words_ids=[[13]])
    for name, value in settings.items():
        setattr(teacher.generation_config, name, value)
    again = teacher_samples(teacher, blocks, 4, prompt_length=3, seed=1, show_progress=False)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, plain))
    # The checkpoint keeps its own settings.
    assert {name: getattr(teacher.generation_config, name) for name in settings} == settings
    # Several end-of-text tokens (as Llama 3 configs have): writing still runs to the full length.
    teacher.generation_config.eos_token_id = [6, 7]
    assert all(len(b["input_ids"]) == 10 for b in teacher_samples(teacher, blocks, 2, seed=1, show_progress=False))


@pytest.mark.parametrize("prompt_length", [0, 10, 11])
def test_teacher_samples_refuse_a_prompt_that_leaves_nothing_to_write(prompt_length):
    with pytest.raises(ValueError, match=f"prompt_length={prompt_length}"):
        teacher_samples(tiny.build("llama"), _blocks(2, length=10), 1, prompt_length=prompt_length,
                        show_progress=False)


def test_teacher_samples_refuse_no_blocks_or_blocks_of_several_lengths():
    teacher = tiny.build("llama")
    with pytest.raises(ValueError, match="none were given"):
        teacher_samples(teacher, [], 1, show_progress=False)
    with pytest.raises(ValueError, match="one length"):
        teacher_samples(teacher, _blocks(2, length=10) + _blocks(2, length=8), 1, show_progress=False)
    with pytest.raises(ValueError, match=r"blocks of 1 token leave nothing to write after a prompt: they need at "
                                         r"least 2 \(raise max_length\)"):
        teacher_samples(teacher, _blocks(2, length=1), 1, show_progress=False)


def test_healing_on_teacher_written_blocks_alone_lowers_the_heldout_loss():
    teacher, student = _compressed()
    written = teacher_samples(teacher, _blocks(8, seed=1), 32, prompt_length=3, batch_size=16, show_progress=False)
    _, report = heal(student, teacher, written, _blocks(8, seed=2),
                     HealConfig(steps=30, learning_rate=1e-2, batch_size=4), show_progress=False)
    assert report.kept and report.kl_after < 0.9 * report.kl_before, report


def test_written_blocks_mix_with_the_real_ones_in_their_format():
    teacher, student = _compressed()
    real = _blocks(8, seed=1)
    written = teacher_samples(teacher, real, 8, prompt_length=3, show_progress=False)
    assert all(torch.is_tensor(b["input_ids"]) and torch.is_tensor(b["attention_mask"]) for b in written)
    _, report = heal(student, teacher, real + written, _blocks(4, seed=2), HealConfig(steps=2, batch_size=16),
                     show_progress=False)
    assert math.isfinite(report.kl_after)


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_a_model_healed_in_bf16_computes_in_float32_again(lora_rank):
    teacher, student = _compressed()
    healed, _ = heal(student, teacher, _blocks(16, seed=1), _blocks(4, seed=2),
                     HealConfig(steps=2, batch_size=4, bf16=True, lora_rank=lora_rank), show_progress=False)
    ids = torch.stack([b["input_ids"] for b in _blocks(2, seed=5)])
    # The class's own forward, run outside any autocast, against the model's bound forward.
    expected = type(healed).forward(healed, input_ids=ids).logits
    assert torch.equal(healed(input_ids=ids).logits, expected)


def test_too_little_data_for_a_held_out_block_says_how_many_blocks_there_are():
    teacher, student = _compressed()
    with pytest.raises(ValueError, match=r"^healing needs training blocks and held-out blocks, got 4 and 0: "):
        heal(student, teacher, _blocks(4), [], HealConfig(steps=1), show_progress=False)


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_heal_gives_both_models_back_in_their_modes_with_their_trainable_weights_and_random_streams(lora_rank):
    import random

    import numpy

    teacher, student = _compressed()
    student.train()
    student.lm_head.eval()  # a mode set module by module comes back as it was too
    frozen = "model.layers.0.self_attn.q_proj.up.weight"  # a factor the user froze: healing trains it, then
    student.get_parameter(frozen).requires_grad_(False)
    trainable = {n: p.requires_grad for n, p in student.named_parameters()}
    modes = {n: m.training for n, m in student.named_modules()}
    teacher.train()
    random.seed(7), numpy.random.seed(7), torch.manual_seed(7)
    expected = random.random(), numpy.random.rand(), torch.rand(()).item()
    random.seed(7), numpy.random.seed(7), torch.manual_seed(7)
    before = student.get_parameter(frozen).detach().clone()
    healed, report = heal(student, teacher, _blocks(8, seed=1), _blocks(4, seed=2),
                          HealConfig(steps=3, learning_rate=1e-2, batch_size=4, lora_rank=lora_rank),
                          show_progress=False)
    assert healed is student
    assert torch.equal(healed.get_parameter(frozen), before) != report.kept  # trained all the same, where kept
    assert {n: p.requires_grad for n, p in healed.named_parameters()} == trainable
    assert {n: m.training for n, m in healed.named_modules()} == modes
    assert all(m.training for m in teacher.modules()) and all(p.requires_grad for p in teacher.parameters())
    assert (random.random(), numpy.random.rand(), torch.rand(()).item()) == expected


@pytest.mark.parametrize("lora_rank, bf16", [(None, False), (2, False), (None, True)])
def test_a_heal_that_fails_midway_leaves_the_student_as_it_was(lora_rank, bf16, monkeypatch):
    from hf_wsvd.integrations import healing

    teacher, student = _compressed()
    weights = {n: v.clone() for n, v in student.state_dict().items()}
    trainable = {n: p.requires_grad for n, p in student.named_parameters()}
    calls = []

    def failing(*args, **kwargs):  # the second held-out measurement fails (after some training steps)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return original(*args, **kwargs)

    original = healing.distillation_kl
    monkeypatch.setattr(healing, "distillation_kl", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        heal(student, teacher, _blocks(8, seed=1), _blocks(4, seed=2),
             HealConfig(steps=4, learning_rate=1e-2, batch_size=4, lora_rank=lora_rank, evaluations=2, bf16=bf16),
             show_progress=False)
    assert "_original_forward" not in student.__dict__  # accelerate's mark of the training's autocast wrapper
    assert student.state_dict().keys() == weights.keys()  # no adapters left on it
    for name, value in student.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert {n: p.requires_grad for n, p in student.named_parameters()} == trainable


@pytest.mark.parametrize("blocks, message", [
    ([torch.arange(12)], "train_blocks[0] is a Tensor: each block must be a dict of input_ids and attention_mask"),
    ([{"input_ids": [5] * 12}, {"input_ids": [5] * 10}], r"train_blocks hold blocks of [10, 12] tokens"),
    ([{"input_ids": [5, 6, tiny.VOCAB_SIZE]}], f"train_blocks[0]: input_ids go from 5 to {tiny.VOCAB_SIZE}, outside "
                                               f"the model's {tiny.VOCAB_SIZE} token embeddings"),
    ([{"input_ids": [[5, 6]]}], "train_blocks[0]: input_ids must be one non-empty sequence of integer token ids, not "
                                "torch.int64 of shape (1, 2)"),
    ([{"input_ids": [5, 6], "attention_mask": [1, 2]}], "train_blocks[0]: attention_mask holds 2; it marks each token 1 "
                                                        "(real) or 0 (padding)"),
    ([{"input_ids": [5, 6], "attention_mask": [1]}], "train_blocks[0]: attention_mask is a torch.int64 tensor of shape "
                                                     "(1,), input_ids (2,): they must match"),
    ([{"input_ids": [5, 6], "attention_mask": [0, 0]}], "train_blocks hold no real token"),
    ((block for block in _blocks(2)), "train_blocks must be a sequence of blocks (a list of dicts, or a Dataset), not a "
                                      "generator: pass list(...) of it"),
], ids=["tensor", "two lengths", "outside the vocabulary", "2-D", "mask of 2", "mask too short", "padding only",
        "generator"])
def test_heal_names_bad_blocks_before_anything_trains(blocks, message):
    teacher, student = _compressed()
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        heal(student, teacher, blocks, _blocks(2), HealConfig(steps=1), show_progress=False)
    with pytest.raises((TypeError, ValueError), match=re.escape(message.replace("train_blocks", "heldout_blocks"))):
        heal(student, teacher, _blocks(2), blocks, HealConfig(steps=1), show_progress=False)
    assert all(p.requires_grad for p in student.parameters())


def test_heal_names_blocks_longer_than_the_position_table():
    teacher, student = _compressed("gpt2")
    with pytest.raises(ValueError, match=re.escape("train_blocks hold blocks of 65 tokens, more than the model's 64 "
                                                   "positions (max_position_embeddings): cut shorter blocks")):
        heal(student, teacher, [{"input_ids": [5] * 65}], _blocks(2), HealConfig(steps=1), show_progress=False)


@pytest.mark.parametrize("field, value", [("hidden_weight", "1"), ("warmup_ratio", "0.1"), ("bf16", "yes")])
def test_heal_options_of_the_wrong_type_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
        HealConfig(**{field: value})


def test_a_healed_card_keeps_no_score_of_the_model_before_healing_as_its_own(tmp_path):
    """The compressed model's evaluation is the Hub's model-index of its card: the healed copy's card
    drops it from the metadata and says whose scores its table holds."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from hf_wsvd.integrations.card import add_healing

    data = ModelCardData(model_name="m", tags=["hf_wsvd"], eval_results=[EvalResult(
        task_type="text-generation", dataset_type="wikitext", dataset_name="wikitext", metric_type="perplexity",
        metric_value=267.3)])
    source, folder = tmp_path / "compressed", tmp_path / "healed"
    source.mkdir(), folder.mkdir()
    table = "| dataset | split | metric | value |\n|---|---|---|---|\n| wikitext | test | perplexity | 267.3 |"
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n# m\n\n## Evaluation\n\n{table}\n").save(source / "README.md")
    assert "model-index" in (source / "README.md").read_text()
    add_healing(source, folder, "healed 30 steps", "hf-wsvd heal compressed healed")
    text = (folder / "README.md").read_text()
    assert "model-index" not in text and "healed" in ModelCard.load(folder / "README.md").data.tags
    assert f"## Evaluation\n\nOf the compressed model before the healing below" in text and table in text
    again = tmp_path / "healed-again"  # healed once more: said once
    again.mkdir()
    add_healing(folder, again, "healed 10 steps", "hf-wsvd heal healed healed-again")
    assert (again / "README.md").read_text().count("Of the compressed model before the healing below") == 1
