"""Checkpoint size on disk against the kept parameter ratio: the shipped MiniLM-L6 SST-2 classifier,
dense and compressed with ``svd`` at kept ratios 0.5 and 0.3, each saved in the shipped dtype.

    python benchmarks/checkpoint_size.py --json-out checkpoint_size.json
    python benchmarks/checkpoint_size.py --from-json checkpoint_size.json
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch

from hf_wsvd import parameter_counts

from common import MINILM, ROOT, ratio_label, svd_variants
from timing import add_json_arguments, kept_fraction, measure_or_publish, verdict, with_key

SIZE_TOLERANCE = 0.02  # issue #8: checkpoint size ratio vs kept parameter ratio


def saved_size(model, folder: Path, dtype: torch.dtype) -> int:
    """Bytes of the weight files of ``model`` saved in ``dtype`` (a copy is converted)."""
    copy.deepcopy(model).to(dtype).save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(args) -> dict:
    from transformers import AutoModelForSequenceClassification

    from report import environment

    stored = AutoModelForSequenceClassification.from_pretrained(args.model).dtype
    sizes = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio, model in svd_variants(args.model, args.ratios).items():
            now, dense_params = parameter_counts(model)
            sizes.append({"ratio": ratio, "params": now, "param_ratio": now / dense_params,
                          "checkpoint_bytes": saved_size(model, Path(tmp) / ratio_label(ratio), stored)})
    for row in sizes:
        row["size_ratio"] = row["checkpoint_bytes"] / sizes[0]["checkpoint_bytes"]
    return {"model": os.path.relpath(args.model, ROOT), "checkpoint_dtype": str(stored).removeprefix("torch."),
            "sizes": sizes, "environment": environment()}


def render(runs: list[dict]) -> str:
    from report import markdown_table

    p = with_key(runs, "sizes")[0]
    rows = [[ratio_label(m["ratio"]), f"{m['params']:,}", m["param_ratio"], m["checkpoint_bytes"] / 2**20,
             m["size_ratio"], f"{m['size_ratio'] / m['param_ratio'] - 1:+.2%}"] for m in p["sizes"]]
    text = markdown_table(
        ["checkpoint", "parameters (whole model)", "parameters / dense", f"safetensors MiB ({p['checkpoint_dtype']})",
         "size / dense size", "size ratio vs parameter ratio"], rows)
    worst = max(abs(m["size_ratio"] / m["param_ratio"] - 1) for m in p["sizes"])
    kept = "/".join(f"{m['ratio']:g}" for m in p["sizes"] if m["ratio"] < 1)
    return text + (f"\n\nKept ratio {kept} is the `param_ratio` of the target linears; the embeddings stay dense, so "
                   f"the whole model keeps more. The size target compares the whole checkpoint (all `*.safetensors`, "
                   f"shipped dtype) relative to the dense one with the whole-model parameter ratio: worst deviation "
                   f"{worst:.2%} (target ≤{SIZE_TOLERANCE:.0%}: {verdict(worst <= SIZE_TOLERANCE)}).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MINILM)
    parser.add_argument("--ratios", nargs="+", type=kept_fraction, default=[0.5, 0.3], help="kept ratios")
    add_json_arguments(parser)
    measure_or_publish("checkpoint_size", parser.parse_args(argv), measure, render)


if __name__ == "__main__":
    main()
