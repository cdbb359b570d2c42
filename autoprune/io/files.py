"""Atomic file writes that either replace the target completely or leave it untouched.

Every file autoprune writes goes through :func:`atomic_path`: the bytes go to a temporary file in the
destination directory, which is flushed to disk and then renamed over the target. A crash, Ctrl-C or a
full disk therefore never leaves a half-written result, and a failed write of an existing file keeps
its old content.

A failure to write (``OSError`` such as ENOSPC, EDQUOT, EROFS, EIO, EACCES, or the ``RuntimeError``
with which ``torch.save`` reports a failed write) is raised as one :class:`AutopruneError` line naming
the path, the cause and the fix. ``KeyboardInterrupt`` and programming errors (e.g. data that is not
JSON serialisable) propagate unchanged; the temporary file is removed in every case.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from autoprune.errors import AutopruneError, ConfigError, first_line

_RESUME_HINT = " (--resume continues an interrupted run)"

# errno -> (cause, fix); the fallback uses the system's text and a generic fix
_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free disk space and run again" + _RESUME_HINT),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or choose another --out, and run again"),
    errno.EROFS: ("read-only file system", "choose a writable location (--out)"),
    errno.EACCES: ("permission denied", "choose a directory you can write to (--out) or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a directory you can write to (--out) or fix its permissions"),
    errno.EIO: ("input/output error", "check the disk (e.g. `dmesg`) and run again" + _RESUME_HINT),
    errno.ENOTDIR: ("a parent of the path is a file, not a directory", "choose another path"),
    errno.EISDIR: ("the path is a directory", "give a file name, not a directory"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
    errno.EMFILE: ("too many open files", "close other programs or raise `ulimit -n` and run again"),
}

# how torch.save's C++ writer reports a failed write (it does not raise OSError)
_TORCH_WRITE_FAILURE = re.compile(r"PytorchStreamWriter|inline_container|file write failed|unexpected pos",
                                  re.IGNORECASE)


#: the most bytes autoprune reads from a settings or record file it wrote (run.json, a --config file)
SMALL_FILE_LIMIT = 16 * 2**20


def read_text(path: str | os.PathLike[str], *, limit: int = SMALL_FILE_LIMIT, errors: str = "strict") -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes. A device (a link to ``/dev/zero``), a pipe
    or a file larger than autoprune ever writes there raises ``ValueError`` naming it, instead of being read
    forever or into all memory; a missing or unreadable file raises ``OSError``."""
    file = Path(path)
    if not stat.S_ISREG(file.stat().st_mode):
        raise ValueError(f"{str(file)!r} is not a regular file (a device, pipe or socket)")
    with open(file, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{str(file)!r} holds more than {limit} bytes, more than autoprune writes there")
    return data.decode("utf-8", errors=errors)


def read_json(path: str | os.PathLike[str], *, limit: int = SMALL_FILE_LIMIT) -> Any:
    """The JSON value in a file, read as :func:`read_text` reads it; nesting too deep to parse raises
    ``ValueError`` ("nested too deeply"), as malformed JSON does, instead of ``RecursionError``."""
    text = read_text(path, limit=limit)
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def check_path(path: Any, name: str = "path", kind: str = "a file path") -> Path:
    """``path`` as a :class:`Path` if it is a non-empty ``str`` or ``os.PathLike`` of one; else one line naming
    ``name`` (the argument) and what it must be."""
    try:
        text = None if isinstance(path, bool) else os.fspath(path)
    except TypeError:
        text = None
    if not isinstance(text, str):
        raise ConfigError(name, path, f"must be {kind} (str or os.PathLike)")
    if not text:
        raise ConfigError(name, path, f"is empty; give {kind}")
    return Path(text)


def write_error(path: str | os.PathLike[str], exc: BaseException, *, action: str = "write") -> AutopruneError:
    """The one-line error for a failed write of ``path`` (``action`` e.g. "write", "create directory")."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        cause, fix = _CAUSES.get(exc.errno, ((exc.strerror or "").lower() or "the system refused the write",
                                             "check the location and run again"))
        cause = f"{cause} ({name})"
    else:  # torch's writer does not say why; the free space usually does
        text = first_line(exc)
        if _nearly_full(Path(path).parent):
            cause = f"no space left on device (ENOSPC; torch: {text[:120]})"
        else:
            cause = f"the write failed ({text[:160]}; usually a full disk or quota)"
        fix = "free disk space and run again" + _RESUME_HINT
    return AutopruneError(f"could not {action} {str(path)!r}: {cause}; {fix}")


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (raised while writing) is the file system refusing, rather than a bug."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, RuntimeError) and bool(_TORCH_WRITE_FAILURE.search(str(exc)))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it.

    The parent directories are created. A write failure inside the block, or while finishing, becomes an
    :class:`AutopruneError`; the target is then untouched and no temporary file remains.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc.filename or target.parent, exc, action="create directory") from exc
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(target, exc) from exc
    try:
        yield Path(tmp)
        _fsync(tmp)  # a delayed-allocation ENOSPC surfaces here, before the rename, not after a crash
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, AutopruneError) and is_write_failure(exc):
            raise write_error(target, exc) from exc
        raise


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a binary file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order; arrays and paths converted)."""
    write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Atomically create ``path`` with ``writer(tmp_path)`` (e.g. a figure's ``savefig``)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def save_torch(path: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save(obj)`` atomically; a full disk is reported as one clear line, not a C++ traceback."""
    import torch  # lazily: the rest of this module is used by torch-free code

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
