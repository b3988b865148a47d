"""Model cards of compressed checkpoints: recipe, parameter counts, per-layer ranks (table and PNG
plot), evaluation results as a ``model-index``, the producing command, and how to load the model."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel

from .checkpoint import (parameter_counts, quantization_summary, recipe_of, refinement_summary, structure,
                         summarize, target_counts)
from ..runtime.modeling_wsvd import CLASS_PREFIX, _supported_auto_classes

PLOT_FILE = "rank_per_layer.png"


def template_path() -> Path:
    """The card template, ``hf_wsvd/model_cards/template.md`` (package data)."""
    return Path(__file__).resolve().parent.parent / "model_cards" / "template.md"


_PIPELINE_TAGS = {"classification": "text-classification", "regression": "text-classification",
                  "causal_lm": "text-generation", "seq2seq_lm": "text2text-generation"}


@dataclass
class Evaluation:
    """Metrics of the compressed model on one dataset split (``metrics``: name → value).

    ``dataset`` names the data in the card's text (a local file's name); only with
    ``dataset_type``, a Hub dataset id (and ``dataset_config``, its configuration), do the results
    become ``model-index`` metadata, which the Hub requires to name a dataset it knows."""

    dataset: str
    metrics: dict[str, float]
    split: str = "validation"
    dataset_type: str | None = None
    dataset_config: str | None = None
    extra: dict = field(default_factory=dict)


def hub_id(name: str | None) -> str | None:
    """``name`` if it can only be a Hub repository id: a valid id that is no local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or os.path.exists(name) or name.endswith(".gguf"):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def base_model_id(source: str, model: PreTrainedModel, given: str | None = None) -> str | None:
    """The Hub id of the dense model a compressed one came from: ``given`` (checked), else
    ``source`` (what was loaded) if it is a Hub id, else the ``_name_or_path`` the model's config
    or the source folder's ``config.json`` records, if that is one; None when none is (a local
    path is never a ``base_model``)."""
    import json

    if given is not None:
        if hub_id(given) is None:
            raise ValueError(f"base model {given!r} is not a Hub model id (user/name)")
        return given
    recorded = [source, getattr(model.config, "_name_or_path", None)]
    config_file = os.path.join(source, "config.json")
    if os.path.isfile(config_file):
        try:
            recorded.append(json.loads(Path(config_file).read_text()).get("_name_or_path"))
        except (OSError, ValueError):
            pass  # an unreadable config records nothing; the model itself loaded from it
    return next((found for found in map(hub_id, recorded) if found), None)


def _task(model: PreTrainedModel) -> str | None:
    from ..tasks import task_of

    try:
        return task_of(model)
    except ValueError:
        return None


# Loading a model for its task, the generic Auto classes last, in this order (T5's and GPT-2's heads
# are also AutoModelForPreTraining's, RoBERTa's masked-LM head too).
_GENERIC_AUTO_CLASSES = ("AutoModelForMaskedLM", "AutoModelForPreTraining")


def auto_class_name(model: PreTrainedModel) -> str:
    """The Auto class that loads the model as its own class, one of its task where there is one
    (``AutoModel`` if none does)."""
    stock = type(model).__bases__[-1] if type(model).__name__.startswith(CLASS_PREFIX) else type(model)
    found = _supported_auto_classes(type(model.config)._wsvd_base) if hasattr(type(model.config), "_wsvd_base") else {}
    loading = [name for name, cls in found.items() if cls is stock and name != "AutoModel"]
    rank = {name: i + 1 for i, name in enumerate(_GENERIC_AUTO_CLASSES)}  # the task's classes first (0)
    return min(loading, key=lambda name: rank.get(name, 0), default="AutoModel")


