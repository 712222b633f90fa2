"""The local stack end to end: ``backjobs stack up`` in a folder of its own on a free port.

Up → every deployment of prefect.yaml with its crons, an ad hoc run of each job completed
(demo data gave each work), ``backjobs trigger email-send-job --wait`` delivering into the
pickup folder, ``status``, a headless Chromium seeing the deployments and the last
cleanup run's artifact, ``up`` again a no-op, ``down`` leaving no process and a free port,
``up`` after ``down`` working, and ``down --wait 0`` stopping at once. The stack folder is
the test's: never ./var.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from backjobs.db import make_engine, session_scope
from backjobs.models import Marker, RefreshToken, StoredFile, Transaction
from backjobs.outbox import enqueue_email
from backjobs.stack.config import CLIENT_PATIENCE
from backjobs.stack.processes import MARKER
from tests.support.browser import chromium_page
from tests.support.dashboard import basic
from tests.support.prefect_api import call_json, clean_env, free_port, healthy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BACKJOBS = str(Path(sys.executable).with_name("backjobs"))
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


@dataclass
class RunningStack:
    var: Path
    port: int
    env: dict[str, str]  # what `backjobs stack env` exports, on top of a clean env
    up_output: str

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def headers(self) -> dict[str, str]:
        return {"Authorization": basic(self.env["PREFECT_API_AUTH_STRING"])}

    def get(self, path: str) -> Any:
        return call_json("GET", f"{self.api}{path}", headers=self.headers())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return call_json("POST", f"{self.api}{path}", headers=self.headers(), body=body)


def stack(
    command: str, base_env: dict[str, str], timeout: float = 400
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BACKJOBS, "stack", *command.split()],
        cwd=ROOT,
        env=base_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def members(var: Path) -> list[int]:
    marker = f"{MARKER}={var / 'stack'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    var = tmp_path_factory.mktemp("stack") / "var"
    port = free_port()
    base = clean_env() | {"BACKJOBS_STACK_DIR": str(var), "BACKJOBS_DASHBOARD_PORT": str(port)}
    try:
        done = stack("up", base)
        assert done.returncode == 0, f"stack up failed:\n{done.stdout}\n{done.stderr}"
        exported = stack("env", base).stdout
        env = base | {
            key.removeprefix("export "): shlex.split(value)[0]
            for key, value in (line.split("=", 1) for line in exported.splitlines())
        }
        yield RunningStack(var=var, port=port, env=env, up_output=done.stdout)
    finally:
        stack("down", base)
        assert members(var) == []


def wait_for_runs(running: RunningStack, timeout: float = 300) -> dict[str, dict[str, Any]]:
    """The last completed run of each deployment, once every one has one.

    The ad hoc run `up` creates may be Cancelled when a scheduled run of the same job
    (email-send-job: every 2 minutes) holds its one-at-a-time slot; the scheduled one
    then completes instead.
    """
    ids = {
        d["name"]: running.get(f"/deployments/name/{d['name']}/{d['name']}")["id"]
        for d in DEPLOYMENTS
    }
    names = {v: k for k, v in ids.items()}
    deadline = time.monotonic() + timeout
    while True:
        runs = running.post(
            "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        )
        done: dict[str, dict[str, Any]] = {}
        for flow_run in sorted(runs, key=lambda r: r["end_time"] or "", reverse=True):
            if flow_run["deployment_id"] in names:
                done.setdefault(names[flow_run["deployment_id"]], flow_run)
        if set(done) == set(ids) or time.monotonic() > deadline:
            return done
        time.sleep(2)


def test_stack_up_deploys_every_job_with_its_crons_and_runs_each_once(
    running: RunningStack,
) -> None:
    assert f"dashboard  http://127.0.0.1:{running.port}" in running.up_output
    assert "/auth/sign-in?token=" in running.up_output
    assert str(running.var / "mail") in running.up_output
    for deployment in DEPLOYMENTS:
        name = deployment["name"]
        served = running.get(f"/deployments/name/{name}/{name}")
        wanted = sorted(s["cron"] for s in deployment.get("schedules") or [])
        assert sorted(s["schedule"]["cron"] for s in served["schedules"]) == wanted
        assert all(s["active"] for s in served["schedules"])
        assert served["pull_steps"] == [{"backjobs.orchestration.deploy.set_project_directory": {}}]

    assert sorted(wait_for_runs(running)) == sorted(d["name"] for d in DEPLOYMENTS)
    adhoc = [r for r in running.post("/flow_runs/filter", {}) if not r["auto_scheduled"]]
    assert len(adhoc) >= len(DEPLOYMENTS)  # one ad hoc run of each job
    artifacts = running.post(
        "/artifacts/filter", {"artifacts": {"key": {"any_": ["cleanup-job-result"]}}}
    )
    assert "refresh_tokens_deleted" in json.dumps(artifacts)
    # The demo data gave every job work: what the cleanup deleted, the emails sent.
    engine = make_engine(running.env["BACKJOBS_DATABASE_URL"])
    with engine.connect() as conn:
        left = {
            model.__tablename__: conn.scalar(select(func.count()).select_from(model))
            for model in (RefreshToken, Marker, StoredFile)
        }
        created = conn.scalar(select(func.count()).select_from(Transaction))
    engine.dispose()
    assert left == {"refresh_tokens": 2, "markers": 3, "stored_files": 2}
    assert created and created > 12
    assert len(list((running.var / "mail").glob("*.eml"))) >= 3


def test_trigger_email_send_job_delivers_into_the_pickup_folder(running: RunningStack) -> None:
    wait_for_runs(running)
    engine = make_engine(running.env["BACKJOBS_DATABASE_URL"])
    with session_scope(engine) as session:
        enqueue_email(
            session,
            to="newcomer@example.com",
            template="generic",
            context={"subject": "Sent by the e2e test", "body": "hello"},
            now=datetime.now(UTC),
        )
    engine.dispose()
    before = set((running.var / "mail").glob("*.eml"))
    # Its */2 schedule would cancel the triggered run (one at a time) if due meanwhile.
    with schedules_paused(running, "email-send-job"):
        done = subprocess.run(
            [BACKJOBS, "trigger", "email-send-job", "--wait"],
            cwd=ROOT,
            env=running.env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    new = set((running.var / "mail").glob("*.eml")) - before
    # The registration jobs' runs may have queued mail too: ours is among the new files, once.
    assert sum("Sent by the e2e test" in p.read_text() for p in new) == 1


@contextmanager
def schedules_paused(running: RunningStack, name: str) -> Iterator[None]:
    """The deployment's schedules paused and no run of it left going; resumed after."""
    deployment = running.get(f"/deployments/name/{name}/{name}")
    path = f"{running.api}/deployments/{deployment['id']}/schedules"

    def set_active(active: bool) -> None:
        for schedule in deployment["schedules"]:
            url = f"{path}/{schedule['id']}"
            call_json("PATCH", url, headers=running.headers(), body={"active": active})

    set_active(False)
    try:
        busy = {"any_": ["PENDING", "RUNNING", "SCHEDULED"]}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # Pausing deletes the future scheduled runs; a started one must end first.
            going = running.post(
                "/flow_runs/filter",
                {
                    "deployments": {"id": {"any_": [deployment["id"]]}},
                    "flow_runs": {"state": {"type": busy}},
                },
            )
            if not going:
                break
            time.sleep(2)
        yield
    finally:
        set_active(True)


