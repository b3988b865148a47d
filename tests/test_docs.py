"""The user-facing pages: links resolve, the code they show runs, and benchmark tables land in them."""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tiny
from hf_wsvd.runtime.modeling_wsvd import CLASS_PREFIX
from hf_wsvd.solvers import SOLVERS

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def code_blocks(page: Path, language: str, section: str | None = None) -> list[str]:
    text = page.read_text()
    if section:
        text = text.split(section, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s):, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_readme_keeps_the_test_command_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    command = readme.split("<!-- test-command:start -->", 1)[1].split("<!-- test-command:end -->", 1)[0]
    assert "python -m pytest" in command and 'pip install torch==2.13.0 -e ".[test]"' in command
    assert len(readme.splitlines()) <= 300


def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    """The README's Python example, as written, on a tiny classifier and a small train.tsv."""
    (block,) = code_blocks(ROOT / "README.md", "python", "## Python API")
    source = tmp_path / "path" / "to" / "sst2-model"
    tiny.build("bert", "AutoModelForSequenceClassification").save_pretrained(source)
    tiny.tokenizer().save_pretrained(source)
    rows = [f"the movie was {word}\t{label}" for word, label in [("great", 1), ("bad", 0), ("good", 1), ("awful", 0)]]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows * 4) + "\n")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md (Python API)", "exec"), scope)
    # The recipe left unset resolves to the recommended one for labelled data, and the checkpoint records it.
    assert scope["config"].method is None
    assert (scope["report"].method, scope["model"].config.wsvd["allocation"]) == ("fisher_whiten", "greedy")
    assert type(scope["model"]).__name__.startswith(CLASS_PREFIX) and scope["report"].ranks
    assert (tmp_path / "sst2-compressed" / "tokenizer.json").is_file()


