"""CPU inference speed of what ``compress`` outputs against the dense original, all in one process
and timed in interleaved rounds (medians; ×dense is the median of the per-round ratios), per torch
thread count:

- the shipped MiniLM-L6 SST-2 classifier in float32, compressed by the recommended recipe
  (``WSVDConfig(param_ratio=...)`` on ``--samples`` SST-2 training examples, 512 by default) at each kept ratio: forward
  throughput at batch 32 × 128 tokens, latency at batch 1 × 128, and the dev accuracy;
- with ``--llm``, a causal LM (the SmolLM2-135M demo model by default) compressed by the
  recommended recipe (calibration: seeded blocks of wiki.valid.tokens) at each reduction: prefill
  throughput (4 × 256 tokens) and greedy decode tokens/s at batch 1 (64 new tokens after a
  32-token prompt, KV cache).

Beside each row: the bytes of its weights against dense, which bounds the speed-up where the
forward is bound by reading them. Compression runs on the GPU when there is one; timing on the CPU.
The compressed models are timed as ``compress`` returns them: factorized layers that read the same
input (query/key/value, gate/up) compute their down factors in one matmul
(``hf_wsvd.share_input_factors``; ``shared_down_groups`` in the JSON); ``--unshared`` times each
layer's own two matmuls instead.

    python benchmarks/speed_cpu.py --threads 2 1 --llm smollm2-135m --json-out speed_cpu.json
    python benchmarks/speed_cpu.py --from-json speed_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import torch

from common import MINILM, ROOT, SHARED, SST2_TRAIN
from hf_wsvd.argtypes import non_negative_int, positive_int
from timing import (add_json_arguments, interleaved_seconds, kept_fraction, load_range, measure_or_publish, median,
                    reduction, shared_down_groups, speedup, token_batch, verdict, with_key)

CPU_TARGET = 1.6  # issue 21: MiniLM SST-2 throughput at kept ratio 0.5, 2 threads, ×dense


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _compressed(dense, config, data, unshared: bool) -> tuple[torch.nn.Module, dict]:
    """``dense`` compressed by ``config`` on ``data`` (on the GPU when there is one), back on the
    CPU in float32 (with its down factors shared as ``compress`` leaves them, unless ``unshared``),
    and what the recipe chose."""
    from hf_wsvd import compress, unshare_input_factors

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model, report = compress(copy.deepcopy(dense).to(device), config, data, show_progress=False)
    seconds = time.perf_counter() - start
    model = model.to("cpu", torch.float32).eval()
    if unshared:
        unshare_input_factors(model)
    structure = {"compress_seconds": seconds, "factorized": len(report.ranks),
                 "pruned_mlps": len(report.pruned_mlps), "cut_attentions": len(report.attention),
                 "dense_layers": len(report.dense_targets), "shared_down_groups": shared_down_groups(model)}
    return model, structure


def _minilm(args) -> dict:
    """The classifier and its compressions by each recipe variant at each kept ratio: (models,
    structures, accuracies), keyed "ratio" (the recommended recipe) or "ratio variant"."""
    from hf_wsvd import WSVDConfig
    from hf_wsvd.evaluation import evaluate_model
    from hf_wsvd.cli.workflow import data_loader, load_model_and_tokenizer

    dense, tokenizer = load_model_and_tokenizer(str(args.model), dtype=torch.float32)
    base = WSVDConfig(num_samples=args.samples, batch_size=8, max_length=128, seed=0)
    train = data_loader(dense, tokenizer, str(SST2_TRAIN), base, ["sentence"], "label")
    dev = data_loader(dense, tokenizer, str(SST2_TRAIN.parent / "dev.tsv"), base, ["sentence"], "label", shuffle=False)
    models, structures, accuracy = {1.0: dense.eval()}, {}, {}
    for variant in args.variants:
        for ratio in args.ratios:
            key = ratio if variant == "{}" else f"{ratio} {variant}"
            config = WSVDConfig(param_ratio=ratio, num_samples=args.samples, batch_size=8, max_length=128,
                                **json.loads(variant))
            models[key], structures[key] = _compressed(dense, config, train, args.unshared)
    for ratio, model in models.items():
        accuracy[ratio] = evaluate_model(model, dev, show_progress=False)["accuracy"]
    return models, structures, accuracy


def _llm(args) -> tuple[dict, dict]:
    """The causal LM and its compressions by the recommended recipe: (models by kept ratio, structures)."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling

    from hf_wsvd import WSVDConfig
    from hf_wsvd.data import text_blocks
    from hf_wsvd.demo_models import DEMO_MODELS, demo_model
    from hf_wsvd.cli.workflow import load_model_and_tokenizer

    path = demo_model(args.llm) if args.llm in DEMO_MODELS else args.llm
    dense, tokenizer = load_model_and_tokenizer(str(path), dtype=torch.float32)
    blocks = text_blocks(Path(args.calibration).read_text(encoding="utf-8").splitlines(), tokenizer, 256)
    random.Random(0).shuffle(blocks)
    data = DataLoader(blocks[: args.llm_samples], batch_size=4,
                      collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    models, structures = {1.0: dense.eval()}, {}
    for reduction in args.reductions:
        config = WSVDConfig(param_ratio=1 - reduction)
        models[1 - reduction], structures[1 - reduction] = _compressed(dense, config, data, args.unshared)
    return models, structures


def _decode(model, prompt: torch.Tensor, new_tokens: int) -> None:
    model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, min_new_tokens=new_tokens,
                   max_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id)


