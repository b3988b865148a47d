"""Sequential whitening of a Llama model of 7B shape (random weights): wall time and peak GPU memory.

The blocks stay in CPU memory; one block at a time moves to the GPU with the calibration
activations (128 sequences × 2048 synthetic tokens by default). Meant for a CUDA GPU.

    python benchmarks/sequential_7b.py --json-out seq7b.json      # measure (GPU machine)
    python benchmarks/sequential_7b.py --from-json seq7b.json     # write the table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_wsvd import WSVDConfig, compress

SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def build(layers: int, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Random bf16 weights built directly on ``device`` (no init pass: N(0, 0.02) filled in place)."""
    config = LlamaConfig(**{**SHAPE_7B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32, device=device).mul_(0.02))
    model.model.rotary_emb.__init__(config=config)  # buffers were left empty by to_empty
    model.model.rotary_emb.to(device)
    return model.eval()


def measure(args) -> dict:
    start = time.perf_counter()
    model = build(args.layers)
    build_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE_7B["vocab_size"], (args.sequences, args.length), generator=generator)
    examples = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    data = DataLoader(examples, batch_size=args.batch_size)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    config = WSVDConfig(method="whiten", param_ratio=1 - args.reduction, allocation="uniform", sequential=True)
    start = time.perf_counter()
    model, report = compress(model, config, data)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "layers": args.layers, "sequences": args.sequences, "length": args.length, "reduction": args.reduction,
        "compress_seconds": seconds, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "build_seconds": build_seconds, "factorized_layers": len(report.ranks),
        "params_before": report.params_before, "params_after": report.params_after,
        "stage_seconds": report.seconds, "environment": __import__("report").environment(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reduction", type=float, default=0.2)
    parser.add_argument("--json-out")
    parser.add_argument("--from-json")
    args = parser.parse_args()

    from report import markdown_table, publish

    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
    else:
        payload = measure(args)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(payload, indent=2))
            return
    p = payload
    table = markdown_table(
        ["model", "calibration", "method", "reduction", "wall time (s)", "peak GPU memory (GiB)", "GPU"],
        [[f"Llama 7B shape, {p['layers']} layers, bf16, random", f"{p['sequences']}×{p['length']} tokens",
          "whiten, sequential", f"{p['reduction']:.0%}", p["compress_seconds"], p["peak_gpu_gib"],
          p["environment"].get("cuda")]],
    )
    publish("sequential_7b", payload, table)


if __name__ == "__main__":
    main()
