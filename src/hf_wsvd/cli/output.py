"""Where ``hf-wsvd compress``, ``heal`` and ``export`` write: refuse an OUTPUT that would lose
something the user owns, replace an earlier hf-wsvd output atomically, never replace one that
changed while the run worked, refuse two runs into one OUTPUT, and recover from a replacement that
was killed midway.

A run claims OUTPUT at its start by creating its staging folder
``.hf-wsvd-<space>-<pid>-<started>t<token>-new-<h>`` next to it (``<h>`` identifies OUTPUT's name,
``<space>`` the machine where ``<pid>`` lives, ``<started>`` when that process started, so that a
pid taken over by another process is not mistaken for the run; a second run seeing a live one, or
one of another machine or container, whose pid it cannot check, is refused and told what that
folder holds) and writes the result there. To replace OUTPUT it renames OUTPUT aside to ``...-old-<h>``, checks that the folder renamed aside is exactly what was checked at the
start (else puts it back and keeps the result under a visible name), renames the new folder in,
then deletes the old one. Killed at any point, the folders say what happened: a later run for the
same OUTPUT puts the old folder back if OUTPUT is missing, and deletes the leftovers of dead
processes of this machine (the pid in the name tells which are live; a container restarted under
its name recovers what its killed run left).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from typing import Iterator, Sequence

# Written last into every output, so that --overwrite can tell an hf-wsvd output from a user's
# folder; it lists the files the output held when written, each with a fingerprint of its sizes and
# modification times, so that a file the user saved over since (a fine-tune saved back) is theirs.
MARKER = ".hf-wsvd-output.json"
_STAGING = re.compile(r"\.hf-wsvd-(?:(?P<host>[0-9a-f]{8})-)?(?P<pid>\d+)-(?:(?P<started>[0-9a-f]+)t)?[0-9a-f]+-"
                      r"(?P<kind>new|old)-(?P<target>[0-9a-f]{12})")
_active: set[str] = set()  # staging folders of this process in use
# How the tokenizers library ends the message of a failed system call: "... (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
logger = logging.getLogger(__name__)
# What ends a run besides Ctrl-C: kill, a scheduler, docker stop; a closed terminal or ssh session.
ENDING_SIGNALS = (signal.SIGTERM,) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


def _full_disk(error: Exception, staging: str) -> int | None:
    """The error number of a write that ran out of room (a full disk or quota), however it was
    reported: an OSError about a file of ``staging`` (or of no file), or the Rust libraries'
    (tokenizers, safetensors) text ending in "(os error N)"; else None."""
    if isinstance(error, OSError):  # about a file of the staging folder, not the cache or a temporary file
        named = error.filename is None or _contains(staging, os.path.abspath(os.fsdecode(error.filename)))
        code = error.errno if named else None
    else:
        found = _RUST_OS_ERROR.search(str(error))
        code = int(found.group(1)) if found else None
    return code if code in (errno.ENOSPC, errno.EDQUOT) else None


def _target_id(output: str) -> str:
    """Names the staging folders of ``output`` (any length of name fits in a file name)."""
    return hashlib.sha1(os.path.basename(output).encode()).hexdigest()[:12]


def _process_space() -> str:
    """Names where this process's pids can be checked: its machine (another container, another host
    sharing the folder over NFS, has another name). Not the pid namespace: a restarted container keeps
    its name and must recover what its killed run left."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _is_live(match: re.Match, path: str) -> bool:
    """Whether the run that made the staging folder ``path`` (its name parsed by ``_STAGING``) may
    still live: a run of another machine or container counts as live (it cannot be checked)."""
    if match["host"] not in (None, _process_space()):
        return True
    pid = int(match["pid"])
    if pid == os.getpid():
        return path in _active
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    # The name records when its run started: a process started at another time took a dead run's pid.
    started = _start_ticks(pid)
    return match["started"] is None or started is None or int(match["started"], 16) == started


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot, where ``/proc`` says; else None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
    except (OSError, ValueError, IndexError):
        return None


def _stale(output: str) -> dict[str, list[str]]:
    """The staging folders of ``output`` left by dead processes, by kind (``new``/``old``)."""
    parent, target = os.path.dirname(output), _target_id(output)
    found: dict[str, list[str]] = {"new": [], "old": []}
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = _STAGING.fullmatch(name)
        path = os.path.join(parent, name)
        if match and match["target"] == target and not _is_live(match, path):
            found[match["kind"]].append(path)
    return found


