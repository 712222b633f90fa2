"""Where the server's automations report: ``POST /backjobs/alerts`` in ``backjobs dashboard``.

The automations of :mod:`backjobs.orchestration.automations` call this endpoint (Prefect's
``call-webhook`` action, from the server's own actions service) with a small JSON body:

- ``{"signal": "state", "job", "deployment_id", "flow_run_id", "event_id", "event"}`` — a
  run of a backjobs deployment ended Failed, Crashed, TimedOut or Completed;
- ``{"signal": "silent", "job", "deployment_id"}`` — no completed run in the silent window;
- ``{"signal": "zombie", "job", "flow_run_id", "last_heartbeat", "heartbeat_seconds"}`` —
  a Running run's heartbeats stopped: if the run is still Running it is set Crashed, with
  the last heartbeat and its worker in the state message (the Crashed state then alerts
  like any failure, and the job's concurrency slot is released).

It runs in front of the gate, in the server's process: it reads runs through Prefect's
app in process (no credential, no network), keeps the incidents
(:class:`backjobs.orchestration.alerts.IncidentBook`), queues the admins' email in the app
database and POSTs the webhook in the background. Callers authenticate with the machine
credential (``Authorization: Basic``, BACKJOBS_DASHBOARD_AUTH_STRING), which ``backjobs
deploy`` stores in the automations' webhook block.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import anyio
import httpx
from sqlalchemy import Engine
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from backjobs.orchestration.alert_delivery import alert_document, post_webhook, queue_alert_email
from backjobs.orchestration.alerts import Alert, IncidentBook, RunInfo
from backjobs.settings import Settings

logger = logging.getLogger(__name__)

RECEIVER_PATH = "/backjobs/alerts"
MAX_BODY_BYTES = 64 * 1024
SEEN_EVENTS = 10_000  # event ids remembered, so a repeated call alerts once
FAILURE_EVENTS = ("Failed", "Crashed", "TimedOut")
MAX_PARTS = 20


class Signal(StrEnum):
    STATE = "state"
    SILENT = "silent"
    ZOMBIE = "zombie"


class AlertReceiver:
    """ASGI: answers ``POST /backjobs/alerts``, hands every other request to ``app``."""

    def __init__(
        self,
        app: Any,
        *,
        prefect_app: Any,
        auth_string: str | None,
        engine: Engine,
        settings: Settings,
        public_url: str,
    ) -> None:
        self.app = app
        self._prefect_app = prefect_app
        self._auth = auth_string.encode() if auth_string else None
        self._engine = engine
        self._settings = settings
        self._public_url = public_url
        self.book = IncidentBook(repeat=timedelta(minutes=settings.alert_repeat_minutes))
        self._lock = asyncio.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._deployments: dict[str, str] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != RECEIVER_PATH:
            await self.app(scope, receive, send)
            return
        response = await self._handle(scope, receive)
        await response(scope, receive, send)

    async def _handle(self, scope: Any, receive: Any) -> JSONResponse:
        if scope["method"] != "POST":
            return JSONResponse({"error": "POST only"}, 405, {"allow": "POST"})
        if not self._authorized(Headers(scope=scope).get("authorization", "")):
            return JSONResponse({"exception_message": "Unauthorized"}, 401)
        try:
            body = json.loads(await _read_body(receive))
            signal = Signal(body["signal"])
            job = str(body["job"])
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": f"bad alert call: {exc}"}, 400)
        self._start_flusher()
        if body.get("deployment_id"):
            self._deployments[job] = str(body["deployment_id"])
        try:
            outcome = await self._dispatch(signal, job, body)
        except httpx.HTTPError as exc:  # the in-process API: a database hiccup
            logger.error("alert call %s for %s failed: %s", signal, job, exc)
            return JSONResponse({"error": str(exc)}, 503)
        return JSONResponse({"outcome": outcome})

    def _authorized(self, authorization: str) -> bool:
        scheme, _, value = authorization.partition(" ")
        if self._auth is None or scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(decoded, self._auth)

    async def _dispatch(self, signal: Signal, job: str, body: dict[str, Any]) -> str:
        now = datetime.now(UTC)
        if signal is Signal.ZOMBIE:
            return await self._zombie(job, body, now=now)
        if signal is Signal.SILENT:
            async with self._lock:
                alert = self.book.silent(job, now=now)
            return await self._deliver(alert)
        event_id, event = str(body.get("event_id") or ""), str(body.get("event") or "")
        async with self._lock:
            if event_id and self._already_seen(event_id):
                return "duplicate"
            run = await self._run_info(str(body["flow_run_id"]), event=event)
            if event.removeprefix("prefect.flow-run.") in FAILURE_EVENTS:
                alert = self.book.failure(job, run, now=now)
            else:
                alert = self.book.completed(job, run, now=now)
            return await self._deliver(alert)

    def _already_seen(self, event_id: str) -> bool:
        if event_id in self._seen:
            return True
        self._seen[event_id] = None
        while len(self._seen) > SEEN_EVENTS:
            self._seen.popitem(last=False)
        return False

    async def _deliver(self, alert: Alert | None) -> str:
        if alert is None:
            return "counted"
        document = alert_document(
            alert, public_url=self._public_url, deployment_id=self._deployments.get(alert.job)
        )
        logger.warning("alert: %s %s (%d failures)", alert.job, alert.kind, alert.failures)
        webhook = self._settings.alert_webhook_url
        if webhook:
            task = asyncio.create_task(post_webhook(webhook, document))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        try:
            await anyio.to_thread.run_sync(
                lambda: queue_alert_email(self._engine, document, settings=self._settings)
            )
        except Exception as exc:  # the webhook still goes out; say why the email did not
            logger.error("alert email for %s (%s) not queued: %s", alert.job, alert.kind, exc)
        return str(alert.kind)

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        """Send ``still failing`` when the repeat time is up and no new failure came."""
        pause = max(1.0, min(30.0, self.book.repeat.total_seconds() / 4))
        while True:
            await asyncio.sleep(pause)
            try:
                async with self._lock:
                    for alert in self.book.due(now=datetime.now(UTC)):
                        await self._deliver(alert)
            except Exception:  # keep flushing; the next pass tries again
                logger.exception("alert flush failed")

    def _api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self._prefect_app),
            base_url="http://prefect-in-memory/api",
            timeout=30,
        )

    async def _run_info(self, flow_run_id: str, *, event: str) -> RunInfo:
        async with self._api() as api:
            response = await api.get(f"/flow_runs/{flow_run_id}")
            response.raise_for_status()
            run = response.json()
            parts = await _failed_parts(api, flow_run_id)
        state = run.get("state") or {}
        seen_state = event.removeprefix("prefect.flow-run.") or str(state.get("name"))
        message = str(state.get("message") or "") if state.get("name") == seen_state else ""
        return RunInfo(
            flow_run_id=flow_run_id,
            name=str(run.get("name") or flow_run_id),
            state=seen_state,
            message=message,
            failed_parts=parts,
        )

    async def _zombie(self, job: str, body: dict[str, Any], *, now: datetime) -> str:
        flow_run_id = str(body["flow_run_id"])
        async with self._api() as api:
            response = await api.get(f"/flow_runs/{flow_run_id}")
            response.raise_for_status()
            run = response.json()
            if run.get("state_type") != "RUNNING":  # ended meanwhile: a late heartbeat
                return f"ignored: the run is {run.get('state_name')}"
            message = zombie_message(run, body, now=now)
            answer = await api.post(
                f"/flow_runs/{flow_run_id}/set_state",
                json={"state": {"type": "CRASHED", "name": "Crashed", "message": message},
                      "force": True},
            )  # fmt: skip
            answer.raise_for_status()
        logger.warning("%s: run %s marked Crashed: %s", job, flow_run_id, message)
        return "crashed"


def zombie_message(run: dict[str, Any], body: dict[str, Any], *, now: datetime) -> str:
    """The Crashed state's message: when the last heartbeat came, and the worker."""
    labels = run.get("labels") or {}
    worker = labels.get("prefect.worker.name") or "an unknown worker"
    pid = run.get("infrastructure_pid")
    where = f"worker {worker}" + (f" (process {pid})" if pid else "")
    last = _parse_time(body.get("last_heartbeat"))
    every = body.get("heartbeat_seconds")
    if last is None:
        since = "no heartbeat received"
    else:
        age = (now - last).total_seconds()
        since = f"last heartbeat {last:%Y-%m-%d %H:%M:%S} UTC, {age:.0f} s before"
    cadence = f", expected every {every} s" if every else ""
    return f"Crashed by the zombie detector: heartbeats stopped ({since}{cadence}); ran on {where}."


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def _failed_parts(api: httpx.AsyncClient, flow_run_id: str) -> tuple[str, ...]:
    """ "task: reason" of the run's failed task runs (their last state)."""
    response = await api.post(
        "/task_runs/filter",
        json={
            "task_runs": {
                "flow_run_id": {"any_": [flow_run_id]},
                "state": {"type": {"any_": ["FAILED", "CRASHED"]}},
            },
            "limit": MAX_PARTS,
        },
    )
    if not response.is_success:
        return ()
    parts = []
    for task_run in response.json():
        message = ((task_run.get("state") or {}).get("message") or "").strip()
        parts.append(f"{task_run.get('name')}: {message.splitlines()[0] if message else 'failed'}")
    return tuple(parts)


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if len(body) > MAX_BODY_BYTES:
            raise ValueError("body too large")
        if not message.get("more_body", False):
            return body
