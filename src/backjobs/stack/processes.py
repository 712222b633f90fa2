"""Detached processes of the local stack: started, found by pid file, stopped.

Each process is started in its own session (it outlives ``backjobs stack up``) with its
output in ``<name>.log`` and its pid in ``<name>.pid``. Every process the stack starts
carries the marker variable ``_BACKJOBS_STACK_MEMBER=<stack folder>`` in its environment,
and so do the processes *they* start (a worker's flow runs): ``down`` finds leftovers by
that marker, so nothing of this stack survives it and nothing else is touched. A pid
file alone is not trusted: the process must still carry the marker (pids are reused).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from backjobs.net import PortInUse, bind_port

MARKER = "_BACKJOBS_STACK_MEMBER"


def spawn(
    folder: Path, name: str, command: Sequence[str], *, env: Mapping[str, str], cwd: Path
) -> int:
    """Start ``command`` detached; its pid (also written to ``<folder>/<name>.pid``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            list(command),
            env=dict(env) | {MARKER: str(folder)},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    process.returncode = 0  # detached on purpose: never waited for here (no ResourceWarning)
    (folder / f"{name}.pid").write_text(f"{process.pid}\n")
    return process.pid


def running_pid(folder: Path, name: str) -> int | None:
    """The pid of ``name`` when its pid file names a live process of this stack."""
    try:
        pid = int((folder / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if is_member(pid, folder) else None


def is_member(pid: int, folder: Path) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and f"{MARKER}={folder}".encode() in environ.split(b"\0")


def members(folder: Path) -> list[int]:
    """Every live process carrying this stack's marker (not this process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            if is_member(int(entry.name), folder):
                found.append(int(entry.name))
    return found


def stop(folder: Path, name: str, *, grace: float, terms: int = 1) -> bool:
    """SIGTERM (``terms`` times, ``grace`` s apart), then SIGKILL; True if it was running.

    A Prefect worker needs two: the first only asks it to finish ("Sending SIGINT"), and
    it may still submit a run meanwhile.
    """
    pid = running_pid(folder, name)
    if pid is not None:
        for _ in range(terms):
            _signal(pid, signal.SIGTERM)
            if _wait_gone([pid], folder, grace):
                break
        else:
            _signal_group_or_pid(pid, signal.SIGKILL)
            _wait_gone([pid], folder, 5)
    (folder / f"{name}.pid").unlink(missing_ok=True)
    return pid is not None


def sweep(folder: Path, *, grace: float = 5, keep: set[int] | None = None) -> int:
    """Stop every leftover process of this stack (a flow run a killed worker left)."""
    pids = [pid for pid in members(folder) if pid not in (keep or set())]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    if pids and not _wait_gone(pids, folder, grace):
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        _wait_gone(pids, folder, 5)
    return len(pids)


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUse` (one line) when something listens on ``host:port``."""
    options = ("BACKJOBS_DASHBOARD_HOST", "BACKJOBS_DASHBOARD_PORT")
    bind_port(host, port, host_option=options[0], port_option=options[1]).close()


def wait_port_free(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check_port_free(host, port)
            return True
        except PortInUse:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def _wait_gone(pids: list[int], folder: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(is_member(pid, folder) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group_or_pid(pid: int, sig: signal.Signals) -> None:
    # Each stack process leads its own session: its group holds what it started.
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        _signal(pid, sig)
