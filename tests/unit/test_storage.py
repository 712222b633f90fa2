"""Local file storage: deletes inside the root, refuses keys that lead out of it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from backjobs.storage import LocalFileStorage, StorageUnavailable, UnsafeStorageKey
from tests.support.files import make_unremovable


@pytest.fixture
def storage(tmp_path: Path) -> LocalFileStorage:
    (tmp_path / "root" / "uploads").mkdir(parents=True)
    return LocalFileStorage(tmp_path / "root")


def test_deletes_an_object_and_reports_one_already_gone(storage: LocalFileStorage) -> None:
    obj = storage.root / "uploads" / "a.bin"
    obj.write_bytes(b"x")
    assert storage.delete("uploads/a.bin") is True
    assert not obj.exists()
    assert storage.delete("uploads/a.bin") is False


@pytest.mark.parametrize(
    "key", ["../outside.txt", "uploads/../../outside.txt", "/etc/passwd", "", "a\\..\\b", "x\x00"]
)
def test_keys_outside_the_root_are_refused(storage: LocalFileStorage, key: str) -> None:
    outside = storage.root.parent / "outside.txt"
    outside.write_text("keep me")
    with pytest.raises(UnsafeStorageKey):
        storage.delete(key)
    assert outside.read_text() == "keep me"


def test_a_link_out_of_the_root_is_refused(storage: LocalFileStorage) -> None:
    outside = storage.root.parent / "secret"
    outside.mkdir()
    (outside / "f.txt").write_text("keep me")
    os.symlink(outside, storage.root / "uploads" / "link")
    with pytest.raises(UnsafeStorageKey, match="symbolic link"):
        storage.delete("uploads/link/f.txt")
    assert (outside / "f.txt").exists()


def test_an_object_that_cannot_be_removed_raises_oserror(storage: LocalFileStorage) -> None:
    (storage.root / "locked").mkdir()
    (storage.root / "locked" / "f").write_text("x")
    make_unremovable(storage.root / "locked" / "f")
    with pytest.raises(OSError) as raised:
        storage.delete("locked/f")
    assert not isinstance(raised.value, UnsafeStorageKey | StorageUnavailable)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (".", "directory"),
        ("./", "directory"),
        ("uploads", "directory"),
        ("uploads/dir", "directory"),
        ("uploads/dir/", "directory"),
        ("n" * 300, "NAME_MAX"),
        ("uploads/" + "d/" * 2100 + "f", "PATH_MAX"),
    ],
)
def test_keys_that_can_never_be_objects_are_refused(
    storage: LocalFileStorage, key: str, why: str
) -> None:
    (storage.root / "uploads" / "dir").mkdir()
    (storage.root / "uploads" / "dir" / "inner").write_text("keep me")
    with pytest.raises(UnsafeStorageKey, match=why):
        storage.delete(key)
    assert (storage.root / "uploads" / "dir" / "inner").read_text() == "keep me"


def test_a_link_as_the_object_is_refused_and_left_in_place(storage: LocalFileStorage) -> None:
    target = storage.root.parent / "target.txt"
    target.write_text("keep me")
    os.symlink(target, storage.root / "uploads" / "link")
    with pytest.raises(UnsafeStorageKey, match="symbolic link"):
        storage.delete("uploads/link")
    assert (storage.root / "uploads" / "link").is_symlink() and target.exists()


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_an_unusable_root_is_reported_with_its_path(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "nope"
    if kind == "a file":
        root.write_text("x")
    storage = LocalFileStorage(root)
    with pytest.raises(StorageUnavailable, match=re.escape(str(root))):
        storage.check()
    with pytest.raises(StorageUnavailable):
        storage.delete("uploads/a.bin")


def _outside_with_a_file(storage: LocalFileStorage) -> Path:
    outside = storage.root.parent / "outside"
    outside.mkdir()
    (outside / "f.txt").write_text("keep me")
    (storage.root / "uploads" / "f.txt").write_text("mine")
    return outside


def _swap_for_link(storage: LocalFileStorage, outside: Path) -> None:
    """The folder ``uploads`` moves away and a link to ``outside`` takes its name."""
    os.rename(storage.root / "uploads", storage.root / "uploads.moved")
    os.symlink(outside, storage.root / "uploads")


def test_a_folder_swapped_for_a_link_just_before_the_unlink_touches_nothing_outside(
    storage: LocalFileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = _outside_with_a_file(storage)
    real_unlink = os.unlink

    def swap_then_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(os, "unlink", real_unlink)
        _swap_for_link(storage, outside)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", swap_then_unlink)
    assert storage.delete("uploads/f.txt") is True
    assert (outside / "f.txt").read_text() == "keep me"
    # What was removed is the object in the real folder, wherever it moved.
    assert not (storage.root / "uploads.moved" / "f.txt").exists()


def test_a_folder_swapped_for_a_link_during_the_walk_is_refused(
    storage: LocalFileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = _outside_with_a_file(storage)
    real_open = os.open

    def open_root_then_swap(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        monkeypatch.setattr(os, "open", real_open)
        fd = real_open(path, flags, *args, **kwargs)
        _swap_for_link(storage, outside)
        return fd

    monkeypatch.setattr(os, "open", open_root_then_swap)
    with pytest.raises(UnsafeStorageKey, match="symbolic link"):
        storage.delete("uploads/f.txt")
    assert (outside / "f.txt").read_text() == "keep me"
    assert (storage.root / "uploads.moved" / "f.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_an_unreadable_root_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "closed"
    root.mkdir(mode=0o000)
    try:
        with pytest.raises(StorageUnavailable, match=r"not readable|cannot be opened"):
            LocalFileStorage(root).check()
    finally:
        root.chmod(0o755)
