"""Tiny seeded models and data for the statistics tests, and a worker for a multi-process run.

Imported by ``test_fisher.py`` and ``test_activations.py`` for the builders; run as a script under
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/stats_worker.py OUTDIR``, where every
rank computes the Fisher and activation statistics of the same model and data with its shard of
the batches and saves what it got to ``OUTDIR/rank{R}.pt``.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny  # noqa: E402

from hf_wsvd.statistics import FISHER, GRAM, MEAN_ABS, gradient_statistics, input_statistics  # noqa: E402
from hf_wsvd.targets import select_targets  # noqa: E402
from hf_wsvd.tasks import per_example_loss, task_of  # noqa: E402

# case → (architecture, Auto class, config overrides)
CASES = {
    "bert_classification": ("bert", "AutoModelForSequenceClassification", {"num_labels": 2}),
    "bert_regression": ("bert", "AutoModelForSequenceClassification", {"num_labels": 1}),
    "llama_causal_lm": ("llama", "AutoModelForCausalLM", {}),
    "gpt2_causal_lm": ("gpt2", "AutoModelForCausalLM", {}),
}

# The cases and data sizes of the multi-process run: 7 examples in batches of 2 are 4 batches
# (2, 2, 2, 1) that two processes split as 4 + 3 examples.
DISTRIBUTED_CASES = ["bert_classification", "gpt2_causal_lm"]
DISTRIBUTED_EXAMPLES, DISTRIBUTED_BATCH = 7, 2
# A single batch, of an odd size (not sliced): the second process gets no batch at all and must
# still join the reduction.
SINGLE_BATCH_EXAMPLES, SINGLE_BATCH = 3, 3
# Batches of an odd size, which two processes cannot slice evenly: whole batches in turn, (3, 1) and (3,).
WHOLE_BATCH = 3


def build_model(case: str, dtype: torch.dtype = torch.float32, **config):
    """The case's tiny model; ``config``: more config overrides (e.g. ``num_hidden_layers``)."""
    arch, auto_class, overrides = CASES[case]
    return tiny.build(arch, auto_class, seed=0, **overrides, **config).to(dtype)


