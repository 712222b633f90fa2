"""File storage behind one small interface; the local directory is the default.

``stored_files.storage_key`` is relative to the storage root. A key that can never name
an object inside the root raises :class:`UnsafeStorageKey` and nothing is touched: such
a row is bad data, not a file. That is a key leading out (``../``, an absolute path, a
symbolic link on the way), one naming the root itself (``.``, empty) or a directory
(``sub/dir``, ``sub/``), a component longer than the file system's NAME_MAX or a path
longer than PATH_MAX, a NUL or a backslash.

**No key reaches outside the root, even while folders change under it.** A delete opens
the root, then each folder of the key relative to the one before (``O_NOFOLLOW``: a
symbolic link on the way is refused, not followed), and unlinks the last name relative to
the last folder opened (``dir_fd``). A folder swapped for a link between two steps is
either refused (not yet opened) or no longer matters (the opened folder is the real one).
Decision: the last name must be a regular file (or another non-directory that is not a
link): a symbolic link there is not an upload, so it is refused as bad data and left in
place, like a directory.

A storage root that is missing, not a directory or not readable raises
:class:`StorageUnavailable` (from :meth:`LocalFileStorage.check` and from any delete):
the cleanup then stops before touching a row.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Protocol

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class UnsafeStorageKey(ValueError):
    """A storage key that does not name an object inside the storage root."""


class StorageUnavailable(OSError):
    """The storage root cannot be used (missing, not a directory, not readable)."""


class FileStorage(Protocol):
    def check(self) -> None:
        """Raise :class:`StorageUnavailable` unless the storage can be used at all."""
        ...

    def delete(self, key: str) -> bool:
        """Delete the object; True if it was removed, False if it was already gone.

        Raises :class:`UnsafeStorageKey` for a key that cannot name an object of the
        storage, :class:`StorageUnavailable` when the storage itself is unusable,
        ``OSError`` when the object exists but cannot be removed.
        """
        ...


class LocalFileStorage:
    """Objects are regular files under ``root``; a key is a relative POSIX path."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def check(self) -> None:
        with self._opened_root():
            pass

    def key_parts(self, key: str) -> tuple[str, ...]:
        """The key's path components, or :class:`UnsafeStorageKey` if it is not an object's."""
        if not key or "\x00" in key or "\\" in key:
            raise UnsafeStorageKey(f"storage key {key!r} is empty or has forbidden characters")
        pure = PurePosixPath(key)
        if pure.is_absolute() or ".." in pure.parts:
            raise UnsafeStorageKey(f"storage key {key!r} points outside the storage root")
        if not pure.parts or key.endswith(("/", "/.")):
            raise UnsafeStorageKey(f"storage key {key!r} names a directory, not an object")
        try:
            encoded = [os.fsencode(part) for part in pure.parts]
        except UnicodeEncodeError:
            raise UnsafeStorageKey(f"storage key {key!r} cannot be a file name here") from None
        name_max, path_max = _limits(self.root)
        if any(len(part) > name_max for part in encoded):
            raise UnsafeStorageKey(
                f"storage key {key[:40]!r}… has a name longer than NAME_MAX ({name_max} bytes)"
            )
        if len(os.fsencode(self.root.absolute())) + 1 + len(os.fsencode(key)) >= path_max:
            raise UnsafeStorageKey(
                f"storage key {key[:40]!r}… is longer than PATH_MAX ({path_max} bytes)"
            )
        return pure.parts

    def delete(self, key: str) -> bool:
        *folders, name = self.key_parts(key)
        with self._opened_root() as root_fd, _opened_folders(root_fd, folders, key) as dir_fd:
            if dir_fd is None:
                return False  # a folder on the way is gone: so is the object
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return False
            if stat.S_ISDIR(mode):
                raise UnsafeStorageKey(f"storage key {key!r} names a directory, not an object")
            if stat.S_ISLNK(mode):
                raise UnsafeStorageKey(f"storage key {key!r} names a symbolic link, not an object")
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                return False
            return True

    @contextmanager
    def _opened_root(self) -> Iterator[int]:
        try:
            fd = os.open(self.root, DIRECTORY_FLAGS)
        except FileNotFoundError:
            raise StorageUnavailable(f"storage root {self.root} does not exist") from None
        except NotADirectoryError:
            raise StorageUnavailable(f"storage root {self.root} is not a directory") from None
        except OSError as exc:
            raise StorageUnavailable(
                f"storage root {self.root} cannot be opened: {exc.strerror}"
            ) from None
        try:
            if not os.access(".", os.R_OK | os.X_OK, dir_fd=fd):
                raise StorageUnavailable(f"storage root {self.root} is not readable")
            yield fd
        finally:
            os.close(fd)


@contextmanager
def _opened_folders(root_fd: int, folders: list[str], key: str) -> Iterator[int | None]:
    """Open each folder relative to the last, never following a link; None if one is gone."""
    opened: list[int] = []
    try:
        dir_fd = root_fd
        for folder in folders:
            try:
                dir_fd = os.open(folder, DIRECTORY_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError as exc:
                # Linux says ENOTDIR (O_DIRECTORY) or ELOOP (O_NOFOLLOW) for a link.
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(folder, dir_fd):
                    raise UnsafeStorageKey(
                        f"storage key {key!r} goes through a symbolic link ({folder!r}); "
                        "links are not followed, so it may point outside the storage root"
                    ) from None
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    yield None  # a folder on the way is missing or a file: no object
                    return
                raise
            opened.append(dir_fd)
        yield dir_fd
    finally:
        for fd in opened:
            os.close(fd)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _limits(root: Path) -> tuple[int, int]:
    """NAME_MAX and PATH_MAX of the file system holding ``root`` (POSIX defaults if unknown)."""
    try:
        return os.pathconf(root, "PC_NAME_MAX"), os.pathconf(root, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def make_storage(root: Path) -> FileStorage:
    """The configured storage (BACKJOBS_STORAGE_ROOT); other kinds plug in here."""
    return LocalFileStorage(root)
