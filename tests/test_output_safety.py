"""Misuse of the CLI: outputs that would lose user files, killed --overwrite runs, pushes of stray
files, and bad input reported as one line (exit 2) naming the value."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from huggingface_hub import ModelCard

import tiny
from helpers import FolderHub, run_cli as run
from hf_wsvd import WSVDConfig, compress, hub
from hf_wsvd.cli import main
from hf_wsvd.cli.output import MARKER, check_output

ROWS = [("the movie was great", 1), ("awful plot", 0), ("really good story", 1), ("bad actor", 0)]


def one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("hf-wsvd") and len(errors[0]) < 400, errors
    return errors[0]


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path):
    """proj/models/tiny (a dense classifier), proj/notes.txt and proj/train.tsv."""
    root = tmp_path / "proj"
    tiny.save(tiny.build("bert"), root / "models" / "tiny")
    (root / "notes.txt").write_text("mine")
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{l}\n" for s, l in ROWS))
    return root


def _checkpoint(path, seed: int = 0) -> None:
    tiny.save_compressed(path, "bert", seed=seed, with_tokenizer=False)


@pytest.mark.parametrize("output, overwrite, message", [
    (".", True, "contains the input"),  # also the current directory
    ("models", True, "contains the input"),
    ("models/tiny", True, "is the input"),
    ("models/tiny/out", False, "lies inside the input"),
    ("..", True, "contains the input"),
])
def test_output_that_would_lose_the_input_or_the_cwd_is_refused(project, monkeypatch, capsys, output, overwrite, message):
    monkeypatch.chdir(project)
    before = snapshot(project)
    argv = ["compress", "models/tiny", output, "--method", "svd", *(["--overwrite"] if overwrite else [])]
    assert run(argv) == 2
    assert message in one_error(capsys)
    assert snapshot(project) == before


def test_output_that_is_the_current_directory_is_refused(project, monkeypatch, capsys):
    _checkpoint(project / "ckpt")
    monkeypatch.chdir(project / "models")
    before = snapshot(project)
    assert run(["export", str(project / "ckpt"), ".", "--dense", "--overwrite"]) == 2
    assert "is the current directory" in one_error(capsys)
    assert snapshot(project) == before


def test_file_or_unwritable_output_is_refused_before_any_work(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    monkeypatch.setattr("hf_wsvd.cli.workflow.load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded a model"))
    assert run(["compress", "models/tiny", "notes.txt", "--method", "svd"]) == 2
    assert "'notes.txt' is a file" in one_error(capsys)
    assert run(["compress", "models/tiny", "notes.txt/out", "--method", "svd"]) == 2
    assert "is a file" in one_error(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        (project / "locked").mkdir(mode=0o500)
        assert run(["compress", "models/tiny", "locked/out", "--method", "svd"]) == 2
        assert "is not writable" in one_error(capsys)
    # a name the file system cannot hold, or too long for the names a run gives folders beside it
    for name in ("a" * 300, "b" * 250, f"{'c' * 300}/out"):
        assert run(["compress", "models/tiny", name, "--method", "svd"]) == 2
        assert "bytes long, at most" in one_error(capsys)
    assert sorted(p.name for p in project.iterdir()) == ["locked", "models", "notes.txt", "train.tsv"][
        os.geteuid() == 0:]


def test_a_failed_run_leaves_no_folder_it_made(project, monkeypatch, capsys):
    """The parents of OUTPUT that the run created are removed with its staging folder when it fails."""
    monkeypatch.chdir(project)
    assert run(["compress", "models/tiny", "new/a/b/out", "--method", "fwsvd", "--data", "missing.txt"]) == 2
    assert "missing.txt" in one_error(capsys)
    assert not (project / "new").exists()
    (project / "kept").mkdir()
    assert run(["compress", "models/tiny", "kept/a/out", "--method", "fwsvd", "--data", "missing.txt"]) == 2
    one_error(capsys)
    assert list((project / "kept").iterdir()) == []  # the user's own folder stays


def test_a_staging_folder_that_cannot_be_made_is_named_by_output(project, monkeypatch, capsys):
    """Where no folder can be made beside OUTPUT (/proc, a read-only mount), the error names OUTPUT,
    not the hidden staging folder, and removes the parents the run made."""
    mkdir = os.mkdir

    def refused(path, *args, **kwargs):
        if os.path.basename(path).startswith(".hf-wsvd-"):
            raise PermissionError(13, "Permission denied", path)
        return mkdir(path, *args, **kwargs)

    monkeypatch.chdir(project)
    monkeypatch.setattr(os, "mkdir", refused)
    assert run(["compress", "models/tiny", "new/out", "--method", "svd"]) == 2
    error = one_error(capsys)
    assert re.search(r"error: \[Errno 13\] cannot write '.*new/out' \(a folder beside it could not be made: "
                     r"Permission denied\)$", error) and ".hf-wsvd-" not in error, error
    assert not (project / "new").exists()


@pytest.mark.parametrize("where, error", [
    ("transformers.PreTrainedTokenizerBase.save_pretrained", Exception("No space left on device (os error 28)")),
    ("transformers.PreTrainedModel.save_pretrained",
     RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")),
    ("hf_wsvd.cli.output._write_marker", OSError(28, "No space left on device")),
], ids=["tokenizers", "safetensors", "marker"])
def test_a_full_disk_while_the_output_is_written_is_one_line(project, monkeypatch, capsys, where, error):
    """The Rust libraries report a failed write as text ending in "(os error N)"; an OSError names
    a file of the staging folder: each is said as the OUTPUT's."""
    def full_disk(*args, **kwargs):
        raise error

    monkeypatch.chdir(project)
    monkeypatch.setattr(where, full_disk)
    assert run(["compress", "models/tiny", "out/a", "--method", "svd"]) == 2
    assert re.search(r"error: \[Errno 28\] No space left on device while writing '.*out/a'$", one_error(capsys))
    assert not (project / "out").exists()  # the staging folder and the parent the run made are gone


