"""WikiText-2 perplexity of real LLMs compressed by each recipe, with and without healing.

Models: the PyPI demo models of ``hf_wsvd.demo_models`` (SmolLM2-135M, Qwen2.5-Coder-0.5B) or any
folder / .gguf. Calibration and healing text: seeded blocks of wiki.valid.tokens; model selection
for healing: perplexity on validation blocks not used for calibration; test: the whole wiki.test.raw
in non-overlapping blocks (never used for anything else). Reductions are of the decoder linears'
parameters (20% = kept ratio 0.8). Runs on a GPU when there is one; measure there, render here:

    python benchmarks/llm.py --model smollm2-135m --json-out smollm2.json     # measure (GPU machine)
    python benchmarks/llm.py --from-json smollm2.json qwen.json               # write the tables
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path
from statistics import median

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForLanguageModeling, pipeline

from hf_wsvd import WSVDConfig, compress
from hf_wsvd.argtypes import non_negative_int, positive_int, speed_limit
from hf_wsvd.integrations.checkpoint import error_falls
from hf_wsvd.data import teacher_samples, text_blocks
from hf_wsvd.demo_models import DEMO_MODELS, demo_model
from hf_wsvd.evaluation import perplexity
from hf_wsvd.integrations.healing import HealConfig, distillation_kl, heal
from hf_wsvd.recipes import default_block_refine_steps
from hf_wsvd.statistics import FISHER_ROWS, GRAM, MEAN_ABS, gradient_statistics, input_statistics
from hf_wsvd.targets import select_targets
from hf_wsvd.tasks import CAUSAL_LM, per_example_loss
from hf_wsvd.cli.workflow import load_model_and_tokenizer
from timing import listed, reduction

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
PROMPT = "The history of the city"
PROBE_STEPS = 40  # healing steps timed to turn --heal-seconds into a step count
# The recipe lists (see recipes) by default, and as --only-recommended sets them: only the recommended
# recipe's rows (fisher_whiten, greedy, sequential, compensated λ=0.1, MLPs pruned)
RECIPE_LISTS = {"methods": ["svd", "fwsvd", "asvd", "whiten", "fisher_whiten"], "allocations": ["uniform", "greedy"],
                "sequential_methods": ["whiten", "fisher_whiten"], "compensated_methods": ["fisher_whiten"],
                "pruned_methods": ["fisher_whiten"], "compensation_ridges": [1e-1]}
RECOMMENDED_LISTS = {"methods": [], "allocations": ["greedy"], "sequential_methods": [], "compensated_methods": [],
                     "pruned_methods": ["fisher_whiten"], "compensation_ridges": [0.1]}


def fingerprint(blocks: list[dict]) -> str:
    """The sha256 of ``blocks``' token ids, in order (the first 16 hex digits)."""
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(json.dumps(list(block["input_ids"])).encode())
    return digest.hexdigest()[:16]


def loader(blocks, tokenizer, batch_size):
    return DataLoader(blocks, batch_size=batch_size, collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False))


def recipes(args) -> list[dict]:
    """The recipes of one reduction: each method × allocation in whole-model mode, the sequential
    methods, the compensated sequential methods at each ridge, and the same with MLP pruning, each
    compensated one at each block refinement setting (every lever named, so that a row means the
    same whatever the defaults)."""
    rows = [dict(method=m, allocation=a, sequential=False) for m in args.methods for a in args.allocations]
    rows += [dict(method=m, allocation=a, sequential=True, compensate=False, mlp_pruning=False)
             for m in args.sequential_methods for a in args.allocations]
    refinements = [dict(block_refine_steps=0)] if 0 in args.refine_steps else []
    refinements += [dict(block_refine_steps=s, block_refine_learning_rate=r, block_refine_batches=b)
                    for s in args.refine_steps if s for r in args.refine_learning_rates for b in args.refine_batches]
    cut = [False, True] if args.attention_pruning else [False]
    for pruned, methods in ((False, args.compensated_methods), (True, args.pruned_methods)):
        rows += [dict(method=m, allocation=a, sequential=True, compensate=True, compensation_ridge=r, mlp_pruning=pruned,
                      attention_pruning=attention, max_kept_ratio_for_speed=limit, **refine)
                 for m in methods for a in args.allocations for r in args.compensation_ridges
                 for attention in (cut if pruned else [False]) for refine in refinements
                 for limit in (args.speed_limits if pruned else [None])]
    return rows


