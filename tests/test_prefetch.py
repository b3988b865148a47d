"""Blocks kept in CPU memory visit the accelerator one at a time (``hf_wsvd.blocks.placed``): the
next block of a walk is staged while the current one runs, a visit leaves the block's own CPU
tensors in place (nothing copied back), and a staged copy that no longer matches its block is
made again. The bookkeeping is tested on the CPU with a stand-in accelerator whose "device copies"
are CPU clones; the CUDA test compares whole compressions with and without prefetch (pinned memory,
side stream)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd import blocks as blocks_module
from hf_wsvd.blocks import placed
from stats_worker import case_inputs

META = torch.device("meta")  # an accelerator to ``placed``; the weights' copies are CPU clones


def _layers(monkeypatch):
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    monkeypatch.setattr(blocks_module, "_copy", lambda source, device, cuda: source.clone())
    return model, loader, model.model.layers


def _on_copies(block: nn.Module, originals: list[int]) -> bool:
    """Whether every weight of ``block`` is a copy (storage other than ``originals``)."""
    return not set(_pointers(block)) & set(originals)


def _pointers(block: nn.Module) -> list[int]:
    return [t.data_ptr() for t in (*block.parameters(), *block.buffers())]


def _count_copies(monkeypatch) -> list[nn.Module]:
    """The blocks whose weights get copied to the device (each staging), in order."""
    copied = []
    original = blocks_module._Staged.__init__

    def counting(self, block, device, stream):
        copied.append(block)
        original(self, block, device, stream)

    monkeypatch.setattr(blocks_module._Staged, "__init__", counting)
    return copied


def test_a_walk_stages_the_next_block_and_leaves_the_cpu_tensors_in_place(monkeypatch):
    _, _, layers = _layers(monkeypatch)
    copied = _count_copies(monkeypatch)
    before = [_pointers(block) for block in layers]
    for index, block in enumerate(layers):
        upcoming = layers[index + 1] if index + 1 < len(layers) else None
        with placed(block, META, upcoming) as device:
            assert device == META
            assert _on_copies(block, before[index])
            if upcoming is not None:  # staged, not yet installed: the next block still holds its own weights
                assert blocks_module._PREFETCHER.staged.block is upcoming
                assert _pointers(upcoming) == before[index + 1]
    # one copy per visit, the first made on arrival and every other one staged ahead
    assert copied == list(layers)
    assert [_pointers(block) for block in layers] == before  # the same CPU storage: nothing copied back
    assert blocks_module._PREFETCHER.staged is None


def test_a_staged_block_changed_before_its_visit_is_copied_again(monkeypatch):
    _, _, layers = _layers(monkeypatch)
    copied = _count_copies(monkeypatch)
    with placed(layers[0], META, layers[1]):
        # a layer of the staged block is replaced before its visit (as a pipeline swaps factors)
        layers[1].mlp.down_proj = nn.Linear(layers[1].mlp.down_proj.in_features, layers[1].mlp.down_proj.out_features,
                                            bias=False)
    swapped = _pointers(layers[1])
    with placed(layers[1], META):
        assert _on_copies(layers[1], swapped)
    assert copied == [layers[0], layers[1], layers[1]]  # the staged copy was stale: copied on arrival
    assert _pointers(layers[1]) == swapped


def test_a_layer_swapped_in_during_a_visit_goes_home_and_a_visit_to_another_block_drops_the_staged_one(monkeypatch):
    _, _, layers = _layers(monkeypatch)
    copied = _count_copies(monkeypatch)
    with placed(layers[0], META, layers[1]):
        layers[0].mlp.up_proj = FactorizedLinear.from_factors(torch.ones(layers[0].mlp.up_proj.out_features, 2),
                                                              torch.ones(2, layers[0].mlp.up_proj.in_features))
        factors = _pointers(layers[0].mlp.up_proj)
    assert isinstance(layers[0].mlp.up_proj, FactorizedLinear) and _pointers(layers[0].mlp.up_proj) == factors
    with placed(layers[0], META):  # not the staged block: copied on arrival, the staged copies dropped
        assert blocks_module._PREFETCHER.staged is None
    assert copied == [layers[0], layers[1], layers[0]]


def test_on_the_cpu_nothing_is_staged(monkeypatch):
    _, _, layers = _layers(monkeypatch)
    copied = _count_copies(monkeypatch)
    before = _pointers(layers[0])
    with placed(layers[0], torch.device("cpu"), layers[1]) as device:
        assert device.type == "cpu" and _pointers(layers[0]) == before
    assert copied == [] and blocks_module._PREFETCHER.staged is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and side streams need CUDA")
def test_offloaded_compression_with_prefetch_equals_the_one_without(monkeypatch):
    model, loader, _, _ = case_inputs("llama_causal_lm", 6, 3)
    config = WSVDConfig(method="fisher_whiten", allocation="greedy", sequential=True, param_ratio=0.6,
                        compute_dtype="float64")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    results = []
    for prefetch in (False, True):
        monkeypatch.setattr(blocks_module, "PREFETCH", prefetch)
        with sdpa_kernel(SDPBackend.MATH):  # an attention backward that adds in a fixed order: runs comparable bit for bit
            compressed, report = compress(copy.deepcopy(model), config, loader, show_progress=False)
        assert all(p.device.type == "cpu" for p in compressed.parameters())  # the model stayed in CPU memory
        results.append((report.ranks, report.refined, compressed.state_dict()))
    assert results[0][0] == results[1][0] and results[0][1] == results[1][1]
    assert any(t.is_pinned() for t in results[1][2].values())  # the dense blocks travelled from pinned memory
    for name, tensor in results[0][2].items():
        assert torch.equal(tensor, results[1][2][name]), name


def test_a_tied_weight_moves_out_and_home_once(monkeypatch):
    """The input embeddings and a tied head are one parameter: moved once, so its home is where it
    was (a second visit recorded the device it had just been moved to, and it stayed there)."""
    from hf_wsvd.blocks import outside_blocks_on

    model, _, _, _ = case_inputs("llama_causal_lm", 6, 3)
    model.lm_head.weight = model.model.embed_tokens.weight
    moved = []
    original = blocks_module._move
    monkeypatch.setattr(blocks_module, "_move", lambda tensor, device, where, key: (moved.append(key),
                                                                                   original(tensor, device, where, key))[1])
    with outside_blocks_on(model, "model.layers", torch.device("cpu")):
        pass
    weights = [key for key in moved if key[1] == "_parameters" and key[0] in ("model.embed_tokens", "lm_head")]
    assert weights == [("model.embed_tokens", "_parameters", "weight")]