def test_status_shows_each_part_and_the_next_runs(running: RunningStack) -> None:
    done = stack("status", running.env)
    assert done.returncode == 0, done.stderr
    assert re.search(r"dashboard\s+up", done.stdout) and re.search(r"worker\s+up", done.stdout)
    for deployment in DEPLOYMENTS:
        line = next(
            row
            for row in done.stdout.splitlines()
            if row.strip().startswith(deployment["name"] + " ")
        )
        for schedule in deployment.get("schedules") or []:
            assert schedule["cron"] in line and "next run 20" in line


def test_the_dashboard_shows_the_deployments_and_the_last_cleanup_artifact(
    running: RunningStack, tmp_path: Path
) -> None:
    completed = wait_for_runs(running)
    link = subprocess.run(
        [BACKJOBS, "dashboard-token", "admin@example.com", "--url"],
        cwd=ROOT,
        env=running.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert link.returncode == 0, link.stderr
    url = f"http://127.0.0.1:{running.port}"
    with chromium_page() as page:
        page.goto(link.stdout.strip())
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{url}/v2/**")
        page.goto(f"{url}/v2/deployments")
        for deployment in DEPLOYMENTS:
            page.get_by_text(deployment["name"], exact=True).first.wait_for(state="visible")
        page.screenshot(path=str(tmp_path / "deployments.png"), full_page=True)
        for deployment in DEPLOYMENTS:
            name = deployment["name"]
            served = running.get(f"/deployments/name/{name}/{name}")
            page.goto(f"{url}/v2/deployments/deployment/{served['id']}")
            page.get_by_text("Schedules").first.wait_for(state="visible")
            if deployment.get("schedules"):
                # The UI describes a cron in words: "At 11:00 PM", "Every 2 minutes".
                shown = page.get_by_text(re.compile(r"^(At |Every )")).first
                shown.wait_for(state="visible")
            page.screenshot(path=str(tmp_path / f"deployment-{name}.png"), full_page=True)

        cleanup = completed["cleanup-job"]
        page.goto(f"{url}/v2/runs/flow-run/{cleanup['id']}?tab=Artifacts")
        page.get_by_text("cleanup-job-result").first.wait_for(state="visible")
        page.screenshot(path=str(tmp_path / "cleanup-run.png"), full_page=True)
    assert (tmp_path / "cleanup-run.png").stat().st_size > 10_000


def test_up_again_is_a_no_op(running: RunningStack) -> None:
    def pids() -> list[str]:
        return [(running.var / "stack" / f"{n}.pid").read_text() for n in ("dashboard", "worker")]

    before = pids()
    done = stack("up", running.env)
    assert done.returncode == 0, done.stderr
    assert "ran now" not in done.stdout
    assert pids() == before
    assert all(int(pid) in members(running.var) for pid in before)


@pytest.mark.parametrize("command", [["trigger", "cleanup-job"], ["deploy"]])
def test_a_new_shell_is_pointed_at_the_stack_that_is_up(
    running: RunningStack, command: list[str]
) -> None:
    """A shell without `stack env` (no PREFECT_API_URL) is refused, naming the command that
    points it at the stack; the eval'd export lines then reach it."""
    new_shell = clean_env() | {"BACKJOBS_STACK_DIR": str(running.var)}
    done = subprocess.run(
        [BACKJOBS, *command], cwd=ROOT, env=new_shell, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("backjobs: error: set PREFECT_API_URL to the Prefect server "), line
    hint = f'the local stack in {running.var} is up, and eval "$({BACKJOBS} stack env)"'
    assert hint in line, line
    exported = subprocess.run(
        ["bash", "-c", f'eval "$({BACKJOBS} stack env)" && echo "$PREFECT_API_URL"'],
        cwd=ROOT, env=new_shell, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert exported.stdout.strip() == running.api, exported.stderr


def test_a_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        base = clean_env() | {
            "BACKJOBS_STACK_DIR": str(tmp_path / "var"),
            "BACKJOBS_DASHBOARD_PORT": str(port),
        }
        done = stack("up --no-demo", base)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"backjobs stack up: error: port {port} on 127.0.0.1 is already in use: stop what "
        "holds it or choose another (BACKJOBS_DASHBOARD_PORT)"
    )
    assert members(tmp_path / "var") == []


def test_down_lets_a_started_run_end_leaves_no_process_and_a_free_port_then_up_works_again(
    running: RunningStack,
) -> None:
    # A run the worker has started when `down` comes: it ends Completed, not Crashed. The
    # test holds the app database's write lock, so the run cannot end (cleanup's deletes
    # wait for it, sqlite's busy timeout: 30 s) before `down` has seen it and waits.
    wait_for_runs(running)  # `up`'s ad hoc runs ended: none holds cleanup-job's one slot
    deployment = running.get("/deployments/name/cleanup-job/cleanup-job")
    lock = sqlite3.connect(running.var / "backjobs.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        started = running.post(f"/deployments/{deployment['id']}/create_flow_run", {})
        state = wait_for_state(running, started["id"], {"RUNNING", "COMPLETED"})
        assert state == "RUNNING", "the run ended before `down`: nothing was waited for"
        # From a shell that does not say where the stack listens: `up` remembered it.
        shell = {
            k: v for k, v in running.env.items() if not k.startswith(("BACKJOBS_DASH", "PREFECT_"))
        }
        down = subprocess.Popen(
            [BACKJOBS, "stack", "down", "--wait", "240"],
            cwd=ROOT,
            env=shell | {"PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert down.stdout is not None
        said = [down.stdout.readline()]
        while said[-1] and "started run(s) to end" not in said[-1]:
            said.append(down.stdout.readline())
        assert re.search(r"waiting up to 240 s for \d+ started run\(s\) to end", said[-1]), said
        # A run that comes due while `down` waits is not started (to be killed with the
        # worker a moment later): the worker's pool is paused until the next `up`.
        name = "pending-users-reminder-job"
        other = running.get(f"/deployments/name/{name}/{name}")
        due = running.post(f"/deployments/{other['id']}/create_flow_run", {})
        polls = float(CLIENT_PATIENCE["PREFECT_WORKER_QUERY_SECONDS"])  # the worker asks
        deadline = time.monotonic() + 2 * polls + 1
        while time.monotonic() < deadline:
            assert running.get(f"/flow_runs/{due['id']}")["state_type"] == "SCHEDULED"
            time.sleep(0.5)
    finally:
        lock.rollback()
        lock.close()
    rest, errors = down.communicate(timeout=300)
    assert down.returncode == 0, errors
    down_stdout = "".join(said) + rest
    assert "could not" not in down_stdout and "marked Crashed" not in down_stdout, down_stdout
    assert members(running.var) == []
    assert port_free(running.port)
    again = stack("up", running.env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "work pool backjobs resumed" in again.stdout, again.stdout
    assert healthy(running.api)
    assert running.get("/work_pools/backjobs")["is_paused"] is False
    assert running.get(f"/flow_runs/{started['id']}")["state_type"] == "COMPLETED"
    assert wait_for_state(running, due["id"], {"COMPLETED"}) == "COMPLETED"  # run once back up
    assert "demo data" not in again.stdout  # the data was kept, not seeded twice


def test_down_wait_0_stops_at_once_and_marks_started_runs_crashed(running: RunningStack) -> None:
    """``down --wait 0`` ("stop now") waits for no run: a started run that cannot end (a
    cleanup run held on the app database's write lock) ends Crashed on the server (its own
    database, read after it stopped), no started run is left Pending or Running, and no
    process of the stack is left. More than the server's page of 200 unfinished runs are
    all marked (runs a dead worker left Pending, made here through the API). Last in the
    module: it leaves the stack down."""
    flow = running.post("/flows/", {"name": "left-pending-by-a-dead-worker"})
    pending = {"type": "PENDING", "name": "Pending"}
    left = [
        running.post("/flow_runs/", {"flow_id": flow["id"], "state": pending})["id"]
        for _ in range(205)
    ]
    lock = sqlite3.connect(running.var / "backjobs.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # cleanup's deletes wait for it: that run cannot end
    locked_at = datetime.now(UTC)
    try:
        blocked, started = wait_for_a_blocked_cleanup_run(running, since=locked_at)
        done = stack("down --wait 0", running.env)
    finally:
        lock.rollback()
        lock.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "waiting up to" not in done.stdout, done.stdout
    marked = re.search(r"(\d+) unfinished run\(s\) marked Crashed", done.stdout)
    assert marked, done.stdout
    assert members(running.var) == []
    assert port_free(running.port)
    server_db = sqlite3.connect(running.var / "stack" / "prefect" / "prefect.db")
    try:
        marks = "?" * len(started)
        states = dict(
            server_db.execute(
                f"SELECT id, state_type FROM flow_run WHERE id IN ({','.join(marks)})", started
            ).fetchall()
        )
        left_states = server_db.execute(
            "SELECT state_type, count(*) FROM flow_run WHERE flow_id = ? GROUP BY state_type",
            [flow["id"]],
        ).fetchall()
        marked_on_server = server_db.execute(
            "SELECT count(*) FROM flow_run JOIN flow_run_state"
            " ON flow_run_state.id = flow_run.state_id WHERE flow_run_state.message = ?",
            ["Crashed: the local stack was stopped"],
        ).fetchone()[0]
    finally:
        server_db.close()
    assert left_states == [("CRASHED", len(left))], left_states
    assert states[blocked] == "CRASHED", states
    # A run with nothing to write (a reminder with no one pending) may end on its own while
    # `down` stops the worker: Completed is then its true state. None is left under way.
    assert set(states.values()) <= {"CRASHED", "COMPLETED"}, states
    # The count `down` prints is the runs it marked, exactly: a started run Prefect itself
    # set Crashed as the worker stopped it (its process killed) is not among them.
    assert int(marked.group(1)) == marked_on_server >= len(left), (done.stdout, states)


def wait_for_a_blocked_cleanup_run(
    running: RunningStack, *, since: datetime, timeout: float = 240
) -> tuple[str, list[str]]:
    """A cleanup run that went Running after ``since``, when the caller took the app
    database's write lock (so its deletes wait and it cannot end), and the ids of every
    started run (Pending or Running) beside it. One Running from before may have deleted
    already (`up` makes an ad hoc run of each job): it is left to end. A cleanup run is
    created when none is due or under way (one created beside a due one would be Cancelled
    for the job's one slot)."""
    cleanup = running.get("/deployments/name/cleanup-job/cleanup-job")["id"]
    deadline = time.monotonic() + timeout
    while True:
        now = datetime.now(UTC)
        wanted = {"state": {"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING"]}}}
        jobs = {"deployment_id": {"is_null_": False}}  # not the deployment-less runs made here
        due = {"expected_start_time": {"before_": now.isoformat()}}  # not the weeks scheduled
        runs = running.post("/flow_runs/filter", {"flow_runs": wanted | jobs | due})
        started = [r for r in runs if r["state_type"] in ("PENDING", "RUNNING")]
        blocked = [
            r
            for r in started
            if r["deployment_id"] == cleanup
            and r["state_type"] == "RUNNING"
            and datetime.fromisoformat(r["start_time"]) > since
        ]
        if blocked:
            return blocked[0]["id"], [r["id"] for r in started]
        if not any(r["deployment_id"] == cleanup for r in runs):  # none due or under way
            running.post(f"/deployments/{cleanup}/create_flow_run", {})
        if time.monotonic() > deadline:
            pytest.fail(f"no cleanup run of the stack started in {timeout:.0f} s: {runs}")
        time.sleep(0.5)


def wait_for_state(running: RunningStack, run_id: str, states: set[str]) -> str:
    """The run's state type once it is one of ``states`` (polled every 0.2 s)."""
    deadline = time.monotonic() + 240
    while True:
        flow_run = running.get(f"/flow_runs/{run_id}")
        if flow_run["state_type"] in states:
            return str(flow_run["state_type"])
        if flow_run["state_type"] in ("FAILED", "CANCELLED", "CRASHED"):
            pytest.fail(f"run {run_id} ended {flow_run['state_name']}: {flow_run['state']}")
        if time.monotonic() > deadline:
            pytest.fail(f"run {run_id} still {flow_run['state_name']}, not {sorted(states)}")
        time.sleep(0.2)