def label(recipe: dict) -> str:
    name = recipe["method"] + (" (sequential" if recipe.get("sequential") else "")
    if recipe.get("compensate"):
        name += f", compensated λ={recipe['compensation_ridge']:g}"
    if recipe.get("mlp_pruning"):
        name += ", MLPs pruned"
    if recipe.get("attention_pruning"):
        name += ", attentions cut"
    limit = recipe.get("max_kept_ratio_for_speed")
    if limit is not None:
        shown = f"{limit:g}" if isinstance(limit, float) else ", ".join(f"{k} {v:g}" for k, v in sorted(limit.items()))
        name += f", kept ratio ≤ {shown} per layer"
    if recipe.get("block_refine_steps"):
        batches = recipe.get("block_refine_batches", 1)
        name += (f", refined {recipe['block_refine_steps']} steps{f' of {batches} batches' if batches > 1 else ''} "
                 f"at {recipe['block_refine_learning_rate']:g}")
    return name + (")" if recipe.get("sequential") else "")


def refinement(refined: dict[str, list[float]]) -> dict:
    """Per-block relative errors of block refinement and the median, least and most fall (1 − after / before)."""
    falls = error_falls(refined)
    return {"refined_blocks": refined, "error_fall": {"median": median(falls), "min": falls[0], "max": falls[-1]}} \
        if falls else {}