def make_examples(task: str, num_examples: int, length: int = 6, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    """Fixed-length examples whose tails are padded by 0, 1 or 2 tokens; causal LM labels are the
    ids with padding set to -100."""
    generator = torch.Generator().manual_seed(seed)
    low, high = len(tiny.SPECIALS), len(tiny.SPECIALS) + len(tiny.WORDS)
    ids = torch.randint(low, high, (num_examples, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(num_examples):
        pad = row % 3
        if pad:
            mask[row, -pad:] = 0
            ids[row, -pad:] = 0  # pad_token_id of the tiny configs
    if task == "classification":
        labels = torch.randint(0, 2, (num_examples,), generator=generator)
    elif task == "regression":
        labels = torch.randn(num_examples, generator=generator)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(num_examples)]


def make_loader(examples: list, batch_size: int) -> DataLoader:
    return DataLoader(examples, batch_size=batch_size, shuffle=False)


def target_modules(model) -> dict:
    return {name: model.get_submodule(full) for name, full in select_targets(model).items()}


def case_inputs(case: str, num_examples: int, batch_size: int, dtype: torch.dtype = torch.float32, **config):
    """(model, loader, modules, loss_fn) of a case (``config``: more config overrides of its model)."""
    model = build_model(case, dtype, **config)
    task = task_of(model)
    loader = make_loader(make_examples(task, num_examples), batch_size)
    return model, loader, target_modules(model), per_example_loss(task)


def fisher_of(model, loader, modules, loss_fn, accelerator=None) -> tuple[dict[str, torch.Tensor], int]:
    """The per-entry Fisher of every module and the number of examples it averages over."""
    stats = gradient_statistics(model, loader, modules, {FISHER}, loss_fn, accelerator, show_progress=False)
    return {name: values[FISHER] for name, values in stats.values.items()}, stats.examples


def activations_of(model, loader, modules, accelerator=None) -> dict:
    """The Gram, mean |x| and token count of every module's input, on the CPU."""
    stats = input_statistics(model, loader, modules, {GRAM, MEAN_ABS}, accelerator, show_progress=False)
    return {name: {**{k: v.cpu() for k, v in values.items()}, "tokens": stats.tokens[name]}
            for name, values in stats.values.items()}


def offload_one_block(model) -> torch.device:
    """The tiny Llama on the accelerator (where compress computes; the CPU here) with block 1's
    weights kept off it by accelerate's CPU offload (meta outside forward, executed there); returns
    that device."""
    from accelerate import cpu_offload

    from hf_wsvd.statistics import default_accelerator

    device = default_accelerator().device
    model.to(device)
    cpu_offload(model.model.layers[1], execution_device=device)
    return device


# The recommended LLM recipe (block refinement included), run by the compression pipeline in one and
# in two processes.
PIPELINE_RECIPE = dict(method="fisher_whiten", allocation="greedy", sequential=True, param_ratio=0.5,
                       compute_dtype="float64")


def pipeline_result(accelerator=None, layers: int | None = None) -> dict:
    """Ranks and factor products of the tiny Llama (``layers`` blocks: default its own) compressed with
    ``PIPELINE_RECIPE``."""
    from hf_wsvd import FactorizedLinear, WSVDConfig, compress

    config = {} if layers is None else {"num_hidden_layers": layers}
    model, loader, _, _ = case_inputs("llama_causal_lm", DISTRIBUTED_EXAMPLES, DISTRIBUTED_BATCH, **config)
    model, report = compress(model, WSVDConfig(**PIPELINE_RECIPE), loader, accelerator=accelerator, show_progress=False)
    products = {n: (m.up.weight @ m.down.weight).detach() for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    return {"ranks": report.ranks, "products": products, "examples": report.importance_examples,
            "refined": report.refined}


# Every built-in modifier at once (both prunings, compensation, refinement, lp embeddings), run in
# one and in two processes.
MODIFIERS_RECIPE = dict(method="whiten", param_ratio=0.3, sequential=True, mlp_pruning=True, attention_pruning=True,
                        block_refine_steps=2, block_refine_batches=2, embeddings=True, embedding_method="lp",
                        embedding_ratio=0.5, rank_multiple=2, compute_dtype="float64")


def modifiers_result(accelerator=None) -> dict:
    """The weights of the tiny Llama compressed with ``MODIFIERS_RECIPE`` and what the report recorded;
    in batches of ``WHOLE_BATCH`` (``pipeline_result``'s are sliced between two processes)."""
    from hf_wsvd import WSVDConfig, compress

    model, loader, _, _ = case_inputs("llama_causal_lm", DISTRIBUTED_EXAMPLES, WHOLE_BATCH)
    model, report = compress(model, WSVDConfig(**MODIFIERS_RECIPE), loader, accelerator=accelerator,
                             show_progress=False)
    return {"weights": {n: t.detach().clone() for n, t in model.state_dict().items()}, "ranks": report.ranks,
            "pruned": report.pruned, "attention": report.attention, "refined": report.refined}


def experts_result(accelerator=None, **recipe) -> dict:
    """The weights of a tiny Mixtral whose experts MLP pruning cut (sequential, greedy: each experts
    module solved by one process and shared; ``recipe``: other fields) and the recorded experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from hf_wsvd import WSVDConfig, compress

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=tiny.VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        pad_token_id=0)).eval()
    loader = make_loader(make_examples("causal_lm", DISTRIBUTED_EXAMPLES), DISTRIBUTED_BATCH)
    recipe = {"method": "whiten", **recipe}
    model, report = compress(model, WSVDConfig(param_ratio=0.5, mlp_pruning=True, block_refine_steps=0,
                                               rank_multiple=1, compute_dtype="float64", **recipe),
                             loader, accelerator=accelerator, show_progress=False)
    return {"weights": {n: t.detach().clone() for n, t in model.state_dict().items()}, "experts": report.experts}


def written_calibration() -> dict:
    """A causal LM's calibration blocks with 3 it writes itself, 2 at a time (``data_loader``), and
    how many times this process called ``generate``."""
    from datasets import Dataset

    from hf_wsvd import WSVDConfig
    from hf_wsvd.cli.workflow import data_loader

    model = build_model("llama_causal_lm")
    calls = []
    generate = model.generate
    model.generate = lambda *args, **kwargs: calls.append(1) or generate(*args, **kwargs)
    text = Dataset.from_dict({"text": [" ".join(tiny.WORDS[(7 * i + j) % len(tiny.WORDS)] for j in range(5))
                                       for i in range(40)]})
    config = WSVDConfig(num_samples=4, max_length=8, batch_size=2, generated_samples=3)
    loader = data_loader(model, tiny.tokenizer(), text, config)
    return {"blocks": loader.dataset["input_ids"], "generate_calls": len(calls)}


def failing_passes(accelerator) -> dict[str, str | None]:
    """Each statistics pass run on data whose example 3 is bad (a NaN regression label, a token id
    outside the vocabulary): pass → the error it ended with in this process."""
    from hf_wsvd.statistics import token_counts

    model, _, modules, loss_fn = case_inputs("bert_regression", DISTRIBUTED_EXAMPLES, DISTRIBUTED_BATCH)
    examples = make_examples("regression", DISTRIBUTED_EXAMPLES)
    examples[3]["labels"] = torch.tensor(float("nan"))
    bad_ids = make_examples("regression", DISTRIBUTED_EXAMPLES)
    bad_ids[3]["input_ids"] = bad_ids[3]["input_ids"].clone().fill_(model.config.vocab_size)
    passes = {"fisher": lambda: fisher_of(model, make_loader(examples, DISTRIBUTED_BATCH), modules, loss_fn, accelerator),
              "activations": lambda: activations_of(model, make_loader(bad_ids, DISTRIBUTED_BATCH), modules, accelerator),
              "token_counts": lambda: token_counts(make_loader(bad_ids, DISTRIBUTED_BATCH), model.config.vocab_size,
                                                   accelerator)}
    # The sequential pipeline: one process's first block fails as the inputs are captured (an
    # out-of-memory error, say), then, in a second run, as its statistics are taken.
    # (Capture runs the embeddings and no block; block 0 runs first when its statistics are taken.)
    for stage, where in (("capture", "model.embed_tokens"), ("block_statistics", "model.layers.0")):
        def sequential(where=where):
            from hf_wsvd import WSVDConfig, compress

            llama, loader, _, _ = case_inputs("llama_causal_lm", DISTRIBUTED_EXAMPLES, DISTRIBUTED_BATCH)

            def fail(module, args):
                if accelerator.process_index == 1:
                    raise ValueError("block 0 failed in this process")

            llama.get_submodule(where).register_forward_pre_hook(fail)
            compress(llama, WSVDConfig(method="whiten", sequential=True, param_ratio=0.5, compute_dtype="float64"),
                     loader, accelerator=accelerator, show_progress=False)

        passes[stage] = sequential
    errors = {}
    for name, run in passes.items():
        try:
            run()
            errors[name] = None
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {error}"
    return errors


def _run(outdir: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from hf_wsvd import WSVDConfig, compress
    from hf_wsvd.statistics import default_accelerator
    from hf_wsvd.statistics.passes import shard

    # First, before anything sets up the processes: writing calibration blocks must do it itself.
    written = written_calibration()
    accelerator = default_accelerator()
    rank = accelerator.process_index
    result: dict = {"num_processes": accelerator.num_processes, "rank": rank, "written": written}
    try:
        for case in DISTRIBUTED_CASES:
            model, loader, modules, loss_fn = case_inputs(case, DISTRIBUTED_EXAMPLES, DISTRIBUTED_BATCH)
            # How many examples this process's shard holds.
            result[f"{case}/local_examples"] = sum(
                batch["labels"].shape[0] for batch in shard(loader, accelerator)
            )
            fisher, examples = fisher_of(model, loader, modules, loss_fn, accelerator)
            result[case] = {"fisher": fisher, "num_examples": examples}
            result[f"{case}/activations"] = activations_of(model, loader, modules, accelerator)

        # The examples of each batch this process's share holds: slices of every batch where the batch
        # size is a multiple of the process count, else whole batches in turn.
        for size in (DISTRIBUTED_BATCH, WHOLE_BATCH):
            loader = make_loader(make_examples("classification", DISTRIBUTED_EXAMPLES), size)
            result[f"shard/{size}"] = [len(batch["labels"]) for batch in shard(loader, accelerator)]

        result["pipeline"] = pipeline_result(accelerator)
        # Three blocks: greedy planning splits two blocks' solves at once between two processes, then
        # the last block's alone.
        result["pipeline3"] = pipeline_result(accelerator, layers=3)
        result["modifiers"] = modifiers_result(accelerator)
        result["experts"] = experts_result(accelerator)
        # the experts alone, priced by a loss-scaled method without a probe layer (their spectra's weights: none)
        result["experts_alone"] = experts_result(accelerator, method="fisher_whiten", target_modules=["experts"])

        case = DISTRIBUTED_CASES[0]
        model, loader, modules, loss_fn = case_inputs(case, SINGLE_BATCH_EXAMPLES, SINGLE_BATCH)
        result["single_batch/local_examples"] = sum(
            batch["labels"].shape[0] for batch in shard(loader, accelerator)
        )
        fisher, examples = fisher_of(model, loader, modules, loss_fn, accelerator)
        result["single_batch"] = {"fisher": fisher, "num_examples": examples}

        # Compensation with a process that holds no calibration data: refused in every process.
        model, loader, _, _ = case_inputs("llama_causal_lm", 1, DISTRIBUTED_BATCH)
        try:
            compress(model, WSVDConfig(**PIPELINE_RECIPE), loader, accelerator=accelerator, show_progress=False)
            result["no_data_error"] = None
        except ValueError as error:
            result["no_data_error"] = str(error)

        # One process's share holds a bad example (the second process takes example 3): each pass ends
        # in both processes, the bad share's with its own error, the other's naming it.
        result["one_failing"] = failing_passes(accelerator)

        # Processes that disagree (a recipe, a model) are refused in every process before any pass.
        result["disagreeing"] = {}
        for what, recipe, seed in (("recipe", {**PIPELINE_RECIPE, "param_ratio": 0.5 + 0.1 * rank}, 0),
                                   ("model", PIPELINE_RECIPE, rank)):
            model = tiny.build("llama", "AutoModelForCausalLM", seed=seed)
            _, loader, _, _ = case_inputs("llama_causal_lm", DISTRIBUTED_EXAMPLES, DISTRIBUTED_BATCH)
            try:
                compress(model, WSVDConfig(**recipe), loader, accelerator=accelerator, show_progress=False)
                result["disagreeing"][what] = None
            except ValueError as error:
                result["disagreeing"][what] = str(error)
        # One-shot batches (a generator) cannot be split: named as given, not as the list compress makes.
        try:
            compress(tiny.build("llama", "AutoModelForCausalLM"), WSVDConfig(**PIPELINE_RECIPE),
                     (batch for batch in loader), accelerator=accelerator, show_progress=False)
            result["generator_error"] = None
        except ValueError as error:
            result["generator_error"] = str(error)

        # An accelerator that would even out the last batch by repeating examples: its setting is not
        # used, no example counts twice.
        even = Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=True))
        result["even_batches_accelerator"] = {"num_processes": even.num_processes, "even_batches": even.even_batches}
        model, loader, modules, loss_fn = case_inputs(case, DISTRIBUTED_EXAMPLES, WHOLE_BATCH)
        fisher, examples = fisher_of(model, loader, modules, loss_fn, even)
        result["even_batches"] = {"fisher": fisher, "num_examples": examples}
    except Exception:  # recorded so that the test shows it
        result["exception"] = traceback.format_exc()
        raise
    finally:
        torch.save(result, outdir / f"rank{rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    _run(Path(sys.argv[1]))