def test_overwrite_replaces_only_earlier_outputs_with_normal_permissions(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert run(["compress", "models/tiny", "out/a", "--method", "svd"]) == 0
    mode = os.stat(project / "out" / "a").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (project / "out" / "a").iterdir()} == {
        p.name: oct(0o666 & ~umask) for p in (project / "out" / "a").iterdir()}  # the weights too (safetensors: 0600)
    assert (project / "out" / "a" / MARKER).is_file()
    # an hf-wsvd output with a file the user added is not replaced
    (project / "out" / "a" / "my-notes.md").write_text("mine")
    assert run(["compress", "models/tiny", "out/a", "--method", "svd", "--overwrite"]) == 2
    assert "did not write or that changed since it wrote them (my-notes.md)" in one_error(capsys)
    (project / "out" / "a" / "my-notes.md").unlink()
    # a dense export is recognized as an hf-wsvd output too
    assert run(["export", "out/a", "out/dense", "--dense"]) == 0
    assert run(["export", "out/a", "out/dense", "--dense", "--overwrite"]) == 0
    # a save_pretrained checkpoint without the marker is recognized by its model_type and files,
    # not counting a .safetensors file its weights are not (activations the user saved there)
    _checkpoint(project / "out" / "api")
    (project / "out" / "api" / "activations.safetensors").write_bytes(b"mine")
    assert run(["export", "out/a", "out/api", "--dense", "--overwrite"]) == 2
    assert "did not write or that changed since it wrote them (activations.safetensors)" in one_error(capsys)
    (project / "out" / "api" / "activations.safetensors").unlink()
    assert run(["export", "out/a", "out/api", "--dense", "--overwrite"]) == 0
    assert (project / "out" / "api" / "config.json").read_text().count('"model_type": "bert"') == 1
    assert [p.name for p in (project / "out").iterdir() if p.name.startswith(".hf-wsvd-")] == []


def test_overwrite_refuses_an_output_whose_files_were_saved_over(project, monkeypatch, capsys):
    """A model fine-tuned and saved back into an earlier output keeps the files' names but is the
    user's: --overwrite refuses it, naming the file, and leaves it as it is."""
    from transformers import AutoModelForSequenceClassification

    monkeypatch.chdir(project)
    assert run(["compress", "models/tiny", "out", "--method", "svd"]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(project / "out")
    with torch.no_grad():
        model.classifier.weight.mul_(3)
    model.save_pretrained(project / "out")
    before = snapshot(project / "out")
    assert run(["compress", "models/tiny", "out", "--method", "svd", "--param-ratio", "0.6", "--overwrite"]) == 2
    error = one_error(capsys)  # save_pretrained rewrote every file: each is named, the weights among them
    assert "changed since it wrote them (" in error and "model.safetensors" in error
    assert snapshot(project / "out") == before
    # an output left as hf-wsvd wrote it is still replaced
    assert run(["compress", "models/tiny", "out2", "--method", "svd"]) == 0
    assert run(["compress", "models/tiny", "out2", "--method", "svd", "--param-ratio", "0.6", "--overwrite"]) == 0


KILL_AFTER_ASIDE = """
import os, signal, sys
from hf_wsvd.cli import main

output, real_replace = os.path.abspath(sys.argv[2]), os.replace

def replace(src, dst):
    real_replace(src, dst)
    if os.path.abspath(src) == output:  # the old output has just been renamed aside
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
main(["export", sys.argv[1], sys.argv[2], "--dense", "--overwrite"])
"""


@pytest.mark.parametrize("meanwhile", ["nothing", "made empty", "made with a file"])
def test_overwrite_killed_mid_replacement_keeps_the_old_output(tmp_path, capsys, meanwhile):
    _checkpoint(tmp_path / "a", seed=0)
    _checkpoint(tmp_path / "b", seed=1)
    out = tmp_path / "dense"
    assert main(["export", str(tmp_path / "a"), str(out), "--dense"]) == 0
    old = snapshot(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path.parent), *sys.path])}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_ASIDE, str(tmp_path / "b"), str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # killed between the two renames: the old output is complete beside OUTPUT, the new one too
    assert not out.exists()
    from hf_wsvd.cli.output import _STAGING

    leftovers = {_STAGING.fullmatch(p.name)["kind"]: p for p in tmp_path.iterdir() if p.name.startswith(".hf-wsvd-")}
    assert sorted(leftovers) == ["new", "old"] and snapshot(leftovers["old"]) == old
    if meanwhile != "nothing":  # e.g. a script's mkdir -p before the next run
        out.mkdir()
    if meanwhile == "made with a file":
        (out / "notes.txt").write_text("mine")
        # the previous output goes where no run deletes it, the user's folder is left as it is
        with pytest.raises(ValueError, match="holds files hf-wsvd did not write"):
            check_output(str(tmp_path / "b"), str(out), overwrite=True)
        kept = [p for p in tmp_path.iterdir() if ".hf-wsvd-previous-" in p.name]
        assert len(kept) == 1 and snapshot(kept[0]) == old and snapshot(out) == {"notes.txt": b"mine"}
        assert "its previous content is in" in capsys.readouterr().err
        return
    # the next run for OUTPUT puts the old output back and removes the leftovers
    check_output(str(tmp_path / "b"), str(out), overwrite=True).release()
    assert snapshot(out) == old
    assert "restored" in capsys.readouterr().err
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".hf-wsvd-")] == []
    assert main(["export", str(tmp_path / "b"), str(out), "--dense", "--overwrite"]) == 0
    assert snapshot(out) != old and set(snapshot(out)) == set(old)


class _Killed(Exception):
    pass


def _killed(number, frame):  # the CLI's SIGTERM handler raises too; the default would end pytest
    raise _Killed


@pytest.fixture
def python_handlers():
    """Python's own SIGINT handler (a run started in the background by a script inherits SIGINT
    ignored) and a SIGTERM handler that raises, for the test; the previous ones after."""
    previous = {kind: signal.getsignal(kind) for kind in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _killed)
    yield
    for kind, handler in previous.items():
        signal.signal(kind, handler)