def recover(output: str | os.PathLike) -> None:
    """Finish what a killed replacement of ``output`` left: put the old output back if ``output``
    is missing, and delete the staging folders of dead processes."""
    output = _place(output)
    stale = _stale(output)
    if stale["old"]:
        old = stale["old"].pop()
        if os.path.isdir(output) and not os.path.islink(output) and not os.listdir(output):
            os.rmdir(output)  # made again, empty, meanwhile (a script's mkdir -p): it holds nothing
        if not os.path.lexists(output):
            os.replace(old, output)
            print(f"hf-wsvd: restored {output} from an interrupted --overwrite", file=sys.stderr)
        else:  # something else took its place: the previous output goes where no run deletes it
            kept = _kept_path(output, "previous")
            os.replace(old, kept)
            print(f"hf-wsvd: {output!r} was recreated after an interrupted --overwrite; its previous content is in "
                  f"{kept!r}", file=sys.stderr)
    for path in stale["new"] + stale["old"]:
        shutil.rmtree(path, ignore_errors=True)


def _place(output: str | os.PathLike) -> str:
    """The absolute path of ``output`` as the system reads it: its parent's symbolic links and ``..``
    resolved in order (``abspath`` alone takes ``link/../out`` as ``out`` beside ``link``), its last
    name kept, so that a symbolic link named as OUTPUT stays one."""
    raw = os.path.join(os.getcwd(), os.fspath(output))
    parent, name = os.path.split(raw.rstrip(os.sep) or os.sep)
    if name in ("", os.curdir, os.pardir):
        return os.path.realpath(raw)
    return os.path.join(os.path.realpath(parent), name)


def _contains(outer: str, inner: str) -> bool:
    return os.path.commonpath([outer, inner]) == outer


