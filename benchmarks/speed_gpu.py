"""GPU generation speed of compressed LLMs against their dense original: a Llama model of 7B shape
(random bf16 weights) dense and with 20% and 40% of its decoder-linear parameters removed (factors
of the uniform ranks, random: speed does not depend on their values), built, measured and freed
one at a time: prefill tokens/s (8 × 2048, KV cache written, last logits only), greedy decode
tokens/s at batch 1 and 16 (256 new tokens after a 128-token prompt, KV cache; timed from the
first new token), decode replayed from a captured CUDA graph (``--parts graph``), peak GPU memory;
``--compile`` decodes with a static cache, which ``generate`` compiles (CUDA graphs).

    python benchmarks/speed_gpu.py --json-out gpu_eager.json                # GPU machine
    python benchmarks/speed_gpu.py --compile --json-out gpu_compiled.json
    python benchmarks/speed_gpu.py --from-json gpu_eager.json gpu_compiled.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from hf_wsvd import WSVDConfig
from hf_wsvd.allocation import uniform_ranks
from hf_wsvd.runtime.factorized_linear import linear_shape
from hf_wsvd.swap import replace_with_factors
from hf_wsvd.targets import select_targets
from timing import (add_json_arguments, interleaved_seconds, measure_or_publish, median, token_batch, verdict,
                    with_key)

DECODE_TARGET, PREFILL_TARGET = 1.4, 1.3  # issue #8: 7B shape, 40% reduction, ×dense


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


def factorize_randomly(model, reduction: float, rank_multiple: int, seed: int = 2) -> dict[str, int]:
    """Replace every decoder linear by random bf16 factors of the uniform rank that removes
    ``reduction`` of its parameters (product entries of std 0.02, like the dense weights)."""
    targets = select_targets(model, None, None)
    shapes = {name: linear_shape(model.get_submodule(full)) for name, full in targets.items()}
    ranks = uniform_ranks(shapes, 1 - reduction, multiple=rank_multiple)
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, rank in ranks.items():
        in_features, out_features = shapes[name]
        scale = (0.02 / rank**0.5) ** 0.5
        up = torch.randn(out_features, rank, generator=generator, device=device, dtype=torch.bfloat16).mul_(scale)
        down = torch.randn(rank, in_features, generator=generator, device=device, dtype=torch.bfloat16).mul_(scale)
        replace_with_factors(model, targets[name], up, down)
    return ranks


def decode(model, batch: int, args) -> dict:
    """Greedy generation of ``args.new_tokens`` tokens after a random prompt (median of repeats)."""
    from transformers import StoppingCriteriaList

    ids = token_batch(model.config.vocab_size, batch, args.prompt_length, model.device, seed=batch)
    options = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                   min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens,
                   pad_token_id=model.config.eos_token_id)
    if args.compile:
        options["cache_implementation"] = "static"
    for _ in range(args.decode_warmup):  # short: warms kernels (and compiles) without a full run
        model.generate(ids, **{**options, "min_new_tokens": 8, "max_new_tokens": 8})
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
    return {"tokens_per_s": median(decode_rates), "end_to_end_tokens_per_s": median(total_rates),
            "runs": decode_rates}


def rewind(cache, length: int) -> None:
    """Move a static KV cache back to ``length`` cached tokens. transformers 5 static layers keep
    their write position in a device tensor (``cumulative_length``) that each forward advances in
    place, which is what lets one captured step be replayed; replaying a pass again starts here."""
    for layer in cache.layers:
        if not hasattr(layer, "cumulative_length"):
            raise RuntimeError(f"{type(layer).__name__} has no cumulative_length: this transformers version "
                               "tracks static-cache positions differently; adapt speed_gpu.rewind")
        layer.cumulative_length.fill_(length)


def graph_decode(model, batch: int, args) -> dict:
    """Greedy decode with a static KV cache, each step (forward, argmax) replayed from one captured
    CUDA graph: the GPU time of decoding without Python or launch overhead, which is what serving
    engines see (eager ``generate`` at batch 1 is bound by launches, and a factorized layer launches
    two kernels). Timed over ``args.new_tokens`` steps after the prompt; the replayed tokens are
    checked against the same steps run eagerly."""
    from transformers import StaticCache

    ids = token_batch(model.config.vocab_size, batch, args.prompt_length, model.device, seed=batch)
    cache = StaticCache(config=model.config, max_cache_len=args.prompt_length + args.new_tokens)
    with torch.inference_mode():
        first = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        step_ids = first.clone()
        logits = torch.empty(batch, model.config.vocab_size, device=model.device, dtype=torch.float32)

        def step() -> None:
            logits.copy_(model(input_ids=step_ids, past_key_values=cache, use_cache=True).logits[:, -1])
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
        same = bool(torch.equal(torch.cat(eager[:-1], 1), torch.cat(replayed[:-1], 1)))
        # the same first step, eager vs replayed: bf16 rounding differences, if any, show here
        first_step_diff = float((eager[-1] - replayed[-1]).abs().max())
        top2 = eager[-1].topk(2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
    del graph, cache
    return {"tokens_per_s": median(rates[1:]), "runs": rates[1:], "replay_matches_eager_tokens": same,
            "checked_tokens": check, "first_step_max_logit_diff": first_step_diff,
            "first_step_min_top2_margin": margin}


def guarded(result: dict, key: str, work) -> None:
    """``result[key] = work()``, or the error (a failed part must not lose the others)."""
    try:
        result[key] = work()
    except Exception as error:  # noqa: BLE001 - recorded in the JSON, the run goes on
        result[key] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        print(f"{key} failed: {result[key]['error']}", file=sys.stderr)
    gc.collect()
    torch.cuda.empty_cache()


def measure_model(reduction: float, args) -> dict:
    from scale import build

    device = torch.device("cuda")
    model = build("7b", args.layers, device, torch.bfloat16)
    dense_params = sum(p.numel() for p in model.parameters())
    ranks = factorize_randomly(model, reduction, args.rank_multiple) if reduction else {}
    gc.collect()
    torch.cuda.empty_cache()
    params = sum(p.numel() for p in model.parameters())
    result = {"reduction": reduction, "params": params, "param_ratio": params / dense_params,
              "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
              "weights_gib": torch.cuda.memory_allocated() / 2**30, "factorized_layers": len(ranks),
              "ranks": sorted(set(ranks.values()))}
    if "prefill" in args.parts:
        def prefill() -> dict:
            ids = token_batch(model.config.vocab_size, args.prefill_batch, args.prefill_length, device)
            torch.cuda.reset_peak_memory_stats()
            seconds = interleaved_seconds(
                {"prefill": lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)},
                args.rounds, 1, 1, device)["prefill"]
            return {"tokens_per_s": args.prefill_batch * args.prefill_length / median(seconds),
                    "seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}

        guarded(result, "prefill", prefill)
    for part, run in (("decode", decode), ("graph", graph_decode)):
        if part not in args.parts:
            continue
        result[part] = {}
        for batch in args.decode_batches:
            def measured(batch=batch, run=run) -> dict:
                torch.cuda.reset_peak_memory_stats()
                return {**run(model, batch, args), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}

            guarded(result[part], str(batch), measured)
        print(f"reduction {reduction}: {part} done", file=sys.stderr)
    del model
    if args.compile:
        torch._dynamo.reset()  # frees the compiled graphs (and their CUDA graph pools)
    gc.collect()
    torch.cuda.empty_cache()
    return result



def measure(args) -> dict:
    """Each model in turn; with ``--json-out`` the file is rewritten after each, so a run cut off
    by a time limit still leaves what it measured."""
    from report import environment

    payload = {"device": "cuda", "gpu": torch.cuda.get_device_name(), "layers": args.layers,
               "compile": args.compile, "parts": args.parts, "rank_multiple": args.rank_multiple,
               "prefill_shape": [args.prefill_batch, args.prefill_length], "prompt_length": args.prompt_length,
               "new_tokens": args.new_tokens, "models": [], "environment": environment()}
    start = time.perf_counter()
    for reduction in args.reductions:
        payload["models"].append(measure_model(reduction, args))
        payload["seconds"] = time.perf_counter() - start
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(payload, indent=2))
    return payload


def render(runs: list[dict]) -> str:
    from report import markdown_table

    def value(m, part, batch=None):
        try:
            entry = m[part] if batch is None else m[part][batch]
            return entry["tokens_per_s"]
        except (KeyError, TypeError):
            return None

    runs = with_key(runs, "models")
    rows, notes = [], []
    for run in runs:
        base = next((m for m in run["models"] if m["reduction"] == 0), None)
        mode = "compiled generate" if run["compile"] else "CUDA graph" if run["parts"] == ["graph"] else "eager"
        columns = [("prefill", None), ("decode", "1"), ("decode", "16"), ("graph", "1"), ("graph", "16")]
        for m in run["models"]:
            cells = []
            for part, batch in columns:
                now, dense = value(m, part, batch), value(base, part, batch) if base else None
                cells += [now if now is not None else "—", now / dense if now and dense else "—"]
            peaks = [d.get("peak_gib") for part in ("decode", "graph") for d in m.get(part, {}).values()
                     if isinstance(d, dict) and "peak_gib" in d]
            rows.append([mode, f"{m['reduction']:.0%}", f"{m['params'] / 1e9:.2f}B", m["weights_bytes"] / 2**30,
                         m["weights_bytes"] / base["weights_bytes"] if base else "—", *cells,
                         (m.get("prefill") or {}).get("peak_gib", "—"), max(peaks, default="—")])
            if base and m["reduction"] == 0.4:
                for part in ("decode", "graph"):
                    d1, d0 = value(m, part, "1"), value(base, part, "1")
                    if d1 and d0:
                        name = "CUDA-graph decode" if part == "graph" else mode if mode.endswith("generate") else f"{mode} generate"
                        notes.append(f"{name}: 40% reduction decode ×{d1 / d0:.2f} at batch 1 (target "
                                     f"≥{DECODE_TARGET}: {verdict(d1 / d0 >= DECODE_TARGET)}).")
                pf, p0 = value(m, "prefill"), value(base, "prefill")
                if pf and p0:
                    notes.append(f"40% reduction prefill ×{pf / p0:.2f} (target ≥{PREFILL_TARGET}: "
                                 f"{verdict(pf / p0 >= PREFILL_TARGET)}).")
            mismatched = {batch: entry for batch, entry in m.get("graph", {}).items()
                          if isinstance(entry, dict) and entry.get("replay_matches_eager_tokens") is False}
            notes += [f"{m['reduction']:.0%}, batch {b}: replayed tokens differ from eager steps (first step: "
                      f"max |Δlogit| {e.get('first_step_max_logit_diff', float('nan')):.3g}, smallest top-2 margin "
                      f"{e.get('first_step_min_top2_margin', float('nan')):.3g})." for b, e in mismatched.items()]
            errors = [f"{part} {batch}: {entry['error']}" for part in ("decode", "graph")
                      for batch, entry in m.get(part, {}).items() if isinstance(entry, dict) and "error" in entry]
            if isinstance(m.get("prefill"), dict) and "error" in m["prefill"]:
                errors.append(f"prefill: {m['prefill']['error']}")
            notes += [f"{m['reduction']:.0%} failed: {e[:200]}" for e in errors]
    run = runs[0]
    text = markdown_table(
        ["Llama 7B shape, bf16", "reduction", "parameters", "weights GiB", "size/dense",
         f"prefill tokens/s ({run['prefill_shape'][0]}×{run['prefill_shape'][1]})", "×dense",
         "generate tokens/s, batch 1", "×dense", "generate, batch 16", "×dense",
         "CUDA-graph decode, batch 1", "×dense", "CUDA-graph decode, batch 16", "×dense",
         "peak GiB prefill", "peak GiB decode"], rows)
    return text + (f"\n\n{run['environment'].get('cuda')}; decode: greedy, {run['new_tokens']} new tokens after a "
                   f"{run['prompt_length']}-token prompt, KV cache; generate is timed from the first new token; "
                   "CUDA-graph decode replays one captured step (static cache) per token. " + " ".join(notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved prefill timing rounds (medians)")
    parser.add_argument("--parts", nargs="+", default=["prefill", "decode", "graph"], choices=["prefill", "decode", "graph"],
                        help="graph: decode replayed from a CUDA graph (static cache)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.0, 0.2, 0.4],
                        help="fractions of the decoder-linear parameters removed (0: dense)")
    parser.add_argument("--rank-multiple", type=int, default=WSVDConfig().rank_multiple,
                        help="round ranks down to a multiple of this (default: WSVDConfig's; 1 = exact ranks)")
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--prefill-length", type=int, default=2048)
    parser.add_argument("--decode-batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--decode-repeats", type=int, default=2)
    parser.add_argument("--decode-warmup", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="decode with a static cache, compiled by generate")
    add_json_arguments(parser)
    measure_or_publish("speed_gpu", parser.parse_args(), measure, render)


if __name__ == "__main__":
    main()