def test_a_signal_during_the_swap_or_the_cleanup_is_delivered_when_it_is_done(tmp_path, monkeypatch, capsys,
                                                                              python_handlers):
    """A Ctrl-C (or a kill) landing while OUTPUT is renamed aside, before the result takes its place,
    or while a failed run's staging folder is deleted, waits until that is done: OUTPUT is never left
    missing, and no staging folder is left half deleted. Before the swap begins one aborts it."""
    from hf_wsvd.cli import output

    _checkpoint(tmp_path / "a")
    out = tmp_path / "dense"
    assert main(["export", str(tmp_path / "a"), str(out), "--dense"]) == 0
    state, interrupted = output._state, []

    def interrupting(kinds, when):
        def read(path):
            if when(os.path.basename(path)) and not interrupted:
                interrupted.append(path)
                for kind in kinds:
                    os.kill(os.getpid(), kind)
            return state(path)
        return read

    def replace(kinds, when, expected):
        interrupted.clear()
        monkeypatch.setattr(output, "_state", interrupting(kinds, when))
        with pytest.raises(expected):
            with check_output(str(tmp_path / "a"), str(out), overwrite=True) as claim:
                with claim.write("test") as staging:
                    open(os.path.join(staging, "result.txt"), "w").write("new")
        assert interrupted and [p for p in tmp_path.iterdir() if p.name.startswith(".hf-wsvd-")] == []

    before = snapshot(out)
    replace([signal.SIGINT], lambda name: name == "dense", KeyboardInterrupt)  # OUTPUT read before the renames
    assert snapshot(out) == before and "already held" not in capsys.readouterr().err
    replace([signal.SIGINT], lambda name: name.startswith(".hf-wsvd-"), KeyboardInterrupt)  # read once renamed aside
    assert (out / "result.txt").read_text() == "new"
    assert f"hf-wsvd: {str(out)!r} already held the new result when the signal came" in capsys.readouterr().err
    # a Ctrl-C and a kill: the kill wins (exit 143, not 130), and the handlers are the ones before
    replace([signal.SIGINT, signal.SIGTERM], lambda name: name.startswith(".hf-wsvd-"), _Killed)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and signal.getsignal(signal.SIGTERM) is _killed
    assert "already held the new result" in capsys.readouterr().err
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ignored (a background run): still ignored during the swap
    interrupted.clear()
    monkeypatch.setattr(output, "_state", interrupting([signal.SIGINT], lambda name: name.startswith(".hf-wsvd-")))
    with check_output(str(tmp_path / "a"), str(out), overwrite=True) as claim:
        with claim.write("test") as staging:
            open(os.path.join(staging, "result.txt"), "w").write("quiet")
    assert interrupted and (out / "result.txt").read_text() == "quiet" and "already held" not in capsys.readouterr().err
    signal.signal(signal.SIGINT, signal.default_int_handler)
    before, rmtree = snapshot(out), shutil.rmtree

    def interrupting_rmtree(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupting_rmtree)
    with pytest.raises(KeyboardInterrupt):
        with check_output(str(tmp_path / "a"), str(out), overwrite=True) as claim:
            with claim.write("test") as staging:
                open(os.path.join(staging, "result.txt"), "w").write("newer")
                raise ValueError("the run failed")
    assert snapshot(out) == before
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".hf-wsvd-")] == []


TERMINATE_WHEN_WRITTEN = """
import os, signal, sys, time
import hf_wsvd.cli.output as output
from hf_wsvd.cli import main

def terminated(folder, command):  # the result is complete in the staging folder: the signal now
    os.kill(os.getpid(), int(sys.argv[3]))
    time.sleep(60)

signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, whatever this test's parent ignores
output._write_marker = terminated
sys.exit(main(["export", sys.argv[1], sys.argv[2], "--dense"]))
"""


