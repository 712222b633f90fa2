"""prefect.yaml: the one list of jobs. Finding it, loading a job's flow, validating it.

``check_project_file`` catches before deploying what Prefect would accept silently: a
cron that can never fire (``0 0 31 2 *`` deploys READY and then logs errors on every
scheduler pass), an unknown timezone, an entrypoint that does not exist, a duplicate
name, a secret written into the file, and a description whose schedule has drifted from
the deployment's schedules.

Each deployment's description states its schedule for the UI (which shows a schedule's
slug, never its cron): in words where :func:`describe_cron` can say it, and the cron in
backticks, e.g. ``daily at 23:00 UTC — `0 23 * * *` ``; a deployment without schedules
says ``no schedule``, an inactive schedule ``paused``. The check compares them.
"""

from __future__ import annotations

import ast
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

PROJECT_FILE = "prefect.yaml"
SECRET_KEYS = re.compile(r"(password|secret|token|api_key|auth_string)", re.IGNORECASE)


def find_project_file(start: str | Path | None = None) -> Path:
    """prefect.yaml in ``start`` (default: the working directory) or the nearest parent."""
    here = Path(start or Path.cwd()).resolve()
    if here.is_file():
        return here
    for folder in (here, *here.parents):
        candidate = folder / PROJECT_FILE
        if candidate.is_file():
            return candidate
    raise LookupError(f"no {PROJECT_FILE} in {here} or any parent folder")


def load_deployments(path: Path) -> list[dict[str, Any]]:
    """The ``deployments:`` entries that are mappings; ValueError when the document is not
    a mapping (a YAML list or scalar) or ``deployments`` is not a list."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [d for d in _deployment_entries(path, document) if isinstance(d, dict)]


def _deployment_entries(path: Path, document: Any) -> list[Any]:
    if document is None:
        return []
    if not isinstance(document, dict):
        raise ValueError(
            f"{path}: the file must be a mapping with a 'deployments' list, not a "
            f"{_yaml_kind(document)}"
        )
    deployments = document.get("deployments") or []
    if not isinstance(deployments, list):
        raise ValueError(f"{path}: 'deployments' must be a list, not a {_yaml_kind(deployments)}")
    return deployments


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return f"{type(value).__name__} ({value!r:.40})"


def kebab(name: str) -> str:
    """``ProcessRecurringTransactionsJob`` -> ``process-recurring-transactions-job``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def seed_name(flow_name: str) -> str:
    """``cleanup-job`` -> ``CleanupJob``."""
    return "".join(part.capitalize() for part in flow_name.split("-"))


def find_deployment(path: Path, job: str) -> dict[str, Any]:
    """The deployment of ``job``, given as flow name or seed name (any case). Reads only
    prefect.yaml: a mistyped name is refused before anything imports Prefect."""
    wanted = job.strip()
    wanted = wanted.lower() if "-" in wanted else kebab(wanted)
    deployments = load_deployments(path)
    for deployment in deployments:
        if str(deployment.get("name", "")).lower() == wanted:
            return deployment
    known = ", ".join(f"{d['name']} ({seed_name(d['name'])})" for d in deployments if "name" in d)
    raise LookupError(f"unknown job {job!r}; known jobs: {known or 'none'}")


def load_job_flow(path: Path, deployment: dict[str, Any]) -> Any:
    """Import the flow of ``deployment`` (from :func:`find_deployment`) from its entrypoint,
    relative to prefect.yaml's folder."""
    from prefect.flows import load_flow_from_entrypoint

    root = path.parent
    script, _, function = str(deployment["entrypoint"]).rpartition(":")
    if str(root) not in sys.path:
        # flows/ and tasks/ import each other from the project root, as on a worker.
        sys.path.insert(0, str(root))
    return load_flow_from_entrypoint(f"{root / script}:{function}", use_placeholder_flow=False)


