"""Atomic writes: a failed write (full disk, read-only, I/O error, torch's writer) is one clear line and
leaves the target untouched and no temporary file behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from autoprune.errors import AutopruneError
from autoprune.io import files


def shutil_usage(total: int, used: int, free: int):
    return shutil._ntuple_diskusage(total, used, free)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def assert_one_line(exc: AutopruneError, *phrases: str) -> None:
    text = str(exc)
    assert "\n" not in text, text
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in {text!r}"


# ---- the ordinary path --------------------------------------------------------------------------------

def test_writes_are_complete_with_normal_permissions(tmp_path):
    target = tmp_path / "a" / "b" / "report.json"  # parents are created
    files.write_json(target, {"x": [1, 2], "p": Path("runs/x")})
    assert json.loads(target.read_text()) == {"x": [1, 2], "p": "runs/x"}
    files.write_text(tmp_path / "t.md", "héllo")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "héllo"
    files.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    files.write_with(tmp_path / "w.txt", lambda p: p.write_text("via writer"))
    assert (tmp_path / "w.txt").read_text() == "via writer"
    files.save_torch(tmp_path / "m.pt", {"w": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "t.md").stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "a" / "b") == []


# ---- failures ----------------------------------------------------------------------------------------

def _raising(code: int):
    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half of it")  # a partial write happened before the failure
        raise OSError(code, os.strerror(code), str(tmp))

    return writer


@pytest.mark.parametrize("code, cause, fix", [
    (errno.ENOSPC, "no space left on device (ENOSPC)", "free disk space"),
    (errno.EDQUOT, "disk quota exceeded (EDQUOT)", "quota"),
    (errno.EROFS, "read-only file system (EROFS)", "writable location"),
    (errno.EIO, "input/output error (EIO)", "check the disk"),
    (errno.EACCES, "permission denied (EACCES)", "permissions"),
    (errno.ENOMEM, "(ENOMEM)", "run again"),  # an errno without a tailored text still reads well
])
def test_os_errors_become_one_line_and_keep_the_old_file(tmp_path, code, cause, fix):
    target = tmp_path / "model.pt"
    target.write_text("the earlier result")
    with pytest.raises(AutopruneError) as info:
        files.write_with(target, _raising(code))
    assert_one_line(info.value, f"could not write {str(target)!r}", cause, fix)
    assert isinstance(info.value.__cause__, OSError)
    assert target.read_text() == "the earlier result"
    assert leftovers(tmp_path) == []


def test_a_new_file_does_not_appear_after_a_failed_write(tmp_path):
    with pytest.raises(AutopruneError, match="ENOSPC"):
        files.write_with(tmp_path / "new.json", _raising(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_torch_write_failure_is_reported_as_a_write_error(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    files.save_torch(target, {"v": 1})

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 truncated")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(AutopruneError) as info:
        files.save_torch(target, {"v": 2})
    assert_one_line(info.value, str(target), "the write failed", "free disk space", "--resume")
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"v": 1}
    assert leftovers(tmp_path) == []


def test_torch_write_failure_on_a_full_disk_says_so(tmp_path, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil_usage(total=10**9, used=10**9, free=4096))
    with pytest.raises(AutopruneError) as info:
        files.save_torch(tmp_path / "m.pt", {})
    assert_one_line(info.value, "no space left on device (ENOSPC; torch: [enforce fail", "free disk space")
    assert list(tmp_path.iterdir()) == []


def test_other_runtime_errors_are_bugs_and_propagate(tmp_path, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        raise RuntimeError("some unrelated bug")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="unrelated bug") as info:
        files.save_torch(tmp_path / "m.pt", {})
    assert not isinstance(info.value, AutopruneError)
    assert list(tmp_path.iterdir()) == []


def test_programming_errors_propagate_unchanged(tmp_path):
    with pytest.raises(TypeError, match="not JSON serialisable"):
        files.write_json(tmp_path / "x.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_propagates_and_cleans_up(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")

    def interrupted(tmp: Path) -> None:
        tmp.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_with(target, interrupted)
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_failure_of_the_final_rename_or_fsync_is_clean(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    target.write_text("old")

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.os, "replace", eio)
    with pytest.raises(AutopruneError, match=r"input/output error \(EIO\)"):
        files.write_text(target, "new")
    monkeypatch.undo()
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(AutopruneError, match="ENOSPC"):
        files.write_text(target, "new")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_directory_creation_failure_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(AutopruneError) as info:  # a parent that is a file: ENOTDIR / EEXIST from mkdir
        files.write_text(tmp_path / "afile" / "sub" / "r.json", "{}")
    assert_one_line(info.value, "could not create directory", "afile")

    def erofs(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", erofs)
    with pytest.raises(AutopruneError) as info:
        files.write_text(tmp_path / "new" / "r.json", "{}")
    assert_one_line(info.value, "could not create directory", str(tmp_path / "new"), "read-only file system (EROFS)")


def test_temp_file_creation_failure_is_one_line(tmp_path, monkeypatch):
    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.tempfile, "mkstemp", enospc)
    with pytest.raises(AutopruneError) as info:
        files.write_text(tmp_path / "r.json", "{}")
    assert_one_line(info.value, str(tmp_path / "r.json"), "(ENOSPC)")


def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "r.json").write_text("old")
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a 0500 directory is still writable")
        with pytest.raises(AutopruneError) as info:
            files.write_text(ro / "r.json", "new")
        assert_one_line(info.value, str(ro / "r.json"), "permission denied (EACCES)")
        assert (ro / "r.json").read_text() == "old"
        assert leftovers(ro) == []
    finally:
        ro.chmod(0o700)


def test_record_files_that_are_devices_pipes_or_huge_are_refused_not_read_forever(tmp_path):
    from autoprune.io.files import read_text
    from autoprune.runs.job import read_history

    (tmp_path / "zero").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "big").write_text("x" * 101)
    (tmp_path / "ok").write_text("é")
    for name in ("zero", "pipe"):
        with pytest.raises(ValueError, match=f"'{tmp_path / name}' is not a regular file"):
            read_text(tmp_path / name)
    with pytest.raises(ValueError, match="holds more than 100 bytes"):
        read_text(tmp_path / "big", limit=100)
    assert read_text(tmp_path / "ok") == "é"
    with pytest.raises(AutopruneError, match="cannot read the history .* is not a regular file"):
        read_history(tmp_path / "zero")