def test_the_recipe_table_names_every_field():
    """The README sends users to this table for all of WSVDConfig's fields."""
    import dataclasses

    from hf_wsvd import WSVDConfig

    page = (ROOT / "docs" / "methods.md").read_text()
    table = page[page.index("| field | meaning |"):]
    named = {name for row in table.splitlines() if row.startswith("|")
             for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert {f.name for f in dataclasses.fields(WSVDConfig)} - named == set()


def test_the_design_page_adds_a_method():
    (block,) = code_blocks(ROOT / "docs" / "design.md", "python", "## Extending hf_wsvd")
    scope = {}
    try:
        exec(compile(block, "docs/design.md (adding a method)", "exec"), scope)
        assert scope["config"].method == "rownorm"
        model = tiny.build("bert", "AutoModelForSequenceClassification")
        _, report = scope["hf_wsvd"].compress(model, scope["config"], show_progress=False)
        assert report.ranks and report.params_after < report.params_before
    finally:
        SOLVERS.pop("rownorm", None)  # other tests iterate over the registered methods


def test_publish_writes_the_table_into_its_docs_page(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    monkeypatch.setattr(report, "ROOT", tmp_path)
    page = tmp_path / "docs" / "benchmarks" / "glue.md"
    page.parent.mkdir(parents=True)
    page.write_text("# GLUE\n\nprose before\n\n<!-- glue_activation:start -->\nold\n<!-- glue_activation:end -->\n\nafter\n")
    payload = {"environment": {"command": "python benchmarks/glue.py --suite activation"}, "rows": [1]}
    report.publish("glue_activation", payload, "| a |\n|---|\n| 1 |")
    text = page.read_text()
    assert "old" not in text and "| 1 |" in text and text.startswith("# GLUE\n\nprose before") and text.endswith("after\n")
    assert "Re-run: `python benchmarks/glue.py --suite activation`" in text
    assert json.loads((tmp_path / "benchmarks" / "results" / "glue_activation.json").read_text())["rows"] == [1]
    report.publish("factorization", payload, "| b |")  # a name without its page yet: the page is created
    assert "<!-- factorization:start -->\n| b |" in (tmp_path / "docs" / "benchmarks" / "factorization.md").read_text()


def test_tests_needing_the_shared_assets_skip_with_the_reason_without_them(tmp_path):
    """The README's test command on a fresh clone (no ../shared beside it): those tests skip and
    say why; where the assets are required (HF_WSVD_REQUIRE_SHARED=1) their absence fails."""
    test = "tests/test_data.py::test_mrpc_pairs_are_found_without_text_columns"
    env = {**os.environ, "HF_WSVD_SHARED": str(tmp_path / "no-shared"), "HF_WSVD_REQUIRE_SHARED": ""}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout[-2000:]
    assert f"needs the shared assets folder {tmp_path / 'no-shared'}" in result.stdout
    result = subprocess.run(command, cwd=ROOT, env={**env, "HF_WSVD_REQUIRE_SHARED": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "HF_WSVD_REQUIRE_SHARED=1 and it is missing" in result.stdout


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    """The benchmark scripts importable (they live outside the package, in benchmarks/)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def test_quantization_benchmark_combines_runs_replacing_rows_measured_again(benchmarks_on_path):
    from quantization import combined

    def row(model, label, kind, perplexity):
        return {"model": model, "row": label, "kind": kind, "perplexity": perplexity}

    first = {"environment": {"command": "run 1"}, "rows": [row("a", "bf16", "dense", 1.0), row("a", "int4 + L", "residual", 3.0),
                                                           row("b", "bf16", "dense", 2.0)]}
    second = {"environment": {"command": "run 2"}, "cut_off": True,
              "rows": [row("b", "bf16", "dense", 2.5), row("a", "int4 alone", "quantized", 4.0)]}
    result = combined([first, second])
    assert [(r["model"], r["row"], r["perplexity"]) for r in result["rows"]] == [
        ("a", "bf16", 1.0), ("a", "int4 alone", 4.0), ("a", "int4 + L", 3.0), ("b", "bf16", 2.5)]
    assert result["environment"]["command"] == "run 1; run 2 (cut off after its last row)"


def test_llm_benchmark_says_which_weights_a_healed_row_has(benchmarks_on_path):
    """A healing that was undone, or whose lowest held-out loss came before its last step, says so in
    the row's name and in the healing table; rows from before evaluations during healing read as the
    last step's."""
    from llm import healed_weights, healing_table

    config = {"batch_size": 8, "learning_rate": 1e-4, "hidden_weight": 0.0, "seed": 0, "steps": 1000}
    base = {"reduction": 0.4, "heal_config": config, "heal_seconds": 10.0, "validation_perplexity": 2.0,
            "perplexity": 3.0}
    rows = [{**base, "heal_kept": False, "heal_best_step": 0}, {**base, "heal_kept": True, "heal_best_step": 300},
            {**base, "heal_kept": True}, base]
    assert [healed_weights(r) for r in rows] == [" (undone: the held-out loss rose)", " (the weights of step 300)", "", ""]
    assert healed_weights({"method": "dense"}) == ""
    lines = healing_table(rows, dense=2.0).splitlines()[2:]
    assert [line.split(" | ")[7] for line in lines] == ["none (undone)", "step 300", "step 1000", "step 1000"]


def test_llm_benchmark_keeps_the_samples_of_runs_on_other_calibration_data_apart(benchmarks_on_path):
    """Two runs of one recipe on different calibration data both keep their sample, each under its own
    name (the later one no longer replaces the earlier); the dense sample is the same model's."""
    from llm import merged

    def run(blocks, text):
        return {"model": "m", "calibration": {"blocks": blocks}, "environment": {"command": f"run {blocks}"},
                "rows": [{"method": "dense", "reduction": 0.0, "allocation": "-", "perplexity": 1.0}],
                "samples": {"dense": "d", "-40% r, greedy": text}}

    written = run(256, "fourth")
    written["calibration"]["teacher_written"] = 32
    model = merged([run(256, "first"), run(501, "second"), run(256, "third"), written])[0]
    assert model["samples"] == {"dense": "d", "-40% r, greedy": "third", "-40% r, greedy, 501 calibration blocks": "second",
                                "-40% r, greedy, 256 + 32 teacher-written calibration blocks": "fourth"}


def test_llm_benchmark_adds_teacher_written_calibration_blocks_and_records_them(benchmarks_on_path):
    """``--calib-generated``: the dense model's blocks follow the real ones in the calibration data, and
    the payload records how many and how long they took; none asked, the data and record are as before."""
    from llm import calibration_data, with_teacher_blocks

    dense = tiny.build("llama", initializer_range=0.3)
    blocks = [{"input_ids": list(range(10 * i + 3, 10 * i + 15)), "attention_mask": [1] * 12} for i in range(4)]
    data, record = with_teacher_blocks(dense, blocks, 3, batch_size=2, seed=0)
    assert data[:4] == blocks and len(data) == 7
    assert all(len(b["input_ids"]) == 12 and b not in blocks for b in data[4:])
    assert record["teacher_written"] == 3 and record["writing_seconds"] > 0
    assert calibration_data({"blocks": 4, **record}) == "4 + 3 teacher-written"
    assert with_teacher_blocks(dense, blocks, 0, batch_size=2, seed=0) == (blocks, {})
    assert calibration_data({"blocks": 4}) == 4


def test_llm_benchmark_fingerprints_the_blocks_it_measured_on(benchmarks_on_path):
    """Rows are comparable only on the same blocks: a tokenizer whose end-of-text token changed cuts
    other blocks from the same file, which the payload's hashes tell apart."""
    from llm import fingerprint

    blocks = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10]}]
    assert fingerprint(blocks) == fingerprint([{"input_ids": torch.tensor(b["input_ids"]).tolist()} for b in blocks])
    assert fingerprint(blocks) != fingerprint(blocks[::-1]) != fingerprint([{"input_ids": [5, 6]}, {"input_ids": [7, 8, 9, 10]}])
    assert len(fingerprint(blocks)) == 16


def test_gpu_speed_benchmark_keeps_each_measured_part_of_a_model_cut_off(benchmarks_on_path, monkeypatch, tmp_path):
    import speed_gpu

    def measure_model(reduction, args, checkpoint):
        result = {"reduction": reduction, "step_bytes": {"1": 2.0 - reduction}, "params": 1, "param_ratio": 1 - reduction,
                  "cut_attentions": 0, "head_dims": [], "pruned_mlps": 1, "mlp_channels": [8], "factorized_layers": 2,
                  "dense_layers": 3, "compile": {"1": {"tokens_per_s": 10.0 + reduction}}}
        checkpoint(result)
        if reduction:
            raise KeyboardInterrupt  # the time limit strikes before the next part
        return result

    monkeypatch.setattr(speed_gpu, "measure_model", measure_model)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "none")
    out = tmp_path / "speed.json"
    args = argparse.Namespace(shape="7b", layers=2, parts=["compile", "int8"], recipe="{}", calibration=[1, 8],
                              prefill_batch=1, prefill_length=8, prompt_length=4, new_tokens=4, reductions=[0.0, 0.5],
                              json_out=str(out),
                              int8_untuned=False)
    with pytest.raises(KeyboardInterrupt):
        speed_gpu.measure(args)
    saved = json.loads(out.read_text())
    assert [(m["reduction"], m.get("incomplete", False)) for m in saved["models"]] == [(0.0, False), (0.5, True)]
    assert saved["models"][1]["compile"]["1"]["tokens_per_s"] == 10.5
    assert "50%: the run was cut off before all its parts were measured." in speed_gpu.render([saved])


