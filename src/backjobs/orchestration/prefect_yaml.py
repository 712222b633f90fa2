"""prefect.yaml: the one list of jobs. Finding it, loading a job's flow, validating it.

``check_project_file`` catches before deploying what Prefect would accept silently: a
cron that can never fire (``0 0 31 2 *`` deploys READY and then logs errors on every
scheduler pass), an unknown timezone, an entrypoint that does not exist, a duplicate
name, a secret written into the file.
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
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    deployments = document.get("deployments") or []
    if not isinstance(deployments, list):
        raise ValueError(f"{path}: 'deployments' must be a list")
    return [d for d in deployments if isinstance(d, dict)]


def seed_name(flow_name: str) -> str:
    """``cleanup-job`` -> ``CleanupJob``."""
    return "".join(part.capitalize() for part in flow_name.split("-"))


def find_deployment(path: Path, job: str) -> dict[str, Any]:
    """The deployment of ``job``, given as flow name or seed name (any case)."""
    from backjobs.orchestration.jobbase import kebab

    wanted = job.strip()
    wanted = wanted.lower() if "-" in wanted else kebab(wanted)
    deployments = load_deployments(path)
    for deployment in deployments:
        if str(deployment.get("name", "")).lower() == wanted:
            return deployment
    known = ", ".join(f"{d['name']} ({seed_name(d['name'])})" for d in deployments if "name" in d)
    raise LookupError(f"unknown job {job!r}; known jobs: {known or 'none'}")


def load_job_flow(path: Path, job: str) -> Any:
    """Import the job's flow from its entrypoint, relative to prefect.yaml's folder."""
    from prefect.flows import load_flow_from_entrypoint

    deployment = find_deployment(path, job)
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
        text = path.read_text(encoding="utf-8")
        deployments = load_deployments(path)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        return [f"cannot read: {exc}"]
    problems = _secrets_written_in(yaml.safe_load(text))
    if not deployments:
        problems.append("no deployments")
    seen: set[str] = set()
    for index, deployment in enumerate(deployments):
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
    for position, schedule in enumerate(deployment.get("schedules") or []):
        problems += [f"schedule {position + 1}: {p}" for p in check_schedule(schedule)]
    return problems


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


def cron_problem(cron: str, zone: Any = UTC, *, day_or: bool = True) -> str | None:
    """Why ``cron`` cannot be used (invalid, or never fires), or None when it is fine."""
    # The croniter that Prefect's own scheduler uses, so both agree on what is valid.
    from prefect._vendor.croniter import croniter  # type: ignore[attr-defined]

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
