"""Where ``hf-wsvd compress`` and ``export`` write: refuse an OUTPUT that would lose something the
user owns, replace an earlier hf-wsvd output atomically, and recover from a replacement that was
killed midway.

A replacement writes the new folder into ``.hf-wsvd-<pid>-<token>-new-<h>`` next to OUTPUT
(``<h>`` identifies OUTPUT's name), renames OUTPUT aside to ``...-old-<h>``, renames the new folder
in, then deletes the old one. Killed at any point, the folders say what happened: a later run for
the same OUTPUT puts the old folder back if OUTPUT is missing, and deletes the leftovers of dead
processes (the pid in the name tells which are live).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from typing import Iterator

# Written last into every output, so that --overwrite can tell an hf-wsvd output from a user's
# folder; it lists the files the output held when written.
MARKER = ".hf-wsvd-output.json"
_STAGING = re.compile(r"\.hf-wsvd-(?P<pid>\d+)-[0-9a-f]+-(?P<kind>new|old)-(?P<target>[0-9a-f]{12})")
_active: set[str] = set()  # staging folders of this process in use


def _target_id(output: str) -> str:
    """Names the staging folders of ``output`` (any length of name fits in a file name)."""
    return hashlib.sha1(os.path.basename(output).encode()).hexdigest()[:12]


def _is_live(pid: int, path: str) -> bool:
    if pid == os.getpid():
        return path in _active
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _stale(output: str) -> dict[str, list[str]]:
    """The staging folders of ``output`` left by dead processes, by kind (``new``/``old``)."""
    parent, target = os.path.dirname(output), _target_id(output)
    found: dict[str, list[str]] = {"new": [], "old": []}
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = _STAGING.fullmatch(name)
        path = os.path.join(parent, name)
        if match and match["target"] == target and not _is_live(int(match["pid"]), path):
            found[match["kind"]].append(path)
    return found


def recover(output: str | os.PathLike) -> None:
    """Finish what a killed replacement of ``output`` left: put the old output back if ``output``
    is missing, and delete the staging folders of dead processes."""
    output = os.path.abspath(output)
    stale = _stale(output)
    if stale["old"] and not os.path.lexists(output):
        os.replace(stale["old"].pop(), output)
        print(f"hf-wsvd: restored {output} from an interrupted --overwrite", file=sys.stderr)
    for path in stale["new"] + stale["old"]:
        shutil.rmtree(path, ignore_errors=True)


def _contains(outer: str, inner: str) -> bool:
    return os.path.commonpath([outer, inner]) == outer


def foreign_files(folder: str) -> list[str]:
    """The entries of ``folder`` that hf-wsvd did not write (all of them when it holds no
    hf-wsvd output). An output is recognized by its marker file, or, for a checkpoint written by
    ``save_pretrained`` alone, by ``model_type: "hf_wsvd"`` and files of a checkpoint only."""
    entries = sorted(os.listdir(folder))
    try:
        with open(os.path.join(folder, MARKER)) as handle:
            written = set(json.load(handle)["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        from .hub import is_checkpoint_file

        try:
            with open(os.path.join(folder, "config.json")) as handle:
                factorized = json.load(handle).get("model_type") == "hf_wsvd"
        except (OSError, ValueError, AttributeError):
            factorized = False
        written = {e for e in entries if is_checkpoint_file(e)} if factorized else set()
    return [e for e in entries if e not in written]


def check_output(source: str | None, output: str, overwrite: bool) -> None:
    """Refuse, before any work, an OUTPUT that would lose something or cannot be written: one that
    is, contains or lies inside the input ``source``; that is or contains the current directory;
    a non-empty folder that is not an earlier hf-wsvd output (or one without ``overwrite``); a file,
    a symlink, or a place whose parent cannot be created or written."""
    path = os.path.abspath(output)
    real = os.path.realpath(path)
    for name, what, may_hold_output in ((source, f"the input {source!r}", True),
                                        (os.getcwd(), "the current directory", False)):
        if not name or not os.path.exists(name):
            continue  # a Hub id
        guarded = os.path.realpath(name)
        inside = may_hold_output and os.path.isdir(guarded) and _contains(guarded, real)
        if _contains(real, guarded) or inside:
            relation = "is" if real == guarded else "lies inside" if inside else "contains"
            raise ValueError(f"output folder {output!r} {relation} {what}; choose a folder outside it")
    recover(path)
    if os.path.islink(path):
        raise ValueError(f"output {output!r} is a symbolic link; name the real folder")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"output {output!r} is a file, not a folder")
    if os.path.isdir(path) and os.listdir(path):
        foreign = foreign_files(path)
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ValueError(f"output folder {output!r} holds files hf-wsvd did not write ({shown}); "
                             "choose another folder (--overwrite replaces only earlier hf-wsvd outputs)")
        if not overwrite:
            raise ValueError(f"output folder {output!r} is not empty; choose another or pass --overwrite")
    existing = os.path.dirname(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"cannot create output folder {output!r}: {existing!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write output folder {output!r}: {existing!r} is not writable")


def _write_marker(folder: str, command: str) -> None:
    from . import __version__

    record = {"written_by": f"hf-wsvd {__version__}", "command": command, "files": sorted(os.listdir(folder))}
    with open(os.path.join(folder, MARKER), "w") as handle:
        json.dump(record, handle, indent=1)


def _staging_path(output: str, kind: str) -> str:
    name = f".hf-wsvd-{os.getpid()}-{secrets.token_hex(4)}-{kind}-{_target_id(output)}"
    return os.path.join(os.path.dirname(output), name)


@contextlib.contextmanager
def staged_output(output: str | os.PathLike, command: str) -> Iterator[str]:
    """A fresh folder next to ``output`` to write into (normal permissions: the umask applies).
    When the block succeeds it gets the marker file and atomically takes ``output``'s place (an
    earlier output is renamed aside, the new one renamed in, then the old one deleted); when it
    fails, ``output`` is left as it was. Call :func:`check_output` first."""
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    staging = _staging_path(output, "new")
    os.mkdir(staging)
    _active.add(staging)
    try:
        yield staging
        _write_marker(staging, command)
        _swap_in(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _active.discard(staging)


def _swap_in(staging: str, output: str) -> None:
    """Rename ``output`` (if any) aside, ``staging`` in, then delete the old output; a failed
    rename puts the old output back."""
    aside = _staging_path(output, "old") if os.path.lexists(output) else None
    if aside:
        _active.add(aside)
        os.replace(output, aside)
    try:
        os.replace(staging, output)
    except BaseException:
        if aside:
            os.replace(aside, output)
        raise
    finally:
        _active.discard(aside)
    if aside:
        shutil.rmtree(aside)
