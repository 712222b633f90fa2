"""Debian packages that tests need as real parts (Chromium, Postfix), installed on demand.

Only where the process may install packages (root, with ``apt-get``); a caller that gets a
reason back skips its test with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def apt_install(package: str, *, debconf: str | None = None, recommends: bool = True) -> str | None:
    """Install ``package`` (``debconf``: selections preseeded first); why not, or None."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return f"not root, cannot apt-get install {package}"
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    no_recommends = [] if recommends else ["--no-install-recommends"]
    steps: list[tuple[list[str], str | None]] = [
        (["apt-get", "update"], None),
        (["apt-get", "install", "-y", *no_recommends, package], None),
    ]
    if debconf is not None:
        steps.insert(0, (["debconf-set-selections"], debconf))
    for command, stdin in steps:
        done = subprocess.run(
            command, input=stdin, env=env, capture_output=True, text=True, timeout=900
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            return f"`{' '.join(command)}` failed: {last}"
    return None