def check_project_file(path: str | Path) -> list[str]:
    """Every problem found in prefect.yaml; an empty list means it can be deployed."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        entries = _deployment_entries(path, document)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return [f"cannot read: {' '.join(str(exc).split())}"]
    except ValueError as exc:
        return [str(exc).removeprefix(f"{path}: ")]
    problems = _secrets_written_in(document)
    if not entries:
        problems.append("no deployments")
    seen: set[str] = set()
    for index, deployment in enumerate(entries):
        if not isinstance(deployment, dict):
            problems.append(
                f"deployments[{index}]: must be a mapping, not a {_yaml_kind(deployment)}"
            )
            continue
        name = str(deployment.get("name") or f"deployments[{index}]")
        if name in seen:
            problems.append(f"{name}: duplicate deployment name")
        seen.add(name)
        problems += [f"{name}: {p}" for p in _check_deployment(path.parent, deployment)]
    return problems


def _check_deployment(root: Path, deployment: dict[str, Any]) -> list[str]:
    problems = []
    if not deployment.get("name"):
        problems.append("no name")
    entrypoint = str(deployment.get("entrypoint") or "")
    script, _, function = entrypoint.rpartition(":")
    if not script or not function:
        problems.append(f"entrypoint {entrypoint!r} is not 'path/to/file.py:flow_name'")
    elif not (root / script).is_file():
        problems.append(f"entrypoint file {script} does not exist")
    else:
        problems += _entrypoint_problems(root, script, function)
    schedules = deployment.get("schedules") or []
    if not isinstance(schedules, list):
        return [*problems, f"'schedules' must be a list, not a {_yaml_kind(schedules)}"]
    for position, schedule in enumerate(schedules):
        problems += [f"schedule {position + 1}: {p}" for p in check_schedule(schedule)]
    problems += description_problems(str(deployment.get("description") or ""), schedules)
    return problems


CRON_IN_BACKTICKS = re.compile(r"`([^`]+)`")
DAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


def describe_cron(cron: str, timezone: str = "UTC") -> str | None:
    """A cron in words for the common shapes (``0 23 * * *`` -> ``daily at 23:00 UTC``).

    None for shapes it does not word (lists, ranges, steps other than minutes); the cron
    itself, shown beside the words, says those.
    """
    fields = cron.split()
    if len(fields) != 5 or field_problems(cron):
        return None
    minute, hour, day, month, weekday = fields
    if (hour, day, month, weekday) == ("*", "*", "*", "*"):
        if minute == "*":
            return "every minute"
        if minute.startswith("*/") and minute[2:].isdigit():
            step = int(minute[2:])
            # */7 fires at :56 and again at :00: "every 7 minutes" only when 60 divides.
            return f"every {step} minutes" if 60 % step == 0 else None
        if minute.isdigit():
            return f"hourly at minute {int(minute)}"
        return None
    if not (minute.isdigit() and hour.isdigit() and month == "*"):
        return None
    at = f"at {int(hour):02d}:{int(minute):02d} {timezone}"
    if day == "*" and weekday == "*":
        return f"daily {at}"
    if day == "*" and weekday.isdigit() and int(weekday) <= 7:
        return f"weekly on {DAYS[int(weekday) % 7]} {at}"
    if weekday == "*" and day.isdigit():
        return f"monthly on day {int(day)} {at}"
    return None


def description_problems(description: str, schedules: list[Any]) -> list[str]:
    """Where the description's stated schedule differs from the deployment's schedules."""
    stated = {c.strip() for c in CRON_IN_BACKTICKS.findall(description) if len(c.split()) == 5}
    crons = [s for s in schedules if isinstance(s, dict) and "cron" in s]
    actual = {str(s["cron"]).strip() for s in crons}
    if not crons:
        if stated:
            return [f"description states {_listed(stated)} but the deployment has no schedule"]
        if "no schedule" not in description.lower():
            return ["description must say 'no schedule' (the deployment has none)"]
        return []
    problems = []
    if stated != actual:
        problems.append(
            f"description states {_listed(stated) or 'no cron'} but the schedule is "
            f"{_listed(actual)}; write the cron in backticks, e.g. "
            f"'{suggested_description(crons)}'"
        )
    for schedule in crons:
        if cron_problem(str(schedule["cron"])):
            continue  # named as an invalid cron already; no words for it
        words = describe_cron(str(schedule["cron"]), str(schedule.get("timezone", "UTC")))
        if words and words.lower() not in description.lower():
            problems.append(f"description must state `{schedule['cron']}` in words: {words!r}")
        if schedule.get("active") is False and "paused" not in description.lower():
            problems.append(f"schedule `{schedule['cron']}` is inactive: say 'paused'")
    return problems


def suggested_description(schedules: list[dict[str, Any]]) -> str:
    """What a description should state for these schedules: each one's words (where
    :func:`describe_cron` has them), cron in backticks, and ``(paused)`` when inactive."""
    stated = []
    for schedule in schedules:
        cron = str(schedule["cron"])
        words = describe_cron(cron, str(schedule.get("timezone", "UTC")))
        paused = " (paused)" if schedule.get("active") is False else ""
        stated.append(f"{words} — `{cron}`{paused}" if words else f"`{cron}`{paused}")
    return "; ".join(stated)


def _listed(crons: set[str]) -> str:
    return ", ".join(f"`{c}`" for c in sorted(crons))


def check_schedule(schedule: Any) -> list[str]:
    """Problems of one schedule entry: its cron must parse and fire, its timezone exist."""
    if not isinstance(schedule, dict):
        return ["must be a mapping with a 'cron' key"]
    if "cron" not in schedule:
        return ["only cron schedules are used here; 'cron' is missing"]
    problems = []
    zone: ZoneInfo | None = None
    timezone = schedule.get("timezone", "UTC")
    try:
        zone = ZoneInfo(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(f"unknown timezone {timezone!r}")
    problem = cron_problem(str(schedule["cron"]), zone or UTC, day_or=schedule.get("day_or", True))
    if problem:
        problems.append(problem)
    return problems


# Each field's name and range (day of week: 0 and 7 are Sunday).
CRON_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day", 1, 31),
    ("month", 1, 12),
    ("weekday", 0, 7),
)
CRON_NUMBER = re.compile(r"\d+")


def field_problems(cron: str) -> list[str]:
    """Numbers outside their field's range (``61 0 * * *``), and steps of 0 or beyond the
    range (``*/0``, ``*/61``). Names (``jan``, ``mon``) and croniter's ``L``/``#`` are
    left to croniter."""
    fields = cron.split()
    if len(fields) != 5:
        return []
    problems = []
    for text, (name, low, high) in zip(fields, CRON_FIELDS, strict=True):
        for item in text.split(","):
            body, _, step = item.partition("/")
            if step and (not step.isdigit() or not 1 <= int(step) <= high):
                problems.append(f"{name} step {step!r} is not between 1 and {high}")
            for number in CRON_NUMBER.findall(body):
                if "#" not in body and not low <= int(number) <= high:
                    problems.append(f"{name} {int(number)} is not between {low} and {high}")
    return problems


def cron_problem(cron: str, zone: Any = UTC, *, day_or: bool = True) -> str | None:
    """Why ``cron`` cannot be used (invalid, or never fires), or None when it is fine."""
    # The croniter that Prefect's own scheduler uses, so both agree on what is valid.
    from prefect._vendor.croniter import croniter  # type: ignore[attr-defined]

    out_of_range = field_problems(cron)
    if out_of_range:
        return f"cron {cron!r} is not a valid cron expression: {'; '.join(out_of_range)}"
    try:
        if not croniter.is_valid(cron):  # type: ignore[no-untyped-call]
            return f"cron {cron!r} is not a valid cron expression"
        start = datetime(2026, 1, 1, tzinfo=zone)
        it = croniter(cron, start, day_or=day_or, max_years_between_matches=8)  # type: ignore[no-untyped-call]
        it.get_next(datetime)  # type: ignore[no-untyped-call]
    except Exception:
        return f"cron {cron!r} never fires (no such date in 8 years)"
    return None


def _entrypoint_problems(root: Path, script: str, function: str) -> list[str]:
    try:
        names = _top_level_names(root / script)
    except SyntaxError as exc:
        return [f"entrypoint file {script} does not parse: {exc.msg} (line {exc.lineno})"]
    except (OSError, UnicodeDecodeError) as exc:
        return [f"entrypoint file {script} cannot be read: {exc}"]
    if function not in names:
        return [f"entrypoint {script}:{function}: no top-level {function!r} in {script}"]
    return []


def _top_level_names(script: Path) -> set[str]:
    tree = ast.parse(script.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _secrets_written_in(document: Any, where: str = "") -> list[str]:
    problems = []
    if isinstance(document, dict):
        for key, value in document.items():
            place = f"{where}.{key}" if where else str(key)
            if SECRET_KEYS.search(str(key)) and isinstance(value, str) and value:
                if not value.startswith("{{"):
                    problems.append(f"{place}: a secret written into the file; use a Secret block")
            problems += _secrets_written_in(value, place)
    elif isinstance(document, list):
        for position, value in enumerate(document):
            problems += _secrets_written_in(value, f"{where}[{position}]")
    return problems