def test_gpu_speed_table_sets_the_compiled_ratio_against_the_eager_one(benchmarks_on_path):
    """Issue 21: compiling must not close the eager gap; the table says whether it did, and the run's note."""
    import speed_gpu

    def model(reduction, eager, compiled):
        return {"reduction": reduction, "step_bytes": {"1": 2.0 - reduction}, "params": 1, "param_ratio": 1 - reduction,
                "cut_attentions": 0, "head_dims": [], "pruned_mlps": 1, "mlp_channels": [8], "factorized_layers": 2,
                "dense_layers": 3, "decode": {"1": {"tokens_per_s": eager, "runs": [eager * 0.95, eager * 1.05]}},
                "compile": {"1": {"tokens_per_s": compiled}}}

    run = {"environment": {"cuda": "gpu", "command": "c"}, "calibration": [1, 8], "new_tokens": 4, "prompt_length": 4,
           "prefill_shape": [1, 8], "note": "Two machines", "models": [model(0.0, 20.0, 100.0), model(0.4, 24.0, 102.0)]}
    text = speed_gpu.render([run])
    assert "40%, batch 1: compiled ×1.02 against eager ×1.20 (target: no lower: NOT met)." in text
    assert "Two machines." in text
    run["models"][1]["compile"]["1"]["tokens_per_s"] = 130.0
    assert "compiled ×1.30 against eager ×1.20 (target: no lower: met)." in speed_gpu.render([run])
    run["models"][0]["decode"]["1"]["runs"] = [13.4, 32.4]  # a cold first run: the eager ratio means nothing
    assert "(target: no lower: not judged, the eager runs of one model differ 2.4×)." in speed_gpu.render([run])
    run["models"][1]["compile"]["1"]["warmup_seconds"] = 95.4  # compilation, which a cut-off run must show
    assert "40%, compile batch 1: the compiled warm-up (compilation included) took 95 s." in speed_gpu.render([run])
    # The same judgement without generate's host loop: inductor's kernels against the eager ones, both replayed.
    for m, eager, compiled in zip(run["models"], (100.0, 120.0), (110.0, 126.5)):
        m["graph"] = {"1": {"tokens_per_s": eager, "runs": [eager, eager * 1.01]}}
        m["graph_compiled"] = {"1": {"tokens_per_s": compiled, "runs": [compiled]}}
    run["models"][0]["prefill"] = {"tokens_per_s": 1000.0}
    run["models"][1]["prefill"] = {"tokens_per_s": 1300.0}
    text = speed_gpu.render([run, run])
    assert "run 2, 40%, batch 1: inductor's kernels replayed ×1.15 against eager kernels replayed ×1.20 (target: no lower: NOT met)." in text
    assert "| 2 | 40% | CUDA-graph decode, inductor's kernels | 126.500 | 1.150 | — | — |" in text
    assert "| 1 | 40% | prefill (1×8 tokens) | 1300.000 | 1.300 | — | — |" in text  # no batch: the first columns
    # where a replayed step's GPU time goes: its kernels a token, and of them the matrix products
    kernels = [["nvjet_sm90_tst_64x8_64x16_2x1_v_bz_splitK_TNT", 6.0, 8], ["cublasLt::splitKreduce_kernel", 2.0, 8],
               ["at::native::vectorized_elementwise_kernel", 3.0, 40], ["gemv2T_kernel_val", 1.0, 4]]
    assert speed_gpu.matmul_ms(kernels, steps=4) == 2.25  # cuBLAS's names: nvjet, split-K reduction, gemv
    graph = run["models"][1]["graph"]["1"]
    graph.update({"kernel_ms_per_step": 3.0, "matmul_ms_per_step": 2.25, "top_kernels_ms": kernels})
    assert ("run 1, 40%, graph batch 1: replayed, GPU kernels 3.00 ms a decode step, of which matrix products "
            "2.25 ms.") in speed_gpu.render([run])
    del graph["matmul_ms_per_step"]  # a run that kept only its largest kernels: a lower bound, and what it leaves
    graph["top_kernels_ms"] = kernels[:3]
    assert ("of which matrix products at least 2.00 ms (of the 3 largest kernels; the others 0.25 ms).") in speed_gpu.render([run])
    assert "| 1 | gpu | 40% (recommended) |" in text  # each run's GPU, beside its models
    # int8 measured without torchao's tuning: its rows say so, and the run's notes
    for m, tokens in zip(run["models"], (16.9, 21.6)):
        m["int8_graph"] = {"1": {"tokens_per_s": tokens}}
    text = speed_gpu.render([{**run, "parts": ["int8_graph"], "int8_untuned": True}])
    assert "| 1 | 40% | int8 CUDA-graph decode, inductor's kernels (untuned) | 21.600 | 1.278 | — | — |" in text
    assert "run 1: int8 parts untuned" in text
    assert "(untuned)" not in speed_gpu.render([{**run, "parts": ["int8_graph"]}])
    # nf4 (bitsandbytes): its rows against nf4 dense, and the run says what they are
    for m, tokens in zip(run["models"], (200.0, 250.0)):
        m["nf4_graph"] = {"1": {"tokens_per_s": tokens}}
    text = speed_gpu.render([{**run, "parts": ["nf4_graph"]}])
    assert "| 1 | 40% | nf4 CUDA-graph decode | 250.000 | 1.250 | — | — |" in text
    assert "run 1: nf4: the same model with bitsandbytes 4-bit NormalFloat block linears" in text
    assert "bitsandbytes" not in speed_gpu.render([{**run, "parts": ["int8_graph"]}])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_matmul_shapes_names_each_product_shape_with_its_count_and_rate(benchmarks_on_path, device):
    """The prefill profile's product shapes: each (m × k by k × n) once, with how many ran and their
    rate (on CUDA, from the GPU's kernel times)."""
    from timing import kernel_times, matmul_shapes, shapes_profile

    wide = torch.nn.Linear(64, 48, bias=False, device=device)
    thin = torch.nn.Linear(64, 8, device=device)  # with a bias: addmm
    biased = torch.nn.Linear(64, 48, device=device)  # wide's shape through addmm: the same row
    x = torch.randn(2, 5, 64, device=device)
    out = torch.empty(10, 48, device=device)  # an out= tensor is recorded among the inputs too
    profiled = shapes_profile(lambda: (wide(x), thin(x), biased(x), torch.mm(x[0], wide.weight.detach().t(),
                                                                             out=out[:5])), device)
    rows = matmul_shapes(profiled, device)
    if device == "cuda":  # a pass made only of products: their time is its kernel time, none counted twice
        many = shapes_profile(lambda: [wide(x) for _ in range(64)], device)  # (as device_time_total did)
        products, kernels = sum(r["ms"] for r in matmul_shapes(many, device)), 1e3 * kernel_times(many)[0]
        assert 0.9 * kernels <= products <= kernels * (1 + 1e-9)
    assert sorted((r["m"], r["k"], r["n"], r["count"]) for r in rows) == [(5, 64, 48, 1), (10, 64, 8, 1),
                                                                         (10, 64, 48, 2)]
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] == pytest.approx(2 * r["m"] * r["k"] * r["n"] * r["count"] / r["ms"] / 1e9)
    with pytest.raises(RuntimeError, match="no matrix products"):
        matmul_shapes(shapes_profile(lambda: x.relu(), device), device)