def _timings(models: dict, calls: dict, args) -> list[dict]:
    """Per thread count, each callable's interleaved timings for every model (``calls``: name →
    (make(model) → callable, iterations, work per call))."""
    default_threads = torch.get_num_threads()
    timings = []
    for threads in args.threads or [default_threads]:
        torch.set_num_threads(threads)
        load = os.getloadavg()[0]
        rows = {ratio: {"ratio": ratio} for ratio in models}
        for name, (make, iters, work) in calls.items():
            seconds = interleaved_seconds({r: make(m) for r, m in models.items()}, args.rounds, iters, args.warmup,
                                          "cpu")
            for ratio in models:
                rows[ratio][f"{name}_per_s"] = work / median(seconds[ratio])
                rows[ratio][f"{name}_x"] = speedup(seconds[1.0], seconds[ratio])
                rows[ratio][f"{name}_s"] = seconds[ratio]
        timings.append({"threads": threads, "loadavg_1min": [load, os.getloadavg()[0]], "rows": list(rows.values())})
    torch.set_num_threads(default_threads)
    return timings


def measure(args) -> dict:
    from report import environment

    torch.manual_seed(0)
    models, structures, accuracy = _minilm(args)
    vocab = models[1.0].config.vocab_size
    big = token_batch(vocab, args.batch, args.length, "cpu")
    one = token_batch(vocab, 1, args.length, "cpu", seed=1)
    calls = {"tokens": (lambda m: lambda: m(input_ids=big), args.iters, args.batch * args.length),
             "latency": (lambda m: lambda: m(input_ids=one), args.latency_iters, 1)}
    payload = {
        "device": "cpu", "model": os.path.relpath(args.model, ROOT), "dtype": "float32", "batch": args.batch,
        "length": args.length, "rounds": args.rounds, "iters": args.iters, "latency_iters": args.latency_iters,
        "timings": _timings(models, calls, args), "environment": environment(),
        "structures": {str(r): s for r, s in structures.items()}, "accuracy": {str(r): a for r, a in accuracy.items()},
        "weight_bytes": {str(r): _weight_bytes(m) for r, m in models.items()},
    }
    if args.llm:
        llms, llm_structures = _llm(args)
        prompt = token_batch(llms[1.0].config.vocab_size, 1, 32, "cpu", seed=2)
        prefill = token_batch(llms[1.0].config.vocab_size, 4, 256, "cpu", seed=3)
        llm_calls = {"prefill": (lambda m: lambda: m(input_ids=prefill, logits_to_keep=1), 1, 4 * 256),
                     "decode": (lambda m: lambda: _decode(m, prompt, args.new_tokens), 1, args.new_tokens)}
        payload["llm"] = {"model": str(args.llm), "timings": _timings(llms, llm_calls, args),
                          "structures": {str(r): s for r, s in llm_structures.items()},
                          "weight_bytes": {str(r): _weight_bytes(m) for r, m in llms.items()},
                          "new_tokens": args.new_tokens}
    return payload


def _structure(structure: dict | None, dense: bool = True) -> str:
    """What a compressed model's recipe chose, in words ("dense" for none; "-" for a compressed model
    whose run did not record it)."""
    if structure is None:
        return "dense" if dense else "-"
    return (f"{structure['pruned_mlps']} MLPs pruned, {structure['cut_attentions']} attentions cut, "
            f"{structure['factorized']} factorized ({structure.get('shared_down_groups', 0)} down groups shared)")


def _bound(weight_bytes: dict | None, key: str) -> float | str:
    """Dense weight bytes over the model's ("-": the run did not record them, as the former speed.py's)."""
    return weight_bytes["1.0"] / weight_bytes[key] if weight_bytes else "-"


def _timing_row(row: dict) -> dict:
    """A MiniLM timing row in today's fields (the former speed.py wrote throughput_x and latency_ms)."""
    if "latency_ms" not in row:
        return row
    return {"tokens_x": row["throughput_x"], "latency_per_s": 1e3 / row["latency_ms"], **row}


