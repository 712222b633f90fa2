"""A real Prefect server, deploys and workers for end-to-end tests.

``start_server`` runs ``prefect server start`` with its own PREFECT_HOME (SQLite, or the
PostgreSQL database given); a :class:`PrefectServer` holds the environment that reaches it
(no PREFECT_* or BACKJOBS_* variable from outside — in particular not
``PREFECT_LOGGING_EXTRA_LOGGERS``, so tests see what a plain worker does), runs the
``prefect`` and ``backjobs`` commands against it, starts workers, and reads the API.

Fixtures (loaded by ``tests/conftest.py``): ``prefect_server``, one SQLite-backed server
per test module (share it: a server takes ≈ 5 s of CPU to start), for tests that look at
the whole server (its deployments, pools, workers); ``shared_prefect_server``, one server
for the whole test run, for tests that only need somewhere to run flows and look up their
own runs by id.

A server on a new SQLite database spends ≈ 10 s of CPU migrating it before it answers:
``seed_prefect_home`` puts a copy of one database migrated once per test run (shared by the
xdist processes) where the server will look, so only its start-up is paid. The copy is made
by the two steps a server takes at start (Prefect's own calls: migrate, then register its
block types), so a server or dashboard started on it is told to skip them
(``SEEDED_HOME_ENV``): ≈ 3 s of CPU less a start (a third), as both would only find
everything done. The local stack's tests start from no database and keep both steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.prefect_api import (
    call_json,
    clean_env,
    create_process_pool,
    free_port,
    healthy,
)

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
BACKJOBS = str(Path(sys.executable).with_name("backjobs"))
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


@dataclass
class PrefectServer:
    """A running server and the environment that reaches it."""

    env: dict[str, str]
    process: subprocess.Popen[bytes] | None  # None: the run's shared server (not ours to stop)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return self.env["PREFECT_API_URL"]

    def prefect(self, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> str:
        done = subprocess.run(
            [PREFECT, *args],
            cwd=cwd,
            env=self.env | (env or {}),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def backjobs(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BACKJOBS, *args],
            cwd=ROOT,
            env=self.env | (env or {}),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def create_pool(self, name: str) -> None:
        """A process work pool (see ``create_process_pool``)."""
        create_process_pool(self.api_url, name)

    def start_worker(
        self,
        pool: str,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        log: Path | None = None,
        limit: int | None = None,
        queue: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """``prefect worker start --pool POOL`` as the README says; returns once it polls.
        ``queue``: poll only that work queue of the pool (online, but blind to the rest)."""
        args = [PREFECT, "worker", "start", "--pool", pool]
        if limit is not None:
            args += ["--limit", str(limit)]
        if queue is not None:
            args += ["--work-queue", queue]
        output = open(log, "ab") if log else subprocess.DEVNULL
        worker = subprocess.Popen(
            args,
            cwd=cwd,
            env=self.env | {"PREFECT_WORKER_QUERY_SECONDS": "2"} | (env or {}),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(worker)
        before = len(self.online_workers(pool))
        deadline = time.monotonic() + 60
        while len(self.online_workers(pool)) <= before and time.monotonic() < deadline:
            assert worker.poll() is None, f"the worker exited with {worker.returncode}"
            time.sleep(0.5)
        return worker

    def stop_workers(self) -> None:
        stop_workers(self.workers)
        self.workers.clear()

    def api(self, path: str, body: dict[str, Any] | None = None) -> Any:
        method = "GET" if body is None else "POST"
        return call_json(method, f"{self.api_url}/{path}", body=body)

    def online_workers(self, pool: str) -> list[dict[str, Any]]:
        try:
            workers = self.api(f"work_pools/{pool}/workers/filter", {})
        except httpx.HTTPError:
            return []
        return [w for w in workers if w.get("status") == "ONLINE"]

    def flow_runs(self, flow_name: str) -> list[dict[str, Any]]:
        return list(
            self.api(
                "flow_runs/filter",
                {"flows": {"name": {"any_": [flow_name]}}, "limit": 200},
            )
        )

    def wait_until_final(
        self, run_ids: list[str], *, timeout: float = 120
    ) -> dict[str, dict[str, Any]]:
        """The runs once every one is in a final state (fails the test at ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.api("flow_runs/filter", {"flow_runs": {"id": {"any_": run_ids}}})
            by_id = {r["id"]: r for r in runs}
            if all(by_id.get(i, {}).get("state_type") in FINAL_STATES for i in run_ids):
                return by_id
            if time.monotonic() > deadline:
                states = sorted(str(r.get("state_name")) for r in runs)
                pytest.fail(f"runs not final after {timeout} s: {states}")
            time.sleep(1)

    def logs_of(self, run_id: str) -> list[dict[str, Any]]:
        return list(
            self.api(
                "logs/filter",
                {
                    "logs": {"flow_run_id": {"any_": [run_id]}},
                    "limit": 200,
                    "sort": "TIMESTAMP_ASC",
                },
            )
        )


_shared_folder: Path | None = None  # the test run's temporary root; set once per process


@pytest.fixture(scope="session", autouse=True)
def _prefect_db_template_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    global _shared_folder
    base = tmp_path_factory.getbasetemp()
    # Under xdist each process has its own base (…/popen-gwN); their parent is the run's.
    _shared_folder = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# A server or dashboard whose PREFECT_HOME holds such a copy: its start-up steps are done.
SEEDED_HOME_ENV = {
    "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
    "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
}
# What a Prefect server does to its database as it starts (prefect.server.api.server:
# run_migrations, then add_block_types), run once in a process of its own.
_PREPARE_DB = """
import asyncio
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

async def main():
    db = provide_database_interface()
    await db.create_db()
    async with await db.session() as session:
        await run_block_auto_registration(session=session)

asyncio.run(main())
"""


def migrated_prefect_db() -> Path:
    """A Prefect SQLite database at the installed Prefect's head revision with Prefect's
    block types registered, made once per test run (``_PREPARE_DB``: a server's own start-up
    steps) under a lock the xdist processes share."""
    assert _shared_folder is not None, "needs the session fixture of tests.support.prefect_server"
    folder = _shared_folder / "prefect-db-template"
    folder.mkdir(exist_ok=True)
    database = folder / "prefect.db"
    with (folder / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database.exists():
            home = folder / "home"
            home.mkdir(exist_ok=True)
            env = clean_env() | {"PREFECT_HOME": str(home)}
            done = subprocess.run(
                [sys.executable, "-c", _PREPARE_DB],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, f"preparing Prefect's database:\n{done.stderr}"
            shutil.copyfile(home / "prefect.db", folder / "prefect.db.part")
            os.replace(folder / "prefect.db.part", database)
    return database


def seed_prefect_home(home: Path) -> None:
    """``home`` (a PREFECT_HOME) holding a migrated copy of Prefect's SQLite database."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_prefect_db(), home / "prefect.db")


def start_server(home: Path, *, database_url: str | None = None) -> PrefectServer:
    """``prefect server start`` on a free port, healthy; SQLite under ``home`` by default
    (a migrated copy: see ``seed_prefect_home``)."""
    if database_url is None:
        seed_prefect_home(home)
    port = free_port()
    env = clean_env() | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    server_env = dict(env)
    if database_url:
        server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    else:
        server_env |= SEEDED_HOME_ENV
    process = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env,
        stdout=open(home / "server.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180  # ≈ 5 s idle; a shared CI machine can be far slower
    while time.monotonic() < deadline:
        assert process.poll() is None, f"prefect server exited; see {home / 'server.log'}"
        if healthy(env["PREFECT_API_URL"]):
            return PrefectServer(env, process)
        time.sleep(0.5)
    process.terminate()
    pytest.fail(f"the Prefect server did not become healthy in 180 s; see {home / 'server.log'}")


def terminate(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, 30 s to exit, then SIGKILL."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


WORKER_GRACE = 5.0  # seconds; `backjobs stack down` gives a worker as long


def stop_workers(workers: list[subprocess.Popen[Any]]) -> None:
    """Stop ``prefect worker start`` processes (each in its own session, with the flow
    runs it started) as ``backjobs stack down`` does: SIGTERM to each process group, then
    SIGKILL to the groups still there after ``WORKER_GRACE`` seconds.

    Not longer: under the suite's load, Prefect 3.9's worker often loses the interrupt its
    SIGTERM handler sends itself ("Received SIGINT. Sending SIGINT to the process worker"
    and nothing after it: py-spy shows it idle in its event loop) and would run on until
    killed; waiting 20-30 s for it cost the suite minutes of teardown.
    """
    live = [worker for worker in workers if worker.poll() is None]
    for worker in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + WORKER_GRACE
    for worker in live:
        try:
            worker.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)


def stop_server(server: PrefectServer) -> None:
    server.stop_workers()
    if server.process is not None:
        terminate(server.process)


SHARED_SERVER = "shared-prefect-server"


def shared_server() -> PrefectServer:
    """The test run's shared SQLite-backed server: started by the first test process that
    asks, under a lock the xdist processes share; stopped when the run ends
    (``pytest_sessionfinish`` below). One server instead of one per
    process saves each further start (≈ 5 s of CPU) and its polling while idle."""
    assert _shared_folder is not None, "needs the session fixture of tests.support.prefect_server"
    folder = _shared_folder / SHARED_SERVER
    folder.mkdir(exist_ok=True)
    with (folder / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        settings = folder / "prefect-env.json"
        if not settings.exists():
            server = start_server(folder / "home")
            assert server.process is not None
            (folder / "pid").write_text(str(server.process.pid))
            reach = {k: v for k, v in server.env.items() if k.startswith("PREFECT_")}
            settings.write_text(json.dumps(reach))
    env = clean_env() | json.loads(settings.read_text())
    log = folder / "home" / "server.log"
    assert healthy(env["PREFECT_API_URL"]), f"the shared Prefect server is gone; see {log}"
    return PrefectServer(env, None)


def stop_shared_server(base: Path) -> None:
    """Stop the shared server started under ``base`` (the test run's temporary root), if one
    was: SIGTERM, 30 s to exit, then SIGKILL."""
    pid_file = base / SHARED_SERVER / "pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    pid_file.unlink()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not _exited(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.2)


def _exited(pid: int) -> bool:
    """Whether ``pid`` has ended: reaped here when it is this process's child (a run in one
    process), else gone or a zombie its parent has not reaped yet."""
    with contextlib.suppress(ChildProcessError):
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def pytest_sessionfinish(session: pytest.Session) -> None:
    # The run's shared server outlives the test process that started it: the controlling
    # process (the only one, or xdist's, once its workers are done) stops it.
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        drain_prefect_workers()
        base_temp = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
        stop_shared_server(base_temp)


def drain_prefect_workers() -> None:
    """Send the logs and events this process's flows left queued while the server is there
    to take them: queued for a stopped server, they held a run in one process (a flows module
    alone) at its exit for over a minute, retrying."""
    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=10)


@pytest.fixture(scope="session")
def shared_prefect_server() -> PrefectServer:
    """The test run's shared Prefect server (see ``shared_server``); never stop it here."""
    return shared_server()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server of the test module's own (own PREFECT_HOME, SQLite)."""
    server = start_server(tmp_path_factory.mktemp("prefect-home"))
    try:
        yield server
    finally:
        stop_server(server)