@pytest.mark.parametrize("kind, said", [(signal.SIGTERM, "terminated"), (getattr(signal, "SIGHUP", 1), "hung up")])
def test_a_terminated_run_leaves_no_staging_folder_and_says_so(tmp_path, kind, said):
    """SIGTERM (kill, timeout, a scheduler) and SIGHUP (a closed terminal or ssh session) unwind like
    Ctrl-C: exit 128 + the signal, one line, nothing left."""
    _checkpoint(tmp_path / "a")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path.parent), *sys.path])}
    ended = subprocess.run([sys.executable, "-c", TERMINATE_WHEN_WRITTEN, str(tmp_path / "a"), str(tmp_path / "out"),
                            str(int(kind))], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ended.returncode == 128 + kind, ended.stderr[-2000:]
    assert ended.stderr.strip().splitlines()[-1] == f"hf-wsvd export: {said}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


INTERRUPTED_AGAIN_AT_EXIT = """
import atexit, os, signal, sys, time
import hf_wsvd.cli.app as app

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
app.main = lambda: 130  # a run that Ctrl-C ended


@atexit.register
def pressed_again():  # Ctrl-C pressed again while the interpreter shuts down
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)


sys.exit(app.console())
"""


def test_ctrl_c_pressed_again_after_the_run_ended_is_ignored():
    """After "interrupted", another Ctrl-C must not break into the interpreter's exit handlers (each
    would print "Exception ignored ..." and a traceback) or change the exit status."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ended = subprocess.run([sys.executable, "-c", INTERRUPTED_AGAIN_AT_EXIT], env=env, capture_output=True, text=True,
                           timeout=300)
    assert ended.returncode == 130
    assert "Exception ignored" not in ended.stderr and "KeyboardInterrupt" not in ended.stderr, ended.stderr[-2000:]


def test_a_reader_that_leaves_the_output_ends_the_command_quietly(tmp_path, monkeypatch, capsys):
    """``hf-wsvd inspect X | head``: when the reader of standard output has gone, the command ends as a
    program killed by SIGPIPE does (status 141, nothing said); a broken pipe elsewhere is one error line."""
    _checkpoint(tmp_path / "a")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    # Buffered, as in a terminal session: the last block is written when the command ends.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path.parent), *sys.path])
    try:
        ended = subprocess.run([sys.executable, "-c", "import sys; from hf_wsvd.cli import main; sys.exit(main(sys.argv[1:]))",
                                "inspect", str(tmp_path / "a")], stdout=write, stderr=subprocess.PIPE, cwd=tmp_path,
                               env=env, text=True, timeout=300)
    finally:
        os.close(write)
    assert ended.returncode == 128 + signal.SIGPIPE, ended.stderr[-2000:]
    assert not re.search(r"error|Traceback|Exception ignored", ended.stderr), ended.stderr[-2000:]

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("hf_wsvd.cli.app._inspect", broken)
    assert run(["inspect", str(tmp_path / "a")]) == 2
    assert one_error(capsys) == "hf-wsvd inspect: error: [Errno 32] Broken pipe"


def test_stale_staging_folders_are_cleaned_and_live_ones_refuse_a_second_run(tmp_path, capsys):
    _checkpoint(tmp_path / "a")
    out = tmp_path / "dense"
    main(["export", str(tmp_path / "a"), str(out), "--dense"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from hf_wsvd.cli.output import _target_id

    target = _target_id(str(out))
    stale = [tmp_path / f".hf-wsvd-{dead.pid}-ab12-{kind}-{target}" for kind in ("new", "old")]
    other = tmp_path / f".hf-wsvd-{dead.pid}-ef56-new-{_target_id(str(tmp_path / 'elsewhere'))}"
    for folder in [*stale, other]:
        folder.mkdir()
    with check_output(str(tmp_path / "a"), str(out), overwrite=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hf-wsvd-")) == [other.name]
    assert (out / "config.json").is_file()  # OUTPUT existed: the stale "old" folder was deleted, not restored
    # a live run's staging folder (the parent process is alive) claims OUTPUT: a second run is refused
    live = tmp_path / f".hf-wsvd-{os.getppid()}-cd34-new-{target}"
    live.mkdir()
    before = snapshot(out)
    assert main(["export", str(tmp_path / "a"), str(out), "--dense", "--overwrite"]) == 2
    error_line = one_error(capsys)
    assert f"another hf-wsvd run (pid {os.getppid()}) is writing" in error_line
    assert snapshot(out) == before and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hf-wsvd-")) == sorted([live.name, other.name])
    assert f"delete {live.name!r} beside it" in error_line  # what to do if no run is working
    live.rmdir()
    # (those names are of an earlier release, without the space or the start.) Today's names record when
    # their process started: a live process of another start has taken a dead run's pid over
    from hf_wsvd.cli.output import _start_ticks

    started = _start_ticks(os.getppid())
    assert started is not None or not sys.platform.startswith("linux")  # /proc says, where there is one
    if started is not None:  # elsewhere a live pid counts as the run's, as before
        taken = tmp_path / f".hf-wsvd-{os.getppid()}-{started + 1:x}tcd34-new-{target}"
        taken.mkdir()
        assert main(["export", str(tmp_path / "a"), str(out), "--dense", "--overwrite"]) == 0
        assert not taken.exists()
    live = tmp_path / f".hf-wsvd-{os.getppid()}-{started or 0:x}tcd34-new-{target}"
    live.mkdir()
    assert main(["export", str(tmp_path / "a"), str(out), "--dense", "--overwrite"]) == 2
    assert f"another hf-wsvd run (pid {os.getppid()}) is writing" in one_error(capsys)
    before = snapshot(out)
    # A staging folder of another machine or container (another pid namespace): its pid cannot be checked here, so it is never
    # taken for stale: refused, named, left in place
    live.rmdir()
    foreign = tmp_path / f".hf-wsvd-0000dead-{dead.pid}-cd34-new-{target}"
    foreign.mkdir()
    assert main(["export", str(tmp_path / "a"), str(out), "--dense", "--overwrite"]) == 2
    error = one_error(capsys)
    assert "a hf-wsvd run of another machine or container" in error and foreign.name in error
    assert error.endswith(f"if none runs, delete {foreign.name!r} beside it")
    assert snapshot(out) == before and foreign.is_dir()
    # its "old" folder holds what OUTPUT held: never to be deleted on our word while OUTPUT is missing
    foreign.rename(aside := tmp_path / f".hf-wsvd-0000dead-{dead.pid}-cd34-old-{target}")
    assert main(["export", str(tmp_path / "a"), str(out), "--dense", "--overwrite"]) == 2
    assert f"{aside.name!r} beside it holds its previous content: rename it back if it is missing" in one_error(capsys)
    assert snapshot(out) == before and aside.is_dir()


def _kept_results(folder) -> list:
    return sorted(p for p in folder.parent.iterdir() if p.name.startswith(folder.name + ".hf-wsvd-result-"))


def test_files_added_to_output_during_a_compress_are_kept_and_the_run_fails(project, monkeypatch, capsys):
    """mkdir o/u; hf-wsvd compress M o/u & -- then the user puts o/u/mine/run1.csv there."""
    import hf_wsvd

    out = project / "o" / "u"
    out.mkdir(parents=True)
    real = hf_wsvd.compress

    def compress_while_the_user_writes(*args, **kwargs):
        (out / "mine").mkdir()
        (out / "mine" / "run1.csv").write_text("r")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_wsvd, "compress", compress_while_the_user_writes)
    assert run(["compress", str(project / "models" / "tiny"), str(out), "--method", "svd"]) == 2
    error = one_error(capsys)
    assert "changed while hf-wsvd ran (added: 'mine'" in error
    assert snapshot(out) == {"mine/run1.csv": b"r"}
    (kept,) = _kept_results(out)
    assert f"saved to {str(kept)!r}" in error and (kept / "config.json").is_file() and (kept / MARKER).is_file()
    assert [p for p in out.parent.iterdir() if p.name.startswith(".hf-wsvd-")] == []


def test_a_replaced_output_changed_during_the_run_is_not_deleted(tmp_path, capsys):
    """heal/compress --overwrite of an earlier output: a notes.txt added meanwhile survives."""
    _checkpoint(tmp_path / "a")
    out = tmp_path / "dense"
    assert main(["export", str(tmp_path / "a"), str(out), "--dense"]) == 0
    with check_output(str(tmp_path / "a"), str(out), overwrite=True) as claim:
        (out / "notes.txt").write_text("mine")
        before = snapshot(out)
        with pytest.raises(FileExistsError, match="changed while hf-wsvd ran \\(added: 'notes.txt'\\)"):
            with claim.write("test") as staging:
                open(os.path.join(staging, "result.txt"), "w").write("new")
    assert snapshot(out) == before
    (kept,) = _kept_results(out)
    assert (kept / "result.txt").read_text() == "new"
    # an edited file (same name, new content) is a change too
    (out / "notes.txt").unlink()
    with check_output(str(tmp_path / "a"), str(out), overwrite=True) as claim:
        time.sleep(0.01)
        (out / "config.json").write_text((out / "config.json").read_text() + " ")
        with pytest.raises(FileExistsError, match="changed: 'config.json'"):
            with claim.write("test"):
                pass
    assert (out / "config.json").read_text().endswith(" ")
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".hf-wsvd-")] == []


def test_two_runs_into_one_output_do_not_both_succeed(tmp_path, capsys):
    _checkpoint(tmp_path / "a")
    out = tmp_path / "dense"
    with check_output(str(tmp_path / "a"), str(out), overwrite=False) as first:
        assert main(["export", str(tmp_path / "a"), str(out), "--dense"]) == 2
        assert "another hf-wsvd run" in one_error(capsys) and not out.exists()
        with first.write("export") as staging:
            open(os.path.join(staging, "config.json"), "w").write("{}")
    assert snapshot(out).keys() == {"config.json", MARKER}
    # two processes racing at the swap: whichever comes second finds OUTPUT taken and keeps its result
    second = check_output(str(tmp_path / "a"), str(tmp_path / "race"), overwrite=False)
    (tmp_path / "race").mkdir()
    (tmp_path / "race" / "theirs.txt").write_text("first")
    with second, pytest.raises(FileExistsError, match="added: 'theirs.txt'"):
        with second.write("export"):
            pass
    assert snapshot(tmp_path / "race") == {"theirs.txt": b"first"}


def test_heal_never_writes_into_or_replaces_its_teacher(tmp_path, capsys):
    tiny.save_compressed(tmp_path / "student", "llama", with_tokenizer=False)  # heal takes causal LMs
    tiny.save_compressed(tmp_path / "teacher", "llama", seed=1, with_tokenizer=False)
    (tmp_path / "text.txt").write_text("some words " * 100)
    before = snapshot(tmp_path / "teacher")
    for output, relation in [("teacher/healed", "lies inside"), ("teacher", "is")]:
        assert run(["heal", str(tmp_path / "student"), str(tmp_path / output), "--teacher", str(tmp_path / "teacher"),
                    "--data", str(tmp_path / "text.txt"), "--overwrite"]) == 2
        assert f"{relation} the input {str(tmp_path / 'teacher')!r}" in one_error(capsys)
    assert snapshot(tmp_path / "teacher") == before


def test_push_uploads_an_allow_list_and_verifies_the_code(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ckpt"
    _checkpoint(out)
    ModelCard("---\nlibrary_name: transformers\n---\n# card").save(out / "README.md")
    (out / ".env").write_text("HF_TOKEN=secret")
    (out / "notes.txt").write_text("private")
    api = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    assert main(["push", str(out), "user/x"]) == 0
    assert "not uploading .env, notes.txt" in capsys.readouterr().out
    (uploaded,) = api.commits
    assert ".env" not in uploaded and "notes.txt" not in uploaded
    assert {"config.json", "model.safetensors", "modeling_wsvd.py", "README.md"} <= set(uploaded)
    with open(out / "factorized_linear.py", "a") as handle:
        handle.write("\n# edited after saving\n")
    assert main(["push", str(out), "user/x"]) == 2
    assert "factorized_linear.py differs from the installed hf_wsvd/runtime/factorized_linear.py" in one_error(capsys)
    assert len(api.commits) == 1


def _pushable(path, **save) -> None:
    model, _ = tiny.compressed("bert")
    model.save_pretrained(path, **save)
    ModelCard("---\nlibrary_name: transformers\n---\n# card").save(path / "README.md")


def test_a_push_that_leaves_the_repository_without_a_tokenizer_says_so(tmp_path, caplog):
    """pipeline() and AutoTokenizer on the Hub copy need one; a tokenizer of an earlier upload is kept."""
    api = FolderHub(tmp_path / "hub")
    _pushable(tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        hub.push(tmp_path / "ckpt", "user/a", api=api)
    assert [r.getMessage() for r in caplog.records if "has no tokenizer" in r.getMessage()] == [
        f"user/a has no tokenizer ({tmp_path / 'ckpt'} held none): AutoTokenizer and pipeline() cannot load the model "
        "from it; save one into the folder (tokenizer.save_pretrained) and push again"]
    tiny.tokenizer().save_pretrained(tmp_path / "ckpt")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_wsvd"):
        hub.push(tmp_path / "ckpt", "user/b", api=api)  # with one
        for name in os.listdir(tmp_path / "ckpt"):
            if name.startswith("tokenizer"):
                os.remove(tmp_path / "ckpt" / name)
        hub.push(tmp_path / "ckpt", "user/b", api=api)  # without, where the repository keeps the earlier one
    assert not [r for r in caplog.records if "has no tokenizer" in r.getMessage()]


def test_push_uploads_only_the_weights_the_index_names(tmp_path, capsys, monkeypatch):
    """Other .safetensors files (activations saved next to the model) are never uploaded."""
    api = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    _pushable(tmp_path / "single")
    _pushable(tmp_path / "sharded", max_shard_size="20KB")
    for folder in ("single", "sharded"):
        (tmp_path / folder / "private-activations.safetensors").write_bytes(b"secret")
        assert main(["push", str(tmp_path / folder), f"user/{folder}"]) == 0
        assert "not uploading private-activations.safetensors" in capsys.readouterr().out
    single, sharded = api.commits
    assert [f for f in single if f.endswith(".safetensors")] == ["model.safetensors"]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(f for f in sharded if "safetensors" in f) == [*shards, "model.safetensors.index.json"]
    # an index naming a file outside the folder is refused
    index["weight_map"][next(iter(index["weight_map"]))] = "../single/model.safetensors"
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["push", str(tmp_path / "sharded"), "user/sharded"]) == 2
    assert "names the weights file '../single/model.safetensors', not a .safetensors file of the folder" in one_error(capsys)
    assert len(api.commits) == 2


def test_a_second_push_replaces_the_earlier_weights_and_keeps_the_repository_s_other_files(tmp_path, capsys, monkeypatch):
    """A sharded upload after an unsharded one (and back): the earlier weight files (transformers would
    load a stale model.safetensors before the new index) and generation config are removed in the same
    commit, made on the head the listing saw, then named in a warning; the repository's other files
    (the user's, a tokenizer file the new upload lacks) stay."""
    import transformers

    api = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    warned = []
    monkeypatch.setattr(hub.logger, "warning", lambda message, *args: warned.append(message % args))
    first, _ = tiny.compressed("bert")
    second, _ = tiny.compressed("bert")
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(1.25)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second", max_shard_size="20KB")
    for folder in ("first", "second"):
        ModelCard("---\nlibrary_name: transformers\n---\n# card").save(tmp_path / folder / "README.md")
    (tmp_path / "first" / "generation_config.json").write_text("{}")
    (tmp_path / "first" / "vocab.txt").write_text("[PAD]\n")
    repo = tmp_path / "hub" / "user" / "m"
    inputs = tiny.inputs("bert")

    def served() -> torch.Tensor:
        with torch.no_grad():
            return transformers.AutoModelForSequenceClassification.from_pretrained(repo)(**inputs).logits

    assert main(["push", str(tmp_path / "first"), "user/m"]) == 0 and not warned and not api.deleted
    (repo / "notes.md").write_text("the user's own file")
    (repo / "extra.safetensors").write_bytes(b"a file the user keeps here")
    assert main(["push", str(tmp_path / "second"), "user/m"]) == 0
    assert sorted(api.deleted) == ["generation_config.json", "model.safetensors"]
    assert "removed the files of an earlier upload" in warned[0] and "model.safetensors" in warned[0]
    assert api.parents == [None, "commit-1"]  # the second commit on the head its listing saw
    with torch.no_grad():
        assert torch.equal(served(), second(**inputs).logits)
    shards = sorted(p.name for p in repo.glob("model-*.safetensors"))
    assert main(["push", str(tmp_path / "first"), "user/m"]) == 0  # and back: the index and its shards go
    assert sorted(api.deleted[2:]) == sorted([*shards, "model.safetensors.index.json"])
    with torch.no_grad():
        assert torch.equal(served(), first(**inputs).logits)
    assert all((repo / name).exists() for name in ("notes.md", "extra.safetensors", "vocab.txt"))


def test_a_push_with_a_tokenizer_removes_the_earlier_upload_s_other_tokenizer_files(tmp_path, monkeypatch):
    """An earlier upload's added_tokens.json or chat template left beside the new tokenizer would
    change it (a token past the new model's embeddings, another model's template)."""
    from transformers import AutoTokenizer

    api = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    _pushable(tmp_path / "ckpt")
    tokenizer = tiny.tokenizer()
    tokenizer.save_pretrained(tmp_path / "ckpt")
    repo = tmp_path / "hub" / "user" / "m"
    repo.mkdir(parents=True)
    (repo / "added_tokens.json").write_text('{"zzznewtoken": 64}')
    (repo / "chat_template.jinja").write_text("{% for m in messages %}OLD {{ m.content }}{% endfor %}")
    (repo / "additional_chat_templates").mkdir()
    (repo / "additional_chat_templates" / "old.jinja").write_text("OLD")
    (repo / "notes.md").write_text("the user's own file")
    # transformers 5 saves named chat templates in a folder of their own: uploaded with the tokenizer
    (tmp_path / "ckpt" / "additional_chat_templates").mkdir()
    (tmp_path / "ckpt" / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    assert main(["push", str(tmp_path / "ckpt"), "user/m"]) == 0
    assert sorted(api.deleted) == ["added_tokens.json", "additional_chat_templates/old.jinja", "chat_template.jinja"]
    assert (repo / "notes.md").exists() and (repo / "additional_chat_templates" / "tool_use.jinja").read_text() == \
        "{{ messages }}"
    served, pushed = AutoTokenizer.from_pretrained(repo), AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert len(served) == len(pushed) == len(tokenizer) and served.chat_template == pushed.chat_template
    # a folder with no vocabulary of its own (a template alone) keeps the repository's tokenizer
    for name in os.listdir(tmp_path / "ckpt"):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "additional")):
            shutil.rmtree(tmp_path / "ckpt" / name) if name.startswith("additional") else os.remove(tmp_path / "ckpt" / name)
    (tmp_path / "ckpt" / "chat_template.jinja").write_text("{{ messages }}")
    before = {p.name for p in repo.iterdir()}
    assert main(["push", str(tmp_path / "ckpt"), "user/m"]) == 0
    assert {p.name for p in repo.iterdir()} == before | {"chat_template.jinja"} and len(api.deleted) == 3
    assert len(AutoTokenizer.from_pretrained(repo)) == len(tokenizer)


def test_push_refuses_a_repository_holding_a_peft_adapter(tmp_path, capsys, monkeypatch):
    """transformers (with peft) would load the adapter and its base model from it, not the pushed model."""
    api = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    _pushable(tmp_path / "ckpt")
    assert main(["push", str(tmp_path / "ckpt"), "user/m"]) == 0
    (tmp_path / "hub" / "user" / "m" / "adapter_config.json").write_text("{}")
    assert main(["push", str(tmp_path / "ckpt"), "user/m"]) == 2
    assert "user/m holds adapter_config.json (a peft adapter)" in one_error(capsys)
    assert len(api.commits) == 1


def test_push_private_refuses_an_existing_public_repository(tmp_path, capsys, monkeypatch):
    """``create_repo`` leaves an existing repository's visibility as it is: --private must not upload
    into a public one; a new repository is created private, and pushing to it again is fine."""
    api = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    _pushable(tmp_path / "ckpt")
    assert main(["push", str(tmp_path / "ckpt"), "user/public"]) == 0
    assert main(["push", str(tmp_path / "ckpt"), "user/public", "--private"]) == 2
    assert "user/public exists and is public: private=True (--private) does not make" in one_error(capsys)
    assert len(api.commits) == 1
    for _ in range(2):
        assert main(["push", str(tmp_path / "ckpt"), "user/secret", "--private"]) == 0
    assert api.private == {"user/public": False, "user/secret": True} and len(api.commits) == 3


@pytest.mark.parametrize("name", ["vocab.txt", "config.json", "model.safetensors", "notes.txt"])
def test_push_never_follows_a_symbolic_link(tmp_path, capsys, monkeypatch, name):
    """A link in the folder (here to a file outside it) is refused if it would be uploaded, and
    left out otherwise: its target is never read into a commit."""
    api = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    out = tmp_path / "ckpt"
    _pushable(out)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / name
    if (out / name).exists():
        (out / name).rename(target)
    else:
        target.write_text("private")
    (out / name).symlink_to(target)
    code = main(["push", str(out), "user/x"])
    if name == "notes.txt":
        assert code == 0 and "not uploading notes.txt" in capsys.readouterr().out
        assert "notes.txt" not in api.commits[0]
    else:
        assert code == 2 and api.commits == []
        assert f"{out / name} is a symbolic link (to {target}): push uploads plain files only" in one_error(capsys)


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (bytes(range(256)) * 8, "cannot be read as tsv")])
def test_empty_or_binary_data_file(project, capsys, content, message):
    (project / "bad.tsv").write_bytes(content)
    assert run(["compress", str(project / "models" / "tiny"), str(project / "out"), "--data", str(project / "bad.tsv")]) == 2
    error = one_error(capsys)
    assert message in error and "bad.tsv" in error


