"""``backjobs deploy`` against a real Prefect server: the server holds exactly the file's
schedules, whatever was deployed before, and deploy prints each change as it stands on
the server (a cron edit, a UI pause it reverted, a job removed from the file); a
never-firing cron is refused; the pull step stores no path of the deploying machine. And
``backjobs trigger`` on the same server: a future as_of refused before any run exists, a
trigger meeting the run that holds the job's one slot.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from backjobs.orchestration.prefect_yaml import describe_cron
from tests.support.prefect_api import call, call_json
from tests.support.prefect_server import PrefectServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
BACKJOBS = str(Path(sys.executable).with_name("backjobs"))
JOB = "email-send-job"
ORPHANS = "removed, paused or changed schedules"  # what deploy says it deleted runs of


@pytest.fixture(scope="module")
def server(prefect_server: PrefectServer) -> dict[str, str]:
    """The module's Prefect server (tests/support/prefect_server.py) with the work pool."""
    prefect_server.create_pool("backjobs")
    return prefect_server.env


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder of one deployment (email-send-job), flows and tasks linked in."""
    folder = tmp_path_factory.mktemp("project")
    for name in ("flows", "tasks"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def write(project: Path, schedules: Any, *, drop_key: bool = False) -> None:
    document = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment,) = [d for d in document["deployments"] if d["name"] == JOB]
    if drop_key:
        deployment.pop("schedules", None)
    else:
        deployment["schedules"] = schedules
    deployment["description"] = description_of(schedules or [])
    document["deployments"] = [deployment]
    (project / "prefect.yaml").write_text(yaml.safe_dump(document, sort_keys=False))


def description_of(schedules: list[dict[str, Any]]) -> str:
    """What `deployments check` wants a description to state of these schedules."""
    if not schedules:
        return "Sends the outbox; no schedule (triggered only)."
    stated = []
    for schedule in schedules:
        words = describe_cron(schedule["cron"]) or "at"
        paused = " (paused)" if schedule.get("active") is False else ""
        stated.append(f"{words} — `{schedule['cron']}`{paused}")
    return "Sends the outbox: " + "; ".join(stated) + "."


def deploy(project: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BACKJOBS, "deploy"], cwd=project, env=env, capture_output=True, text=True, timeout=180
    )


def deployed(env: dict[str, str]) -> dict[str, Any]:
    url = f"{env['PREFECT_API_URL']}/deployments/name/{JOB}/{JOB}"
    deployment: dict[str, Any] = call_json("GET", url)
    return deployment


def schedules(env: dict[str, str]) -> list[tuple[str, bool, str | None]]:
    return sorted(
        (s["schedule"]["cron"], s["active"], s["slug"]) for s in deployed(env)["schedules"]
    )


def cron(expression: str, slug: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"cron": expression, "timezone": "UTC", **({"slug": slug} if slug else {}), **extra}


def deploy_ok(project: Path, env: dict[str, str]) -> str:
    done = deploy(project, env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_redeploying_leaves_the_server_holding_exactly_the_files_schedules(
    server: dict[str, str], project: Path
) -> None:
    write(project, [cron("*/2 * * * *", "email-cron"), cron("0 12 * * *")])
    deploy_ok(project, server)
    assert schedules(server) == [("*/2 * * * *", True, "email-cron"), ("0 12 * * *", True, None)]

    # A changed cron is updated in place, `active: false` honoured, a dropped one deleted.
    write(project, [cron("*/5 * * * *", "email-cron", active=False)])
    deploy_ok(project, server)
    assert schedules(server) == [("*/5 * * * *", False, "email-cron")]

    # Removing the `active: false` line turns the schedule back on.
    write(project, [cron("*/5 * * * *", "email-cron")])
    deploy_ok(project, server)
    assert schedules(server) == [("*/5 * * * *", True, "email-cron")]

    # No `schedules:` key: no schedule (the seed's CronNever), but it can be triggered.
    # A run of the old schedule queued for a concurrency slot, which Prefect keeps when
    # the schedule goes, is deleted too.
    waiting = run_queued_for_a_slot(server)
    write(project, None, drop_key=True)
    out = deploy_ok(project, server)
    assert schedules(server) == []
    assert f"{JOB}: " in out and f" run(s) of {ORPHANS} deleted" in out
    deployment_id = deployed(server)["id"]
    runs = api(server, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
    assert waiting not in [r["id"] for r in runs]
    assert [r for r in runs if r["state_type"] == "SCHEDULED" and r["auto_scheduled"]] == []
    triggered = subprocess.run(
        [BACKJOBS, "trigger", JOB, "--project-dir", str(project)],
        env=server,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert triggered.returncode == 0, triggered.stderr
    assert f"{JOB}/{JOB}: flow run" in triggered.stdout

    # `schedules: []` as well.
    write(project, [cron("0 6 * * *", "email-cron")])
    deploy_ok(project, server)
    assert schedules(server) == [("0 6 * * *", True, "email-cron")]
    write(project, [])
    deploy_ok(project, server)
    assert schedules(server) == []

    # The pull step stores no path of the deploying machine.
    deployment = deployed(server)
    assert deployment["pull_steps"] == [{"backjobs.orchestration.deploy.set_project_directory": {}}]
    assert str(project) not in json.dumps(deployment)
    assert str(ROOT) not in json.dumps(deployment)


def test_a_never_firing_cron_is_refused_before_anything_is_deployed(
    server: dict[str, str], project: Path
) -> None:
    write(project, [cron("0 6 * * *", "email-cron")])
    deploy_ok(project, server)
    write(project, [cron("0 0 31 2 *", "email-cron")])
    done = deploy(project, server)
    assert done.returncode == 1
    assert "refusing to deploy" in done.stderr and "0 0 31 2 *" in done.stderr
    assert "never fires" in done.stderr
    assert schedules(server) == [("0 6 * * *", True, "email-cron")]


def test_deploy_in_the_callers_process_leaves_its_environment_folder_and_logging_as_they_were(
    server: dict[str, str], project: Path, tmp_path: Path
) -> None:
    """`stack up` deploys in its own process (Prefect's CLI in-process, with the stack's
    environment): afterwards the process is as it was, and a failure names Prefect's reason."""
    from backjobs.orchestration.deploy import DeployError
    from backjobs.orchestration.deploy import deploy as deploy_here

    environ, folder = dict(os.environ), Path.cwd()
    loggers = {name: list(logging.getLogger(name).handlers) for name in ("", "prefect")}
    write(project, [cron("0 7 * * *", "email-cron")])
    changes = deploy_here(project / "prefect.yaml", env=server)
    assert schedules(server) == [("0 7 * * *", True, "email-cron")]
    assert any("0 7 * * *" in line for line in changes[JOB].report), changes[JOB].report

    # A work pool the server does not have: Prefect refuses, in its own words.
    other = tmp_path / "other"
    other.mkdir()
    for name in ("flows", "tasks"):
        (other / name).symlink_to(ROOT / name)
    document = yaml.safe_load((project / "prefect.yaml").read_text())
    document["deployments"][0]["work_pool"]["name"] = "no-such-pool"
    (other / "prefect.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.raises(DeployError, match="no-such-pool") as refused:
        deploy_here(other / "prefect.yaml", env=server)
    assert "prefect deploy --all failed (exit 1)" in str(refused.value)

    assert dict(os.environ) == environ
    assert Path.cwd() == folder
    assert {name: logging.getLogger(name).handlers for name in loggers} == loggers
    assert schedules(server) == [("0 7 * * *", True, "email-cron")]


def run_queued_for_a_slot(
    env: dict[str, str], *, not_at: Callable[[datetime], bool] = lambda _: False
) -> str:
    """One run of the deployment's schedule in ``AwaitingConcurrencySlot`` (as Prefect
    leaves it when a deployment that queues has its slot taken), at a time ``not_at``
    refuses; its id."""
    deployment_id = deployed(env)["id"]
    call_json(
        "POST",
        f"{env['PREFECT_API_URL']}/deployments/{deployment_id}/schedule",
        body={"min_runs": 3, "max_runs": 3},
    )
    runs = api(env, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
    # The last one: due minutes ahead, so still due after a deploy that follows, however slow.
    run = max(
        (
            r
            for r in runs
            if r["auto_scheduled"]
            and r["state_type"] == "SCHEDULED"
            and not not_at(datetime.fromisoformat(r["expected_start_time"]))
        ),
        key=lambda r: datetime.fromisoformat(r["expected_start_time"]),
    )
    state = {
        "type": "SCHEDULED",
        "name": "AwaitingConcurrencySlot",
        "state_details": {"scheduled_time": run["expected_start_time"]},
    }
    answer = call_json(
        "POST",
        f"{env['PREFECT_API_URL']}/flow_runs/{run['id']}/set_state",
        body={"state": state, "force": True},
    )
    assert answer["status"] == "ACCEPT", answer
    return str(run["id"])


def api(env: dict[str, str], path: str, body: dict[str, object]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = call_json("POST", f"{env['PREFECT_API_URL']}/{path}", body=body)
    return found


def test_deploy_prints_what_changed_on_the_server_and_names_the_pause_it_reverted(
    server: dict[str, str], project: Path
) -> None:
    slug = "email-send-job-cron"
    write(project, [cron("*/2 * * * *", slug)])
    deploy_ok(project, server)

    # A cron edit: `prefect deploy` applies it itself; the report still shows it. A run of
    # the old cron that Prefect keeps (queued for a slot) at a time the new one never fires
    # is deleted, as the scheduler's race would leave one.
    waiting = run_queued_for_a_slot(server, not_at=lambda when: when.minute % 5 == 0)
    write(project, [cron("*/5 * * * *", slug)])
    out = deploy_ok(project, server)
    assert f"{JOB}: schedule {slug}: cron `*/2 * * * *` → `*/5 * * * *`" in out, out
    assert re.search(rf"{JOB}: [1-9][0-9]* scheduled run\(s\) of {ORPHANS} deleted", out), out
    assert waiting not in [r["id"] for r in runs_of(server)]

    # A pause made in the UI (its schedule toggle: PATCH the schedule's `active`).
    deployment = deployed(server)
    (schedule,) = deployment["schedules"]
    url = f"{server['PREFECT_API_URL']}/deployments/{deployment['id']}/schedules/{schedule['id']}"
    call_json("PATCH", url, body={"active": False})
    assert schedules(server) == [("*/5 * * * *", False, slug)]
    out = deploy_ok(project, server)
    assert (
        f"{JOB}: schedule {slug} `*/5 * * * *` re-activated (paused on the server; "
        "prefect.yaml says active — add `active: false` to keep it paused)"
    ) in out, out
    assert schedules(server) == [("*/5 * * * *", True, slug)]

    # A second automation of one name (Prefect allows it: two deploys at once, a copy made
    # by hand) is deleted and named: one alert per failure, and nothing left firing unseen.
    alert = f"backjobs-{JOB}-alert"
    (mine,) = [a for a in api(server, "automations/filter", {}) if a["name"] == alert]
    copy = {k: v for k, v in mine.items() if k not in ("id", "created", "updated")}
    call_json("POST", f"{server['PREFECT_API_URL']}/automations/", body=copy)
    out = deploy_ok(project, server)
    assert f"{JOB}: automation {alert}: 1 duplicate(s) deleted" in out, out
    left = [a for a in api(server, "automations/filter", {}) if a["name"] == alert]
    assert [a["description"] for a in left] == [mine["description"]]

    out = deploy_ok(project, server)
    assert out.strip() == f"{JOB}: unchanged: `*/5 * * * *` active"
    write(project, [cron("*/5 * * * *", slug, active=False)])
    out = deploy_ok(project, server)
    assert f"{JOB}: schedule {slug} `*/5 * * * *` paused" in out, out
    write(project, [])
    out = deploy_ok(project, server)
    assert f"{JOB}: schedule {slug} `*/5 * * * *` removed (not in prefect.yaml)" in out, out


# --- backjobs trigger and the job's one slot (deployment limit 1, CANCEL_NEW) -----------


@pytest.fixture(scope="module")
def app(
    server: dict[str, str], sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The server's environment plus an app database, as a worker and `trigger` get it."""
    folder = tmp_path_factory.mktemp("trigger-app")
    shutil.copyfile(sqlite_template, folder / "app.db")
    return server | {
        "BACKJOBS_DATABASE_URL": f"sqlite:///{folder / 'app.db'}",
        "BACKJOBS_STORAGE_ROOT": str(folder / "files"),
        "BACKJOBS_EMAIL_PICKUP_DIR": str(folder / "mail"),
        "PYTHONUNBUFFERED": "1",
    }


def runs_of(env: dict[str, str]) -> list[dict[str, Any]]:
    return api(env, "flow_runs/filter", {"deployments": {"id": {"any_": [deployed(env)["id"]]}}})


def scheduled_run(env: dict[str, str], *, at: datetime, as_of: str | None = None) -> str:
    """A run of the job, as the scheduler makes one, due ``at``."""
    body: dict[str, Any] = {
        "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": at.isoformat()}}
    }
    if as_of:
        body["parameters"] = {"as_of": as_of}
    run = call_json(
        "POST",
        f"{env['PREFECT_API_URL']}/deployments/{deployed(env)['id']}/create_flow_run",
        body=body,
    )
    return str(run["id"])


def set_state(env: dict[str, str], run_id: str, kind: str) -> Any:
    """What a worker (Pending) or the engine (Running, Completed) proposes for a run."""
    url = f"{env['PREFECT_API_URL']}/flow_runs/{run_id}/set_state"
    return call_json("POST", url, body={"state": {"type": kind}})


def complete(env: dict[str, str], run_id: str) -> None:
    """Running (once its scheduled time has come: the server says WAIT before), then
    Completed, so the server releases the slot as after a real run."""
    deadline = time.monotonic() + 60
    while (answer := set_state(env, run_id, "RUNNING"))["status"] != "ACCEPT":
        assert answer["status"] == "WAIT" and time.monotonic() < deadline, answer
        time.sleep(1)
    assert set_state(env, run_id, "COMPLETED")["status"] == "ACCEPT"


def read_until(process: subprocess.Popen[str], text: str) -> str:
    """The trigger's output up to the line holding ``text`` (it prints unbuffered)."""
    assert process.stdout is not None
    seen = ""
    while text not in seen:
        line = process.stdout.readline()
        assert line, f"trigger ended before printing {text!r}:\n{seen}"
        seen += line
    return seen


def start_trigger(env: dict[str, str], project: Path, *args: str) -> subprocess.Popen[str]:
    command = [BACKJOBS, "trigger", JOB, "--project-dir", str(project), *args]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_a_future_as_of_is_refused_by_trigger_before_any_run_exists(
    app: dict[str, str], project: Path
) -> None:
    write(project, [])
    deploy_ok(project, app)
    before = len(runs_of(app))
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    done = subprocess.run(
        [BACKJOBS, "trigger", JOB, "--as-of", future, "--wait", "--project-dir", str(project)],
        env=app,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "in the future" in line and "BACKJOBS_ALLOW_FUTURE_AS_OF" in line
    assert "no run was created" in line
    assert len(runs_of(app)) == before


def test_a_trigger_meeting_the_run_holding_the_slot_follows_it_or_queues_behind_it(
    prefect_server: PrefectServer, app: dict[str, str], project: Path
) -> None:
    write(project, [])
    deploy_ok(project, app)
    # 1. A scheduled run due in a few seconds is picked up early, just after the trigger
    # made its run: the trigger's run is Cancelled. The scheduled run is made once the
    # trigger's run exists, so its clock is later than the trigger's however slowly the
    # trigger started. The worker polls another queue, so the test itself moves the runs
    # to Pending, in that order, as the worker would.
    prefect_server.start_worker("backjobs", env=app, cwd=project, queue="elsewhere")
    known = {r["id"] for r in runs_of(app)}
    trigger = start_trigger(app, project, "--wait", "--timeout", "150")
    deadline = time.monotonic() + 60
    while not (ours := [r["id"] for r in runs_of(app) if r["id"] not in known]):
        assert time.monotonic() < deadline, "trigger made no run"
        time.sleep(0.2)
    holder = scheduled_run(app, at=datetime.now(UTC) + timedelta(seconds=3))
    assert set_state(app, holder, "PENDING")["status"] == "ACCEPT"
    lost = set_state(app, ours[0], "PENDING")
    assert lost["status"] == "REJECT" and lost["state"]["type"] == "CANCELLED"
    read_until(trigger, "covers this trigger: following it")
    complete(app, holder)
    out, err = trigger.communicate(timeout=120)
    assert trigger.returncode == 0, out + err
    assert f"{JOB}: completed" in out

    # 2. A run holding the slot with an older clock does not cover the trigger: it
    # queues behind it, then a real worker runs its own run.
    prefect_server.stop_workers()
    old = scheduled_run(app, at=datetime.now(UTC), as_of="2026-01-01T00:00:00Z")
    taken = set_state(app, old, "PENDING")
    assert taken["status"] == "ACCEPT", taken
    prefect_server.start_worker("backjobs", env=app, cwd=project)
    trigger = start_trigger(app, project, "--wait", "--timeout", "150")
    shown = read_until(trigger, "queueing behind it")
    assert "does not cover as_of" in shown and "2026-01-01T00:00:00+00:00" in shown
    complete(app, old)
    out, err = trigger.communicate(timeout=150)
    assert trigger.returncode == 0, shown + out + err
    assert "creating the run again" in out and f"{JOB}/{JOB}: flow run" in out
    assert f"{JOB}: completed" in out
    assert "Cancelled" not in out
    prefect_server.stop_workers()


def test_a_job_removed_from_prefect_yaml_loses_its_schedules_and_other_projects_keep_theirs(
    server: dict[str, str], project: Path, tmp_path: Path
) -> None:
    """A job dropped from prefect.yaml loses its schedules (``prefect deploy`` alone keeps
    its cron running) and its silence; deploy says what is left and how to delete it, at
    every deploy, and a run of it started by hand is still alerted. A deployment of another
    project (no backjobs pull step) on the same server keeps its schedule and is not named."""
    both = tmp_path / "both"
    both.mkdir()
    for name in ("flows", "tasks"):
        (both / name).symlink_to(ROOT / name)
    document = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    document["deployments"] = [
        d for d in document["deployments"] if d["name"] in ("cleanup-job", JOB)
    ]
    (both / "prefect.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    deploy_ok(both, server)
    base = server["PREFECT_API_URL"]
    flow = call_json("POST", f"{base}/flows/", body={"name": "other-project-flow"})
    other = call_json(
        "POST",
        f"{base}/deployments/",
        body={
            "name": "other-project",
            "flow_id": flow["id"],
            "schedules": [{"schedule": {"cron": "0 1 * * *", "timezone": "UTC"}, "active": True}],
        },
    )
    try:
        write(project, [cron("*/2 * * * *", "email-cron")])  # email-send-job alone
        out = deploy_ok(project, server)
        assert (
            "cleanup-job: schedule cleanup-job-cron `0 23 * * *` removed (the job is not in "
            "prefect.yaml)"
        ) in out, out
        left = (
            "cleanup-job: not in prefect.yaml: never runs on its own; the deployment stays on"
            " the server with its past runs, a run started by hand still alerted (`prefect"
            " deployment delete cleanup-job/cleanup-job` deletes it, and the next deploy its"
            " automations)"
        )
        assert left in out, out
        # Watched as a job without a schedule: no silence, the alert and zombie kept.
        assert "cleanup-job: automation backjobs-cleanup-job-silent deleted" in out, out
        assert "backjobs-cleanup-job-alert" not in out and "-cleanup-job-zombie" not in out, out
        automations = call_json("POST", f"{base}/automations/filter", body={})
        assert sorted(a["name"] for a in automations if "cleanup-job" in a["name"]) == [
            "backjobs-cleanup-job-alert",
            "backjobs-cleanup-job-zombie",
        ]
        assert "other-project" not in out, out
        retired = call_json("GET", f"{base}/deployments/name/cleanup-job/cleanup-job")
        assert retired["schedules"] == []
        kept = call_json("GET", f"{base}/deployments/{other['id']}")
        assert [s["schedule"]["cron"] for s in kept["schedules"]] == ["0 1 * * *"]
        assert schedules(server) == [("*/2 * * * *", True, "email-cron")]

        again = deploy_ok(project, server)  # nothing left to remove: the reminder alone
        assert [line for line in again.splitlines() if line.startswith("cleanup-job")] == [left]
    finally:
        for deployment_id in (other["id"], retired_id(base)):
            if deployment_id:
                call_json("DELETE", f"{base}/deployments/{deployment_id}")


def retired_id(base: str) -> str | None:
    found = call("GET", f"{base}/deployments/name/cleanup-job/cleanup-job")
    return str(found.json()["id"]) if found.status_code == 200 else None
