"""Factorized layers that read the same input (q/k/v, gate/up) share one down matmul
(``SharedDown``): the outputs are the unshared ones, the checkpoint is unchanged, and training,
peft, conversions, copies and ``torch.compile`` keep working."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

import tiny
from helpers import run_without_hf_wsvd
from hf_wsvd import (FactorizedLinear, WSVDConfig, compress, overlap_sibling_products, share_input_factors,
                     unshare_input_factors)
from hf_wsvd.integrations.peft_lora import register_factorized_lora
from hf_wsvd.runtime import factorized_linear

# float32: each output element is the same length-`in` dot product shared or not; only the BLAS
# kernel's blocking (its summation order) may change with the matrix width: a few ulps.
# bfloat16: the same, rounded to 8 bits of mantissa: one ulp of the output (2^-8 relative).
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -7)}


class Attention(nn.Module):
    """q/k/v read the input; o reads another tensor (it must never join the group)."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q, k, v
        self.o_proj = FactorizedLinear(q.out_features, 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return self.o_proj(qkv[..., : self.q_proj.out_features]) + qkv.sum()


def attention(ranks: tuple, dtype: torch.dtype = torch.float32, seed: int = 0) -> Attention:
    """q/k/v of 16 inputs: a FactorizedLinear of that rank, or dense where the rank is None."""
    torch.manual_seed(seed)
    layers = [nn.Linear(16, out) if rank is None else FactorizedLinear(16, out, rank)
              for rank, out in zip(ranks, (12, 8, 8))]
    return Attention(*layers).to(dtype).eval()


def down_calls(model: nn.Module) -> list:
    """A list that collects the name of each ``FactorizedLinear`` whose own ``down`` runs."""
    calls = []
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear):
            module.down.register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


def tiny_llama(**config):
    """A tiny Llama with every decoder linear factorized (4 key/value heads, so that k/v save)."""
    model, _ = compress(tiny.build("llama", num_key_value_heads=4),
                        WSVDConfig(method="svd", param_ratio=0.5, allocation="uniform", **config), show_progress=False)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ranks", [(3, 5, 7), (3, None, 6), (None, 4, None)])
def test_shared_outputs_equal_the_layers_own(ranks, dtype):
    """Two or three factorized siblings of different ranks, dense siblings mixed in: one matmul for
    the factorized ones, outputs equal; a single factorized layer shares with no one."""
    shared, plain = attention(ranks, dtype), attention(ranks, dtype)
    factorized = sum(rank is not None for rank in ranks)
    assert share_input_factors(shared) == (factorized > 1)
    assert shared.o_proj.shared_down is None
    x = torch.randn(2, 5, 16, dtype=dtype)
    calls = down_calls(shared)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), plain(x), **TOLERANCES[dtype])
    assert calls == (["o_proj"] if factorized > 1 else [n for n, r in zip(("q_proj", "k_proj", "v_proj"), ranks)
                                                        if r is not None] + ["o_proj"])
    # Outside a call of their module the layers compute their own down: nothing is cached across calls.
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(shared.q_proj(x), plain.q_proj(x), **TOLERANCES[dtype])
    assert calls == (["q_proj"] if ranks[0] is not None else [])


def test_the_factors_become_views_of_one_tensor_with_the_same_values():
    model, reference = attention((3, 5, 7)), attention((3, 5, 7))
    share_input_factors(model)
    group = model.q_proj.shared_down
    assert group is model.k_proj.shared_down is model.v_proj.shared_down and group.weight.shape == (15, 16)
    for name in ("q_proj", "k_proj", "v_proj"):
        weight = getattr(model, name).down.weight
        assert type(weight) is nn.Parameter
        assert weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
        assert torch.equal(weight, getattr(reference, name).down.weight)
    assert model.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():  # an in-place update of a factor is one of the shared weight
        model.k_proj.down.weight.mul_(2)
        reference.k_proj.down.weight.mul_(2)
        x = torch.randn(3, 16)
        torch.testing.assert_close(model(x), reference(x), **TOLERANCES[torch.float32])


