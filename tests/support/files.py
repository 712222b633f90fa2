"""Files a test cannot remove, as on a real installation (a read-only or immutable file).

``make_unremovable(path)``: as root (who ignores permissions) the file is made immutable
(``chattr +i``); otherwise its folder is made read-only. Either is undone after the test
by the autouse fixture below (loaded as a plugin by ``tests/conftest.py``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_UNDO: list[Callable[[], object]] = []


def make_unremovable(path: Path) -> None:
    """Make unlinking ``path`` fail (EPERM or EACCES) until the test ends."""
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot make {path} immutable here: {done.stderr.strip()}")
        _UNDO.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=False))
    else:
        folder = path.parent
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        _UNDO.append(lambda: folder.chmod(mode))


@pytest.fixture(autouse=True)
def _unremovable_files_undone() -> Iterator[None]:
    yield
    while _UNDO:
        _UNDO.pop()()
