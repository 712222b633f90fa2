"""``backjobs deploy`` against a real Prefect server: the server holds exactly the file's
schedules, whatever was deployed before; a never-firing cron is refused; the pull step
stores no path of the deploying machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from backjobs.orchestration.prefect_yaml import describe_cron
from tests.support.prefect_api import call_json
from tests.support.prefect_server import PrefectServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
BACKJOBS = str(Path(sys.executable).with_name("backjobs"))
JOB = "email-send-job"


@pytest.fixture(scope="module")
def server(prefect_server: PrefectServer) -> dict[str, str]:
    """The module's Prefect server (tests/support/prefect_server.py) with the work pool."""
    create = [PREFECT, "work-pool", "create", "--type", "process", "backjobs"]
    subprocess.run(create, env=prefect_server.env, check=True, capture_output=True, timeout=60)
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
    write(project, None, drop_key=True)
    deploy_ok(project, server)
    assert schedules(server) == []
    deployment_id = deployed(server)["id"]
    runs = api(server, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
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


def api(env: dict[str, str], path: str, body: dict[str, object]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = call_json("POST", f"{env['PREFECT_API_URL']}/{path}", body=body)
    return found