def test_gradients_reach_each_layers_own_down_factor():
    """Training (a down factor needs its gradient) runs each layer's own factors; with the down
    factors frozen (LoRA, healing of the up factors) the shared matmul runs and the gradients of the
    input and of the up factors are the unshared ones."""
    shared, plain = attention((3, None, 6)), attention((3, None, 6))
    share_input_factors(shared)
    x = torch.randn(4, 16)
    calls = down_calls(shared)
    for model in (shared, plain):
        model(x).sum().backward()
    assert calls == ["q_proj", "v_proj", "o_proj"]
    for (name, a), b in zip(shared.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOLERANCES[torch.float32], msg=name)
    calls.clear()
    for model in (shared, plain):
        model.zero_grad()
        for name in ("q_proj", "v_proj"):
            getattr(model, name).down.weight.requires_grad_(False)
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    for model, inp in zip((shared, plain), inputs):
        model(inp).sum().backward()
    assert calls == ["o_proj"]
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(shared.q_proj.up.weight.grad, plain.q_proj.up.weight.grad, **TOLERANCES[torch.float32])


def test_a_replaced_or_converted_factor_releases_the_group():
    model = attention((3, 5, 7))
    share_input_factors(model)
    group = model.q_proj.shared_down
    model.k_proj.down = nn.Linear(16, 5, bias=False)  # peft, a quantizer or a merge replaces the module
    calls = down_calls(model)
    with torch.no_grad():
        model(torch.randn(2, 16))
    assert calls == ["q_proj", "k_proj", "v_proj", "o_proj"] and model.q_proj.shared_down is None
    assert not model._forward_pre_hooks and not model._forward_hooks and group.layers
    share_input_factors(model)
    model.v_proj.half()  # a conversion of one layer: the others' shared weight would go stale
    assert all(getattr(model, n).shared_down is None for n in ("q_proj", "k_proj", "v_proj"))
    model.v_proj.float()
    assert share_input_factors(model) == 1
    model.q_proj.down.weight.data = model.q_proj.down.weight.data.clone()  # relinked by hand: seen in eager mode
    with torch.no_grad():
        model(torch.randn(2, 16))
    assert model.k_proj.shared_down is None
    assert share_input_factors(model) == 1 and unshare_input_factors(model) == 1 and model.q_proj.shared_down is None


def test_compress_shares_and_the_checkpoint_keeps_its_tensors(tmp_path):
    """compress and from_pretrained share (q/k/v and gate/up of each block); the saved tensors are
    those of the unshared model, and a loaded model saves them again unchanged."""
    model = tiny_llama()
    assert len({id(m.shared_down) for m in model.modules() if isinstance(m, FactorizedLinear) and m.shared_down}) == 4
    ids = tiny.inputs("llama")
    with torch.no_grad():
        shared = model(**ids).logits
    model.save_pretrained(tmp_path / "shared")
    unshare_input_factors(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, shared, **TOLERANCES[torch.float32])
    model.save_pretrained(tmp_path / "plain")
    saved = load_file(tmp_path / "shared" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in
                                                       load_file(tmp_path / "plain" / "model.safetensors").items()}
    assert "model.layers.0.self_attn.q_proj.down.weight" in saved
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "shared")
    assert share_input_factors(loaded) == 0 and loaded.model.layers[1].mlp.up_proj.shared_down is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, shared, **TOLERANCES[torch.float32])
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_conversions_and_copies_share_again():
    model = tiny_llama()
    ids = tiny.inputs("llama")
    model.to(torch.bfloat16)
    group = model.model.layers[0].self_attn.q_proj.shared_down
    assert group is not None and group.weight.dtype == torch.bfloat16
    copied = copy.deepcopy(model)
    twin = copied.model.layers[0].self_attn.q_proj
    assert twin.shared_down not in (None, group) and twin.shared_down.owner is copied.model.layers[0].self_attn
    assert twin.down.weight.untyped_storage().data_ptr() == twin.shared_down.weight.untyped_storage().data_ptr()
    calls = down_calls(copied)
    with torch.no_grad():
        out = copied(**ids).logits
        unshare_input_factors(model)
        torch.testing.assert_close(out, model(**ids).logits, **TOLERANCES[torch.bfloat16])
    assert calls and not any(".q_proj" in c or ".gate_proj" in c for c in calls)
    layer = copy.deepcopy(copied.model.layers[1].mlp.up_proj)  # a layer alone: it brings its siblings along
    group = layer.shared_down
    assert group.layers[1] is layer and group.owner.up_proj is layer and group.owner is not copied.model.layers[1].mlp
    assert layer.down.weight.data_ptr() == group.weight[group.ranks[0]:].data_ptr()


