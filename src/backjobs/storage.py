"""File storage behind one small interface; the local directory is the default.

``stored_files.storage_key`` is relative to the storage root. A key that would resolve
outside the root (``../``, an absolute path, a symbolic link that leads out) raises
:class:`UnsafeStorageKey` and nothing is touched: such a row is bad data, not a file.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Protocol


class UnsafeStorageKey(ValueError):
    """A storage key that does not name an object inside the storage root."""


class FileStorage(Protocol):
    def delete(self, key: str) -> bool:
        """Delete the object; True if it was removed, False if it was already gone.

        Raises :class:`UnsafeStorageKey` for a key outside the storage, ``OSError``
        when the object exists but cannot be removed.
        """
        ...


class LocalFileStorage:
    """Objects are files under ``root``; a key is a relative POSIX path."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        if not key or "\x00" in key or "\\" in key:
            raise UnsafeStorageKey(f"storage key {key!r} is empty or has forbidden characters")
        pure = PurePosixPath(key)
        if pure.is_absolute() or ".." in pure.parts:
            raise UnsafeStorageKey(f"storage key {key!r} points outside the storage root")
        root = self.root.resolve()
        path = root.joinpath(*pure.parts)
        # Follow links in every component: the object must really be inside the root.
        if not Path(os.path.realpath(path)).is_relative_to(root):
            raise UnsafeStorageKey(f"storage key {key!r} resolves outside the storage root")
        return path

    def delete(self, key: str) -> bool:
        path = self.path_for(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True


def make_storage(root: Path) -> FileStorage:
    """The configured storage (BACKJOBS_STORAGE_ROOT); other kinds plug in here."""
    return LocalFileStorage(root)