def test_nan_weight_names_the_layer(project, capsys):
    model = tiny.build("bert")
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    tiny.save(model, project / "nan")
    assert run(["compress", str(project / "nan"), str(project / "out"), "--method", "svd"]) == 2
    # said before any decomposition, the same on every device (CUDA's eigh raises on NaN)
    assert "layer 'encoder.layer.1.output.dense' has non-finite weights (NaN or inf)" in one_error(capsys)
    assert not (project / "out").exists()


@pytest.mark.parametrize("deleted", ["bert.embeddings.word_embeddings.weight", "classifier.weight"])
def test_a_dense_model_missing_a_tensor_is_refused_not_compressed_with_random_weights(project, capsys, deleted):
    from safetensors.torch import load_file, save_file

    weights = project / "models" / "tiny" / "model.safetensors"
    tensors = load_file(weights)
    del tensors[deleted]
    save_file(tensors, weights, metadata={"format": "pt"})
    assert run(["compress", str(project / "models" / "tiny"), str(project / "out"), "--method", "svd"]) == 2
    assert f"the tensor '{deleted}' is missing from the checkpoint's weights" in one_error(capsys)
    assert not (project / "out").exists()


def test_a_non_finite_weight_is_refused_before_any_pass():
    """Found before the statistics' time is spent, and by every process at once (one process's solve
    finding it would leave the others waiting in its broadcast)."""
    from stats_worker import case_inputs

    from hf_wsvd.tasks import per_example_loss, task_of

    model, loader, _, _ = case_inputs("llama_causal_lm", 4, 2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    calls = []

    def loss_fn(model, batch):
        calls.append(batch)
        return per_example_loss(task_of(model))(model, batch)

    refused = r"^layer 'layers.1.mlp.down_proj' has non-finite weights \(NaN or inf\)"
    with pytest.raises(FloatingPointError, match=refused):
        compress(model, WSVDConfig(method="fisher_whiten", param_ratio=0.5), loader, loss_fn=loss_fn, show_progress=False)
    with pytest.raises(FloatingPointError, match=refused):  # Q + L takes its own path, checked the same
        compress(model, WSVDConfig(method="quantized_residual", quantize="int4", quantize_group_size=16, residual_rank=4),
                 loader, loss_fn=loss_fn, show_progress=False)
    # A damaged parameter outside the target layers is named too, not blamed on a layer's statistics.
    for name in ("model.embed_tokens.weight", "model.layers.1.post_attention_layernorm.weight"):
        model, loader, _, _ = case_inputs("llama_causal_lm", 4, 2)
        with torch.no_grad():
            model.get_parameter(name).view(-1)[3] = float("nan")
        with pytest.raises(FloatingPointError, match=f"^the parameter '{name}' has non-finite values"):
            compress(model, WSVDConfig(method="fisher_whiten", param_ratio=0.5), loader, loss_fn=loss_fn,
                     show_progress=False)
    assert calls == []


def test_a_non_finite_offloaded_weight_is_refused_where_it_is_read():
    """accelerate keeps an offloaded block's weights off the model (meta) until they are read: the
    up-front check cannot see them, the solve's read does, with the same message."""
    from stats_worker import case_inputs, offload_one_block

    model, loader, _, _ = case_inputs("llama_causal_lm", 4, 2)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    offload_one_block(model)
    with pytest.raises(FloatingPointError, match=r"^layer 'layers.1.self_attn.o_proj' has non-finite weights"):
        compress(model, WSVDConfig(method="svd", param_ratio=0.5, allocation="uniform"), show_progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_all_finite_sees_one_nan_or_inf_anywhere(dtype):
    """What the load check and compress read: a single bad value, at either end or inside."""
    from hf_wsvd.runtime.modeling_wsvd import all_finite

    weight = torch.randn(5, 7).to(dtype)
    assert all_finite(weight) and all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.ones(3, dtype=torch.int8))
    cases = (((0, 0), float("inf")), ((4, 6), float("-inf")), ((2, 3), float("nan")))
    for index, value in cases[2:] if dtype == torch.float8_e4m3fn else cases:  # it has no infinity (saturates)
        bad = weight.float()
        bad[index] = value
        assert not all_finite(bad.to(dtype)), (index, value)


def test_all_finite_reads_packed_4bit_weights_through_their_scales():
    """bitsandbytes' Params4bit holds packed codes, stored in any dtype (bfloat16 under FSDP-QLoRA),
    where a bit pattern can read as NaN: what says whether its values are finite is the scales of its
    quant_state (double quantization: those of state2 too)."""
    from types import SimpleNamespace

    from hf_wsvd.runtime.modeling_wsvd import all_finite

    class Packed(torch.nn.Parameter):  # stands in for bitsandbytes' Params4bit (needs CUDA)
        pass

    packed = Packed(torch.full((4, 2), float("nan"), dtype=torch.bfloat16), requires_grad=False)
    packed.quant_state = SimpleNamespace(absmax=torch.ones(2), state2=None)
    assert all_finite(packed)
    packed.quant_state.absmax[1] = float("inf")
    assert not all_finite(packed)
    packed.quant_state = SimpleNamespace(absmax=torch.ones(2, dtype=torch.uint8),
                                         state2=SimpleNamespace(absmax=torch.tensor([1.0, float("nan")])))
    assert not all_finite(packed)


def test_a_failed_or_non_finite_decomposition_names_the_layer():
    """Statistics or weights that a decomposition cannot take: the error says which layer, whether
    the decomposition raises (CUDA's eigh on NaN; CPU's here) or returns non-finite factors."""
    import dataclasses

    from hf_wsvd.solvers import SOLVERS, LayerProblem

    svd, problem = SOLVERS["svd"], LayerProblem("layers.0.fc", torch.randn(6, 5, dtype=torch.float64), 2, None)
    raising = dataclasses.replace(svd, solve=lambda problem: torch.linalg.cholesky(-torch.eye(2)))
    with pytest.raises(torch.linalg.LinAlgError, match=r"^'layers.0.fc': linalg\.cholesky"):
        raising.finite_solve(problem)
    silent = dataclasses.replace(svd, solve=lambda problem: (torch.full((6, 2), float("nan")), torch.ones(2, 5)))
    with pytest.raises(FloatingPointError, match="svd produced non-finite factors for 'layers.0.fc'"):
        silent.finite_solve(problem)


def test_batches_without_labels_through_the_api():
    model = tiny.build("bert")
    batch = {k: v for k, v in tiny.inputs("bert").items()}
    with pytest.raises(ValueError, match="no 'labels'"):
        compress(model, WSVDConfig(method="fwsvd", param_ratio=0.5), [batch], show_progress=False)


def test_mistyped_local_model_path_fails_at_once(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    for path in ["./models/tinyy", "models/tinyy", "../proj/models/tinyy"]:
        start = time.monotonic()
        assert run(["compress", path, "out", "--method", "svd"]) == 2
        assert time.monotonic() - start < 5
        assert f"model folder {path!r} does not exist" in one_error(capsys)


@pytest.mark.parametrize("argv, message", [
    (["eval", "M", "--data", "D", "--num-samples", "0"], "argument --num-samples: 0 is not a positive integer"),
    (["compress", "M", "O", "--max-kept-ratio-for-speed", "2"], "max kept ratio for speed 2.0 is outside (0, 1]"),
])
def test_bad_numbers_are_named(capsys, argv, message):
    assert run(argv) == 2
    assert message in one_error(capsys)


def test_eval_of_an_empty_split_is_one_line(project, capsys):
    (project / "header.tsv").write_text("sentence\tlabel\n")
    assert run(["eval", str(project / "models" / "tiny"), "--data", str(project / "header.tsv")]) == 2
    error = one_error(capsys)
    assert "header.tsv" in error and "holds no rows, only a header" in error


def test_card_states_the_examples_actually_used(project):
    out = project / "out"
    assert main(["compress", str(project / "models" / "tiny"), str(out), "--data", str(project / "train.tsv"),
                 "--num-samples", "512"]) == 0
    text = (out / "README.md").read_text()
    assert f"train.tsv` ({len(ROWS)} examples," in text and "512 examples" not in text


def test_huge_weights_with_lp_are_one_line(project, capsys):
    model = tiny.build("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] = 3e38
    tiny.save(model, project / "huge")
    assert run(["compress", str(project / "huge"), str(project / "out"), "--method", "lp"]) == 2
    error = one_error(capsys)
    assert "decomposition failed" in error or "NaN or inf" in error, error


def _causal_lm(root, arch: str = "gpt2", **overrides):
    """A tiny dense causal LM and a compressed copy of it, saved under ``root``; returns their paths."""
    import copy

    dense = tiny.build(arch, **overrides)
    ids = torch.randint(len(tiny.SPECIALS), dense.config.vocab_size, (8, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 12, dtype=torch.long), "labels": ids[i:i + 4]}
               for i in (0, 4)]
    compressed, _ = compress(copy.deepcopy(dense), WSVDConfig(method="whiten", param_ratio=0.5), batches,
                             show_progress=False)
    return tiny.save(dense, root / f"{arch}-dense"), tiny.save(compressed, root / f"{arch}-compressed")


@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n"], ids=["empty", "blank lines"])
def test_text_without_words_names_the_file_for_a_causal_lm(tmp_path, capsys, content):
    dense, _ = _causal_lm(tmp_path, "llama")
    (tmp_path / "blank.txt").write_text(content)
    for argv in (["compress", str(dense), str(tmp_path / "out"), "--data"], ["eval", str(dense), "--data"]):
        assert run([*argv, str(tmp_path / "blank.txt")]) == 2
        error = one_error(capsys)
        assert f"data file {str(tmp_path / 'blank.txt')!r}" in error and ("holds no text" in error or "is empty" in error)
    assert not (tmp_path / "out").exists()


def test_sequences_longer_than_the_position_table_are_named(tmp_path, capsys):
    """GPT-2 learns 64 positions here: --max-length 100 is refused before any forward pass, in
    compress, eval and heal."""
    dense, compressed = _causal_lm(tmp_path)
    (tmp_path / "text.txt").write_text("the movie was good and the plot was great\n" * 200)
    text = ["--data", str(tmp_path / "text.txt"), "--max-length", "100"]
    for argv in (["compress", str(dense), str(tmp_path / "out")], ["eval", str(dense)],
                 ["heal", str(compressed), str(tmp_path / "out"), "--teacher", str(dense), "--heldout-blocks", "1"]):
        assert run([*argv, *text]) == 2
        error = one_error(capsys)
        assert "--max-length 100 exceeds the model's 64 positions (max_position_embeddings)" in error, error
    assert run(["eval", str(dense), *text[:2], "--max-length", "64"]) == 0  # the whole table is usable


def test_token_ids_beyond_the_embeddings_are_named(tmp_path, capsys):
    """A model with fewer token embeddings than its tokenizer's ids (or eval --tokenizer of another
    vocabulary) fails with the two numbers, not an IndexError."""
    dense, _ = _causal_lm(tmp_path, vocab_size=20)
    (tmp_path / "text.txt").write_text("the movie was good and the plot was great\n" * 20)
    assert run(["eval", str(dense), "--data", str(tmp_path / "text.txt"), "--max-length", "8"]) == 2
    largest = max(tiny.tokenizer()("the movie was good and the plot was great")["input_ids"] + [tiny.tokenizer().eos_token_id])
    assert f"the tokenizer's ids go up to {largest} but the model has 20 token embeddings" in one_error(capsys)
    # a classifier without its own tokenizer, given one of another vocabulary
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngreat plot\t1\nawful\t0\n")
    tiny.save(tiny.build("bert", vocab_size=20), tmp_path / "small-bert", with_tokenizer=False)
    tiny.tokenizer().save_pretrained(tmp_path / "tokenizer")
    assert run(["eval", str(tmp_path / "small-bert"), "--data", str(tmp_path / "dev.tsv"),
                "--tokenizer", str(tmp_path / "tokenizer")]) == 2
    assert "but the model has 20 token embeddings: use the model's own tokenizer" in one_error(capsys)


@pytest.mark.parametrize("arch, longest", [("bert", 64), ("roberta", 69), ("gpt2", 64), ("llama", None)])
def test_the_position_bound_reads_the_learned_table(arch, longest):
    from hf_wsvd.data import positions

    for model in (tiny.build(arch), tiny.compressed(arch)[0]):  # factorized models keep their table
        bound = positions(model)
        assert (bound.longest if bound else None) == longest
        assert bound is None or bound.field == "max_position_embeddings"


def test_dot_dot_after_a_symbolic_link_is_read_as_the_system_reads_it(project, monkeypatch, capsys):
    """``link/../out`` is ``out`` beside the link's target, not beside the link: taken textually, the
    input's own folder would pass as a fresh output, and the result would land somewhere else."""
    (project / "models" / "tiny" / "sub").mkdir()
    (project / "into_input").symlink_to(project / "models" / "tiny" / "sub")
    monkeypatch.chdir(project)
    before = snapshot(project)
    assert run(["compress", "models/tiny", "into_input/../out", "--method", "svd"]) == 2
    assert "lies inside the input" in one_error(capsys)
    assert snapshot(project) == before

    (project / "loop").symlink_to(project / "loop")
    with pytest.raises(ValueError, match="/loop' is a symbolic link that leads nowhere"):
        check_output(None, "loop/out", overwrite=False)

    elsewhere = project.parent / "elsewhere"
    (elsewhere / "deep").mkdir(parents=True)
    (project / "away").symlink_to(elsewhere / "deep")
    with check_output(None, "away/../out", overwrite=False) as claim, claim.write("test") as staging:
        with open(os.path.join(staging, "result.txt"), "w") as handle:
            handle.write("x")
    assert (elsewhere / "out" / "result.txt").read_text() == "x"
    assert not (project / "out").exists()


def test_an_output_folder_keeps_the_mode_and_group_the_user_gave_it(tmp_path):
    out = tmp_path / "private"
    out.mkdir()
    default = os.stat(out).st_gid  # what the staging folder beside it gets
    other = next((g for g in os.getgroups() if g != default), 1 if os.getuid() == 0 else None)
    if other is not None:  # a team's group (where this user may give one)
        os.chown(out, -1, other)
    os.chmod(out, 0o2750)
    group = os.stat(out).st_gid
    with check_output(None, str(out), overwrite=False) as claim, claim.write("test") as staging:
        (tmp_path / "private.txt").write_text("x")
        shutil.copy(tmp_path / "private.txt", staging)
    assert (out / "private.txt").read_text() == "x"
    assert oct(os.stat(out).st_mode & 0o7777) == oct(0o2750)
    assert os.stat(out).st_gid == group


def test_a_mount_point_is_refused_as_output_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "volume"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: os.path.abspath(path) == str(out) or real(path))
    with pytest.raises(ValueError, match="output folder .*volume' is a mount point, which the finished result "
                                         "cannot be moved onto: name a folder inside it"):
        check_output(None, str(out), overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["volume"]  # no staging folder made beside it


@pytest.mark.parametrize("environment, writes", [({"RANK": "1"}, True), ({"RANK": "1", "WORLD_SIZE": "1"}, True),
                                                 ({"RANK": "0", "WORLD_SIZE": "2"}, True),
                                                 ({"RANK": "1", "WORLD_SIZE": "2"}, False)])
def test_only_a_launch_s_other_ranks_do_not_write_and_say_so_in_one_line(tmp_path, monkeypatch, environment, writes):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with check_output(None, str(tmp_path / "out"), overwrite=False) as claim:
        if writes:
            claim.check_writer("export")
        else:
            with pytest.raises(ValueError, match=r"hf-wsvd export runs in one process, and this one is rank 1 of 2 "
                                                 r"processes \(torchrun or accelerate launch\): start it without"):
                claim.check_writer("export")
