"""CPU inference speed of compressed models against their dense original: the shipped MiniLM-L6
SST-2 classifier in float32, dense and compressed with ``svd`` (speed does not depend on the
method, only on the ranks) at kept ratios 0.5 and 0.3, all in one process and timed in interleaved
rounds (medians; ×dense is the median of the per-round ratios): forward throughput at batch
32 × 128 tokens and latency at batch 1 × 128, per torch thread count.

    python benchmarks/speed_cpu.py --json-out speed_cpu.json
    python benchmarks/speed_cpu.py --from-json speed_cpu.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from common import MINILM, ROOT, ratio_label, svd_variants
from timing import (add_json_arguments, interleaved_seconds, load_range, measure_or_publish, median, speedup,
                    token_batch, verdict, with_key)

CPU_TARGET = 1.5  # issue #8: MiniLM throughput at kept ratio 0.5, ×dense


def measure(args) -> dict:
    from report import environment

    models = svd_variants(args.model, args.ratios)
    vocab = models[1.0].config.vocab_size
    big = token_batch(vocab, args.batch, args.length, "cpu")
    one = token_batch(vocab, 1, args.length, "cpu", seed=1)
    default_threads = torch.get_num_threads()
    timings = []
    for threads in args.threads or [default_threads]:
        torch.set_num_threads(threads)
        load = os.getloadavg()[0]
        throughput = interleaved_seconds({r: (lambda m: lambda: m(input_ids=big))(m) for r, m in models.items()},
                                         args.rounds, args.iters, args.warmup, "cpu")
        latency = interleaved_seconds({r: (lambda m: lambda: m(input_ids=one))(m) for r, m in models.items()},
                                      args.rounds, args.latency_iters, args.warmup, "cpu")
        timings.append({"threads": threads, "loadavg_1min": [load, os.getloadavg()[0]], "rows": [
            {"ratio": ratio, "tokens_per_s": args.batch * args.length / median(throughput[ratio]),
             "throughput_x": speedup(throughput[1.0], throughput[ratio]), "throughput_s": throughput[ratio],
             "latency_ms": 1e3 * median(latency[ratio]), "latency_x": speedup(latency[1.0], latency[ratio]),
             "latency_s": latency[ratio]} for ratio in models]})
    torch.set_num_threads(default_threads)
    return {
        "device": "cpu", "model": os.path.relpath(args.model, ROOT), "dtype": "float32",
        "default_threads": default_threads, "batch": args.batch, "length": args.length, "rounds": args.rounds,
        "iters": args.iters, "latency_iters": args.latency_iters, "timings": timings, "environment": environment(),
    }


def render(runs: list[dict]) -> str:
    from report import markdown_table

    runs = with_key(runs, "timings")
    p = runs[0]
    rows, notes = [], []
    for timing in (t for run in runs for t in run["timings"]):
        for m in timing["rows"]:
            rows.append([timing["threads"], load_range(timing["loadavg_1min"]), ratio_label(m["ratio"]),
                         m["tokens_per_s"], m["throughput_x"], m["latency_ms"], m["latency_x"]])
        half = next((m for m in timing["rows"] if m["ratio"] == 0.5), None)
        if half:
            notes.append(f"Target ≥{CPU_TARGET}× dense throughput at kept ratio 0.5, {timing['threads']} thread(s): "
                         f"{half['throughput_x']:.2f}× ({verdict(half['throughput_x'] >= CPU_TARGET)}).")
    text = markdown_table(
        ["threads", "load (1 min)", "MiniLM-L6 SST-2, float32", f"tokens/s ({p['batch']}×{p['length']})", "×dense",
         f"latency ms (1×{p['length']})", "×dense"], rows)
    notes.insert(0, f"CPU ({p['environment']['cpus']} cores), medians of {p['rounds']} interleaved rounds; ×dense is "
                    "the median of the per-round ratios; load: `os.getloadavg()` before–after.")
    return text + "\n\n" + " ".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MINILM)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.3], help="kept ratios")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (medians)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--iters", type=int, default=3, help="throughput forwards per round")
    parser.add_argument("--latency-iters", type=int, default=20, help="latency forwards per round")
    parser.add_argument("--threads", nargs="+", type=int, help="torch threads of the timings (default: torch's)")
    add_json_arguments(parser)
    measure_or_publish("speed_cpu", parser.parse_args(), measure, render)


if __name__ == "__main__":
    main()
