"""GPU generation speed of what ``compress`` outputs against the dense original: a Llama model of 7B
shape (random bf16 weights) dense and compressed by the recommended recipe (``WSVDConfig(param_ratio=
1 - reduction)``, calibrated on random token sequences: its structure — cut attentions, pruned MLPs,
factorized or dense layers — is the one the recipe chooses for this model), built, measured and
freed one at a time: prefill tokens/s (8 × 2048, KV cache written, last logits only; one more pass
profiled: its kernels, and its matrix products by shape with the rate each reached), greedy decode
tokens/s at batch 1 and 16 with ``generate`` (256 new tokens after a 128-token prompt, KV cache;
timed from the first new token), decode replayed from a captured CUDA graph (``graph``; ``graph_overlap``:
with the up products of sibling layers on parallel streams, ``overlap_sibling_products``), and
``generate`` with a static cache compiled by ``torch.compile`` (``compile``; its tokens checked
against eager greedy decoding), peak GPU memory. Beside each model: the bytes one decode step reads
(weights, and the KV cache at the mean context of the decode), whose ratio to dense bounds the
decode speed-up where decode is bound by memory traffic. The compressed models are timed as
``compress`` returns them: factorized layers that read the same input (q/k/v, gate/up) compute
their down factors in one matmul (``hf_wsvd.share_input_factors``; ``shared_down_groups`` in the
JSON); ``--unshared`` times each layer's own two matmuls instead. Quantized parts time the same
model after torchao int8 weight-only (``int8``, ``int8_graph``: compiled) or bitsandbytes nf4
(``nf4_graph``: its own kernels) quantization of the block linears.

    python benchmarks/speed_gpu.py --json-out gpu.json                      # GPU machine
    python benchmarks/speed_gpu.py --from-json gpu.json                      # publish the table
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from hf_wsvd import WSVDConfig, overlap_sibling_products, unshare_input_factors
from hf_wsvd.argtypes import non_negative_int, positive_int
from scale import SHAPES, build
from timing import (add_json_arguments, cuda_kernels, interleaved_seconds, kernel_times, matmul_shapes,
                    measure_or_publish, median, require_cuda, shapes_profile, shared_down_groups, token_batch, verdict,
                    with_key)

# Issue 21: ×dense of the recommended recipe's output (the same-size structure of narrower dense MLPs).
# Parts a note sets against another of the same model: (part, its counterpart, what the note calls them, whether
# issue 21 asks it to be no lower: a compiled runtime must not close the eager gap).
PAIRS = (("compile", "decode", "compiled", "eager", True),
         ("graph_compiled", "graph", "inductor's kernels replayed", "eager kernels replayed", True),
         ("graph_overlap", "graph", "sibling ups overlapped", "without", False))
# Runs of one model further apart than this (fastest / slowest) measure the machine, not the model.
SPREAD_TO_JUDGE = 1.2
TARGETS = {0.2: {("graph", "1"): 1.10, ("graph", "16"): 1.09, ("prefill", None): 1.17},
           0.4: {("graph", "1"): 1.20, ("graph", "16"): 1.15, ("prefill", None): 1.39}}


# How the table names each timed part, in its order, and what each means.
PART_NAMES = {"prefill": "prefill", "graph": "CUDA-graph decode",
              "graph_overlap": "CUDA-graph decode, sibling ups overlapped", "graph_compiled": "CUDA-graph decode, inductor's kernels",
              "graph_unshared": "CUDA-graph decode, downs unshared", "decode": "generate",
              "compile": "compiled generate", "compile_unshared": "compiled generate, downs unshared",
              "int8": "int8 compiled generate", "int8_graph": "int8 CUDA-graph decode, inductor's kernels",
              "nf4_graph": "nf4 CUDA-graph decode"}
# The parts that time decoding, each a {batch: result} dict in a model's JSON.
DECODE_PARTS = tuple(part for part in PART_NAMES if part != "prefill")
PART_NOTES = ("generate is timed from the first new token;",
              "CUDA-graph decode replays one captured step (static cache) per token (inductor's kernels: the step's "
              "forward compiled by torch.compile, then captured);",
              "compiled generate uses a static cache and torch.compile;",
              "sibling ups overlapped: the up products of layers sharing a down matmul each on a CUDA stream of its "
              "own (overlap_sibling_products);",
              "downs unshared: each factorized layer its own down matmul;",
              "int8: the same model with torchao int8 weight-only block linears.")


class FirstTokenClock:
    """A stopping criterion that never stops: it records when the first new token exists (after
    the prefill), so decode time excludes the prompt."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.never: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.start is None:
            torch.cuda.synchronize()
            self.start = time.perf_counter()
        if self.never is None or self.never.shape[0] != input_ids.shape[0]:
            self.never = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self.never