def test_torch_compile_traces_the_shared_matmul_in_one_graph():
    """fullgraph compile: one linear per shared group instead of one per layer, the eager outputs."""
    model = tiny_llama()
    ids = tiny.inputs("llama")
    linears = []

    def count(graph_module, example_inputs):
        linears.append(sum(node.target is torch._C._nn.linear for node in graph_module.graph.nodes))
        return graph_module.forward

    results = []
    for share in (True, False):
        (share_input_factors if share else unshare_input_factors)(model)
        torch._dynamo.reset()
        with torch.no_grad():
            results.append(torch.compile(model, backend=count, fullgraph=True)(**ids).logits)
    # per block: q/k/v downs 3 -> 1, gate/up downs 2 -> 1
    assert linears[1] - linears[0] == 2 * 3, linears
    torch.testing.assert_close(results[0], results[1], **TOLERANCES[torch.float32])


def test_compiled_static_cache_generation_compiles_once_and_gives_the_eager_tokens():
    """What ``generate`` compiles with a static cache (as on a GPU): one graph for every decoding step
    of every call — a recompilation per step would time compilation, not decoding — and the
    eager greedy tokens."""
    model = tiny_llama().eval()
    assert any(isinstance(m, FactorizedLinear) and m.shared_down is not None for m in model.modules())
    ids = tiny.inputs("llama")["input_ids"][:1, :6]
    options = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    compile_config = transformers.CompileConfig(backend="aot_eager", mode=None, fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):  # a recompilation raises
        eager = model.generate(ids, **options)
        first = model.generate(ids, cache_implementation="static", compile_config=compile_config, **options)
        second = model.generate(ids, cache_implementation="static", compile_config=compile_config, **options)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled, not run eagerly
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_peft_lora_on_shared_layers():
    """LoRA on the inner linears releases the group (its down is wrapped); LoRA on whole factorized
    modules keeps the shared base matmul; both give the unshared model's outputs."""
    ids = tiny.inputs("llama")
    whole = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    for on_whole_modules in (False, True):
        outputs = []
        for share in (True, False):
            model = tiny_llama()
            if not share:
                unshare_input_factors(model)
            torch.manual_seed(0)
            config = LoraConfig(r=2, target_modules=whole if on_whole_modules else ["down", "up"],
                                init_lora_weights=False)
            peft_model = get_peft_model(model, register_factorized_lora(config) if on_whole_modules else config)
            with torch.no_grad():
                outputs.append(peft_model(**ids).logits)
            if share:
                sharing = {m.shared_down is not None for name, m in model.named_modules()
                           if type(m) is FactorizedLinear and any(f".{n}" in name for n in whole)}
                assert sharing == {on_whole_modules}
        torch.testing.assert_close(outputs[0], outputs[1], **TOLERANCES[torch.float32])


