"""Model cards of compressed checkpoints: recipe, parameter counts, per-layer ranks (table and PNG
plot), evaluation results as a ``model-index``, the producing command, and how to load the model."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel

from .checkpoint import parameter_counts, recipe_of, summarize
from .runtime.modeling_wsvd import _supported_auto_classes

PLOT_FILE = "rank_per_layer.png"


def template_path() -> Path:
    """The card template: ``model_cards/template.md`` at the repository root, installed as the
    ``hf_wsvd.model_cards`` package data (pyproject maps the folder there)."""
    candidates = []
    try:
        from importlib.resources import files

        candidates.append(Path(str(files("hf_wsvd.model_cards") / "template.md")))
    except (ImportError, TypeError, ValueError):  # a source checkout on sys.path: no such package
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "model_cards" / "template.md")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"model card template not found (looked at {', '.join(map(str, candidates))})")
_PIPELINE_TAGS = {"classification": "text-classification", "regression": "text-classification",
                  "causal_lm": "text-generation"}


@dataclass
class Evaluation:
    """Metrics of the compressed model on one dataset split (``metrics``: name → value)."""

    dataset: str
    metrics: dict[str, float]
    split: str = "validation"
    dataset_type: str | None = None  # Hub dataset id; defaults to ``dataset``
    extra: dict = field(default_factory=dict)


def _task(model: PreTrainedModel) -> str | None:
    from .tasks import task_of

    try:
        return task_of(model)
    except ValueError:
        return None


def auto_class_name(model: PreTrainedModel) -> str:
    """The Auto class that loads the model as its own class (``AutoModel`` if none does)."""
    stock = type(model).__bases__[-1] if type(model).__name__.startswith("Wsvd") else type(model)
    found = _supported_auto_classes(type(model.config)._wsvd_base) if hasattr(type(model.config), "_wsvd_base") else {}
    return next((name for name, cls in found.items() if cls is stock and name != "AutoModel"), "AutoModel")


def plot_ranks(model: PreTrainedModel, path: str | os.PathLike) -> None:
    """Save a bar chart of the kept rank of every factorized layer (and its full rank) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(model)
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
    lines += [f"| `{r.name}` | {r.shape[0]} × {r.shape[1]} | {r.rank} | {r.params:,} | {r.dense_params:,} |"
              for r in summarize(model)]
    return "\n".join(lines)


def _eval_table(evaluation: Evaluation | None) -> str:
    if evaluation is None:
        return "Not evaluated when the checkpoint was written (`hf-wsvd eval DIR --data FILE`)."
    lines = ["| dataset | split | metric | value |", "|---|---|---|---|"]
    lines += [f"| {evaluation.dataset} | {evaluation.split} | {name} | {value:.4f} |"
              for name, value in evaluation.metrics.items()]
    return "\n".join(lines)


def _importance_data(data: str | None, examples: int | None, recipe: dict) -> str:
    if not data:
        return "none"
    used = f"{examples} examples" if examples is not None else f"at most {recipe.get('num_samples')} examples"
    return f"`{data}` ({used})"


def build_card(
    model: PreTrainedModel,
    base_model: str,
    command: str,
    importance_data: str | None = None,
    evaluation: Evaluation | None = None,
    repo_id: str | None = None,
    importance_examples: int | None = None,
) -> ModelCard:
    """The model card of a compressed model (``model`` holds its factorized layers and recipe).

    ``base_model``: the dense model it came from (a Hub id becomes ``base_model`` metadata);
    ``command``: the exact command that produced it; ``repo_id``: where it is (or will be) on the
    Hub, used in the loading snippets; ``importance_examples``: how many examples the importance
    data held (the recipe's ``num_samples`` is only an upper bound)."""
    from . import __version__

    recipe = recipe_of(model.config)
    if recipe is None:
        raise ValueError(f"{type(model).__name__} is not an hf_wsvd model: no card to write")
    now, dense = parameter_counts(model)
    task = _task(model)
    name = repo_id or os.path.basename(os.path.normpath(base_model)) + f"-{recipe['method']}"
    eval_results = None
    if evaluation is not None:
        eval_results = [
            EvalResult(task_type=_PIPELINE_TAGS.get(task, "other"), dataset_type=evaluation.dataset_type or evaluation.dataset,
                       dataset_name=evaluation.dataset, dataset_split=evaluation.split, metric_type=metric,
                       metric_name=metric, metric_value=float(value))
            for metric, value in evaluation.metrics.items()
        ]
    hub_base = base_model if not os.path.exists(base_model) and base_model.count("/") == 1 else None
    card_data = ModelCardData(
        model_name=name, base_model=hub_base, library_name="transformers", pipeline_tag=_PIPELINE_TAGS.get(task),
        tags=["hf_wsvd", "low-rank", "compressed", recipe["method"]], eval_results=eval_results,
        hf_wsvd={"method": recipe["method"], "param_ratio": recipe["param_ratio"], "params": now, "dense_params": dense},
    )
    return ModelCard.from_template(
        card_data, template_path=str(template_path()), model_name=name, base_model=base_model, hf_wsvd_version=__version__,
        method=recipe["method"], fisher_axis=recipe.get("fisher_axis") if recipe["method"] != "svd" else None,
        importance_data=_importance_data(importance_data, importance_examples, recipe),
        param_ratio=recipe["param_ratio"], params_after=f"{now:,}", params_before=f"{dense:,}",
        kept_percent=f"{100 * now / dense:.1f}%", num_layers=len(summarize(model)), eval_table=_eval_table(evaluation),
        command=command, auto_class=auto_class_name(model), repo_id=repo_id or "path/to/this-folder",
        plot_file=PLOT_FILE, rank_table=_rank_table(model),
    )


def write_card(folder: str | os.PathLike, model: PreTrainedModel, **kwargs) -> ModelCard:
    """Write ``README.md`` (see :func:`build_card` for the arguments) and the rank plot into
    ``folder``; returns the card."""
    card = build_card(model, **kwargs)
    plot_ranks(model, Path(folder) / PLOT_FILE)
    card.save(Path(folder) / "README.md")
    return card


def add_healing(source: str | os.PathLike, folder: str | os.PathLike, summary: str, command: str) -> None:
    """Copy ``source``'s model card and rank plot into ``folder`` with a "Healing" section (``summary``
    and the ``command``) appended and the ``healed`` tag; a source without a card gets one with
    only that section."""
    source, folder = Path(source), Path(folder)
    card = ModelCard.load(source / "README.md") if (source / "README.md").is_file() else ModelCard("")
    card.data.tags = sorted(set(card.data.tags or []) | {"healed"})
    card.text = card.text.rstrip() + f"\n\n## Healing\n\n{summary}.\n\n```bash\n{command}\n```\n"
    card.save(folder / "README.md")
    if (source / PLOT_FILE).is_file():
        shutil.copyfile(source / PLOT_FILE, folder / PLOT_FILE)
