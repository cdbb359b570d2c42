"""One run per output: a second process is refused while the first holds the lock, and takes over after it
exits or is killed; --force clears only a directory this process has locked."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autoprune.errors import AutopruneError
from autoprune.runs import lock
from autoprune.runs.lock import LOCK_NAME, clear_directory, lock_output

HOLDER = textwrap.dedent("""
    import sys
    from autoprune.runs.lock import lock_output
    with lock_output(sys.argv[1], kind=sys.argv[2]):
        print("locked", flush=True)
        sys.stdin.readline()  # hold the lock until the parent says so (or kills us)
    print("released", flush=True)
""")


@pytest.fixture
def holder():
    """Start a process that holds a lock; yields a function (path, kind) -> Popen."""
    started: list[subprocess.Popen] = []

    def start(path: Path, kind: str = "directory") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), kind, "prune", "--out", str(path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[1])
        started.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()


def take(path: Path, kind: str = "directory") -> None:
    """Take the lock and release it at once."""
    with lock_output(path, kind=kind):
        pass


def release(proc: subprocess.Popen) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "released"
    assert proc.wait(timeout=30) == 0


def test_a_second_process_is_refused_then_succeeds_after_a_normal_exit(tmp_path, holder):
    out = tmp_path / "runs" / "x"
    proc = holder(out)
    record = json.loads((out / LOCK_NAME).read_text())
    assert record["pid"] == proc.pid and record["host"] == socket.gethostname()
    assert record["started"].endswith("Z") and "prune --out" in record["command"]
    with pytest.raises(AutopruneError) as info:
        take(out)
    text = str(info.value)
    assert "\n" not in text
    assert f"output directory {str(out)!r} is in use by another autoprune run (pid {proc.pid} on host " in text
    assert "prune --out" in text and "wait for it to finish or choose another --out" in text
    release(proc)
    assert not (out / LOCK_NAME).exists()  # removed on release
    with lock_output(out, kind="directory") as held:
        assert held.stale_holder is None
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_a_killed_holder_is_taken_over_with_a_note(tmp_path, holder, caplog):
    out = tmp_path / "x"
    proc = holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / LOCK_NAME).exists()  # a killed run cannot clean up; the kernel released its flock
    caplog.set_level(logging.WARNING, logger="autoprune.runs.lock")
    with lock_output(out, kind="directory") as held:
        assert held.stale_holder is not None and held.stale_holder["pid"] == proc.pid
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over a stale lock left by pid {proc.pid} (no longer running)" in caplog.text


def test_the_file_kind_locks_beside_the_output_file(tmp_path, holder):
    out = tmp_path / "models" / "lenet.pt"
    proc = holder(out, "file")
    assert (tmp_path / "models" / ".lenet.pt.lock").exists() and not out.exists()
    with pytest.raises(AutopruneError, match=rf"output file '.*lenet\.pt' is in use .*pid {proc.pid}"):
        take(out, "file")
    take(tmp_path / "models" / "other.pt", "file")  # another file in the same folder is free
    release(proc)
    with lock_output(out, kind="file") as held:
        assert held.lock_file == tmp_path / "models" / ".lenet.pt.lock"


def test_nested_locking_in_one_process_is_refused_not_deadlocked(tmp_path):
    with lock_output(tmp_path / "x", kind="directory"):
        with pytest.raises(AutopruneError, match="already locked by this process"):
            take(tmp_path / "x")
        assert (tmp_path / "x" / LOCK_NAME).exists()  # the refused inner attempt did not release the outer lock
    take(tmp_path / "x")  # and after the outer block it is free again


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt), lock_output(tmp_path / "x", kind="directory"):
        raise KeyboardInterrupt
    assert not (tmp_path / "x" / LOCK_NAME).exists()
    with lock_output(tmp_path / "x", kind="directory"):
        pass


def test_directories_it_created_are_removed_when_left_empty_and_kept_otherwise(tmp_path):
    with pytest.raises(RuntimeError), lock_output(tmp_path / "a" / "b" / "out", kind="directory"):
        raise RuntimeError("the run failed before writing anything")
    assert not (tmp_path / "a").exists()  # every directory it made, innermost first
    with lock_output(tmp_path / "c" / "model.pt", kind="file"):
        pass
    assert not (tmp_path / "c").exists()
    with lock_output(tmp_path / "d" / "out", kind="directory") as held:
        (held.path / "report.md").write_text("written")
    assert (tmp_path / "d" / "out" / "report.md").exists() and not (tmp_path / "d" / "out" / LOCK_NAME).exists()
    (tmp_path / "e").mkdir()
    with lock_output(tmp_path / "e", kind="directory"):
        pass
    assert (tmp_path / "e").is_dir()  # there before: kept, even empty


def test_clear_directory_keeps_only_the_lock_file(tmp_path):
    out = tmp_path / "run"
    (out / "work" / "deep").mkdir(parents=True)
    (out / "model.pt").write_text("old")
    (out / ".hidden").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours")
    (out / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RuntimeError, match="without holding lock_output"):
        clear_directory(out)
    assert (out / "model.pt").exists()
    with lock_output(out, kind="directory"):
        clear_directory(out)
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    assert (outside / "keep.txt").read_text() == "not ours"  # a symlink is removed, not followed
    assert list(out.iterdir()) == []


def test_wrong_kinds_of_path(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(AutopruneError, match="is a file; give a directory"), \
            lock_output(tmp_path / "afile", kind="directory"):
        pass
    with pytest.raises(AutopruneError, match="is a directory; give a file name"), lock_output(tmp_path, kind="file"):
        pass
    with pytest.raises(ValueError, match="kind must be"), lock_output(tmp_path / "y", kind="folder"):  # type: ignore
        pass


def test_an_unwritable_location_is_one_line(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # not root: a real read-only directory
            with pytest.raises(AutopruneError) as info, lock_output(ro / "x", kind="directory"):
                pass
            assert "\n" not in str(info.value) and "permission denied" in str(info.value)
    finally:
        ro.chmod(0o700)

    real_open = os.open

    def erofs(path, flags, *args, **kwargs):
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(lock.os, "open", erofs)
    with pytest.raises(AutopruneError) as info, lock_output(tmp_path / "out", kind="directory"):
        pass
    text = str(info.value)
    assert "\n" not in text
    assert f"cannot lock output directory {str(tmp_path / 'out')!r}: read-only file system (EROFS)" in text
    assert "choose a writable location (--out)" in text
    monkeypatch.undo()
    with lock_output(tmp_path / "out", kind="directory"):  # nothing stuck in this process after the failure
        pass


RACER = textwrap.dedent("""
    import os, sys, time
    from autoprune.errors import AutopruneError
    from autoprune.runs.lock import lock_output
    out, got, overlaps = sys.argv[1], 0, 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        try:
            with lock_output(out, kind="directory"):
                got += 1
                try:  # only one process may be inside at a time
                    fd = os.open(os.path.join(out, "inside"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    overlaps += 1
                    continue
                time.sleep(0.001)
                os.close(fd)
                os.unlink(os.path.join(out, "inside"))
        except AutopruneError:
            pass
    print(got, overlaps)
""")


def test_racing_processes_never_hold_the_lock_together(tmp_path):
    """Lock files are created and removed all the time here: exclusion must survive the unlink/reopen race."""
    out = tmp_path / "x"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1]) for _ in range(3)]
    results = [tuple(map(int, p.communicate(timeout=60)[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(got for got, _ in results) > 10  # the lock changed hands many times
    assert all(overlaps == 0 for _, overlaps in results), results
