"""The benchmark scripts' command lines, run in-process on their committed results (no model, no GPU):
``--json-out`` measures and prints without publishing, ``--from-json`` renders earlier runs and
publishes them (the committed results file alone gives its table back unchanged), runs record the
commit they measured, and bad options end in one argparse line. Every publish here goes to a copy
of the pages under ``tmp_path`` (``report.ROOT``); the repository's are checked untouched."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# results name → (script, options that choose its table)
REPUBLISHED = {"glue": ("glue", []), "glue_activation": ("glue", ["--suite", "activation"]),
               "embeddings": ("embeddings", []), "elementwise_glue": ("elementwise_glue", []),
               "svd_risk": ("svd_risk", []), "solver_curves": ("solver_curves", [])}


def _snapshot() -> dict[Path, tuple[int, int]]:
    folders = [ROOT / "docs" / "benchmarks", RESULTS]
    return {path: (path.stat().st_mtime_ns, path.stat().st_size)
            for folder in folders for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def pages(monkeypatch, tmp_path):
    """The benchmark scripts importable, publishing into ``tmp_path`` (a copy of the docs pages and
    results files a test asks for: ``copy(name)``); the repository's pages and results stay as they were."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report

    monkeypatch.setattr(report, "ROOT", tmp_path)
    before = _snapshot()

    def copy(name: str) -> Path:
        """``name``'s page and results file into ``tmp_path``; the copied results file."""
        page = report.page(name).relative_to(tmp_path)
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
        results = tmp_path / "benchmarks" / "results" / f"{name}.json"
        results.parent.mkdir(parents=True, exist_ok=True)
        if (RESULTS / f"{name}.json").exists():
            shutil.copy(RESULTS / f"{name}.json", results)
        return results

    yield copy
    assert _snapshot() == before, "a benchmark test wrote into the repository's docs or results"


def _published(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "benchmarks" / "results" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(REPUBLISHED))
def test_the_committed_results_file_alone_gives_its_table_back_unchanged(pages, tmp_path, name):
    """The five scripts that measured and published in one go render their committed results with
    --from-json: page and results file as committed (their figure drawn again beside them)."""
    import importlib

    import report

    script, options = REPUBLISHED[name]
    results = pages(name)
    page = report.page(name)
    main = importlib.import_module(script).main
    main([*options, "--from-json", str(results)])
    assert page.read_text() == (ROOT / page.relative_to(tmp_path)).read_text()
    assert results.read_text() == (RESULTS / f"{name}.json").read_text()
    if name in ("svd_risk", "solver_curves"):
        assert (tmp_path / "benchmarks" / "results" / f"{name}.png").stat().st_size > 0


def test_from_json_with_json_out_prints_and_publishes_nothing(pages, tmp_path, capsys):
    import embeddings

    embeddings.main(["--from-json", str(RESULTS / "embeddings.json"), "--json-out", str(tmp_path / "run.json")])
    assert "| sst2 | lp1 | 0.720 |" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*"))  # not the run file, not a page, not a results file


def _glue_run(suite: str, accuracy: float) -> dict:
    import report

    row = {"task": "sst2", "method": "svd", "param_ratio": 0.5, "accuracy": accuracy, "f1": 0.5, "majority_share": 0.5}
    return {"environment": report.environment(), "suite": suite, "rows": [row]}


def test_json_out_measures_and_prints_and_records_the_commit_without_publishing(pages, monkeypatch, tmp_path,
                                                                                  capsys):
    """A smoke run with --json-out leaves the published table and results alone; its file records
    the commit it measured (None: not a git checkout, as ``tmp_path`` is)."""
    import glue

    monkeypatch.setattr(glue, "measure", lambda args: _glue_run(args.suite, 0.25))
    out = tmp_path / "out" / "run.json"
    out.parent.mkdir()
    glue.main(["--json-out", str(out)])
    assert "| sst2 | svd | 0.500 | 0.250 |" in capsys.readouterr().out
    assert [path.name for path in tmp_path.rglob("*") if path.is_file()] == ["run.json"]
    assert "git" in json.loads(out.read_text())["environment"]