def test_trust_remote_code_shares(tmp_path):
    tiny.save(tiny_llama(), tmp_path / "ckpt")
    result = run_without_hf_wsvd(f"""
        import torch, transformers
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        attention = model.model.layers[0].self_attn
        module = type(attention.q_proj).__module__
        ids = torch.tensor([[7, 8, 9, 10, 11]])
        groups = {{id(m.shared_down): m.shared_down for m in model.modules() if getattr(m, "shared_down", None)}}
        with torch.no_grad():
            shared = model(ids).logits
            for group in groups.values():
                group.release()
            plain = model(ids).logits
        print(json.dumps([module, attention.q_proj.shared_down is None, len(groups),
                          (shared - plain).abs().max().item()]))
    """.replace("import torch,", "import json, torch,"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    module, released, groups, diff = json.loads(result.stdout.splitlines()[-1])
    assert module.startswith("transformers_modules") and released and groups == 4 and diff < 1e-5, result.stdout


class FakeStream:
    """Stands for a CUDA stream on the CPU: records what waits on what and which ups run on it."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.device = name, log, torch.device("cpu")

    def wait_stream(self, other: "FakeStream") -> None:
        self.log.append(f"{self.name} waits {other.name}")


@pytest.fixture
def fake_capture(monkeypatch):
    """A CUDA graph capture on the CPU: ``_capturing`` true, streams that log their use."""
    log, current = [], []
    main = FakeStream("main", log)
    sides = [FakeStream(f"side{i}", log) for i in range(3)]

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    monkeypatch.setattr(factorized_linear, "_capturing", lambda x: True)
    monkeypatch.setattr(factorized_linear, "_side_streams", lambda main, count: sides[:count])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: log.append(f"read on {stream.name}"))
    return log, current


def up_log(model: nn.Module, log: list, current: list) -> None:
    """Log each call of a factorized layer and of its up factor (with the stream it runs on)."""
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear):
            module.register_forward_pre_hook(lambda *_, name=name: log.append(f"{name} called"))
            module.up.register_forward_hook(
                lambda *_, name=name: log.append(f"{name}.up on {current[-1].name if current else 'main'}"))


def test_overlapped_ups_run_on_side_streams_under_a_capture_with_the_same_outputs(fake_capture):
    """Under a (faked) graph capture, the first sibling called runs every sibling's up on a stream of
    its own, forked from and joined back to the current one; the outputs are exactly those without."""
    log, current = fake_capture
    model = attention((3, 5, 7))
    share_input_factors(model)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = model(x)
        assert overlap_sibling_products(model) == 1 and model.q_proj.overlap_products
        up_log(model, log, current)
        assert torch.equal(model(x), expected)
    assert log == ["q_proj called", "side0 waits main", "q_proj.up on side0", "side1 waits main", "k_proj.up on side1",
                   "side2 waits main", "v_proj.up on side2", "main waits side0", "read on main", "main waits side1",
                   "read on main", "main waits side2", "read on main", "k_proj called", "v_proj called",
                   "o_proj called", "o_proj.up on main"]
    log.clear()
    overlap_sibling_products(model, False)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert log == ["q_proj called", "q_proj.up on main", "k_proj called", "k_proj.up on main", "v_proj called",
                   "v_proj.up on main", "o_proj called", "o_proj.up on main"]


class CrossAttention(Attention):
    """The query reads one input, key and value another."""

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q_proj(x).flatten(), self.k_proj(memory).flatten(), self.v_proj(memory).flatten()])


def test_a_group_whose_layers_read_different_inputs_stops_overlapping(fake_capture):
    log, current = fake_capture
    torch.manual_seed(0)
    model = CrossAttention(*(FactorizedLinear(16, out, 4) for out in (12, 8, 8))).eval()
    reference = copy.deepcopy(model)
    share_input_factors(model)
    share_input_factors(reference)
    x, memory = torch.randn(1, 3, 16), torch.randn(1, 6, 16)
    with torch.no_grad():
        expected = reference(x, memory)
        overlap_sibling_products(model)
        assert torch.equal(model(x, memory), expected)  # the first call: k/v ups also ran on x, unused
        assert model.q_proj.shared_down._ahead_wasted
        up_log(model, log, current)
        assert torch.equal(model(x, memory), expected)
    assert [entry for entry in log if ".up" in entry] == ["q_proj.up on main", "k_proj.up on main", "v_proj.up on main"]


class QueryOnly(Attention):
    """Only the query is computed (a layer reusing another's keys and values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def test_a_group_whose_siblings_are_not_all_called_stops_overlapping(fake_capture):
    log, current = fake_capture
    model = QueryOnly(*(FactorizedLinear(16, out, 4) for out in (12, 8, 8))).eval()
    share_input_factors(model)
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        expected = model(x)
        overlap_sibling_products(model)
        assert torch.equal(model(x), expected)  # k/v ups computed ahead, never taken
        assert model.q_proj.shared_down._ahead_wasted and copy.deepcopy(model).q_proj.shared_down._ahead_wasted
        up_log(model, log, current)
        assert torch.equal(model(x), expected)
    assert [entry for entry in log if ".up" in entry] == ["q_proj.up on main"]


def test_side_streams_are_shared_and_never_the_current_stream(monkeypatch):
    log = []
    main = FakeStream("main", log)
    made = iter([main, *(FakeStream(f"side{i}", log) for i in range(4))])  # the pool may hand out main itself
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: next(made))
    monkeypatch.setattr(factorized_linear, "_SIDE_STREAMS", {})
    first = factorized_linear._side_streams(main, 3)
    assert [stream.name for stream in first] == ["side0", "side1", "side2"]
    assert factorized_linear._side_streams(main, 2) == first[:2]  # shared: no new stream
    other = first[0]  # a capture on one of them: it is dropped from the branches
    assert [stream.name for stream in factorized_linear._side_streams(other, 3)] == ["side1", "side2", "side3"]


def test_overlap_is_kept_through_conversions_and_copies_and_checked():
    model = tiny_llama()
    assert overlap_sibling_products(model) == 4
    model.to(torch.float64)  # the groups are stacked again
    groups = {id(m.shared_down): m.shared_down for m in model.modules()
              if isinstance(m, FactorizedLinear) and m.shared_down is not None}
    assert len(groups) == 4 and all(layer.overlap_products for group in groups.values() for layer in group.layers)
    assert all(m.overlap_products for m in copy.deepcopy(model).modules() if isinstance(m, FactorizedLinear))
    assert overlap_sibling_products(model, False) == 4
    assert not any(m.overlap_products for m in model.modules() if isinstance(m, FactorizedLinear))
    with pytest.raises(ValueError, match="enabled='yes' must be True or False"):
        overlap_sibling_products(model, "yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overlap", [False, True])
def test_cuda_graph_replay_of_a_shared_model(overlap, monkeypatch):
    """A forward captured in a CUDA graph (as benchmarks/speed_gpu.py captures decode steps) replays
    the eager shared forward, which equals the unshared one."""
    model = tiny_llama().to("cuda", torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.shared_down.weight.is_cuda
    assert overlap_sibling_products(model, overlap) == 4
    forks = []
    side_streams = factorized_linear._side_streams
    monkeypatch.setattr(factorized_linear, "_side_streams",
                        lambda main, count: forks.append((main, side_streams(main, count))) or forks[-1][1])
    ids = torch.tensor([[7, 8, 9, 10, 11]], device="cuda")
    with torch.inference_mode():
        eager = model(ids, use_cache=False).logits.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            model(ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(ids, use_cache=False).logits
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, eager, **TOLERANCES[torch.bfloat16])
        # the siblings' up products ran on streams of their own in the captured graph, only if asked
        assert len(forks) == (4 if overlap else 0)  # each of the 4 groups (2 blocks' q/k/v, gate/up) once
        assert all(main not in streams and len(set(streams)) == len(streams) for main, streams in forks)
        unshare_input_factors(model)
        torch.testing.assert_close(model(ids, use_cache=False).logits, eager, **TOLERANCES[torch.bfloat16])