def render(runs: list[dict]) -> str:
    from report import markdown_table

    runs = with_key(runs, "timings")
    p = runs[0]
    rows, notes = [], []
    for run in runs:
        for timing in run["timings"]:
            timed = [_timing_row(m) for m in timing["rows"]]
            for m in timed:
                key = str(m["ratio"])
                ratio, _, variant = str(m["ratio"]).partition(" ")
                dense = float(ratio) == 1.0
                label = "dense" if dense else f"kept {float(ratio):g}" + (f", {variant}" if variant else "")
                rows.append([timing["threads"], load_range(timing["loadavg_1min"]), label,
                             _structure(run.get("structures", {}).get(key), dense), _bound(run.get("weight_bytes"), key),
                             m["tokens_per_s"], m["tokens_x"], 1e3 / m["latency_per_s"], m["latency_x"],
                             run.get("accuracy", {}).get(key, "—")])
            half = next((m for m in timed if m["ratio"] == 0.5), None)
            if half and timing["threads"] == 2:
                notes.append(f"Target ≥{CPU_TARGET}× dense throughput at kept ratio 0.5, 2 threads: "
                             f"{half['tokens_x']:.2f}× ({verdict(half['tokens_x'] >= CPU_TARGET)}).")
    text = markdown_table(
        ["threads", "load (1 min)", "MiniLM-L6 SST-2, float32 (recommended recipe)", "structure",
         "bound (dense bytes/bytes)", f"tokens/s ({p['batch']}×{p['length']})", "×dense",
         f"latency ms (1×{p['length']})", "×dense", "SST-2 dev accuracy"], rows)
    notes.insert(0, f"CPU ({p['environment']['cpus']} cores), medians of {p['rounds']} interleaved rounds; ×dense is "
                    "the median of the per-round ratios; load: `os.getloadavg()` before–after; kept ratio: of the "
                    "encoder linears' parameters.")
    text += "\n\n" + " ".join(notes)
    llm_runs = [run for run in runs if run.get("llm")]
    if llm_runs:
        llm_rows = []
        for run in llm_runs:
            llm = run["llm"]
            for timing in llm["timings"]:
                for m in timing["rows"]:
                    key = str(m["ratio"])
                    llm_rows.append([timing["threads"], load_range(timing["loadavg_1min"]), f"{1 - m['ratio']:.0%}",
                                     _structure(llm["structures"].get(key)), _bound(llm.get("weight_bytes"), key),
                                     m["prefill_per_s"], m["prefill_x"], m["decode_per_s"], m["decode_x"]])
        text += "\n\n" + markdown_table(
            ["threads", "load (1 min)", f"{llm_runs[0]['llm']['model']}, float32, reduction", "structure",
             "bound (dense bytes/bytes)", "prefill tokens/s (4×256)", "×dense",
             f"decode tokens/s (batch 1, {llm_runs[0]['llm']['new_tokens']} new)", "×dense"], llm_rows)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MINILM)
    parser.add_argument("--ratios", nargs="+", type=kept_fraction, default=[0.5, 0.3], help="kept ratios")
    parser.add_argument("--samples", type=positive_int, default=512, help="SST-2 training examples of the recipe")
    parser.add_argument("--variants", nargs="+", default=["{}", '{"mlp_pruning": true, "attention_pruning": true}'],
                        help="WSVDConfig fields set on the recommended recipe, as JSON, one compression each ({}: "
                             "the recommended recipe)")
    parser.add_argument("--unshared", action="store_true",
                        help="time each factorized layer's own down matmul (compress shares query/key/value's)")
    parser.add_argument("--llm", help="also time a causal LM: a demo model name, folder or .gguf")
    parser.add_argument("--reductions", nargs="+", type=reduction, default=[0.2, 0.4], help="of the LM's decoder linears")
    parser.add_argument("--calibration", default=str(SHARED / "data/wikitext-2/wiki.valid.tokens"))
    parser.add_argument("--llm-samples", type=positive_int, default=32, help="calibration blocks of 256 tokens")
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--rounds", type=positive_int, default=7, help="interleaved timing rounds (medians)")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--length", type=positive_int, default=128)
    parser.add_argument("--iters", type=positive_int, default=3, help="throughput forwards per round")
    parser.add_argument("--latency-iters", type=positive_int, default=20, help="latency forwards per round")
    parser.add_argument("--threads", nargs="+", type=positive_int, help="torch threads of the timings (default: torch's)")
    add_json_arguments(parser)
    measure_or_publish("speed_cpu", parser.parse_args(argv), measure, render)


if __name__ == "__main__":
    main()
