"""One run per output: an exclusive lock on an output directory or file.

``prune`` and ``compare`` lock their output directory (``<dir>/.autoprune.lock``), ``train --out m.pt``
its output file (``<parent>/.m.pt.lock``), before writing anything. The lock is ``flock(LOCK_EX |
LOCK_NB)`` on the lock file, so the kernel releases it when the holder exits, however it exits (even
SIGKILL); the file also records who holds it (pid, host, start time, command) so that a refused run can
say who is in the way. A lock file left by a killed run is taken over with a warning.

Locking the same output twice in one process (nested) is refused with a clear error rather than
deadlocking or silently sharing: a second writer in the same process is as much a bug as one in another.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from autoprune.errors import AutopruneError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".autoprune.lock"
_COMMAND_LIMIT = 200

_held: dict[str, int] = {}  # lock file (real path) -> pid of this process that holds it
_held_guard = threading.Lock()


@dataclass(frozen=True)
class OutputLock:
    """A held lock: the output it protects, its lock file, and the stale holder it replaced (if any)."""

    path: Path
    lock_file: Path
    stale_holder: dict[str, Any] | None


def lock_file_for(path: str | os.PathLike[str], kind: Literal["directory", "file"]) -> Path:
    """Where the lock of an output directory or output file lives."""
    p = Path(path)
    if kind == "directory":
        return p / LOCK_NAME
    if kind == "file":
        return p.parent / f".{p.name}.lock"
    raise ValueError(f"kind must be 'directory' or 'file', got {kind!r}")


@contextlib.contextmanager
def lock_output(path: str | os.PathLike[str], *, kind: Literal["directory", "file"]) -> Iterator[OutputLock]:
    """Hold the output ``path`` exclusively for the duration of the block.

    The directory (``kind="directory"``) or the file's parent (``kind="file"``) is created if needed, and removed
    again on exit if the block left it empty (a run that failed before writing leaves nothing behind). Raises
    :class:`AutopruneError` naming the holder if another live process holds the output, or if
    the lock cannot be created. On exit the lock file is removed and the lock released.
    """
    if fcntl is None:  # pragma: no cover - Windows
        raise AutopruneError("output locking needs a POSIX system (fcntl.flock); run autoprune on Linux or macOS")
    p = Path(path)
    lock_file = lock_file_for(p, kind)
    label = f"output {'directory' if kind == 'directory' else 'file'} {str(p)!r}"
    if kind == "directory" and p.exists() and not p.is_dir():
        raise AutopruneError(f"{label} is a file; give a directory (--out)")
    if kind == "file" and p.is_dir():
        raise AutopruneError(f"{label} is a directory; give a file name (--out)")
    created = [d for d in (lock_file.parent, *lock_file.parent.parents) if not d.exists()]
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _os_error(label, "create", exc) from exc
    key = os.path.realpath(lock_file)
    with _held_guard:
        if _held.get(key) == os.getpid():
            raise AutopruneError(f"{label} is already locked by this process (lock_output is not reentrant); "
                                 "lock each output once")
        _held[key] = os.getpid()
    try:
        fd, previous = _acquire(lock_file, label)
    except BaseException:
        with _held_guard:
            _held.pop(key, None)
        raise
    try:
        stale = _stale(previous)
        _write_holder(fd, label)
        yield OutputLock(p, lock_file, stale)
    finally:
        with contextlib.suppress(OSError):
            if _same_file(fd, lock_file):
                os.unlink(lock_file)  # unlink while still holding the lock, so no one locks a doomed inode
        os.close(fd)  # releases the flock
        with _held_guard:
            _held.pop(key, None)
        for directory in created:  # innermost first; stops at the first one that is not empty
            try:
                directory.rmdir()
            except OSError:
                break


def _acquire(lock_file: Path, label: str) -> tuple[int, dict[str, Any] | None]:
    """Open and flock the lock file; return its descriptor and the record a previous holder left in it."""
    for _ in range(50):  # retried only when the file was replaced between open and flock
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _os_error(label, "lock", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd, wait=True)
            os.close(fd)
            raise AutopruneError(f"{label} is in use by another autoprune run ({_describe(holder)}); wait for it "
                                 "to finish or choose another --out") from None
        except OSError as exc:
            os.close(fd)
            raise _os_error(label, "lock", exc) from exc
        if _same_file(fd, lock_file):
            return fd, _read_holder(fd, wait=False)
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    raise AutopruneError(f"{label}: could not take its lock file {str(lock_file)!r} (it keeps being replaced); "
                         "run again")


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int, *, wait: bool) -> dict[str, Any] | None:
    """The holder's record; a holder that has just taken the lock gets a moment to write it."""
    for attempt in range(20 if wait else 1):
        try:
            data = os.pread(fd, 4096, 0)
        except OSError:
            return None
        if data.strip():
            try:
                record = json.loads(data.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                return None
            return record if isinstance(record, dict) else None
        if attempt < 19 and wait:
            time.sleep(0.01)
    return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder details not recorded"
    pid, host = _clean(holder.get("pid")), _clean(holder.get("host"))
    started, command = _clean(holder.get("started")), _clean(holder.get("command"))
    return f"pid {pid} on host {host}, started {started}: {command}"


def _clean(value: Any) -> str:
    """An untrusted field of a lock file as a short single-line string."""
    text = "?" if value is None else str(value)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text[:_COMMAND_LIMIT]


def _stale(previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record of a holder that died without releasing (its file remained); logs the take-over."""
    if not previous:
        return None
    pid = previous.get("pid")
    same_host = previous.get("host") == socket.gethostname()
    if same_host and type(pid) is int and not _alive(pid):
        log.warning("taking over a stale lock left by pid %d (no longer running)", pid)
    else:  # the kernel says no one holds it; the record is left over (e.g. pid reused, or another host)
        log.warning("taking over a stale lock left by pid %s on host %s (it no longer holds the lock)",
                    _clean(pid), _clean(previous.get("host")))
    return previous


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def _write_holder(fd: int, label: str) -> None:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else list(sys.argv[1:])
    command = " ".join(argv)
    if len(command) > _COMMAND_LIMIT:
        command = command[:_COMMAND_LIMIT - 3] + "..."
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "command": command}
    data = (json.dumps(record) + "\n").encode("utf-8")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError as exc:
        raise _os_error(label, "lock", exc) from exc


def _os_error(label: str, action: str, exc: OSError) -> AutopruneError:
    name = errno.errorcode.get(exc.errno or 0, "")
    cause = (exc.strerror or str(exc)).lower() + (f" ({name})" if name else "")
    return AutopruneError(f"cannot {action} {label}: {cause}; choose a writable location (--out) or fix its "
                          "permissions")


@dataclass(frozen=True)
class Layout:
    """What a run (or a comparison) writes into its directory, for ``--force`` to recognise it.

    Attributes:
        what: its name in messages ("run", "comparison").
        files: the regular files it writes (besides its lock and the temporary files of its atomic writes).
        markers: files of which one must exist for the directory to hold one (``run.json``, ``report.json``).
        directories: its sub-directories and the files each holds.
        subdirectory: whether a sub-directory is one of its own (a comparison's method runs).
    """

    what: str
    files: frozenset[str]
    markers: tuple[str, ...]
    directories: Mapping[str, frozenset[str]] = field(default_factory=dict)
    subdirectory: Callable[[Path], bool] | None = None

    def foreign(self, path: Path) -> list[str]:
        """The entries of ``path`` (relative names) it did not write."""
        out = []
        for entry in sorted(path.iterdir()):
            name = entry.name
            if name == LOCK_NAME:
                continue
            if entry.is_symlink():  # never followed: whatever it points to is not the run's
                out.append(name)
                continue
            if entry.is_file() and (name in self.files or _temporary(name, self.files)):
                continue
            if entry.is_dir() and name in self.directories:
                inside = self.directories[name]
                out += [f"{name}/{e.name}" for e in sorted(entry.iterdir()) if e.is_symlink() or not e.is_file()
                        or not (e.name in inside or _temporary(e.name, inside))]
                continue
            if entry.is_dir() and self.subdirectory is not None and self.subdirectory(entry):
                continue
            out.append(name)
        return out

    def holds_one(self, path: Path) -> bool:
        """Whether ``path`` holds one (a marker file) and nothing else."""
        return any((path / m).is_file() for m in self.markers) and not self.foreign(path)


def check_replaceable(path: str | os.PathLike[str], layout: Layout) -> None:
    """Refuse to replace (``--force``) a directory that holds anything autoprune did not write there.

    A directory without the layout's markers holds no run at all, and one with other entries (at any depth
    the layout knows) holds something of the user's (a dataset, notes): ``--force`` must never delete those.
    """
    p = Path(path)
    entries = [e for e in p.iterdir() if e.name != LOCK_NAME]
    if entries and not any((p / m).is_file() for m in layout.markers):
        raise AutopruneError(f"output directory {str(p)!r} is not empty and holds no autoprune {layout.what} (it "
                             f"holds {_listing(sorted(e.name for e in entries))}); choose a new or empty --out")
    others = layout.foreign(p)
    if others:
        raise AutopruneError(f"output directory {str(p)!r} holds an autoprune {layout.what} and also "
                             f"{_listing(others)}, which autoprune did not write; --force replaces only a "
                             f"{layout.what}: move those out or choose another --out")


def _temporary(name: str, names: set[str]) -> bool:
    """Whether ``name`` is a temporary file of an atomic write of one of ``names`` (``.NAME.XXXX.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in names)


def _listing(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more


def clear_directory(path: str | os.PathLike[str], keep: Iterable[str] = (LOCK_NAME,)) -> None:
    """Delete everything inside the locked output directory ``path`` except the names in ``keep`` (``--force``).

    The caller must hold :func:`lock_output` on ``path`` (this process), so ``--force`` can never delete
    a directory that another live run is writing; otherwise this raises ``RuntimeError`` (a bug).
    Symbolic links are removed, not followed.
    """
    p = Path(path)
    with _held_guard:
        held = _held.get(os.path.realpath(p / LOCK_NAME)) == os.getpid()
    if not held:
        raise RuntimeError(f"clear_directory({str(p)!r}) called without holding lock_output on it")
    keep = set(keep)
    try:
        for entry in p.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as exc:
        where = exc.filename or p
        raise AutopruneError(f"cannot clear output directory {str(p)!r} (--force): {str(where)!r}: "
                             f"{(exc.strerror or str(exc)).lower()}; remove it by hand or choose another --out"
                             ) from exc