def plot_ranks(model: PreTrainedModel, path: str | os.PathLike) -> None:
    """Save a bar chart of the kept rank of every factorized layer (and its full rank) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summarize(model) if r.rank is not None]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 3.6))
    positions = range(len(rows))
    axes.bar(positions, [min(r.shape) for r in rows], color="#dddddd", label="full rank")
    axes.bar(positions, [r.rank for r in rows], color="#3b75af", label="kept rank")
    axes.set_xticks(list(positions), [r.name for r in rows], rotation=90, fontsize=6)
    axes.set_ylabel("rank")
    axes.set_title("kept rank per layer")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _rank_table(model: PreTrainedModel) -> str:
    lines = ["| layer | shape (out × in) | rank | parameters | dense parameters |", "|---|---|---|---|---|"]
    lines += [f"| `{r.name}` | {r.shape[0]} × {r.shape[1]} | {r.kind} | {r.params:,} | {r.dense_params:,} |"
              for r in summarize(model)]
    return "\n".join(lines)


def _eval_table(evaluation: Evaluation | None) -> str:
    if evaluation is None:
        return "Not evaluated when the checkpoint was written (`hf-wsvd eval DIR --data FILE`)."
    lines = ["| dataset | split | metric | value |", "|---|---|---|---|"]
    lines += [f"| {evaluation.dataset} | {evaluation.split} | {name} | {value:.4f} |"
              for name, value in evaluation.metrics.items()]
    return "\n".join(lines)


def _reads_fisher_axis(method: str) -> bool:
    """Whether ``method``'s options (``hf_wsvd.solvers``) hold ``fisher_axis`` (a method that reads no
    Fisher information has none to show)."""
    from ..config import option_names
    from ..solvers import get_solver

    try:
        options = get_solver(method).options()
    except ValueError:  # a method registered by a plugin not installed here
        return False
    return "fisher_axis" in option_names(options)


def _allocation(recipe: dict) -> str:
    if recipe["method"] == "quantized_residual":
        return (f"every target layer quantized, plus a rank-{recipe.get('residual_rank')} low-rank correction of its "
                "quantization error")
    # Recipes saved before allocation was recorded were uniform.
    if (recipe.get("allocation") or "uniform") == "greedy":
        return (f"`greedy`: one budget of param_ratio {recipe['param_ratio']} over all target layers, spent where "
                "it removes the most loss (ranks differ per layer; some may stay dense)")
    return (f"`uniform`: every target layer gets the rank (or channels) of param_ratio {recipe['param_ratio']}, "
            "rounded down to rank_multiple (a layer whose rank would save nothing or run no faster stays dense)")


def _importance_data(data: str | None, examples: int | None, recipe: dict) -> str:
    if not data:
        return "none"
    written = recipe.get("generated_samples") or 0  # recipes saved before the field lack it
    limit = recipe.get("num_samples")
    used = (f"{examples} examples" if examples is not None
            else f"at most {limit + written if isinstance(limit, int) else limit} examples")
    if written:
        used += f", {written} of them written by the model itself"
    return f"`{os.path.basename(os.path.normpath(data))}` ({used}, local data)"


def build_card(
    model: PreTrainedModel,
    base_model: str,
    command: str,
    importance_data: str | None = None,
    evaluation: Evaluation | None = None,
    repo_id: str | None = None,
    importance_examples: int | None = None,
    base_model_hub_id: str | None = None,
) -> ModelCard:
    """The model card of a compressed model (``model`` holds its factorized layers and recipe).

    ``base_model``: the dense model it came from, as loaded (folder, Hub id or .gguf file);
    ``base_model_hub_id``: its Hub id when ``base_model`` is a local copy (see
    :func:`base_model_id`; only a Hub id becomes ``base_model`` metadata); ``command``: the exact
    command that produced it; ``repo_id``: where it is (or will be) on the Hub, used in the loading
    snippets; ``importance_examples``: how many examples the importance data held (the recipe's
    ``num_samples`` is only an upper bound)."""
    from .. import __version__

    recipe = recipe_of(model.config)
    if recipe is None:
        raise ValueError(f"{type(model).__name__} is not an hf_wsvd model: no card to write")
    now, dense = parameter_counts(model)
    target_now, target_dense = target_counts(model)
    task = _task(model)
    hub_base = base_model_id(base_model, model, base_model_hub_id)
    name = repo_id or os.path.basename(os.path.normpath(hub_base or base_model)) + f"-{recipe['method']}"
    eval_results = None
    if evaluation is not None and evaluation.dataset_type:
        eval_results = [
            EvalResult(task_type=_PIPELINE_TAGS.get(task, "other"), dataset_type=evaluation.dataset_type,
                       dataset_name=evaluation.dataset, dataset_config=evaluation.dataset_config,
                       dataset_split=evaluation.split, metric_type=metric, metric_name=metric,
                       metric_value=float(value))
            for metric, value in evaluation.metrics.items()
        ]
    card_data = ModelCardData(
        model_name=name, base_model=hub_base, library_name="transformers", pipeline_tag=_PIPELINE_TAGS.get(task),
        tags=["hf_wsvd", "compressed", "low-rank", recipe["method"]], eval_results=eval_results,
        datasets=[evaluation.dataset_type] if eval_results else None,
        hf_wsvd={"method": recipe["method"], "allocation": recipe.get("allocation") or "uniform",
                 "param_ratio": recipe["param_ratio"], "target_kept": round(target_now / target_dense, 4),
                 "params": now, "dense_params": dense},
    )
    shown_base = (f"[`{hub_base}`](https://huggingface.co/{hub_base})" if hub_base
                  else f"`{os.path.basename(os.path.normpath(base_model))}` (a local checkpoint)")
    return ModelCard.from_template(
        card_data, template_path=str(template_path()), model_name=name, base_model=shown_base,
        hf_wsvd_version=__version__,
        method=recipe["method"], fisher_axis=recipe.get("fisher_axis") if _reads_fisher_axis(recipe["method"]) else None,
        importance_data=_importance_data(importance_data, importance_examples, recipe),
        allocation=_allocation(recipe), target_kept=f"{target_now / target_dense:.3f}", model_kept=f"{now / dense:.3f}",
        params_after=f"{now:,}", params_before=f"{dense:,}", layers=structure(model),
        eval_table=_eval_table(evaluation),
        command=command, auto_class=auto_class_name(model), repo_id=repo_id or "path/to/this-folder",
        plot_file=PLOT_FILE, rank_table=_rank_table(model), quantization=quantization_summary(model),
        refinement=refinement_summary(recipe.get("refined") or {}, recipe.get("block_refine_steps"),
                                      recipe.get("block_refine_batches", 1)),
    )


def write_card(folder: str | os.PathLike, model: PreTrainedModel, **kwargs) -> ModelCard:
    """Write ``README.md`` (see :func:`build_card` for the arguments) and the rank plot into
    ``folder`` (the saved checkpoint's); returns the card."""
    if not Path(folder).is_dir():
        raise ValueError(f"folder={os.fspath(folder)!r} is not a folder: save the model there first "
                         "(model.save_pretrained), then write its card beside it")
    card = build_card(model, **kwargs)
    plot_ranks(model, Path(folder) / PLOT_FILE)
    card.save(Path(folder) / "README.md")
    return card


def load_card(path: str | os.PathLike) -> ModelCard:
    """The model card at ``path``; one that is not UTF-8 text, or whose YAML header does not parse
    or is not a mapping, is a one-line ValueError naming the file."""
    import yaml  # huggingface_hub's own dependency, which parses the header

    try:
        return ModelCard.load(path)
    except UnicodeDecodeError as error:
        raise ValueError(f"the model card {os.fspath(path)!r} is not UTF-8 text ({error.reason} at byte "
                         f"{error.start}): write it again as text, or delete it") from None
    except (yaml.YAMLError, ValueError) as error:
        # huggingface_hub's own ValueError: a header that parses to something else than a mapping
        if not isinstance(error, yaml.YAMLError) and "metadata block" not in str(error):
            raise
        detail = " ".join(str(error).split())
        raise ValueError(f"the model card {os.fspath(path)!r} has a YAML header that does not parse as metadata "
                         f"({detail}): fix or delete its metadata between the --- lines") from None


def add_healing(source: str | os.PathLike, folder: str | os.PathLike, summary: str, command: str) -> None:
    """Copy ``source``'s model card and rank plot into ``folder`` with a "Healing" section (``summary``
    and the ``command``) appended and the ``healed`` tag; a source without a card gets one with
    only that section."""
    source, folder = Path(source), Path(folder)
    # A card of no metadata block is parsed with a warning the user cannot act on: start from an empty one.
    card = load_card(source / "README.md") if (source / "README.md").is_file() else ModelCard("---\ntags: []\n---\n")
    card.data.tags = sorted(set(card.data.tags or []) | {"healed"})
    # The compressed model's scores are not the healed model's: no longer its metadata, and said so.
    card.data.eval_results, card.data.datasets = None, None
    said = "Of the compressed model before the healing below (`hf-wsvd eval` measures this one):"
    if said not in card.text and "## Evaluation\n\n| dataset |" in card.text:
        card.text = card.text.replace("## Evaluation\n\n", f"## Evaluation\n\n{said}\n\n", 1)
    card.text = card.text.rstrip() + f"\n\n## Healing\n\n{summary}.\n\n```bash\n{command}\n```\n"
    card.save(folder / "README.md")
    if (source / PLOT_FILE).is_file():
        shutil.copyfile(source / PLOT_FILE, folder / PLOT_FILE)
