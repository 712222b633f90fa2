"""Who may call which route: the machine configures, an admin (a human) operates.

The **machine** credential (``BACKJOBS_DASHBOARD_AUTH_STRING``: workers, ``prefect
deploy``, ``backjobs deploy``/``trigger``) may call everything, as Prefect's own auth
string would. A **human** (an admin's JWT) may call only the routes named in
:data:`HUMAN_ROUTES`, an allow-list of (method, path pattern): deny by default, so a route
a new Prefect version adds stays closed to admins until it is named here. What the list
names:

- reading everything (``GET``, and the reads the UI makes with ``POST``: ``…/filter``,
  ``…/count``, ``…/paginate``, ``…/history``, ``/api/ui/…``, ``/api/events/filter``),
  except secret values: a block read with ``include_secrets`` (in the query, as FastAPI
  parses it, or in a filter's body) is refused, so secret fields come back obfuscated.
  Variables are readable: Prefect's variables are not for secrets, and backjobs keeps none;
- creating runs of existing deployments with parameters only (no ``job_variables``: they
  choose the command and environment of the run's process on the worker; no
  ``work_queue_name``: Prefect creates a missing queue, and another queue escapes the
  deployment's queue and its limits);
- cancelling, retrying or setting the state of runs, resuming paused runs;
- pausing and resuming deployments and schedules (the ``active`` or ``paused`` field
  only: a cron or a parameter change is a deployment change).

Everything else is the machine's: creating, updating or deleting deployments, work pools
and their base job templates, work queues, blocks, variables, automations, concurrency
limits, flows and saved searches, deleting runs, writing logs, artifacts and events
(events in). The UI's pages (every ``GET`` outside ``/api/``) are open to admins.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

from starlette.datastructures import QueryParams

from backjobs.clock import FutureAsOfRefused, check_as_of, to_utc
from backjobs.settings import get_settings


class Role(StrEnum):
    HUMAN = "human"
    MACHINE = "machine"


class Kind(StrEnum):
    READ = "read"  # changes nothing: not audited
    OPERATE = "operate"  # changes something: one audit line


# A body check: None when the JSON body is acceptable, else why it is refused.
BodyCheck = Callable[[Any], str | None]


class Rule(NamedTuple):
    method: str
    pattern: re.Pattern[str]
    kind: Kind
    body_check: BodyCheck | None


class Decision(NamedTuple):
    allowed: bool
    kind: Kind
    body_check: BodyCheck | None  # to run on the request's JSON body before letting it in
    reason: str


def _no_secrets(body: Any) -> str | None:
    if isinstance(body, dict) and body.get("include_secrets") not in (None, False):
        return "include_secrets is for the machine credential"
    return None


# What a human may send when creating a run of a deployment. The UI's custom run sends
# some of these; job_variables is accepted only empty (the UI sends {}), work_queue_name
# only null: Prefect creates a named queue that is missing, and a run on a queue of its
# own escapes its deployment's queue and that queue's limits.
RUN_FIELDS = frozenset(
    {
        "name",
        "parameters",
        "state",
        "tags",
        "labels",
        "idempotency_key",
        "enforce_parameter_schema",
        "empirical_policy",
        "context",
        "work_queue_name",
        "parent_task_run_id",
        "job_variables",
    }
)


def _parameters_only(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    unknown = sorted(set(body) - RUN_FIELDS)
    if unknown:
        return f"fields {', '.join(unknown)} are for the machine credential"
    if body.get("job_variables"):
        return "job_variables are for the machine credential"
    if body.get("work_queue_name") is not None:
        return "work_queue_name is for the machine credential (the deployment's queue is used)"
    return _future_as_of(body.get("parameters"))


def _future_as_of(parameters: Any) -> str | None:
    """A run "from the future" is refused here, before it exists, as ``backjobs trigger``
    refuses it (the worker would refuse it too, leaving a Failed run in the history).
    A value that is no date-time is left to the server's parameter check."""
    value = parameters.get("as_of") if isinstance(parameters, dict) else None
    if not isinstance(value, str):
        return None
    try:
        as_of = to_utc(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        return None
    try:
        check_as_of(as_of, now=datetime.now(UTC), allow_future=get_settings().allow_future_as_of)
    except FutureAsOfRefused as refused:
        return str(refused)
    return None


def _only(*fields: str) -> BodyCheck:
    allowed = frozenset(fields)

    def check(body: Any) -> str | None:
        if not isinstance(body, dict) or not body or set(body) - allowed:
            return f"only {', '.join(sorted(allowed))} may be changed by an admin"
        return None

    return check


def _rule(method: str, path: str, kind: Kind, body_check: BodyCheck | None = None) -> Rule:
    pattern = re.escape(path).replace(r"\*", "[^/]+")
    return Rule(method, re.compile(f"/api{pattern}"), kind, body_check)


_R, _O = Kind.READ, Kind.OPERATE
_GET_READS = """
    /admin/settings /admin/storage /admin/version /artifacts/* /artifacts/*/latest
    /automations/* /automations/related-to/* /block_capabilities/ /block_documents/*
    /block_schemas/* /block_schemas/checksum/* /block_types/* /block_types/slug/*
    /block_types/slug/*/block_documents /block_types/slug/*/block_documents/name/*
    /collections/views/* /concurrency_limits/* /concurrency_limits/tag/* /csrf-token
    /deployments/* /deployments/*/schedules /deployments/*/work_queue_check
    /deployments/name/*/* /events/filter/next /flow_run_states/ /flow_run_states/*
    /flow_runs/* /flow_runs/*/graph /flow_runs/*/graph-v2 /flow_runs/*/input/*
    /flow_runs/*/logs/download /flows/* /flows/name/* /hello /observed-states /ready
    /saved_searches/* /task_run_states/ /task_run_states/* /task_runs/* /ui/task_runs/*
    /v2/concurrency_limits/* /variables/* /variables/name/* /version /work_pools/*
    /work_pools/*/queues/* /work_queues/* /work_queues/*/status /work_queues/name/*
""".split()
_POST_READS = """
    /artifacts/count /artifacts/filter /artifacts/latest/count /artifacts/latest/filter
    /automations/count /automations/filter /block_documents/count /block_schemas/filter
    /block_types/filter /concurrency_limits/filter /deployments/count /deployments/filter
    /deployments/paginate /events/count-by/* /events/filter /flow_runs/count
    /flow_runs/filter /flow_runs/history /flow_runs/lateness /flow_runs/paginate
    /flow_runs/*/input/filter /flows/count /flows/filter /flows/paginate /logs/filter
    /saved_searches/filter /task_runs/count /task_runs/filter /task_runs/history
    /task_runs/paginate /task_workers/filter /ui/flow_runs/count-task-runs
    /ui/flow_runs/history /ui/flows/count-deployments /ui/flows/next-runs
    /ui/schemas/validate /ui/task_runs/count /ui/task_runs/dashboard/counts
    /v2/concurrency_limits/filter /variables/count /variables/filter /work_pools/count
    /work_pools/filter /work_pools/*/concurrency_status /work_pools/*/queues/filter
    /work_pools/*/workers/filter /work_queues/filter /work_queues/*/concurrency_status
""".split()

HUMAN_ROUTES: tuple[Rule, ...] = (
    *(_rule("GET", path, _R) for path in _GET_READS),
    *(_rule("POST", path, _R) for path in _POST_READS),
    _rule("POST", "/block_documents/filter", _R, _no_secrets),
    _rule("POST", "/deployments/*/create_flow_run", _O, _parameters_only),
    _rule("POST", "/flow_runs/*/set_state", _O),
    _rule("POST", "/flow_runs/bulk_set_state", _O),
    _rule("POST", "/flow_runs/*/resume", _O),
    _rule("POST", "/task_runs/*/set_state", _O),
    _rule("POST", "/deployments/*/pause_deployment", _O),
    _rule("POST", "/deployments/*/resume_deployment", _O),
    _rule("PATCH", "/deployments/*", _O, _only("paused")),
    _rule("PATCH", "/deployments/*/schedules/*", _O, _only("active")),
)

# Websockets a human may open: reading events and logs. Events in, the worker channel
# and task-run subscriptions (which claim work) are the machine's.
HUMAN_SOCKETS = frozenset({"/api/events/out", "/api/logs/out"})

# What the machine calls often that changes nothing an operator audits (reads by POST,
# polls, heartbeats, its own logs and events).
MACHINE_READS = re.compile(
    r"/api/(.*/)?(filter|count|paginate|history|lateness|next-runs|validate"
    r"|get_scheduled_flow_runs|get_runs|heartbeat|concurrency_status|count-task-runs"
    r"|count-deployments)(/.*)?|/api/(logs|events)/?"
)


def _odd_path(path: str) -> bool:
    return any(part in (".", "..") for part in path.split("/")) or "//" in path


def decide(role: Role, method: str, path: str, query: bytes) -> Decision:
    """May ``role`` call ``method path``? For a human, the matching allow-list rule."""
    if role is Role.MACHINE:
        read = method in ("GET", "HEAD") or bool(MACHINE_READS.fullmatch(path))
        return Decision(True, Kind.READ if read else Kind.OPERATE, None, "")
    if _odd_path(path):
        return Decision(False, Kind.OPERATE, None, "an odd path")
    if not path.startswith("/api/"):  # the UI's pages and assets
        allowed = method in ("GET", "HEAD")
        return Decision(allowed, Kind.READ, None, "" if allowed else "not a page")
    if query and _asks_for_secrets(query):
        return Decision(False, Kind.READ, None, "include_secrets is for the machine credential")
    lookup = "GET" if method == "HEAD" else method
    for rule in HUMAN_ROUTES:
        if rule.method == lookup and rule.pattern.fullmatch(path):
            return Decision(True, rule.kind, rule.body_check, "")
    kind = Kind.READ if method in ("GET", "HEAD") else Kind.OPERATE
    return Decision(False, kind, None, "not an admin's route: the machine credential's")


def _asks_for_secrets(query: bytes) -> bool:
    # Parsed as FastAPI parses it (keys percent-decoded: ``include%5Fsecrets`` is the same
    # parameter); any value but a plain "no" is refused, every one of a repeated key.
    values = QueryParams(query).getlist("include_secrets")
    return any(value.strip().lower() not in ("false", "0", "no", "off", "") for value in values)


def check_body(check: BodyCheck, body: bytes) -> str | None:
    """Why the JSON ``body`` is refused by ``check``; None when it passes."""
    try:
        parsed = json.loads(body) if body.strip() else {}
    except ValueError:
        return "the body is not JSON"
    return check(parsed)
