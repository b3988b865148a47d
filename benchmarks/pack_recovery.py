"""Pack what `examples/recover_glue.py` needs on a GPU machine into one small folder (default
`.device/recovery/`, git-ignored): the SST-2 MiniLM and the SST-2 train/dev TSVs, gzipped.

The transfer limit is below the model's 45 MB, so the word-embedding rows of tokens that occur
nowhere in SST-2 train or dev (at the script's max length) are zeroed before gzip: no SST-2
computation reads them (no forward use, zero gradients), so importance statistics, compression,
training and dev accuracy are the same as with the full table; the zeroed model is not one to
deploy. On the GPU machine:

    mkdir -p /tmp/minilm && cp .device/recovery/minilm-l6-sst2/* /tmp/minilm/ && gunzip -f /tmp/minilm/*.gz
    python examples/recover_glue.py --model-dir /tmp/minilm --data-dir .device/recovery/SST-2 ...
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from recover_glue import read_tsv  # noqa: E402  (it puts src/ on the path for a plain checkout)
from hf_wsvd.argtypes import positive_int  # noqa: E402

EMBEDDINGS = "bert.embeddings.word_embeddings.weight"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(ROOT.parent / "shared" / "models" / "minilm-l6-sst2"))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue" / "SST-2"))
    parser.add_argument("--output", default=str(ROOT / ".device" / "recovery"))
    parser.add_argument("--max-length", type=positive_int, default=128)
    args = parser.parse_args()
    source, out = Path(args.model_dir), Path(args.output)
    if out.exists():
        shutil.rmtree(out)
    (out / source.name).mkdir(parents=True)
    (out / "SST-2").mkdir()

    tokenizer = AutoTokenizer.from_pretrained(source)
    used = set(tokenizer.all_special_ids)
    for split in ("train", "dev"):
        rows = read_tsv(Path(args.data_dir) / f"{split}.tsv")
        for ids in tokenizer([s for s, _ in rows], truncation=True, max_length=args.max_length)["input_ids"]:
            used.update(ids)
        with open(Path(args.data_dir) / f"{split}.tsv", "rb") as raw, gzip.open(out / "SST-2" / f"{split}.tsv.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)

    tensors = load_file(source / "model.safetensors")
    keep = torch.zeros(tensors[EMBEDDINGS].shape[0], dtype=torch.bool)
    keep[sorted(used)] = True
    tensors[EMBEDDINGS] = tensors[EMBEDDINGS] * keep.unsqueeze(1).to(tensors[EMBEDDINGS].dtype)
    save_file(tensors, out / source.name / "model.safetensors", metadata={"format": "pt"})
    with open(out / source.name / "model.safetensors", "rb") as raw, \
            gzip.open(out / source.name / "model.safetensors.gz", "wb", compresslevel=9) as packed:
        shutil.copyfileobj(raw, packed)
    digest = hashlib.sha256((out / source.name / "model.safetensors").read_bytes()).hexdigest()
    (out / source.name / "model.safetensors").unlink()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / source.name / name)
    manifest = {"model": str(source), "kept_embedding_rows": int(keep.sum()), "vocab": int(keep.numel()),
                "model_safetensors_sha256": digest, "max_length": args.max_length}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB; kept {manifest['kept_embedding_rows']:,} of {manifest['vocab']:,} "
          "embedding rows")


if __name__ == "__main__":
    main()