def foreign_files(folder: str) -> list[str]:
    """The entries of ``folder`` that hf-wsvd did not write, or that changed since it wrote them (all
    of them when it holds no hf-wsvd output). An output is recognized by its marker file, or, for a
    checkpoint written by ``save_pretrained`` alone, by ``model_type: "hf_wsvd"`` and files of a
    checkpoint only."""
    entries = sorted(os.listdir(folder))
    try:
        with open(os.path.join(folder, MARKER)) as handle:
            record = json.load(handle)
        written = set(record["files"]) | {MARKER}
        stamps = record.get("fingerprints") or {}  # absent from markers written before they were recorded
        written -= {n for n in written & set(stamps) if _fingerprint(os.path.join(folder, n)) != stamps[n]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        from ..integrations.checkpoint import folder_model_type
        from ..integrations.hub import checkpoint_files
        from ..runtime.modeling_wsvd import MODEL_TYPE

        try:
            factorized = folder_model_type(folder) == MODEL_TYPE
        except ValueError:  # a damaged config.json: not recognized as an output
            factorized = False
        written = set(checkpoint_files(folder)) if factorized else set()
    return [e for e in entries if e not in written]


def _state(path: str) -> tuple:
    """What is at ``path``, to tell later whether it changed: ``()`` for nothing or an empty
    folder; else every entry below it with its type, size, modification time and inode."""
    if not os.path.lexists(path):
        return ()
    if os.path.islink(path) or not os.path.isdir(path):
        info = os.lstat(path)
        return (("", stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, info.st_ino),)
    entries = []
    for root, folders, files in os.walk(path):
        for name in folders + files:
            full = os.path.join(root, name)
            info = os.lstat(full)
            entries.append((os.path.relpath(full, path), stat.S_IFMT(info.st_mode), info.st_size,
                            info.st_mtime_ns, info.st_ino))
    return tuple(sorted(entries))


def _fingerprint(path: str) -> str:
    """The types, sizes and modification times of what is at ``path`` (not inodes: the output is
    renamed into place after its marker is written), hashed."""
    return hashlib.sha1(repr([entry[:4] for entry in _state(path)]).encode()).hexdigest()


def _difference(before: tuple, after: tuple) -> str:
    """``after`` against ``before`` (see :func:`_state`) in a few words, naming an entry."""
    old, new = {e[0]: e for e in before}, {e[0]: e for e in after}
    for what, names in (("added", sorted(set(new) - set(old))), ("removed", sorted(set(old) - set(new))),
                        ("changed", sorted(n for n in set(old) & set(new) if old[n] != new[n]))):
        if names:
            shown = ", ".join(repr(n or ".") for n in names[:3]) + (", ..." if len(names) > 3 else "")
            return f"{what}: {shown}"
    return "changed"


class OutputChanged(FileExistsError):
    """OUTPUT changed while a run worked: it is left alone and the new result kept beside it."""


def _live_claims(output: str, own: str | None) -> list[re.Match]:
    """The staging folders (their names parsed by ``_STAGING``) of live hf-wsvd runs (or runs that
    cannot be checked), other than the folder ``own``, staging ``output``."""
    parent, target = os.path.dirname(output), _target_id(output)
    found = []
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        match = _STAGING.fullmatch(name)
        path = os.path.join(parent, name)
        if match and match["target"] == target and path != own and _is_live(match, path):
            found.append(match)
    return found


class OutputClaim:
    """An OUTPUT checked for a run (see :func:`check_output`): what was there then, and the staging
    folder next to it that the run writes into. While the claim lasts, other runs into the same
    OUTPUT are refused; :meth:`write` swaps the result in only if OUTPUT is as it was checked.
    Use it as a context manager: leaving it removes a staging folder that was not swapped in."""

    def __init__(self, output: str, state: tuple, writer: bool) -> None:
        self.output, self.state = output, state
        self.staging = _staging_path(output, "new") if writer else None
        self.created: list[str] = []  # the parent folders this claim made, outermost first
        if self.staging:
            parent = os.path.dirname(output)
            while not os.path.lexists(parent):
                self.created.insert(0, parent)
                parent = os.path.dirname(parent)
            try:
                os.makedirs(os.path.dirname(output), exist_ok=True)
                os.mkdir(self.staging)
            except OSError as error:  # named by OUTPUT: the staging folder's name means nothing to the user
                made = error.filename if error.filename not in (None, self.staging) else None
                self.staging = None
                self.release()
                what = f"the folder {made!r}" if made else "a folder beside it"
                raise OSError(error.errno, f"cannot write {output!r} ({what} could not be made: "
                                           f"{error.strerror})") from None
            _active.add(self.staging)
            others = _live_claims(output, self.staging)
            if others:
                self.release()
                match = others[0]
                if match["host"] not in (None, _process_space()):  # its pid means nothing here
                    folder = match.string
                    left = (f"{folder!r} beside it holds its previous content: rename it back if it is missing, "
                            "else delete it") if match["kind"] == "old" else f"delete {folder!r} beside it"
                    raise FileExistsError(f"a hf-wsvd run of another machine or container (pid {match['pid']} "
                                          f"there) is writing {output!r} or was killed: wait for it; if none runs, "
                                          f"{left}")
                raise FileExistsError(f"another hf-wsvd run (pid {match['pid']}) is writing {output!r}; wait for "
                                      f"it to end or choose another output folder (if no hf-wsvd run is working, "
                                      f"delete {match.string!r} beside it)")

    def __enter__(self) -> "OutputClaim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """End the claim: delete the staging folder unless it was swapped in or kept, and the parent
        folders the claim made that stayed empty (a run that failed leaves no trace)."""
        with _signals_held():  # a second Ctrl-C or a kill does not cut the cleanup short
            if self.staging:
                shutil.rmtree(self.staging, ignore_errors=True)
                _active.discard(self.staging)
            for folder in reversed(self.created):
                try:
                    os.rmdir(folder)  # only if empty: OUTPUT or a user's file there keeps it
                except OSError:
                    break
            self.created = []

    def check_writer(self, command: str) -> None:
        """Refuse, in one line, a process that does not write the output: one of rank above 0 under a
        distributed launch, where ``command`` runs in one process."""
        if not self.staging:
            raise ValueError(f"hf-wsvd {command} runs in one process, and this one is rank {os.environ.get('RANK')} "
                             f"of {os.environ.get('WORLD_SIZE')} processes (torchrun or accelerate launch): start it "
                             "without a launcher")

    @contextlib.contextmanager
    def write(self, command: str) -> Iterator[str]:
        """The staging folder to write the result into; when the block succeeds it gets the marker
        file and takes OUTPUT's place, atomically, if OUTPUT is still what was checked. Otherwise
        :class:`OutputChanged` is raised, OUTPUT is left untouched and the result kept beside it."""
        self.check_writer(command)
        try:
            yield self.staging
            _usual_permissions(self.staging)
            _write_marker(self.staging, command)
        except Exception as error:
            code = _full_disk(error, self.staging)
            if code is None:
                raise
            raise OSError(code, f"{os.strerror(code)} while writing {self.output!r}") from error
        if os.path.isdir(self.output):  # the folder the user made (or an earlier output) keeps its mode and group
            _same_access(self.staging, self.output)
        self._swap_in()

    def _swap_in(self) -> None:
        now = _state(self.output)
        if now != self.state:
            self._refuse(now)
        if not self.state:
            try:  # renaming onto nothing or an empty folder: it fails if entries appeared since
                os.replace(self.staging, self.output)
            except OSError:
                self._refuse(_state(self.output))
            return
        aside = _staging_path(self.output, "old")
        _active.add(aside)
        # From the first rename to the second OUTPUT is missing: a signal then waits until the new
        # result is in place (and says so), or the old one back.
        with _signals_held(f"hf-wsvd: {self.output!r} already held the new result when the signal came"):
            try:
                os.replace(self.output, aside)
                moved = _state(aside)  # renamed aside, nothing can be added to it any more by its path
                if moved != self.state:
                    self._put_back(aside)
                    self._refuse(moved)
                try:
                    os.replace(self.staging, self.output)
                except BaseException:
                    self._put_back(aside)
                    raise
            finally:
                _active.discard(aside)
            shutil.rmtree(aside)

    def _put_back(self, aside: str) -> None:
        """Return the folder renamed aside to OUTPUT; if OUTPUT was taken meanwhile, to a visible
        name that no later run deletes."""
        try:
            os.replace(aside, self.output)
        except OSError:
            kept = _kept_path(self.output, "previous")
            os.replace(aside, kept)
            with contextlib.suppress(OSError):  # a hung-up terminal
                print(f"hf-wsvd: {self.output!r} was recreated meanwhile; its previous content is in {kept!r}",
                      file=sys.stderr)

    def _refuse(self, now: tuple) -> None:
        kept, staging, self.staging = _kept_path(self.output, "result"), self.staging, None
        os.replace(staging, kept)
        _active.discard(staging)
        raise OutputChanged(f"output folder {self.output!r} changed while hf-wsvd ran ({_difference(self.state, now)}); "
                            f"it was left as it is and the new result saved to {kept!r}: move it where you want it")


@contextlib.contextmanager
def _signals_held(done: str | None = None) -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP are held; when the block ends normally the one that came
    (SIGTERM first, then SIGHUP) is raised again, after ``done`` is printed. Python runs signal handlers in the main
    thread only, so elsewhere nothing is held (a thread's signal mask would not do: the kernel hands
    a process's signal to any thread that does not block it)."""
    caught: list[int] = []
    with contextlib.ExitStack() as restore:
        if threading.current_thread() is threading.main_thread():
            for kind in ENDING_SIGNALS + (signal.SIGINT,):
                handler = signal.getsignal(kind)
                if handler not in (None, signal.SIG_IGN):  # set outside Python, or ignored: left as it is
                    restore.callback(signal.signal, kind, handler)  # first: restored whatever comes next
                    signal.signal(kind, lambda number, frame: caught.append(number))
        yield
    if caught:  # an error in the block ends the run anyway: its exception is not replaced
        if done:
            with contextlib.suppress(OSError):  # a hung-up terminal: the signal still comes
                print(done, file=sys.stderr)
        signal.raise_signal(next((kind for kind in ENDING_SIGNALS if kind in caught), signal.SIGINT))


def _kept_path(output: str, what: str) -> str:
    """A visible, unused name beside ``output`` for a folder hf-wsvd must not delete."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = f"{output}.hf-wsvd-{what}-{stamp}"
    suffix = 1
    while os.path.lexists(path):
        path, suffix = f"{output}.hf-wsvd-{what}-{stamp}-{suffix}", suffix + 1
    return path


def _is_writer() -> bool:
    # Under torchrun / accelerate launch (WORLD_SIZE > 1) only rank 0 writes; a RANK left in the
    # environment outside a launch makes no other process.
    try:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        processes = 1
    return processes <= 1 or os.environ.get("RANK", "0") == "0"


def check_output(sources: str | Sequence[str | None] | None, output: str | os.PathLike, overwrite: bool) -> OutputClaim:
    """Refuse, before any work, an OUTPUT that would lose something or cannot be written: one that
    is, contains or lies inside one of the inputs ``sources``; that is or contains the current
    directory; a non-empty folder that is not an earlier hf-wsvd output (or one without
    ``overwrite``); a file, a symlink, or a place whose parent cannot be created or written; one
    that another hf-wsvd run is writing. Returns the claim to write through (rank 0 only)."""
    output = str(output)
    if not output.strip():
        raise ValueError(f"output folder {output!r} is empty: name a folder")
    path = _place(output)
    real = os.path.realpath(path)
    named = [sources] if isinstance(sources, str) or sources is None else list(sources)
    guarded = [(s, f"the input {s!r}", True) for s in named if s] + [(os.getcwd(), "the current directory", False)]
    for name, what, may_hold_output in guarded:
        if not os.path.exists(name):
            continue  # a Hub id
        source = os.path.realpath(name)
        inside = may_hold_output and os.path.isdir(source) and _contains(source, real)
        if _contains(real, source) or inside:
            relation = "is" if real == source else "lies inside" if inside else "contains"
            raise ValueError(f"output folder {output!r} {relation} {what}; choose a folder outside it")
    recover(path)
    if os.path.islink(path):
        raise ValueError(f"output {output!r} is a symbolic link; name the real folder")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"output {output!r} is a file, not a folder")
    if os.path.ismount(path):  # the result is written beside OUTPUT and renamed onto it
        raise ValueError(f"output folder {output!r} is a mount point, which the finished result cannot be moved "
                         "onto: name a folder inside it")
    if os.path.isdir(path) and os.listdir(path):
        foreign = foreign_files(path)
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ValueError(f"output folder {output!r} holds files hf-wsvd did not write or that changed since "
                             f"it wrote them ({shown}); choose another folder, or delete it yourself to replace it "
                             "(--overwrite replaces only earlier hf-wsvd outputs as written)")
        if not overwrite:
            raise ValueError(f"output folder {output!r} is not empty; choose another or pass --overwrite")
    existing = os.path.dirname(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "a symbolic link that leads nowhere (a loop, or a missing target)" if os.path.islink(existing) \
            else "a file"
        raise ValueError(f"cannot create output folder {output!r}: {existing!r} is {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write output folder {output!r}: {existing!r} is not writable")
    _check_name_lengths(path, existing)
    return OutputClaim(path, _state(path), _is_writer())


def _check_name_lengths(path: str, existing: str) -> None:
    """Refuse a folder name the file system cannot hold, or too long to leave room for the names a
    run may give a folder beside it (``_kept_path``) — found now, not when the result is saved."""
    limit = os.pathconf(existing, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    names = os.path.relpath(path, existing).split(os.sep)
    for index, name in enumerate(names):
        allowed = limit - len(".hf-wsvd-previous-YYYYmmdd-HHMMSS-99") if index == len(names) - 1 else limit
        if len(os.fsencode(name)) > allowed:
            shown = name if len(name) <= 40 else f"{name[:40]}..."
            raise ValueError(f"cannot create the output folder: its name {shown!r} is {len(os.fsencode(name))} "
                             f"bytes long, at most {allowed} here")


def _usual_permissions(folder: str) -> None:
    """Give the files written into ``folder`` the permissions the umask gives new files: safetensors
    (0.8) writes its weights readable by their owner alone, which a shared model folder must not be."""
    umask = _umask()
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def _same_access(folder: str, like: str) -> None:
    """Give ``folder`` the mode bits (setgid included) and the group of the folder ``like``, where
    this process may: a private folder (0700) or a team's (2770) stays so."""
    try:
        mode = os.stat(like)
        if hasattr(os, "chown"):  # first: a change of group may clear the setgid bit the chmod then sets
            with contextlib.suppress(PermissionError):  # a group this user is not in: the mode is kept all the same
                os.chown(folder, -1, mode.st_gid)
        os.chmod(folder, stat.S_IMODE(mode.st_mode))
    except FileNotFoundError:  # gone meanwhile: the swap refuses it
        return
    except OSError as error:  # a file system without modes (some network shares): the result is kept
        logger.warning(f"could not give {folder!r} the mode and group of {like!r}: {error}")


def _umask() -> int:
    """This process's umask; read from ``/proc`` where it can be (setting it to read it would, for an
    instant, give other threads' new files no mask)."""
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1], 8) for line in handle if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
        return umask


def _write_marker(folder: str, command: str) -> None:
    from .. import __version__

    files = sorted(os.listdir(folder))
    record = {"written_by": f"hf-wsvd {__version__}", "command": command, "files": files,
              "fingerprints": {name: _fingerprint(os.path.join(folder, name)) for name in files}}
    with open(os.path.join(folder, MARKER), "w") as handle:
        json.dump(record, handle, indent=1)


def _staging_path(output: str, kind: str) -> str:
    started = _start_ticks(os.getpid())
    token = secrets.token_hex(4) if started is None else f"{started:x}t{secrets.token_hex(4)}"
    name = f".hf-wsvd-{_process_space()}-{os.getpid()}-{token}-{kind}-{_target_id(output)}"
    return os.path.join(os.path.dirname(output), name)
