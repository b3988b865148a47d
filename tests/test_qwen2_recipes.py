"""Every registered method compresses a Qwen2-architecture causal LM (GQA, q/k/v biases, untied head)
from the CLI, and the result reloads with hf_wsvd and, through its remote code, without it."""

from __future__ import annotations

import pytest
import torch
import transformers

import tiny
from helpers import run_without_hf_wsvd
from hf_wsvd.cli import main
from hf_wsvd.solvers import SOLVERS

# Recipes beyond one method each (whose defaults for whiten and fisher_whiten prune the MLPs): the
# LLM recipe with compensation and factorized layers, greedy allocation, and attention pruning asked for.
EXTRA = {"fisher_whiten-attention-pruning": ["--method", "fisher_whiten", "--attention-pruning"],
         "fisher_whiten-sequential-compensated": ["--method", "fisher_whiten", "--sequential", "--compensate",
                                                  "--allocation", "greedy", "--no-mlp-pruning",
                                                  "--no-attention-pruning"],
         "whiten-greedy": ["--method", "whiten", "--allocation", "greedy"]}
RECIPES = {**{m: ["--method", m] for m in sorted(SOLVERS)}, **EXTRA}
# int8 per row: any layer shape quantizes (tests/test_quantization.py covers the grouped formats)
RECIPES["quantized_residual"] += ["--quantize", "int8", "--residual-rank", "2"]
LOW_RANK = ("FactorizedLinear", "LowRankCorrectedLinear")


@pytest.fixture(scope="module")
def dense_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    tiny.save(tiny.build("qwen2"), root / "dense")
    words = tiny.WORDS
    text = "\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(11)) for i in range(40))
    (root / "text.txt").write_text(text)
    return root


def test_every_recipe_compresses_qwen2_from_the_cli_and_reloads(dense_and_text):
    root = dense_and_text
    counts = {}
    for name, flags in RECIPES.items():
        out = root / name
        code = main(["compress", str(root / "dense"), str(out), "--param-ratio", "0.5", "--rank-multiple", "1",
                     "--data", str(root / "text.txt"), "--num-samples", "8", "--max-length", "8",
                     "--batch-size", "4", "--max-iterations", "2", *flags])
        assert code == 0, name
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        counts[name] = sum(type(m).__name__ in LOW_RANK for m in model.modules())
        assert model.config.wsvd["method"] == flags[1]
        gram = flags[1] in ("whiten", "fisher_whiten")
        pruned = any(layer.mlp.down_proj.in_features < 64 for layer in model.model.layers)
        assert pruned == (gram and "--no-mlp-pruning" not in flags), name
        # Greedy allocation decides whether an attention is cut; the recipe says whether it may be (asked only).
        assert bool(model.config.wsvd["attention_pruning"]) == (gram and "--attention-pruning" in flags), name
        cut = any(layer.self_attn.head_dim < 8 for layer in model.model.layers)
        assert counts[name] > 0 or pruned or cut, name
        with torch.no_grad():
            assert torch.isfinite(model(**tiny.inputs("qwen2")).logits).all(), name
    result = run_without_hf_wsvd(f"""
        import transformers
        for name, count in {counts!r}.items():
            model = transformers.AutoModelForCausalLM.from_pretrained("{root}/" + name, trust_remote_code=True)
            found = sum(type(m).__name__ in {LOW_RANK!r} for m in model.modules())
            assert found == count, (name, found, count)
            print(name, "ok")
    """, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(" ok") == len(RECIPES)