def test_gpu_speed_notes_name_the_prefill_shapes_slower_than_dense(benchmarks_on_path):
    """Issue 21's prefill gap: the note names the compressed model's product shapes that run below dense's rate."""
    import speed_gpu

    dense = {"kernel_ms": 900.0, "matmul_ms": 800.0, "matmul_tflops": 600.0,
             "matmul_shapes": [{"m": 16384, "k": 4096, "n": 4096, "count": 128, "ms": 800.0, "tflops": 600.0}]}
    compressed = {"kernel_ms": 790.0, "matmul_ms": 700.0, "matmul_tflops": 500.0, "matmul_shapes": [
        {"m": 16384, "k": 4096, "n": 11008, "count": 30, "ms": 500.0, "tflops": 590.0},   # at dense's rate
        {"m": 16384, "k": 4096, "n": 384, "count": 40, "ms": 150.0, "tflops": 300.0},     # slow and large: named
        {"m": 16384, "k": 384, "n": 4096, "count": 4, "ms": 20.0, "tflops": 100.0}]}      # slow but < 5%: left out
    notes = speed_gpu.prefill_profile("run 1, 20%", compressed, dense)
    assert notes == ["run 1, 20%, prefill: GPU kernels 790.0 ms a pass, of which matrix products 700.0 ms at 500 "
                     "TFLOP/s, other kernels 90.0 ms (dense: products 800.0, other 100.0 ms); at dense's rate its "
                     "products would take 116.7 ms less; below 0.9 of dense's 600: "
                     "16384×4096×384 (40×) 300 TFLOP/s, 150.0 ms."]
    assert speed_gpu.prefill_profile("run 1, 0%", dense, dense) == [
        "run 1, 0%, prefill: GPU kernels 900.0 ms a pass, of which matrix products 800.0 ms at 600 TFLOP/s, "
        "other kernels 100.0 ms."]
    assert speed_gpu.prefill_profile("run 1, 20%", {"tokens_per_s": 1.0}, dense) == []  # not profiled: no note
    faster = {**compressed, "matmul_tflops": 650.0, "matmul_shapes": []}  # products above dense's rate: nothing to gain
    assert speed_gpu.prefill_profile("run 1, 40%", faster, dense) == [
        "run 1, 40%, prefill: GPU kernels 790.0 ms a pass, of which matrix products 700.0 ms at 650 TFLOP/s, "
        "other kernels 90.0 ms (dense: products 800.0, other 100.0 ms)."]