def test_runs_published_from_files_say_how_to_publish_them_again(pages, monkeypatch, tmp_path):
    """--from-json of measurement files (not the results file alone) publishes every run, with the
    command that gives the table again from its results file: the suite's own for glue_activation."""
    import glue

    pages("glue_activation")
    runs = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, accuracy in zip(runs, (0.25, 0.75)):
        path.write_text(json.dumps(_glue_run("activation", accuracy)))
    glue.main(["--suite", "activation", "--from-json", *map(str, runs)])
    published = _published(tmp_path, "glue_activation")
    command = "python benchmarks/glue.py --suite activation --from-json benchmarks/results/glue_activation.json"
    assert published["environment"]["command"] == command and len(published["runs"]) == 2
    text = (tmp_path / "docs" / "benchmarks" / "glue.md").read_text()
    assert "| sst2 | svd | 0.500 | 0.250 |" in text and "| sst2 | svd | 0.500 | 0.750 |" in text
    assert f"Re-run: `{command}`" in text
    assert "<!-- glue:start -->" in text  # the core table's block is left as it was


def test_glue_refuses_runs_of_another_suite(pages, tmp_path):
    import glue

    pages("glue")
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_glue_run("activation", 0.5)))
    with pytest.raises(SystemExit, match="these runs measured --suite activation, not core: pass --suite activation"):
        glue.main(["--from-json", str(run)])


def test_elementwise_glue_appends_a_run_and_its_rows_replace_the_published_ones(pages, monkeypatch, tmp_path):
    import elementwise_glue

    pages("elementwise_glue")
    committed = json.loads((RESULTS / "elementwise_glue.json").read_text())
    again = {**committed["rows"][1], "accuracy": 0.123}  # a (task, method, ratio) measured again
    monkeypatch.setattr(elementwise_glue, "measure",
                        lambda args: {"environment": {"command": "python benchmarks/elementwise_glue.py --append"},
                                      "options": {}, "rows": [again]})
    elementwise_glue.main(["--append"])
    published = _published(tmp_path, "elementwise_glue")
    assert published["runs"] == [committed, published["runs"][1]] and published["runs"][1]["rows"] == [again]
    text = (tmp_path / "docs" / "benchmarks" / "elementwise_glue.md").read_text()
    table = text.split("<!-- elementwise_glue:start -->\n")[1].split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(committed["rows"]) and table[3].split(" | ")[3] == "0.123"
    assert "Re-run: `python benchmarks/elementwise_glue.py --append`" in text


def test_elementwise_glue_append_is_not_for_files(pages, capsys):
    import elementwise_glue

    with pytest.raises(SystemExit):
        elementwise_glue.main(["--append", "--from-json", str(RESULTS / "elementwise_glue.json")])
    assert "--append publishes a run measured here" in capsys.readouterr().err