def measure(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = str(demo_model(args.model)) if args.model in DEMO_MODELS else args.model
    dense, tokenizer = load_model_and_tokenizer(path, dtype=torch.float32)
    dense.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    blocks = text_blocks(Path(args.calibration).read_text(encoding="utf-8").splitlines(), tokenizer, args.calib_length)
    random.Random(0).shuffle(blocks)
    validation, calibration = blocks[: args.validation_blocks], blocks[args.validation_blocks:][: args.calib_samples]
    healing = blocks[args.validation_blocks:]  # the validation blocks stay held out of healing too
    calib_blocks, written_record = with_teacher_blocks(dense, calibration, args.calib_generated,
                                                       args.generation_batch_size, args.heal_seed)
    test = text_blocks([Path(args.test).read_text(encoding="utf-8")], tokenizer, args.eval_length)
    test = test[: args.eval_blocks] if args.eval_blocks else test
    calib_loader = loader(calib_blocks, tokenizer, args.batch_size)
    test_loader = loader(test, tokenizer, args.batch_size)
    valid_loader = loader(validation, tokenizer, args.batch_size)

    def row(name, reduction, allocation, model, **extra):
        result = {"model": args.model, "method": name, "reduction": reduction, "allocation": allocation,
                  "perplexity": perplexity(model, test_loader), "validation_perplexity": perplexity(model, valid_loader),
                  **extra}
        print(result, flush=True)
        if args.json_out:  # a publishable payload of the rows so far, in case a later step fails or the run is cut off
            Path(args.json_out + ".partial").write_text(json.dumps(payload([*rows, result], cut_off=True), indent=2))
        return result

    def payload(rows: list[dict], cut_off: bool = False) -> dict:
        return {
            "rows": rows,
            "model": args.model,
            # The blocks' token ids hashed: a tokenizer that changed between environments (its end-of-text
            # token) cuts other blocks from the same file, and rows are comparable only on the same blocks.
            "calibration": {"blocks": len(calibration), "tokens_per_block": args.calib_length,
                            "sha256": fingerprint(calibration), **written_record},
            "validation": {"blocks": len(validation), "sha256": fingerprint(validation)},
            "evaluation": {"blocks": len(test), "tokens_per_block": args.eval_length, "file": "wiki.test.raw",
                           "sha256": fingerprint(test)},
            "tokenizer": {"eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id},
            "statistics_seconds": stats_seconds,
            "minutes": (time.perf_counter() - started) / 60,
            "prompt": PROMPT,
            "samples": samples,
            "environment": __import__("report").environment(),
            **({"cut_off": True} if cut_off else {}),
        }

    started = time.perf_counter()
    rows, samples, stats_seconds = [], {}, None
    rows.append(row("dense", 0.0, "-", dense))
    samples["dense"] = generate(dense, tokenizer, device)
    start = time.perf_counter()
    modules = {n: dense.get_submodule(f) for n, f in select_targets(dense).items()}
    stats = gradient_statistics(dense, calib_loader, modules, {FISHER_ROWS}, per_example_loss(CAUSAL_LM)).merged(
        input_statistics(dense, calib_loader, modules, {GRAM, MEAN_ABS}))
    stats_seconds = time.perf_counter() - start
    for reduction in args.reductions:
        best = None
        for recipe in recipes(args):
            config = WSVDConfig(param_ratio=round(1 - reduction, 4), max_length=args.calib_length, **recipe)
            start = time.perf_counter()
            model, report = compress(copy.deepcopy(dense), config, calib_loader, statistics=stats, show_progress=False)
            seconds = time.perf_counter() - start
            rows.append(row(label(recipe), reduction, recipe["allocation"], model, compress_seconds=seconds,
                            params_after=report.params_after, params_before=report.params_before,
                            **refinement(report.refined)))
            if best is None or rows[-1]["validation_perplexity"] < best[0]["validation_perplexity"]:
                best = (rows[-1], model)
            else:
                del model
        chosen, model = best
        samples[f"-{reduction:.0%} {chosen['method']}, {chosen['allocation']}"] = generate(model, tokenizer, device)
        if args.heal_steps or args.heal_seconds:
            config = HealConfig(steps=args.heal_steps or PROBE_STEPS, learning_rate=args.heal_learning_rate,
                                batch_size=args.heal_batch_size or args.batch_size,
                                hidden_weight=args.heal_hidden_weight, seed=args.heal_seed)
            start = time.perf_counter()
            written = teacher_samples(dense, healing, args.heal_generated, batch_size=args.generation_batch_size,
                                      seed=args.heal_seed, show_progress=False)
            writing = time.perf_counter() - start
            if args.heal_seconds:
                if writing >= args.heal_seconds:
                    raise SystemExit(f"writing {len(written)} blocks took {writing:.0f} s, all of --heal-seconds "
                                     f"{args.heal_seconds:g}: lower --heal-generated or raise --heal-seconds")
                steps = steps_within(args.heal_seconds - writing, model, dense, healing, validation, config)
                config = dataclasses.replace(config, steps=steps)
            model, report = heal(model, dense, healing + written, validation, config, show_progress=False)
            model.to(device)
            name = f", healed {config.steps} steps" + (f", {len(written)} teacher-written blocks" if written else "")
            rows.append(row(chosen["method"] + name, reduction, chosen["allocation"], model,
                            heal_seconds=writing + report.seconds, generation_seconds=writing,
                            kl_before=report.kl_before, kl_after=report.kl_after,
                            heal_tokens=config.steps * config.batch_size * args.calib_length, heal_config=report.config,
                            heal_blocks=len(healing), heal_generated=len(written), heal_kept=report.kept,
                            heal_best_step=report.best_step, heal_losses=report.losses))
            samples[f"-{reduction:.0%} healed"] = generate(model, tokenizer, device)
        del model, best
    return payload(rows)


def _kept_step(row: dict) -> int | None:
    """The step whose weights a healed row has (None: healing was undone); rows from before
    evaluations during healing have no best step: their last step's where kept."""
    if not row.get("heal_kept", True):
        return None
    return row.get("heal_best_step") or row["heal_config"]["steps"]


def _kept_label(row: dict) -> str:
    """The healing table's "weights kept" cell."""
    step = _kept_step(row)
    return "none (undone)" if step is None else f"step {step}"


def healed_weights(row: dict) -> str:
    """What a row's name adds when its weights are not its healing's last step's: undone, or an
    earlier step's."""
    if "heal_config" not in row:
        return ""
    step = _kept_step(row)
    if step is None:
        return " (undone: the held-out loss rose)"
    return f" (the weights of step {step})" if step < row["heal_config"]["steps"] else ""


def steps_within(seconds: float, model, dense, healing, validation, config: HealConfig) -> int:
    """The healing steps that fit in ``seconds`` on this machine, from the time of a short probe run
    (which includes the Trainer's start-up, so the estimate errs on the short side); the held-out
    evaluations during healing (``config.evaluations`` passes over ``validation``) are timed apart
    and taken from the budget."""
    probe = dataclasses.replace(config, steps=PROBE_STEPS, evaluations=0)
    _, report = heal(copy.deepcopy(model), dense, healing, healing[:1], probe, show_progress=False)
    start = time.perf_counter()
    distillation_kl(model, dense, validation, config.batch_size)
    evaluating = config.evaluations * (time.perf_counter() - start)
    return max(1, int((seconds - evaluating) * PROBE_STEPS / report.seconds))


def generate(model, tokenizer, device) -> str:
    text = pipeline("text-generation", model=model, tokenizer=tokenizer, device=device)
    return text(PROMPT, max_new_tokens=40, do_sample=False)[0]["generated_text"]


def merged(payloads: list[dict]) -> list[dict]:
    """One payload per model: the rows of all its runs (one dense row; each row keeps its run's
    calibration size), the runs' commands, their minutes and samples."""
    models: dict[str, dict] = {}
    for payload in payloads:
        data = calibration_data(payload["calibration"])
        rows = [{**row, "calibration_blocks": row.get("calibration_blocks", data)} for row in payload["rows"]]
        device = payload["environment"].get("cuda") or "CPU"
        runs = payload.get("runs", [f"{payload['environment']['command']} ({device}"
                                    + ("; cut off after its last row here)" if payload.get("cut_off") else ")")])
        devices = payload.get("devices", [device])
        if payload["model"] not in models:
            models[payload["model"]] = {**payload, "rows": rows, "runs": list(runs), "devices": list(devices),
                                        "samples": dict(payload.get("samples", {}))}
            continue
        model = models[payload["model"]]
        model["devices"] = list(dict.fromkeys(model["devices"] + devices))
        seen = {_identity(row) for row in model["rows"]}  # runs repeat the compression rows before healing
        model["rows"] += [row for row in rows if row["method"] != "dense" and _identity(row) not in seen]
        model["runs"] += runs
        model["minutes"] = model.get("minutes", 0) + payload.get("minutes", 0)
        # a run on other data keeps its samples apart
        suffix = "" if data == calibration_data(model["calibration"]) else f", {data} calibration blocks"
        model["samples"].update({name + ("" if name == "dense" else suffix): text
                                 for name, text in payload.get("samples", {}).items()})
    return list(models.values())


def calibration_data(calibration: dict) -> int | str:
    """A run's calibration data as its rows name it: the blocks, and the teacher-written ones added."""
    written = calibration.get("teacher_written")
    return f"{calibration['blocks']} + {written} teacher-written" if written else calibration["blocks"]


def with_teacher_blocks(dense: torch.nn.Module, calibration: list[dict], count: int, batch_size: int,
                        seed: int) -> tuple[list[dict], dict]:
    """The calibration blocks with ``count`` blocks written by the dense model added (continuations
    of calibration blocks), and what the payload records of them (their number and writing time)."""
    start = time.perf_counter()
    written = teacher_samples(dense, calibration, count, batch_size=batch_size, seed=seed, show_progress=False)
    record = {"teacher_written": len(written), "writing_seconds": time.perf_counter() - start} if written else {}
    return calibration + written, record


def _identity(row: dict) -> tuple:
    return row["method"], row["reduction"], row["allocation"], row["calibration_blocks"], round(row["perplexity"], 6)


def healing_table(rows: list[dict], dense: float) -> str:
    """The healed rows with their healing settings and time (teacher-written blocks included)."""
    from report import markdown_table

    return markdown_table(
        ["reduction", "teacher-written blocks", "batch", "learning rate", "hidden-state weight", "seed", "steps",
         "weights kept", "writing s", "healing s (all)", "validation perplexity", "perplexity", "× dense"],
        [[f"{r['reduction']:.0%}", r.get("heal_generated", 0), r["heal_config"]["batch_size"],
          f"{r['heal_config']['learning_rate']:g}", f"{r['heal_config']['hidden_weight']:g}", r["heal_config"]["seed"],
          r["heal_config"]["steps"], _kept_label(r), round(r.get("generation_seconds", 0)), round(r["heal_seconds"]),
          r["validation_perplexity"], r["perplexity"], r["perplexity"] / dense]
         for r in rows if "heal_config" in r])


def table(payloads: list[dict]) -> str:
    from report import markdown_table

    lines = []
    for payload in payloads:
        dense = payload["rows"][0]["perplexity"]
        lines.append(f"#### {payload['model']}\n")
        lines.append(markdown_table(
            ["recipe", "reduction", "allocation", "calibration blocks", "perplexity", "× dense", "compression s",
             "block error fall (median)", "healing s"],
            [[r["method"] + healed_weights(r), f"{r['reduction']:.0%}", r["allocation"], r.get("calibration_blocks", "-"), r["perplexity"],
              r["perplexity"] / dense, round(r["compress_seconds"]) if "compress_seconds" in r else "-",
              f"{r['error_fall']['median']:.0%}" if "error_fall" in r else "-",
              round(r["heal_seconds"]) if "heal_seconds" in r else "-"]
             for r in payload["rows"]]))
        if any("heal_config" in r for r in payload["rows"]):
            lines.append("\nHealing runs (factors and pruned linears trained, KL to the dense model's logits plus "
                         "the hidden-state weight times the MSE of the last hidden states; cosine schedule):\n")
            lines.append(healing_table(payload["rows"], dense))
        ev = payload["evaluation"]
        lines.append(f"\nCalibration blocks of {payload['calibration']['tokens_per_block']} tokens of wiki.valid.tokens; "
                     f"evaluation {ev['blocks']}×{ev['tokens_per_block']} tokens of {ev['file']}; healed from "
                     "the best recipe of its run by validation perplexity; measured on "
                     f"{' / '.join(payload.get('devices') or [payload['environment'].get('cuda') or 'CPU'])} "
                     "(one per run, named after its command)"
                     + (f", {payload['minutes']:.1f} minutes in all.\n" if payload.get("minutes") else ".\n"))
        lines += [f"Measured by: {run}" for run in payload.get("runs", [payload["environment"]["command"]])]
        if payload.get("samples"):
            lines.append("\nSamples (greedy decoding):\n")
            lines += [f"- {name}: {text!r}" for name, text in payload["samples"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help=f"one of {sorted(DEMO_MODELS)}, a folder or a .gguf")
    parser.add_argument("--calibration", default=str(SHARED / "data/wikitext-2/wiki.valid.tokens"))
    parser.add_argument("--test", default=str(SHARED / "data/wikitext-2-raw/wiki.test.raw"))
    parser.add_argument("--calib-samples", type=positive_int, default=64)
    parser.add_argument("--calib-length", type=positive_int, default=512)
    parser.add_argument("--validation-blocks", type=positive_int, default=32)
    parser.add_argument("--eval-length", type=positive_int, default=512)
    parser.add_argument("--eval-blocks", type=non_negative_int, default=0, help="0: the whole test file")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--reductions", type=listed(reduction), default=[0.2, 0.4])
    # the recipe lists default to None, to tell a list given from a default: filled in after parsing from
    # RECIPE_LISTS (RECOMMENDED_LISTS with --only-recommended, which refuses them given)
    shown = {name: f"default: {','.join(map(str, value))}" for name, value in RECIPE_LISTS.items()}
    parser.add_argument("--methods", type=lambda s: [x for x in s.split(",") if x], help=shown["methods"])
    parser.add_argument("--allocations", type=lambda s: s.split(","), help=shown["allocations"])
    parser.add_argument("--sequential-methods", type=lambda s: [x for x in s.split(",") if x],
                        help=shown["sequential_methods"])
    parser.add_argument("--compensated-methods", type=lambda s: [x for x in s.split(",") if x],
                        help=shown["compensated_methods"])
    parser.add_argument("--pruned-methods", type=lambda s: [x for x in s.split(",") if x],
                        help="compensated sequential methods with MLP pruning (hf_wsvd.methods.mlp_pruning; "
                             f"{shown['pruned_methods']})")
    parser.add_argument("--compensation-ridges", type=lambda s: [float(x) for x in s.split(",")],
                        help=shown["compensation_ridges"])
    parser.add_argument("--refine-steps", type=listed(non_negative_int),
                        default=[0, default_block_refine_steps(
                            torch.device("cuda" if torch.cuda.is_available() else "cpu"))],
                        help="block refinement steps of the compensated rows, each a row (0: without refinement)")
    parser.add_argument("--refine-learning-rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=[WSVDConfig.block_refine_learning_rate])
    parser.add_argument("--refine-batches", type=lambda s: [positive_int(x) for x in s.split(",")],
                        default=[WSVDConfig.block_refine_batches],
                        help="calibration batches per block refinement step (block_refine_batches), each a row")
    parser.add_argument("--speed-limits", nargs="+", type=lambda t: None if t == "none" else speed_limit(t),
                        default=[None], help="max_kept_ratio_for_speed of the MLP-pruned rows, each a row: a number, "
                        "a per-shape JSON file (as --max-kept-ratio-for-speed takes) or 'none' (off)")
    parser.add_argument("--attention-pruning", action="store_true",
                        help="also the MLP-pruned rows with attention pruning (head dimensions cut)")
    parser.add_argument("--only-recommended", action="store_true",
                        help="only the recommended recipe's rows (fisher_whiten, greedy, sequential, compensated "
                             "λ=0.1, MLPs pruned) at each --refine-steps: it sets the recipe lists, so it refuses "
                             "their flags (--methods, --allocations, ...)")
    parser.add_argument("--heal-steps", type=non_negative_int, default=0, help="heal the best recipe of each reduction (0: no)")
    parser.add_argument("--heal-seconds", type=float, default=0,
                        help="heal for as many steps as fit in this many seconds (timed by a short probe; "
                             "overrides --heal-steps)")
    parser.add_argument("--heal-learning-rate", type=float, default=HealConfig.learning_rate)
    parser.add_argument("--heal-batch-size", type=non_negative_int, default=0, help="0: --batch-size")
    parser.add_argument("--heal-hidden-weight", type=float, default=HealConfig.hidden_weight)
    parser.add_argument("--heal-generated", type=non_negative_int, default=0,
                        help="add this many blocks written by the dense model (continuations of healing blocks) to the "
                             "healing text; their writing time counts as healing time")
    parser.add_argument("--calib-generated", type=non_negative_int, default=0,
                        help="add this many blocks written by the dense model (continuations of calibration blocks) "
                             "to the calibration data")
    parser.add_argument("--generation-batch-size", type=positive_int, default=256)
    parser.add_argument("--heal-seed", type=non_negative_int, default=0)
    parser.add_argument("--name", default="llm", help="results name (benchmarks/results/NAME.json)")
    parser.add_argument("--json-out", help="write the measurements here instead of publishing them")
    parser.add_argument("--from-json", nargs="+",
                        help="publish measurements taken earlier (one file per run, or a published llm.json); the "
                             "runs of one model make one table")
    args = parser.parse_args(argv)
    given = [name for name in RECIPE_LISTS if getattr(args, name) is not None]
    if args.only_recommended and given:
        parser.error(f"--only-recommended sets the recipe lists itself: drop --{given[0].replace('_', '-')} or "
                     "--only-recommended")
    lists = RECOMMENDED_LISTS if args.only_recommended else RECIPE_LISTS
    for name, default in lists.items():
        if getattr(args, name) is None:
            setattr(args, name, default)

    from report import publish
    from timing import read_fields, read_json

    if args.from_json:
        loaded = [read_json(path) for path in args.from_json]
        payloads = read_fields(merged, [p for data in loaded for p in (data["models"] if "models" in data else [data])],
                               "llm")
    else:
        payloads = [measure(args)]
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(payloads[0], indent=2))
            Path(args.json_out + ".partial").unlink(missing_ok=True)  # the rows so far, now all in the file
            return
    publish(args.name, {"models": payloads}, read_fields(table, payloads, "llm", args.from_json))


if __name__ == "__main__":
    main()
