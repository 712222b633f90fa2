"""Local file storage: deletes inside the root, refuses keys that lead out of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backjobs.storage import LocalFileStorage, UnsafeStorageKey


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
    with pytest.raises(UnsafeStorageKey, match="outside"):
        storage.delete("uploads/link/f.txt")
    assert (outside / "f.txt").exists()


def test_an_object_that_cannot_be_removed_raises_oserror(storage: LocalFileStorage) -> None:
    (storage.root / "uploads" / "dir").mkdir()
    (storage.root / "uploads" / "dir" / "inner").write_text("x")
    with pytest.raises(OSError):
        storage.delete("uploads/dir")
