"""prefect.yaml validation: what Prefect would deploy silently is caught before."""

from __future__ import annotations

from pathlib import Path

import pytest

from backjobs.cli import main
from backjobs.orchestration.prefect_yaml import (
    check_project_file,
    cron_problem,
    describe_cron,
    find_deployment,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_projects_prefect_yaml_is_valid() -> None:
    assert check_project_file(ROOT / "prefect.yaml") == []
    assert main(["deployments", "check", str(ROOT / "prefect.yaml")]) == 0


@pytest.mark.parametrize("cron", ["0 23 * * *", "*/2 * * * *", "5 0 * * *", "0 0 29 2 *"])
def test_crons_that_fire_pass(cron: str) -> None:
    assert cron_problem(cron) is None


@pytest.mark.parametrize(
    ("cron", "why"), [("0 0 31 2 *", "never fires"), ("61 * * * *", "not a valid"), ("x", "valid")]
)
def test_crons_that_cannot_fire_are_rejected(cron: str, why: str) -> None:
    problem = cron_problem(cron)
    assert problem is not None and why in problem and cron in problem


def _write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "job.py").write_text("job_flow = 1\n")
    path = tmp_path / "prefect.yaml"
    path.write_text(body)
    return path


def test_every_problem_is_named(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
deployments:
  - name: cleanup-job
    entrypoint: flows/job.py:job_flow
    schedules:
      - cron: "0 0 31 2 *"
        timezone: Mars/Olympus
  - name: cleanup-job
    entrypoint: flows/missing.py:x
    job_variables:
      env:
        BACKJOBS_SMTP_PASSWORD: hunter2
""",
    )
    problems = "\n".join(check_project_file(path))
    assert "never fires" in problems
    assert "Mars/Olympus" in problems
    assert "duplicate deployment name" in problems
    assert "flows/missing.py does not exist" in problems
    assert "BACKJOBS_SMTP_PASSWORD" in problems and "hunter2" not in problems
    assert main(["deployments", "check", str(path)]) == 1


def test_jobs_are_found_by_flow_or_seed_name_and_unknown_ones_listed() -> None:
    path = ROOT / "prefect.yaml"
    assert find_deployment(path, "CleanupJob")["name"] == "cleanup-job"
    assert find_deployment(path, "cleanup-job")["name"] == "cleanup-job"
    with pytest.raises(LookupError, match=r"unknown job 'NoSuchJob'.*cleanup-job \(CleanupJob\)"):
        find_deployment(path, "NoSuchJob")


def test_trigger_without_a_server_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["trigger", "cleanup-job", "--project-dir", str(ROOT)]) == 2
    assert "PREFECT_API_URL" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cron", "words"),
    [
        ("0 23 * * *", "daily at 23:00 UTC"),
        ("5 0 * * *", "daily at 00:05 UTC"),
        ("*/2 * * * *", "every 2 minutes"),
        ("15 * * * *", "hourly at minute 15"),
        ("30 6 * * 1", "weekly on Monday at 06:30 UTC"),
        ("0 3 1 * *", "monthly on day 1 at 03:00 UTC"),
        ("0 9-17 * * 1-5", None),
    ],
)
def test_a_cron_in_words(cron: str, words: str | None) -> None:
    assert describe_cron(cron) == words


def test_a_description_that_drifted_from_its_schedule_is_named(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
deployments:
  - name: a-job
    description: "Daily at 23:00 UTC — `0 23 * * *`. Does things."
    entrypoint: flows/job.py:job_flow
    schedules:
      - cron: "0 22 * * *"
  - name: b-job
    description: "Sends things every few minutes — `*/5 * * * *`."
    entrypoint: flows/job.py:job_flow
    schedules:
      - cron: "*/5 * * * *"
  - name: c-job
    description: "Does things."
    entrypoint: flows/job.py:job_flow
  - name: d-job
    description: "Daily at 01:00 UTC — `0 1 * * *`."
    entrypoint: flows/job.py:job_flow
    schedules:
      - cron: "0 1 * * *"
        active: false
  - name: e-job
    description: "No schedule: triggered by hand."
    entrypoint: flows/job.py:job_flow
""",
    )
    problems = check_project_file(path)
    assert problems == [
        "a-job: description states `0 23 * * *` but the schedule is `0 22 * * *`; write the "
        "cron in backticks, e.g. 'daily at 22:00 UTC — `0 22 * * *`'",
        "a-job: description must state `0 22 * * *` in words: 'daily at 22:00 UTC'",
        "b-job: description must state `*/5 * * * *` in words: 'every 5 minutes'",
        "c-job: description must say 'no schedule' (the deployment has none)",
        "d-job: schedule `0 1 * * *` is inactive: say 'paused'",
    ]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("- name: a-job\n", "must be a mapping with a 'deployments' list, not a list"),
        ("just words\n", "must be a mapping with a 'deployments' list, not a str"),
        ("deployments: {name: a-job}\n", "'deployments' must be a list, not a mapping"),
        ("deployments:\n  - a-job\n", "deployments[0]: must be a mapping, not a str"),
        (
            "deployments:\n  - name: a-job\n    entrypoint: flows/job.py:job_flow\n"
            "    description: no schedule\n    schedules: {cron: '0 1 * * *'}\n",
            "a-job: 'schedules' must be a list, not a mapping",
        ),
    ],
)
def test_any_yaml_is_a_problem_line_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, problem: str
) -> None:
    path = _write(tmp_path, body)
    assert any(problem in p for p in check_project_file(path)), check_project_file(path)
    assert main(["deployments", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("cron", "why"),
    [
        ("61 0 * * *", "minute 61 is not between 0 and 59"),
        ("0 24 * * *", "hour 24 is not between 0 and 23"),
        ("0 0 0 * *", "day 0 is not between 1 and 31"),
        ("*/61 * * * *", "minute step '61' is not between 1 and 59"),
        ("0 0 * * 8", "weekday 8 is not between 0 and 7"),
    ],
)
def test_out_of_range_fields_are_invalid_crons_and_never_worded(cron: str, why: str) -> None:
    problem = cron_problem(cron)
    assert problem is not None and "not a valid cron expression" in problem and why in problem
    assert describe_cron(cron) is None


def test_every_description_problem_at_once_and_never_none(tmp_path: Path) -> None:
    """Two schedules, one removed and the other paused in one edit: one check names all."""
    path = _write(
        tmp_path,
        """
deployments:
  - name: a-job
    description: "Daily at 06:00 UTC — `0 6 * * *`; every 5 minutes — `*/5 * * * *`."
    entrypoint: flows/job.py:job_flow
    schedules:
      - cron: "0 9-17 * * 1-5"
        active: false
""",
    )
    problems = check_project_file(path)
    assert problems == [
        "a-job: description states `*/5 * * * *`, `0 6 * * *` but the schedule is "
        "`0 9-17 * * 1-5`; write the cron in backticks, e.g. '`0 9-17 * * 1-5` (paused)'",
        "a-job: schedule `0 9-17 * * 1-5` is inactive: say 'paused'",
    ]
    assert not any("None" in p for p in problems)


def test_cleanup_jobs_description_names_its_four_parts() -> None:
    description = find_deployment(ROOT / "prefect.yaml", "cleanup-job")["description"].lower()
    for part in ("refresh tokens", "markers trash", "abandoned uploads", "outbox rows"):
        assert part in description