def test_sibling_speed_table_shows_each_variant_where_it_ran(benchmarks_on_path):
    """A variant a group cannot take (grouped_mm needs one output width) reads as a dash, not a number."""
    import sibling_speed

    def row(group, us):
        return {"group": group, "tokens": 1, "ratio": 0.5, "us": us,
                "x_dense": {v: us["dense"] / t for v, t in us.items()}}

    run = {"environment": {"cuda": "gpu"}, "threads": 1, "rounds": 7, "iters": 20,
           "rows": [row("q/k/v", {"dense": 50.0, "shared": 25.0, "grouped_mm": 40.0}),
                    row("q/kv", {"dense": 30.0, "shared": 20.0})]}
    text = sibling_speed.render([run])
    assert "| gpu | q/k/v | 1 | 0.500 | 50.0 (1.00) | 25.0 (2.00) | 40.0 (1.25) |" in text
    assert "| gpu | q/kv | 1 | 0.500 | 30.0 (1.00) | 20.0 (1.50) | — |" in text


@pytest.mark.parametrize("options, says", [(["--tokens", "1", "32"], "at most 16 tokens"),
                                           (["--triton-blocks", "48x64"], "must be a multiple of the tile's 48 columns")])
def test_sibling_speed_refuses_sizes_its_triton_kernel_would_compute_wrong(benchmarks_on_path, monkeypatch, capsys,
                                                                           options, says):
    import sibling_speed

    monkeypatch.setattr(sys, "argv", ["sibling_speed.py", "--triton", *options])
    with pytest.raises(SystemExit):
        sibling_speed.main()
    assert says in capsys.readouterr().err