def test_environment_records_the_commit_and_whether_the_tree_differs(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import report

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    monkeypatch.setattr(report, "ROOT", ROOT)
    state = report.environment()["git"]
    assert state["commit"] == head.stdout.strip() and isinstance(state["dirty"], bool)
    monkeypatch.setattr(report, "ROOT", tmp_path)  # an unpacked copy, no checkout
    assert report.environment()["git"] is None


@pytest.mark.parametrize("flag", ["--methods", "--allocations", "--compensation-ridges"])
def test_llm_only_recommended_refuses_the_recipe_lists_it_sets(pages, capsys, flag):
    import llm

    with pytest.raises(SystemExit) as exit_:
        llm.main(["--only-recommended", flag, "1"])
    assert exit_.value.code == 2
    assert f"--only-recommended sets the recipe lists itself: drop {flag} or --only-recommended" in \
        capsys.readouterr().err


def test_llm_recipe_lists_default_or_as_given_or_recommended(pages, monkeypatch):
    import llm

    class Measured(Exception):
        pass

    def measure(args):
        raise Measured(args)

    monkeypatch.setattr(llm, "measure", measure)
    lists = {}
    for argv in ([], ["--methods", "svd"], ["--only-recommended"]):
        with pytest.raises(Measured) as measured:
            llm.main(argv)
        lists[tuple(argv)] = {name: getattr(measured.value.args[0], name) for name in llm.RECIPE_LISTS}
    assert lists[()] == llm.RECIPE_LISTS
    assert lists[("--methods", "svd")] == {**llm.RECIPE_LISTS, "methods": ["svd"]}
    assert lists[("--only-recommended",)] == llm.RECOMMENDED_LISTS


@pytest.mark.parametrize("script, flag, value, says", [
    ("quantization", "--calib-samples", "0", "0 is not a positive integer"),
    ("quantization", "--eval-blocks", "-3", "-3 is not an integer >= 0"),
    ("quantization", "--bits", "4,0", "0 is not a positive integer"),
    ("scale", "--sequences", "0", "0 is not a positive integer"),
    ("scale", "--block-refine-steps", "-1", "-1 is not an integer >= 0"),
    ("svd_risk", "--num-samples", "-3", "-3 is not a positive integer"),
    ("svd_risk", "--threads", "0", "0 is not a positive integer"),
    ("solvers_gpu", "--max-iterations", "0", "0 is not a positive integer"),
    ("solvers_gpu", "--threads", "x", "'x' is not an integer"),
    ("glue", "--num-samples", "0", "0 is not a positive integer"),
    ("elementwise_glue", "--rank-multiple", "0", "0 is not a positive integer"),
    ("solver_curves", "--threads", "0", "0 is not a positive integer"),
    ("speed_gpu", "--decode-warmup", "-1", "-1 is not an integer >= 0"),
    ("speed_gpu", "--new-tokens", "0", "0 is not a positive integer"),
    ("speed_svd", "--svd-layers", "0", "0 is not a positive integer"),
    ("sibling_speed", "--tokens", "0", "0 is not a positive integer"),
    ("llm", "--heal-seed", "-1", "-1 is not an integer >= 0"),
])
def test_counts_out_of_range_end_in_one_argparse_line(pages, monkeypatch, capsys, script, flag, value, says):
    import importlib

    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", flag, value])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"{script}.py: error: argument {flag}: {says}"


@pytest.mark.parametrize("name", ["checkpoint_size", "compress_time"])
def test_size_and_compress_time_tables_replace_their_block_of_the_speed_page(pages, tmp_path, name):
    """Their tables on speed.md (from the former speed.py's run) sit between their markers: publishing
    replaces that block, nothing is appended after the page's other tables."""
    import importlib

    pages(name)
    page = tmp_path / "docs" / "benchmarks" / "speed.md"
    start, end = f"<!-- {name}:start -->\n", f"\n<!-- {name}:end -->"
    before, _, rest = page.read_text().partition(start)
    block, _, after = rest.partition(end)
    importlib.import_module(name).main(["--from-json", str(RESULTS / "speed_cpu_earlier.json")])
    text = page.read_text()
    assert text.startswith(before + start) and text.endswith(end + after) and text.count(start) == 1
    new = text[len(before + start):-len(end + after)]
    command = f"python benchmarks/{name}.py --from-json benchmarks/results/{name}.json"
    assert new == f"{block}\n\nRe-run: `{command}` (results: `benchmarks/results/{name}.json`)."


def test_speed_cpu_renders_runs_from_before_weight_bytes_were_recorded(pages, tmp_path, capsys):
    """The former speed.py's run (no weight bytes, structures or accuracy; its own field names):
    the bound, structure and accuracy unknown, the timings as measured."""
    import speed_cpu

    speed_cpu.main(["--from-json", str(RESULTS / "speed_cpu_earlier.json"), "--json-out", str(tmp_path / "x.json")])
    out = capsys.readouterr().out
    assert "| 2 | 0.9–1.3 | kept 0.5 | - | - | 1.39e+04 | 1.404 | 11.028 | 1.402 | — |" in out
    assert "| 1 | 1.3–1.2 | dense | dense | - | 5266.894 | 1.000 | 25.542 | 1.000 | — |" in out
    run = json.loads((RESULTS / "speed_cpu_llm.json").read_text())
    del run["weight_bytes"], run["llm"]["weight_bytes"]
    text = speed_cpu.render([run])
    assert "| 2 | 2.0–1.9 | 20% | 23 MLPs pruned, 0 attentions cut, 84 factorized (26 down groups shared) | - |" in text