def compress_with_recipe(model, reduction: float, args) -> dict:
    """Compress ``model`` in place with the recommended recipe (plus ``args.recipe``'s fields) at
    ``reduction`` of its decoder-linear parameters, calibrated on ``args.calibration`` random
    sequences; returns what it chose and how long it took."""
    from torch.utils.data import DataLoader

    from hf_wsvd import compress

    sequences, length = args.calibration
    ids = token_batch(model.config.vocab_size, sequences, length, "cpu", seed=7)
    data = DataLoader([{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids],
                      batch_size=args.calibration_batch)
    config = WSVDConfig(param_ratio=1 - reduction, max_length=length, batch_size=args.calibration_batch,
                        **json.loads(args.recipe))
    torch.cuda.synchronize()
    start = time.perf_counter()
    model, report = compress(model, config, data, show_progress=False)
    torch.cuda.synchronize()
    if args.unshared:
        unshare_input_factors(model)
    head_dims = sorted({entry["head_dim"] for entry in report.attention.values()})
    cut = [e["channels"] for e in report.experts.values() if e["channels"] < e["dense_channels"]]
    return {"compress_seconds": time.perf_counter() - start, "factorized_layers": len(report.ranks),
            "ranks": sorted(set(report.ranks.values())), "pruned_mlps": len(report.pruned_mlps),
            "mlp_channels": sorted({report.pruned[n]["shape"][0] for n in report.pruned_mlps}),
            "cut_attentions": len(report.attention), "head_dims": head_dims,
            "cut_experts": len(cut), "expert_channels": sorted(set(cut)),
            "dense_layers": len(report.dense_targets), "shared_down_groups": shared_down_groups(model),
            "recipe": {k: v for k, v in config.to_dict().items() if k in ("param_ratio", *json.loads(args.recipe))}}


def step_bytes(model, batch: int, context: int) -> int:
    """The bytes one decode step reads: every weight once (of a mixture of experts, the experts the
    step's tokens reach, expected under uniform routing), and the KV cache of ``batch`` sequences
    of ``context`` tokens (each layer's keys and values at its own head size)."""
    weights = 0
    for module in model.modules():
        experts = getattr(module, "num_experts", None)
        for p in module.parameters(recurse=False):
            share = 1.0
            if p.dim() == 3 and p.shape[0] == experts:  # each token reads top-k of the experts
                share = 1 - (1 - model.config.num_experts_per_tok / experts) ** batch
            weights += int(p.numel() * p.element_size() * share)
    cache = 0
    for layer in model.model.layers:
        attention = layer.self_attn
        cache += 2 * attention.k_proj.out_features * context * batch * attention.k_proj.weight.element_size()
    return weights + cache


def decode(model, batch: int, args, compiled: bool = False) -> dict:
    """Greedy generation of ``args.new_tokens`` tokens after a random prompt (median of repeats);
    ``compiled``: with a static cache, which ``generate`` compiles with ``torch.compile``, and the
    tokens compared with eager greedy decoding."""
    from transformers import StoppingCriteriaList

    ids = token_batch(model.config.vocab_size, batch, args.prompt_length, model.device, seed=batch)
    options = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                   min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens,
                   pad_token_id=model.config.eos_token_id)
    extra = {}
    if compiled:
        started = time.perf_counter()
        eager = model.generate(ids, **options)
        extra["eager_reference_seconds"] = time.perf_counter() - started
        print(f"batch {batch}: eager reference in {extra['eager_reference_seconds']:.0f} s; compiling", file=sys.stderr)
        options["cache_implementation"] = "static"
    # The warm-up runs the timed length. Compiled: the static cache is sized by the generation's
    # length, so a shorter warm-up compiles other shapes and the timed run recompiles (measured on an
    # H200: 1.4 tokens/s for dense and compressed alike, compilation rather than decoding). Eager: with an
    # 8-token warm-up, dense 7B's two timed 64-token runs went at 13.4 and 32.4 tokens/s (H200).
    started = time.perf_counter()
    for _ in range(args.decode_warmup):
        model.generate(ids, **options)
    if args.decode_warmup:  # compiled: mostly compilation (a cut-off run's log says whether it got past it)
        extra["warmup_seconds"] = time.perf_counter() - started
        print(f"batch {batch}: warm-up in {extra['warmup_seconds']:.0f} s", file=sys.stderr)
    decode_rates, total_rates = [], []
    for _ in range(args.decode_repeats):
        clock = FirstTokenClock()
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, stopping_criteria=StoppingCriteriaList([clock]), **options)
        torch.cuda.synchronize()
        end = time.perf_counter()
        if out.shape[1] != args.prompt_length + args.new_tokens:
            raise RuntimeError(f"generated {out.shape[1] - args.prompt_length} tokens, not {args.new_tokens}")
        decode_rates.append(batch * (args.new_tokens - 1) / (end - clock.start))
        total_rates.append(batch * args.new_tokens / (end - start))
        if compiled:
            extra.update({"tokens_equal_eager": bool(torch.equal(out, eager)),
                          "tokens_matching_eager": float((out == eager).float().mean())})
    # Where the time goes: the GPU's kernel time in one more generation against the timed wall time
    # (a share well below 1 means the host, not the model's bytes, sets the pace).
    try:
        kernels, top = cuda_kernels(lambda: model.generate(ids, **options))
        wall = batch * args.new_tokens / median(total_rates)
        extra.update({"kernel_ms_per_token": 1e3 * kernels / args.new_tokens, "kernel_share_of_wall": kernels / wall,
                      "top_kernels_ms": top})
    except Exception as error:  # noqa: BLE001 - a profiler failure must not lose the timings above
        extra["profile_error"] = f"{type(error).__name__}: {error}"[:500]
    return {"tokens_per_s": median(decode_rates), "end_to_end_tokens_per_s": median(total_rates),
            "runs": decode_rates, **extra}


