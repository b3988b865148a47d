"""``offload_activations``: the sequential walk keeps its hidden states (the compressed model's stream
and, with compensation, the dense one) in CPU memory and copies each batch to the accelerator when
it is used. The result is the one without it; on CUDA the streams are pinned host tensors."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_wsvd import WSVDConfig, compress
from hf_wsvd import blocks as blocks_module
from stats_worker import case_inputs

RECIPE = dict(method="fisher_whiten", allocation="greedy", sequential=True, param_ratio=0.6, compute_dtype="float64",
              block_refine_steps=2)


def test_the_flag_is_checked_and_saved_with_the_recipe():
    with pytest.raises(ValueError, match="offload_activations='yes' must be True, False or None"):
        WSVDConfig(offload_activations="yes")
    with pytest.raises(ValueError, match=r"offload_activations=True .* not sequential \(sequential=False;"):
        WSVDConfig(offload_activations=True, sequential=False)
    with pytest.raises(ValueError, match=r"not sequential \(pipeline='whole_model';"):
        WSVDConfig(offload_activations=True, pipeline="whole_model")
    assert WSVDConfig.from_dict(WSVDConfig(offload_activations=True).to_dict()).offload_activations is True


def test_a_model_that_is_not_compressed_sequentially_is_refused():
    model, loader, _, _ = case_inputs("bert_classification", 4, 2)
    with pytest.raises(ValueError, match="offload_activations=True .* not sequential"):
        compress(model, WSVDConfig(method="fisher_whiten", offload_activations=True), loader, show_progress=False)


def _compress(model, loader, offload: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # an attention backward that adds in a fixed order: runs comparable bit for bit
        return compress(copy.deepcopy(model), WSVDConfig(**RECIPE, offload_activations=offload), loader,
                        show_progress=False)


def _same(a, b) -> None:
    (model_a, report_a), (model_b, report_b) = a, b
    assert report_a.ranks == report_b.ranks and report_a.refined == report_b.refined and report_a.refined
    state_b = model_b.state_dict()
    for name, tensor in model_a.state_dict().items():
        assert torch.equal(tensor, state_b[name]), name


def test_the_result_is_the_one_without_offload():
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    _same(_compress(model, loader, False), _compress(model, loader, True))


def _stored_apart_and_written_in_place(monkeypatch) -> list:
    """On a CPU, stand in for pinned storage: streams stored as copies of their own, each output
    written into the buffer of the hidden states it replaces (what CUDA does), so that a walk that
    still needed a buffer after it is overwritten would see the change. Returns the writes' log."""
    writes = []
    monkeypatch.setattr(blocks_module, "on_host", lambda tensor: tensor.clone())

    def in_place(output, stored):
        writes.append(stored.data_ptr())
        return stored.copy_(output) if stored.shape == output.shape else output.clone()

    monkeypatch.setattr(blocks_module, "stored_like", in_place)
    return writes


def test_streams_overwritten_in_place_give_the_same_result(monkeypatch):
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    plain = _compress(model, loader, False)
    writes = _stored_apart_and_written_in_place(monkeypatch)
    _same(plain, _compress(model, loader, True))
    assert writes and len(set(writes)) < len(writes)  # the buffers were reused block after block


def test_quantized_residual_refinement_with_streams_overwritten_in_place(monkeypatch):
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    recipe = dict(method="quantized_residual", quantize="int4", quantize_group_size=32, residual_rank=4,
                  block_refine_steps=2)
    results = []
    for offload in (False, True):
        if offload:
            writes = _stored_apart_and_written_in_place(monkeypatch)
        results.append(compress(copy.deepcopy(model), WSVDConfig(**recipe, offload_activations=offload), loader,
                                show_progress=False))
    assert writes
    (plain, plain_report), (offloaded, report) = results
    assert plain_report.refined == report.refined and report.refined
    corrections = {k: v for k, v in offloaded.state_dict().items() if k.endswith((".up.weight", ".down.weight"))}
    assert corrections and all(torch.equal(plain.state_dict()[k], v) for k, v in corrections.items())


def test_outputs_stay_where_the_stream_is_kept_and_clones_are_apart():
    stored, output = torch.zeros(2, 3), torch.ones(2, 3)
    assert blocks_module.stored_like(output, stored) is output  # a walk all in CPU memory copies nothing
    assert torch.equal(stored, torch.zeros(2, 3))
    clone = blocks_module.host_clone(output)
    assert torch.equal(clone, output) and clone.data_ptr() != output.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory and asynchronous copies need CUDA")
def test_on_cuda_the_streams_live_in_pinned_host_memory_with_the_same_result(monkeypatch):
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    model.cuda()
    where = []
    original = blocks_module.stored_like
    monkeypatch.setattr(blocks_module, "stored_like", lambda output, stored: (
        where.append((stored.device.type, stored.is_pinned())), original(output, stored))[1])
    plain = _compress(model, loader, False)
    assert where and set(where) == {("cuda", False)}
    where.clear()
    offloaded = _compress(model, loader, True)
    assert where and set(where) == {("cpu", True)}  # both streams, every block, every batch
    _same(plain, offloaded)