def test_gpu_speed_benchmark_refuses_nf4_beside_int8_or_with_widths_its_kernels_do_not_take(benchmarks_on_path,
                                                                                            monkeypatch, capsys):
    """A one-line refusal before any work: nf4 and int8 both quantize the one model in place, and
    widths that bitsandbytes' 4-bit kernels do not take would time its fallback."""
    import speed_gpu

    monkeypatch.setattr(sys, "argv", ["speed_gpu.py", "--parts", "graph", "nf4_graph", "int8_graph"])
    with pytest.raises(SystemExit) as refused:
        speed_gpu.main()
    assert refused.value.code == 2
    assert "--parts: nf4_graph and the int8 parts each quantize the model: run them separately" in capsys.readouterr().err
    # widths bitsandbytes' 4-bit kernels do not take would time its fallback (the whole weight dequantized)
    for recipe in ("{}", '{"rank_multiple": 96}'):
        monkeypatch.setattr(sys, "argv", ["speed_gpu.py", "--parts", "graph", "nf4_graph", "--recipe", recipe])
        with pytest.raises(SystemExit) as refused:
            speed_gpu.main()
        assert refused.value.code == 2
        assert "--parts nf4_graph needs ranks and MLP widths in multiples of 64" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_counts_the_kernels_of_a_replayed_cuda_graph(benchmarks_on_path):
    """The speed benchmark's host-or-GPU diagnosis: kernels replayed from a CUDA graph are counted,
    and their time is within the call's wall time."""
    from timing import cuda_graphed, cuda_kernels

    a = torch.randn(4096, 4096, device="cuda")
    replay = cuda_graphed(lambda: a @ a, repeats=20)
    replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    kernels, top = cuda_kernels(replay)
    wall = time.perf_counter() - start
    assert 0 < kernels <= wall
    assert sum(count for _, _, count in top) >= 20  # every replayed product's kernel(s)
    assert kernels > 20 * 2 * 4096**3 / 2e15  # 20 products at no more than 2 PFLOP/s: all of them counted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_speed_benchmark_replays_eager_and_inductor_decode_steps(benchmarks_on_path, compiled):
    """The CUDA-graph decode of the speed benchmark, with eager kernels and with inductor's: the
    replayed steps give the tokens of the same steps run unreplayed (float32: no near-tie flips)."""
    import speed_gpu

    model = tiny.build("llama", vocab_size=256).cuda().eval()  # token_batch draws ids from 100 up
    args = argparse.Namespace(prompt_length=8, new_tokens=8, decode_repeats=1)
    torch._dynamo.reset()
    result = speed_gpu.graph_decode(model, 2, args, compiled=compiled)
    assert result["replay_matches_eager_tokens"] and result["checked_tokens"] == 8
    assert result["tokens_per_s"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_speed_benchmark_replays_inductor_decode_steps_of_an_int8_model(benchmarks_on_path):
    """The int8_graph part: a compressed model's block linears in torchao int8 weight-only, the step's
    forward compiled by inductor and replayed from a CUDA graph, gives the tokens of the same steps
    run unreplayed."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    import speed_gpu
    from hf_wsvd import WSVDConfig, compress, unshare_input_factors

    model = compress(tiny.build("llama", vocab_size=256).eval(), WSVDConfig(param_ratio=0.5),
                     show_progress=False)[0].cuda().to(torch.bfloat16)
    unshare_input_factors(model)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: type(m) is torch.nn.Linear and "lm_head" not in name)
    args = argparse.Namespace(prompt_length=8, new_tokens=8, decode_repeats=1)
    torch._dynamo.reset()
    result = speed_gpu.graph_decode(model, 1, args, compiled=True)
    assert result["checked_tokens"] == 8 and result["tokens_per_s"] > 0
    assert result["replay_matches_eager_tokens"] or result["first_step_min_top2_margin"] < 0.1  # bf16 near-ties only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_speed_benchmark_replays_the_decode_steps_of_an_nf4_model(benchmarks_on_path):
    """The nf4_graph part: a compressed model's block linears (factors and pruned layers) in
    bitsandbytes nf4, its own kernels replayed from a CUDA graph, give the tokens of the same steps
    run unreplayed; the head stays as it was."""
    bnb = pytest.importorskip("bitsandbytes", reason="the nf4 part needs bitsandbytes (its CUDA kernels)")
    import speed_gpu
    from hf_wsvd import WSVDConfig, compress, unshare_input_factors

    model = compress(tiny.build("llama", vocab_size=256).eval(), WSVDConfig(param_ratio=0.5),
                     show_progress=False)[0].cuda().to(torch.bfloat16)
    unshare_input_factors(model)
    speed_gpu.nf4_(model)
    plain = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == ["lm_head"] and any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    args = argparse.Namespace(prompt_length=8, new_tokens=8, decode_repeats=1)
    result = speed_gpu.graph_decode(model, 1, args)
    assert result["checked_tokens"] == 8 and result["tokens_per_s"] > 0
    assert result["replay_matches_eager_tokens"] or result["first_step_min_top2_margin"] < 0.1  # bf16 near-ties only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_speed_benchmark_decode_says_where_the_time_goes(benchmarks_on_path):
    """Eager ``generate`` of a tiny model on the GPU: its kernels are a part of the wall time, the
    rest the host's, and the profiler's record of them does not replace the timings."""
    import speed_gpu

    model = tiny.build("llama", vocab_size=256).cuda().eval()  # token_batch draws ids from 100 up
    args = argparse.Namespace(prompt_length=8, new_tokens=8, decode_warmup=1, decode_repeats=2)
    result = speed_gpu.decode(model, 1, args)
    assert "profile_error" not in result, result.get("profile_error")
    assert 0 < result["kernel_share_of_wall"] < 1.5 and result["top_kernels_ms"]
    assert result["tokens_per_s"] > 0 and len(result["runs"]) == 2
    assert result["warmup_seconds"] > 0 and "eager_reference_seconds" not in result  # eager: no reference run


def test_republished_table_says_the_command_that_republishes_it(benchmarks_on_path, monkeypatch, tmp_path):
    """``--from-json`` of the published results file (here the GPU speed table's) and a new run keeps
    every run with the command that measured it, and the table's Re-run line publishes it again from
    its results file — not the first run's command (which would measure one run, not give the table),
    nor the files just given (which need not stay)."""
    import report
    import speed_gpu

    monkeypatch.setattr(report, "ROOT", tmp_path)
    (tmp_path / "docs" / "benchmarks").mkdir(parents=True)
    results = ROOT / "benchmarks" / "results"
    new = tmp_path / "new.json"
    new.write_text((results / "speed_gpu_compile_int8_cut.json").read_text())
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "benchmarks" / "speed_gpu.py"), "--from-json",
                                      str(results / "speed_gpu.json"), str(new)])
    speed_gpu.main()
    before = json.loads((results / "speed_gpu.json").read_text())["runs"] + [json.loads(new.read_text())]
    after = json.loads((tmp_path / "benchmarks" / "results" / "speed_gpu.json").read_text())
    assert [run["environment"]["command"] for run in after["runs"]] == [run["environment"]["command"] for run in before]
    command = "python benchmarks/speed_gpu.py --from-json benchmarks/results/speed_gpu.json"
    assert after["environment"]["command"] == command
    assert f"Re-run: `{command}`" in (tmp_path / "docs" / "benchmarks" / "speed.md").read_text()


def test_scale_extrapolation_puts_the_hidden_states_where_they_wait(benchmarks_on_path):
    """The 70B slice at 32 sequences, extrapolated to 128, predicts what the slice at 128 measured (one
    H200): with the hidden states in CPU memory their growth is host memory, not GPU memory; kept on
    the GPU, the same growth is GPU memory."""
    import scale

    results = ROOT / "benchmarks" / "results"
    small = json.loads((results / "scale_70b_slice2_offload.json").read_text())
    measured = json.loads((results / "scale_70b_slice2_offload_128.json").read_text())
    assert small["offload_activations"] and small["sequences"] == 32 and measured["sequences"] == 128
    predicted = scale.extrapolate(small, 128)
    assert predicted["peak_gib_per_gpu"] == pytest.approx(measured["peak_gib_per_gpu"], abs=0.5)
    assert predicted["host_gib"] == pytest.approx(measured["extrapolated"]["host_gib"], abs=1.0)
    on_gpu = scale.extrapolate({**small, "offload_activations": False}, 128)
    streams = 2 * 96 * 2048 * scale.SHAPES["70b"]["hidden_size"] * 2 / 2**30  # 96 more sequences, two streams, bf16
    assert on_gpu["peak_gib_per_gpu"][0] == pytest.approx(small["peak_gib_per_gpu"][0] + streams)
    assert on_gpu["host_gib"] == pytest.approx(predicted["host_gib"] - streams)


def test_scale_benchmark_publishes_from_its_published_results_and_new_runs(benchmarks_on_path, monkeypatch, tmp_path):
    """``scale.py --from-json`` takes the published file (its runs) beside new measurement files, as the
    other benchmarks do: republishing keeps every earlier row."""
    import report
    import scale

    monkeypatch.setattr(report, "ROOT", tmp_path)
    (tmp_path / "docs" / "benchmarks").mkdir(parents=True)
    results = ROOT / "benchmarks" / "results"
    earlier = [json.loads((results / name).read_text()) for name in ("scale_7b_256.json", "scale_7b_slice4.json")]
    published = tmp_path / "published.json"
    published.write_text(json.dumps({"environment": earlier[0]["environment"], "runs": earlier}))
    monkeypatch.setattr(sys, "argv", ["scale.py", "--from-json", str(published),
                                      str(results / "scale_70b_slice2_offload.json")])
    scale.main()
    runs = json.loads((tmp_path / "benchmarks" / "results" / "scale.json").read_text())["runs"]
    assert [(run["shape"], run["layers"]) for run in runs] == [("7b", 32), ("7b", 4), ("70b", 2)]
    table = (tmp_path / "docs" / "benchmarks" / "scale.md").read_text()
    assert "| Llama 70b shape, 2 of 80 layers | offload, hidden states in CPU memory |" in table
    assert "Re-run: `python benchmarks/scale.py --from-json benchmarks/results/scale.json`" in table


def test_benchmarks_refuse_bad_inputs_in_one_line(benchmarks_on_path, monkeypatch, tmp_path):
    """A GPU measurement on a machine without one, unreadable --from-json files and a run of another
    benchmark end in one line naming the problem, before any work (not a traceback, or a 7B model built
    on the CPU first)."""
    from timing import kept_fraction, read_fields, read_json, reduction, require_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="measuring on cuda needs a CUDA GPU and this machine has none"):
        require_cuda(argparse.Namespace(device="cuda", from_json=None))
    require_cuda(argparse.Namespace(device="cuda", from_json=["runs.json"]))  # rendering needs no GPU
    require_cuda(argparse.Namespace(device="cpu", from_json=None))
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "list.json").write_text("[1]")
    for path, says in ((tmp_path / "gone.json", "No such file or directory"), (tmp_path / "empty.json", "is not JSON"),
                       (tmp_path / "list.json", "holds a JSON list, not a run's object")):
        with pytest.raises(SystemExit, match=re.escape(f"--from-json {str(path)!r}") + ".*" + says):
            read_json(str(path))
    with pytest.raises(SystemExit, match="a run lacks the field 'rows' that llm.py reads"):
        read_fields(lambda runs: runs[0]["rows"], [{}], "llm")
    for kind, text in ((kept_fraction, "1.5"), (kept_fraction, "0"), (reduction, "1"), (reduction, "0")):
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)
    assert kept_fraction("1") == 1.0 and reduction("0.4") == 0.4