def rewind(cache, length: int) -> None:
    """Move a static KV cache back to ``length`` cached tokens. transformers 5 static layers keep
    their write position in a device tensor (``cumulative_length``) that each forward advances in
    place, which is what lets one captured step be replayed; replaying a pass again starts here."""
    for layer in cache.layers:
        if not hasattr(layer, "cumulative_length"):
            raise RuntimeError(f"{type(layer).__name__} has no cumulative_length: this transformers version "
                               "tracks static-cache positions differently; adapt speed_gpu.rewind")
        layer.cumulative_length.fill_(length)


def graph_decode(model, batch: int, args, compiled: bool = False) -> dict:
    """Greedy decode with a static KV cache, each step (forward, argmax) replayed from one captured
    CUDA graph: the GPU time of decoding without Python or launch overhead, which is what serving
    engines see (eager ``generate`` at batch 1 is bound by launches, and a factorized layer launches
    two kernels). Timed over ``args.new_tokens`` steps after the prompt; the replayed tokens are
    checked against the same steps run unreplayed. ``compiled``: the step's forward is inductor's
    (``torch.compile``, no CUDA graphs of its own), so its kernels are timed without ``generate``'s
    host work between steps."""
    from transformers import StaticCache

    forward = torch.compile(model, fullgraph=True, dynamic=False) if compiled else model
    # transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = token_batch(model.config.vocab_size, batch, args.prompt_length, model.device, seed=batch)
    cache = StaticCache(config=model.config, max_cache_len=args.prompt_length + args.new_tokens)
    with torch.inference_mode():
        first = model(input_ids=ids, **{name: cache}, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        step_ids = first.clone()
        logits = torch.empty(batch, model.config.vocab_size, device=model.device, dtype=torch.float32)

        def step() -> None:
            logits.copy_(forward(input_ids=step_ids, **{name: cache}, use_cache=True).logits[:, -1])
            step_ids.copy_(logits.argmax(-1, keepdim=True))

        def decode_pass(run, steps: int, keep: int = 0) -> list[torch.Tensor]:
            """The step ids of the first ``keep`` steps, then the first step's logits."""
            rewind(cache, args.prompt_length)
            step_ids.copy_(first)
            kept = []
            for index in range(steps):
                run()
                if index == 0 and keep:
                    first_logits = logits.clone()
                if index < keep:
                    kept.append(step_ids.clone())
            return kept + [first_logits] if keep else kept

        check = min(16, args.new_tokens)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture requires
            eager = decode_pass(step, check, keep=check)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        replayed = decode_pass(graph.replay, check, keep=check)
        rates = []
        for _ in range(1 + args.decode_repeats):  # the first timed pass is a warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            decode_pass(graph.replay, args.new_tokens)
            torch.cuda.synchronize()
            rates.append(batch * args.new_tokens / (time.perf_counter() - start))
        # where a replayed step's GPU time goes: the matrix products (which shrink with the weights'
        # bytes, at best) against everything else (norms, rotary, attention, cache writes)
        try:
            kernels, every = cuda_kernels(lambda: decode_pass(graph.replay, args.new_tokens), top=None)
            profile = {"kernel_ms_per_step": 1e3 * kernels / args.new_tokens,
                       "matmul_ms_per_step": matmul_ms(every, args.new_tokens), "top_kernels_ms": every[:24]}
        except Exception as error:  # noqa: BLE001 - a profiler failure must not lose the timings above
            profile = {"profile_error": f"{type(error).__name__}: {error}"[:500]}
        same = bool(torch.equal(torch.cat(eager[:-1], 1), torch.cat(replayed[:-1], 1)))
        # the same first step, eager vs replayed: bf16 rounding differences, if any, show here
        first_step_diff = float((eager[-1] - replayed[-1]).abs().max())
        top2 = eager[-1].topk(2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
    del graph, cache
    return {"tokens_per_s": median(rates[1:]), "runs": rates[1:], "replay_matches_eager_tokens": same,
            "checked_tokens": check, "first_step_max_logit_diff": first_step_diff,
            "first_step_min_top2_margin": margin, **profile}


def guarded(result: dict, key: str, work) -> None:
    """``result[key] = work()``, or the error (a failed part must not lose the others)."""
    try:
        result[key] = work()
    except Exception as error:  # noqa: BLE001 - recorded in the JSON, the run goes on
        result[key] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        print(f"{key} failed: {result[key]['error']}", file=sys.stderr)
    gc.collect()
    torch.cuda.empty_cache()


def measure_model(reduction: float, args, checkpoint: Callable[[dict], None] = lambda result: None) -> dict:
    """One model (dense, or compressed at ``reduction``), its parts in turn; ``checkpoint`` sees the
    result so far once the model is built (and compressed) and after each part."""
    device = torch.device("cuda")
    model = build(args.shape, args.layers, device, torch.bfloat16)
    dense_params = sum(p.numel() for p in model.parameters())
    result = {"reduction": reduction}
    if reduction:
        result.update(compress_with_recipe(model, reduction, args))
    gc.collect()
    torch.cuda.empty_cache()
    params = sum(p.numel() for p in model.parameters())
    context = args.prompt_length + args.new_tokens // 2
    result.update({"params": params, "param_ratio": params / dense_params,
                   "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                   "weights_gib": torch.cuda.memory_allocated() / 2**30,
                   "step_bytes": {str(b): step_bytes(model, b, context) for b in args.decode_batches}})
    checkpoint(result)
    if "prefill" in args.parts:
        def prefill() -> dict:
            ids = token_batch(model.config.vocab_size, args.prefill_batch, args.prefill_length, device)

            def one_pass() -> object:
                return model(input_ids=ids, use_cache=True, logits_to_keep=1)

            torch.cuda.reset_peak_memory_stats()
            seconds = interleaved_seconds({"prefill": one_pass}, args.rounds, 1, 1, device)["prefill"]
            timed = {"tokens_per_s": args.prefill_batch * args.prefill_length / median(seconds),
                     "seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            # where a pass's GPU time goes, and which product shapes run below the rate of the others
            try:
                with torch.inference_mode():
                    profiled = shapes_profile(one_pass, device)
                kernels, ranked = kernel_times(profiled)
                shapes = matmul_shapes(profiled, device)
                ms = sum(row["ms"] for row in shapes)
                flops = sum(2 * row["m"] * row["k"] * row["n"] * row["count"] for row in shapes)
                return {**timed, "kernel_ms": 1e3 * kernels, "matmul_ms": ms, "matmul_tflops": flops / ms / 1e9,
                        "matmul_shapes": shapes, "kernels": ranked[:16]}
            except Exception as error:  # noqa: BLE001 - a profiler failure must not lose the timings above
                return {**timed, "profile_error": f"{type(error).__name__}: {error}"[:500]}

        guarded(result, "prefill", prefill)
        checkpoint(result)
    parts = (("decode", decode), ("graph", graph_decode), ("graph_overlap", graph_decode),
             ("graph_compiled", lambda model, batch, args: graph_decode(model, batch, args, compiled=True)),
             ("compile", lambda model, batch, args: decode(model, batch, args, compiled=True)),
             ("graph_unshared", graph_decode),
             ("compile_unshared", lambda model, batch, args: decode(model, batch, args, compiled=True)),
             ("int8", lambda model, batch, args: decode(model, batch, args, compiled=True)),
             ("int8_graph", lambda model, batch, args: graph_decode(model, batch, args, compiled=True)),
             ("nf4_graph", graph_decode))
    for part, run in parts:
        if part not in args.parts:
            continue
        if part not in ("decode", "graph"):
            # Compiled, or the model changes: each such part from an empty dynamo cache (the earlier
            # graphs freed, and within the recompile limit).
            torch._dynamo.reset()
        int8 = part.startswith("int8")
        if part.endswith("_unshared") or int8 or part == "nf4_graph":
            # Each factorized layer its own down matmul; quantized, the quantized down factors replace
            # the shared bf16 ones, which are freed.
            unshare_input_factors(model)
        if int8 and "int8_weights_gib" not in result:  # the int8 parts share one quantization
            # Deployers quantize: torchao int8 weight-only (what TorchAoConfig applies at load) on the
            # block linears, then compiled decoding, which its kernels need to be fast: torchao turns on
            # inductor's coordinate-descent tuning for the process (untuned, dense int8 decodes 4.4-4.7x
            # slower), which tunes each distinct kernel shape in turn.
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            quantize_(model, Int8WeightOnlyConfig(set_inductor_config=not args.int8_untuned),
                      filter_fn=lambda m, name: type(m) is torch.nn.Linear and "lm_head" not in name)
            gc.collect()
            torch.cuda.empty_cache()
            result["int8_weights_gib"] = torch.cuda.memory_allocated() / 2**30
        if part == "nf4_graph":
            nf4_(model)
            gc.collect()
            torch.cuda.empty_cache()
            result["nf4_weights_gib"] = torch.cuda.memory_allocated() / 2**30
        overlap_sibling_products(model, part == "graph_overlap")
        result[part] = {}
        for batch in args.decode_batches:
            def measured(batch=batch, run=run) -> dict:
                torch.cuda.reset_peak_memory_stats()
                return {**run(model, batch, args), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}

            guarded(result[part], str(batch), measured)
        checkpoint(result)
        print(f"reduction {reduction}: {part} done", file=sys.stderr)
    del model
    torch._dynamo.reset()  # frees the compiled graphs (and their CUDA graph pools)
    gc.collect()
    torch.cuda.empty_cache()
    return result


def nf4_(model: torch.nn.Module) -> None:
    """The block linears (not the head) in bitsandbytes 4-bit NormalFloat, in place: what
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` gives at load (blocks of 64,
    scales not quantized again), computing in the weights' dtype with bitsandbytes' own kernels,
    which need no compilation."""
    import bitsandbytes as bnb

    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or f"{name}.{child_name}".endswith("lm_head"):
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=False).to(child.weight.device)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, layer)


def measure(args) -> dict:
    """Each model in turn; with ``--json-out`` the file is rewritten after each model and each of
    its parts (the model in progress marked ``incomplete``), so a run cut off by a time limit still
    leaves what it measured."""
    from report import environment

    payload = {"device": "cuda", "gpu": torch.cuda.get_device_name(), "shape": args.shape, "layers": args.layers,
               "parts": args.parts, "recipe": json.loads(args.recipe), "calibration": args.calibration,
               "prefill_shape": [args.prefill_batch, args.prefill_length], "prompt_length": args.prompt_length,
               "new_tokens": args.new_tokens, "int8_untuned": args.int8_untuned, "models": [],
               "environment": environment()}
    if "nf4_graph" in args.parts:
        payload["bitsandbytes"] = importlib.metadata.version("bitsandbytes")
    start = time.perf_counter()

    def write(models: list[dict]) -> None:
        payload["seconds"] = time.perf_counter() - start
        if args.json_out:  # whole or not at all: a kill while writing must not lose the earlier models
            partial = Path(f"{args.json_out}.tmp")
            partial.write_text(json.dumps({**payload, "models": models}, indent=2))
            os.replace(partial, args.json_out)

    for reduction in args.reductions:
        # torchao's int8 settings change inductor's config for the process: each model from the same one
        inductor = torch._inductor.config.save_config()
        try:
            payload["models"].append(measure_model(
                reduction, args, lambda result: write([*payload["models"], {**result, "incomplete": True}])))
        finally:
            torch._inductor.config.load_config(inductor)
        write(payload["models"])
    return payload


# cuBLAS / cuBLASLt kernel names (Hopper's nvjet, older gemm and gemv kernels, their split-K reduction)
MATMUL_KERNEL = re.compile(r"gemm|gemv|nvjet|splitKreduce", re.IGNORECASE)


def matmul_ms(kernels: list[list], steps: int) -> float:
    """Milliseconds a step of the profiled ``[name, ms, count]`` kernels that are matrix products."""
    return sum(ms for name, ms, _ in kernels if MATMUL_KERNEL.search(name)) / steps


def step_matmuls(entry: dict, steps: int) -> str:
    """The matrix products' milliseconds of a profiled step; runs that kept only the 24 largest
    kernels give a lower bound, with the time those leave unnamed."""
    if "matmul_ms_per_step" in entry:
        return f"{entry['matmul_ms_per_step']:.2f} ms"
    named = sum(ms for _, ms, _ in entry["top_kernels_ms"]) / steps
    return (f"at least {matmul_ms(entry['top_kernels_ms'], steps):.2f} ms (of the {len(entry['top_kernels_ms'])} "
            f"largest kernels; the others {entry['kernel_ms_per_step'] - named:.2f} ms)")


def prefill_profile(where: str, entry: dict | None, dense: dict | None) -> list[str]:
    """A note on a profiled prefill pass: its kernels, its matrix products and their rate, the other
    kernels' time (beside dense's: the part factorizing the weights does not shrink), how much shorter
    its products would be at dense's rate, and the product shapes that take at least 5% of the
    products' time at under 0.9 of the dense model's rate."""
    if not isinstance(entry, dict) or "matmul_ms" not in entry:
        return []
    profiled = isinstance(dense, dict) and "matmul_ms" in dense and entry is not dense
    note = (f"{where}, prefill: GPU kernels {entry['kernel_ms']:.1f} ms a pass, of which matrix products "
            f"{entry['matmul_ms']:.1f} ms at {entry['matmul_tflops']:.0f} TFLOP/s, other kernels "
            f"{entry['kernel_ms'] - entry['matmul_ms']:.1f} ms"
            + (f" (dense: products {dense['matmul_ms']:.1f}, other {dense['kernel_ms'] - dense['matmul_ms']:.1f} ms)"
               if profiled else ""))
    rate = dense["matmul_tflops"] if profiled else None
    # what the products' rate costs: the same FLOPs at dense's rate (the rest of the pass unchanged)
    slower = entry["matmul_ms"] * (1 - entry["matmul_tflops"] / rate) if rate else 0.0
    if slower >= 0.05:
        note += f"; at dense's rate its products would take {slower:.1f} ms less"
    slow = [row for row in entry["matmul_shapes"] if rate and row["tflops"]
            and row["ms"] >= 0.05 * entry["matmul_ms"] and row["tflops"] < 0.9 * rate]
    if slow:
        note += (f"; below 0.9 of dense's {rate:.0f}: " + ", ".join(
            f"{r['m']}×{r['k']}×{r['n']} ({r['count']}×) {r['tflops']:.0f} TFLOP/s, {r['ms']:.1f} ms" for r in slow))
    return [note + "."]


def render(runs: list[dict]) -> str:
    from report import markdown_table

    def value(m, part, batch=None):
        try:
            entry = m[part] if batch is None else m[part][batch]
            return entry["tokens_per_s"]
        except (KeyError, TypeError):
            return None

    runs = with_key(runs, "models")
    models, timings, notes = [], [], []
    for number, run in enumerate(runs, 1):
        notes += [run["note"].rstrip(".") + "."] if run.get("note") else []
        untuned = run.get("int8_untuned") and any(part.startswith("int8") for part in run["parts"])
        if untuned:
            notes.append(f"run {number}: int8 parts untuned, without torchao's inductor settings (no "
                         "coordinate-descent tuning of the kernels).")
        if "nf4_graph" in run.get("parts", ()):
            notes.append(f"run {number}: nf4: the same model with bitsandbytes 4-bit NormalFloat block linears "
                         "(its own kernels, replayed from a CUDA graph); nf4 rows against nf4 dense.")
        base = next((m for m in run["models"] if m["reduction"] == 0), None)
        recipe = ", ".join(f"{k}={v}" for k, v in run.get("recipe", {}).items()) or "recommended"
        for m in run["models"]:
            shape = run.get("shape", "7b")  # runs before the option: the Llama 7B shape
            label = ("" if shape == "7b" else f"{shape}: ") + f"{m['reduction']:.0%}" + (
                "" if not m["reduction"] else f" ({recipe})")
            where = f"run {number}, {m['reduction']:.0%}"
            bounds = [base["step_bytes"][b] / m["step_bytes"][b] if base and b in m["step_bytes"] else "—"
                      for b in ("1", "16")]
            peaks = [d.get("peak_gib") for part in DECODE_PARTS for d in m.get(part, {}).values()
                     if isinstance(d, dict) and "peak_gib" in d]
            structure = "dense" if not m["reduction"] else (
                f"{m['cut_attentions']} attentions cut to head dim {'/'.join(map(str, m['head_dims'])) or '-'}, "
                f"{m['pruned_mlps']} MLPs to {'-'.join(map(str, m['mlp_channels'][:1] + m['mlp_channels'][-1:])) or '-'} "
                f"channels, {m['factorized_layers']} factorized ({m.get('shared_down_groups', 0)} down groups "
                f"shared), {m['dense_layers']} dense"
                + (f", {m['cut_experts']} experts modules to "
                   f"{'-'.join(map(str, m['expert_channels'][:1] + m['expert_channels'][-1:]))} channels an expert"
                   if m.get("cut_experts") else ""))
            models.append([number, run["environment"].get("cuda") or "—", label, structure, f"{m['params'] / 1e9:.2f}B",
                           m["param_ratio"],
                           "×".join(map(str, run["calibration"])), f"{run['prompt_length']} + {run['new_tokens']}", *bounds,
                           (m.get("prefill") or {}).get("peak_gib", "—"), max(peaks, default="—"),
                           m.get("compress_seconds", "—")])
            for part, name in PART_NAMES.items():
                batches = (None,) if part == "prefill" else ("1", "16")  # prefill: its own shape, first columns
                cells = []
                for batch in batches:
                    now, dense = value(m, part, batch), value(base, part, batch) if base else None
                    cells += [now if now is not None else "—", now / dense if now and dense else "—"]
                cells += ["—", "—"] * (2 - len(batches))
                if any(cell != "—" for cell in cells):
                    if part == "prefill":
                        name += f" ({run['prefill_shape'][0]}×{run['prefill_shape'][1]} tokens)"
                    if untuned and part.startswith("int8"):
                        name += " (untuned)"
                    timings.append([number, f"{m['reduction']:.0%}", name, *cells])
            for part, batch, entry in [(p, b, e) for p in ("compile", "compile_unshared", "int8") for b, e in m.get(p, {}).items()]:
                if isinstance(entry, dict) and entry.get("tokens_equal_eager") is False:
                    notes.append(f"{where}, {part} batch {batch}: {entry['tokens_matching_eager']:.1%} of "
                                 "the tokens equal eager greedy decoding (bf16 rounding differs between the compiled "
                                 "and eager kernels; a near-tie then picks another token).")
            notes += [f"{where}, {part} batch {b}: GPU kernels {e['kernel_share_of_wall']:.0%} of the wall "
                      f"time ({e['kernel_ms_per_token']:.2f} ms a new token, prompt included)."
                      for part in DECODE_PARTS for b, e in m.get(part, {}).items()
                      if isinstance(e, dict) and "kernel_share_of_wall" in e]
            notes += [f"{where}, {part} batch {b}: replayed, GPU kernels {e['kernel_ms_per_step']:.2f} ms a decode "
                      f"step, of which matrix products {step_matmuls(e, run['new_tokens'])}."
                      for part in ("graph", "graph_overlap", "graph_unshared") for b, e in m.get(part, {}).items()
                      if isinstance(e, dict) and "kernel_ms_per_step" in e]
            notes += [f"{where}, {part} batch {b}: the compiled warm-up (compilation included) "
                      f"took {e['warmup_seconds']:.0f} s." for part in ("compile", "compile_unshared", "int8")
                      for b, e in m.get(part, {}).items() if isinstance(e, dict) and "warmup_seconds" in e]
            mismatched = {batch + suffix: entry for part, suffix in (("graph", ""), ("graph_overlap", " (sibling ups overlapped)"),
                                                                    ("graph_compiled", " (inductor's kernels)"),
                                                                    ("int8_graph", " (int8, inductor's kernels)"),
                                                                    ("nf4_graph", " (nf4)"))
                          for batch, entry in m.get(part, {}).items()
                          if isinstance(entry, dict) and entry.get("replay_matches_eager_tokens") is False}
            notes += [f"{where}, batch {b}: replayed tokens differ from the same steps unreplayed (first step: "
                      f"max |Δlogit| {e.get('first_step_max_logit_diff', float('nan')):.3g}, smallest top-2 margin "
                      f"{e.get('first_step_min_top2_margin', float('nan')):.3g})." for b, e in mismatched.items()]
            notes += prefill_profile(where, m.get("prefill"), (base or {}).get("prefill"))
            errors = [f"{part} {batch}: {entry['error']}" for part in DECODE_PARTS
                      for batch, entry in m.get(part, {}).items() if isinstance(entry, dict) and "error" in entry]
            if isinstance(m.get("prefill"), dict) and "error" in m["prefill"]:
                errors.append(f"prefill: {m['prefill']['error']}")
            notes += [f"{where} failed: {e[:200].rstrip('.')}." for e in errors]
            if m.get("incomplete"):
                notes.append(f"{where}: the run was cut off before all its parts were measured.")
            for part, other, part_name, other_name, targeted in PAIRS if base and m["reduction"] else ():
                for batch in m.get(part, {}):
                    ratios = [value(m, p, batch) / value(base, p, batch)
                              for p in (part, other) if value(m, p, batch) and value(base, p, batch)]
                    if len(ratios) < 2:
                        continue
                    note = f"{where}, batch {batch}: {part_name} ×{ratios[0]:.2f} against {other_name} ×{ratios[1]:.2f}"
                    if targeted:
                        spread = max(max(runs) / min(runs) for runs in (m[other][batch]["runs"], base[other][batch]["runs"]))
                        judged = (verdict(ratios[0] >= ratios[1]) if spread <= SPREAD_TO_JUDGE else
                                  f"not judged, the eager runs of one model differ {spread:.1f}×")
                        note += f" (target: no lower: {judged})"
                    notes.append(note + ".")
        for reduction, targets in TARGETS.items() if run.get("shape", "7b") == "7b" else ():
            m = next((m for m in run["models"] if m["reduction"] == reduction), None)
            if m is None or base is None:
                continue
            where = f"run {number}, {reduction:.0%}"
            for (part, batch), target in targets.items():
                now, dense = value(m, part, batch), value(base, part, batch)
                if now and dense:
                    name = "prefill" if part == "prefill" else f"CUDA-graph decode, batch {batch}"
                    notes.append(f"{where}: {name} ×{now / dense:.3f} (target ≥{target}: "
                                 f"{verdict(now / dense >= target)}).")
    model_table = markdown_table(
        ["run", "GPU", "shape (Llama 7B unless named), bf16, reduction (recipe)", "structure", "parameters", "size/dense",
         "calibration (random tokens)", "decode: prompt + new tokens", "bound b1 (dense bytes/bytes)", "bound b16",
         "peak GiB prefill", "peak GiB decode", "compress s"], models)
    timing_table = markdown_table(
        ["run", "reduction", "part", "tokens/s, batch 1 (prefill: the shape named)",
         "×dense", "tokens/s, batch 16", "×dense"], timings)
    gpus = " / ".join(dict.fromkeys(r["environment"].get("cuda") or "—" for r in runs))
    return (f"{model_table}\n\n{timing_table}\n\n{gpus} (each run's GPU: first table); each run's models, then their "
            "timings (×dense: against the dense model of the same run; int8 rows against int8 dense); decode: "
            "greedy, KV cache. " + " ".join(PART_NOTES) +
            " Bound: the bytes one decode step reads (weights + KV cache at the mean context), dense over "
            "compressed. " + " ".join(notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=7, help="interleaved prefill timing rounds (medians)")
    parser.add_argument("--parts", nargs="+", default=["prefill", "graph", "decode", "compile", "int8"],
                        choices=["prefill", *DECODE_PARTS],
                        help="graph: decode replayed from a CUDA graph (static cache); graph_overlap: the same with "
                             "overlap_sibling_products (sibling up products on parallel streams); graph_compiled: the same with "
                             "the step's forward compiled by inductor; compile: generate with a static "
                             "cache and torch.compile; graph_unshared / compile_unshared: graph / compile again after "
                             "unshare_input_factors (each layer its own down matmul); int8: compiled decoding after "
                             "torchao int8 weight-only quantization; int8_graph: graph_compiled after it (the int8 "
                             "parts come last: they quantize the model); nf4_graph: graph after bitsandbytes nf4 "
                             "quantization (alone: it quantizes the model too)")
    parser.add_argument("--int8-untuned", action="store_true",
                        help="the int8 parts without torchao's inductor settings (its coordinate-descent tuning of "
                             "each kernel shape, which makes the first compilation of a compressed model long)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b",
                        help="the model's shape (benchmarks/scale.py; issue 21's targets are judged on 7b)")
    parser.add_argument("--layers", type=positive_int, default=32)
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.0, 0.2, 0.4],
                        help="fractions of the decoder-linear parameters removed (0: dense)")
    parser.add_argument("--recipe", default="{}", help="WSVDConfig fields set on top of the recommended recipe, as "
                                                       "JSON (e.g. '{\"attention_pruning\": false}')")
    parser.add_argument("--unshared", action="store_true",
                        help="time each factorized layer's own down matmul (compress shares q/k/v and gate/up's)")
    parser.add_argument("--calibration", nargs=2, type=positive_int, default=[16, 512], metavar=("SEQUENCES", "LENGTH"),
                        help="random calibration tokens of the recipe (default: 16 x 512)")
    parser.add_argument("--calibration-batch", type=positive_int, default=4)
    parser.add_argument("--prefill-batch", type=positive_int, default=8)
    parser.add_argument("--prefill-length", type=positive_int, default=2048)
    parser.add_argument("--decode-batches", nargs="+", type=positive_int, default=[1, 16])
    parser.add_argument("--prompt-length", type=positive_int, default=128)
    parser.add_argument("--new-tokens", type=positive_int, default=256)
    parser.add_argument("--decode-repeats", type=positive_int, default=2)
    parser.add_argument("--decode-warmup", type=non_negative_int, default=1)
    add_json_arguments(parser)
    args = parser.parse_args()
    if "nf4_graph" in args.parts and not args.from_json:
        if any(part.startswith("int8") for part in args.parts):
            parser.error("--parts: nf4_graph and the int8 parts each quantize the model: run them separately")
        # bitsandbytes' 4-bit kernels take input widths in multiples of 64; narrower or odd ones fall
        # back to dequantizing the whole weight each step, which would time that, not nf4
        multiple = json.loads(args.recipe).get("rank_multiple")
        if not multiple or multiple % 64:
            parser.error(f"--parts nf4_graph needs ranks and MLP widths in multiples of 64 for bitsandbytes' 4-bit "
                         f"kernels (rank_multiple={multiple}): add \"rank_multiple\": 64 (or a multiple) to --recipe")
        if importlib.util.find_spec("bitsandbytes") is None:
            parser.error("--parts nf4_graph needs bitsandbytes: pip install -e '.[bnb]'")
    require_cuda(args)  # after the options' own checks, which need no GPU
    measure_or_publish("speed_gpu", args, measure, render)


if __name__ == "__main__":
    main()
