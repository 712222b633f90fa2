"""Where the server's automations report: ``POST /backjobs/alerts`` in ``backjobs dashboard``.

The automations of :mod:`backjobs.orchestration.automations` call this endpoint (Prefect's
``call-webhook`` action, from the server's own actions service) with a small JSON body:

- ``{"signal": "state", "job", "deployment_id", "flow_run_id", "event_id", "event"}`` — a
  run of a backjobs deployment ended Failed, Crashed, TimedOut or Completed;
- ``{"signal": "silent", "job", "deployment_id"}`` — no completed run in the silent window;
- ``{"signal": "zombie", "job", "flow_run_id", "last_heartbeat", "last_event",
  "heartbeat_seconds"}`` — a run's heartbeats stopped, or never began (after it went
  Pending or Running): if the run is still Running or Pending it is set Crashed, with what
  was last heard and its worker in the state message (the Crashed state then alerts like
  any failure, and the job's concurrency slot is released); one still Cancelling is set
  Cancelled, as its user asked (:mod:`backjobs.orchestration.alert_zombie`).

It runs in front of the gate, in the server's process: it reads runs through Prefect's
app in process (no credential, no network), applies the incident rules
(:class:`backjobs.orchestration.alerts.IncidentBook`) to the job's incident as stored on the
server (:mod:`backjobs.orchestration.alert_store`), queues the admins' email in the app
database and POSTs the webhook in the background. Callers authenticate with the machine
credential (``Authorization: Basic``, BACKJOBS_DASHBOARD_AUTH_STRING), which ``backjobs
deploy`` stores in the automations' webhook block.

A failure is a run attempt (the run's id and ``run_count``), not an event: Prefect allows
Failed → Failed and Crashed → Failed, so one attempt can end twice — a client that retries
its state change after losing the server's answer (a busy SQLite server does that), or a run
the zombie check set Crashed reporting its own failure after. Its second failure event is
answered ``duplicate`` and counted nowhere; an event delivered twice is, too.

Prefect never retries a webhook action, so each step that can fail on a transient error is
retried here before the answer (:func:`backjobs.orchestration.alert_delivery.retrying`). A
run that still cannot be read alerts with what its event says; an email that still cannot
be queued leaves the webhook going out; an incident that cannot be read means the call is
lost: each of these logs one ERROR line naming the job and the run, and the call is
answered 503. Prefect records that answer as a call done (with its status code), and a
call that failed outright as a failed action: the flusher finds both in the server's event
log and handles the call again (:mod:`backjobs.orchestration.alert_redelivery`).

An incident that cannot be written once its alert went out is kept in memory, used in the
server's copy's place and written again at every pass of the flusher
(:meth:`AlertReceiver._store`): reading the server's older copy back would count the
alerted failures again. So the counts stay exact while the dashboard runs; only a dashboard
stopped before the write succeeds may send those alerts again after its restart. Where the
redelivery read the event log up to is kept the same way (:meth:`AlertReceiver._save_mark`),
so a call it delivered again is not handled again at the next pass.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

import anyio
import httpx
from sqlalchemy import Engine
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from backjobs.orchestration.alert_delivery import (
    alert_document,
    alert_key,
    error_line,
    post_webhook,
    queue_alert_email,
    retrying,
)
from backjobs.orchestration.alert_redelivery import (
    WATERMARK,
    Undelivered,
    completed_since,
    read_watermark,
    undelivered_calls,
    write_watermark,
)
from backjobs.orchestration.alert_store import (
    SEEN_PER_JOB,
    load_incident,
    load_incidents,
    save_incident,
)
from backjobs.orchestration.alert_zombie import crash_if_stuck
from backjobs.orchestration.alerts import Alert, Incident, IncidentBook, RunInfo
from backjobs.settings import Settings

logger = logging.getLogger(__name__)
V = TypeVar("V")

RECEIVER_PATH = "/backjobs/alerts"
MAX_BODY_BYTES = 64 * 1024
SEEN_EVENTS = 10_000  # event ids remembered, so a repeated call alerts once
FAILURE_EVENTS = ("Failed", "Crashed", "TimedOut")
MAX_PARTS = 20
# Retries of a write (an incident, the redelivery's mark) before it is kept in memory for
# the flusher's next pass (an incident's lock is held meanwhile: other calls wait).
STORE_DELAYS = (0.5, 1.0)
# A call's event is in the log a moment after the call (the server stores events every 5 s,
# retrying on a busy database): the redelivery reads up to this long ago, so that it never
# passes an event not yet stored.
REDELIVERY_SETTLE = timedelta(seconds=30)
REDELIVERY_TRIES = 5  # passes a redelivered call may fail (each retried within) before LOST


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
        self.repeat = timedelta(minutes=settings.alert_repeat_minutes)
        self._lock = asyncio.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._deployments: dict[str, str] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._redelivery_tries: dict[str, int] = {}
        # Incidents (None: closed) whose alert went out but whose write to the server
        # failed: the truth until a write succeeds (see _store).
        self._unsaved: dict[str, Incident | None] = {}
        # Where the redelivery read the event log up to, and the calls handled at that
        # instant, while its last write to the server failed (see _save_mark): at most
        # one, under the Variable's name.
        self._unsaved_mark: dict[str, tuple[datetime, set[str]]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            self._start_flusher()  # workers poll: it starts soon after the server does
        if scope["type"] != "http" or scope["path"] != RECEIVER_PATH:
            await self.app(scope, receive, send)
            return
        response = await self._handle(scope, receive)
        await response(scope, receive, send)

    async def _handle(self, scope: Any, receive: Any) -> JSONResponse:
        if scope["method"] != "POST":
            return JSONResponse({"error": "POST only"}, 405, {"allow": "POST"})
        if not self._authorized(Headers(scope=scope).get("authorization", "")):
            logger.error(
                "alert call refused: not the machine credential (the webhook block holds "
                "another one: run `backjobs deploy` to store the current one); the call is "
                "delivered again from the server's event log"
            )
            return JSONResponse({"exception_message": "Unauthorized"}, 401)
        try:
            raw = await _read_body(receive)
        except CallCut as exc:  # the caller hung up: nothing to answer, but say it
            logger.error("alert LOST: %s", exc)
            return JSONResponse({"error": str(exc)}, 400)
        try:
            body = json.loads(raw)
            signal = Signal(body["signal"])
            job = str(body["job"])
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": f"bad alert call: {exc}"}, 400)
        if body.get("deployment_id"):
            self._deployments[job] = str(body["deployment_id"])
        try:
            outcome = await self._dispatch(signal, job, body)
        except Exception as exc:  # retried already (a transient error) or not retryable
            run = body.get("flow_run_id") or "none"
            logger.error("alert LOST: %s call for job %s, run %s: %s", signal, job, run, exc)
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
            return await retrying(
                f"zombie check of {job} run {body.get('flow_run_id')}",
                lambda: self._zombie(job, body, now=now),
            )
        async with self._lock:
            if signal is Signal.SILENT:
                book = await self._book(job)
                alert = book.silent(job, now=now)
                return await self._settle(job, book, alert, run_id=None)
            return await self._state(job, body, now=now)

    async def _state(self, job: str, body: dict[str, Any], *, now: datetime) -> str:
        event_id, event = str(body.get("event_id") or ""), str(body.get("event") or "")
        run_id = str(body["flow_run_id"])
        if event_id in self._seen:
            return "duplicate"
        book = await self._book(job)
        incident = book.incidents.get(job)
        if incident is not None and event_id and event_id in incident.seen:
            return "duplicate"
        run, attempt = await self._run_or_event(job, run_id, event=event)
        failed = event.removeprefix("prefect.flow-run.") in FAILURE_EVENTS
        # A failure is one run attempt, whatever number of failure events it made.
        key = f"{run_id}#{attempt}" if failed and attempt else event_id
        if key != event_id and (
            key in self._seen or (incident is not None and key in incident.seen)
        ):
            self._remember(event_id)
            return "duplicate"
        alert = book.failure(job, run, now=now) if failed else book.completed(job, run, now=now)
        incident = book.incidents.get(job)
        if incident is not None and key:
            incident.seen = [*incident.seen, key][-SEEN_PER_JOB:]
        outcome = await self._settle(job, book, alert, run_id=run_id)
        self._remember(event_id)
        self._remember(key)
        return outcome

    async def _book(self, job: str) -> IncidentBook:
        """A book holding the job's incident as the server has it (or, while its last write
        failed, as this process holds it)."""
        book = IncidentBook(repeat=self.repeat)
        if job in self._unsaved:
            found = self._unsaved[job]
        else:
            found = await retrying(f"reading the incident of {job}", lambda: self._load(job))
        if found is not None:
            book.incidents[job] = found
        return book

    async def _load(self, job: str) -> Incident | None:
        async with self._api() as api:
            return await load_incident(api, job)

    async def _settle(
        self, job: str, book: IncidentBook, alert: Alert | None, *, run_id: str | None
    ) -> str:
        """Send the alert (if any), then store the incident: none is counted without being
        sent, and none sent is counted again (see :meth:`_store`)."""
        outcome = await self._deliver(alert, run_id=run_id) if alert else "counted"
        await self._store(job, book.incidents.get(job))
        return outcome

    async def _store(self, job: str, incident: Incident | None) -> None:
        """Write the job's incident (None: delete it), or keep it (:func:`write_or_keep`):
        the flusher's next pass writes it."""

        async def write() -> None:
            async with self._api() as api:
                await save_incident(api, job, incident)

        await write_or_keep(self._unsaved, job, incident, write,
                            what=f"the incident of {job}",
                            after_restart="may send its alerts again")  # fmt: skip

    async def _redelivered(self, call: Undelivered) -> str:
        if call.signal == Signal.SILENT:
            async with self._api() as api:
                deployment = str(call.body["deployment_id"])
                if await completed_since(api, deployment, call.occurred):
                    return "stale (a run of the job completed since)"
        return await self._dispatch(Signal(call.signal), call.job, call.body)

    def _remember(self, key: str) -> None:
        if not key:
            return
        self._seen[key] = None
        while len(self._seen) > SEEN_EVENTS:
            self._seen.popitem(last=False)

    async def _deliver(self, alert: Alert, *, run_id: str | None) -> str:
        document = alert_document(
            alert, public_url=self._public_url, deployment_id=self._deployments.get(alert.job)
        )
        logger.warning("alert: %s %s (%d failures)", alert.job, alert.kind, alert.failures)
        webhook = self._settings.alert_webhook_url
        if webhook:
            task = asyncio.create_task(post_webhook(webhook, document))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        def queue() -> int | None:
            return queue_alert_email(
                self._engine, document, settings=self._settings, dedup_key=alert_key(alert)
            )

        try:
            await retrying(
                f"queueing the alert email of {alert.job}",
                lambda: anyio.to_thread.run_sync(queue),
            )
        except Exception as exc:  # the webhook still goes out; say why the email did not
            logger.error(
                "alert email NOT queued for job %s, run %s (%s): %s",
                alert.job, run_id or "none", alert.kind, exc,
            )  # fmt: skip
        return str(alert.kind)

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        """Send ``still failing`` when the repeat time is up and no new failure came."""
        pause = max(1.0, min(30.0, self.repeat.total_seconds() / 4))
        while True:
            await asyncio.sleep(pause)
            try:
                await self._redeliver(now=datetime.now(UTC))
            except Exception:  # the next pass starts again where this one stopped
                logger.exception("alert redelivery failed; the next pass tries again")
            try:
                async with self._lock:
                    await self._flush(now=datetime.now(UTC))
            except Exception:  # keep flushing; the next pass tries again
                logger.exception("alert flush failed")

    async def _redeliver(self, *, now: datetime) -> None:
        """Handle, oldest first, the automation calls that went wrong
        (:mod:`backjobs.orchestration.alert_redelivery`), then move the mark past them."""
        until = now - REDELIVERY_SETTLE
        since, handled = await self._read_mark(now=now)
        if until <= since:
            return
        async with self._api() as api:
            calls = await undelivered_calls(api, since=since, until=until, handled=handled)
        for call in calls:
            run = call.body.get("flow_run_id") or "none"
            try:
                outcome = await self._redelivered(call)
            except Exception as exc:
                tries = self._redelivery_tries[call.event_id] = (
                    self._redelivery_tries.get(call.event_id, 0) + 1
                )
                if tries < REDELIVERY_TRIES:
                    raise  # the next pass starts again with this call
                logger.error("alert LOST: %s call for job %s, run %s (it %s): redelivery "
                             "given up after %d passes: %s",
                             call.signal, call.job, run, call.why, tries, exc)  # fmt: skip
            else:
                logger.warning(
                    "alert redelivered: %s call for job %s, run %s (it %s): %s",
                    call.signal, call.job, run, call.why, outcome,
                )  # fmt: skip
            if call.occurred > since:
                since, handled = call.occurred, set()
            handled.add(call.event_id)
            if self._unsaved_mark:  # a write failed: the pass's last write tries again
                self._unsaved_mark[WATERMARK] = (since, set(handled))
            else:
                await self._save_mark(since, handled)
        await self._save_mark(until, set())

    async def _read_mark(self, *, now: datetime) -> tuple[datetime, set[str]]:
        """Where the redelivery read the log up to: the server's Variable, or, while the
        last write of it failed, this process's copy (the pass's last write tries again)."""
        if WATERMARK in self._unsaved_mark:
            since, handled = self._unsaved_mark[WATERMARK]
            return since, set(handled)
        async with self._api() as api:
            return await read_watermark(api, now=now)

    async def _save_mark(self, until: datetime, handled: set[str]) -> None:
        """Write where the redelivery read the log up to, or keep it (:func:`write_or_keep`):
        reading the server's older copy back would handle its calls again."""

        async def write() -> None:
            async with self._api() as api:
                await write_watermark(api, until, handled)

        await write_or_keep(self._unsaved_mark, WATERMARK, (until, set(handled)), write,
                            what="where the alert redelivery read up to",
                            after_restart="reads those calls again (a failure already "
                                          "counted is answered duplicate)")  # fmt: skip

    async def _flush(self, *, now: datetime) -> None:
        for job, incident in list(self._unsaved.items()):
            await self._store(job, incident)
        async with self._api() as api:
            incidents = await load_incidents(api)
        for job, kept in self._unsaved.items():  # still not written: newer than the server's
            incidents.pop(job, None)
            if kept is not None:
                incidents[job] = kept
        book = IncidentBook(repeat=self.repeat)
        book.incidents = incidents
        for alert in book.due(now=now):
            run = alert.run.flow_run_id if alert.run else None
            await self._settle(alert.job, book, alert, run_id=run)

    def _api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self._prefect_app),
            base_url="http://prefect-in-memory/api",
            timeout=30,
        )

    async def _run_or_event(
        self, job: str, flow_run_id: str, *, event: str
    ) -> tuple[RunInfo, int | None]:
        """The run as the server has it and its attempt (``run_count``); if it cannot be
        read, what its event says (attempt None)."""
        try:
            return await retrying(
                f"reading run {flow_run_id} of {job}",
                lambda: self._run_info(flow_run_id, event=event),
            )
        except Exception as exc:
            logger.error("alert for job %s, run %s: the run cannot be read (%s); alerting "
                         "with what its event says", job, flow_run_id, exc)  # fmt: skip
            return RunInfo(
                flow_run_id=flow_run_id,
                name=flow_run_id,
                state=event.removeprefix("prefect.flow-run.") or "unknown",
                message=f"(the run could not be read: {exc})",
            ), None

    async def _run_info(self, flow_run_id: str, *, event: str) -> tuple[RunInfo, int | None]:
        async with self._api() as api:
            response = await api.get(f"/flow_runs/{flow_run_id}")
            response.raise_for_status()
            run = response.json()
            parts = await _failed_parts(api, flow_run_id)
        state = run.get("state") or {}
        seen_state = event.removeprefix("prefect.flow-run.") or str(state.get("name"))
        message = str(state.get("message") or "") if state.get("name") == seen_state else ""
        info = RunInfo(
            flow_run_id=flow_run_id,
            name=str(run.get("name") or flow_run_id),
            state=seen_state,
            message=message,
            failed_parts=parts,
        )
        return info, int(run.get("run_count") or 0)

    async def _zombie(self, job: str, body: dict[str, Any], *, now: datetime) -> str:
        async with self._api() as api:
            return await crash_if_stuck(api, job, body, now=now)


async def write_or_keep(
    held: dict[str, V],
    key: str,
    value: V,
    write: Callable[[], Awaitable[None]],
    *,
    what: str,
    after_restart: str,
) -> None:
    """``await write()``, retried briefly (STORE_DELAYS); if the server still cannot take it
    (a locked SQLite file, a restarting database), keep ``value`` in ``held[key]``, which
    the caller reads in the server's copy's place until a later call writes it. ``what``
    names it in the log: WARNING at the first failed write, ERROR at each later one, then a
    line when it is stored again."""
    waiting = key in held
    held[key] = value
    try:
        await retrying(f"storing {what}", write, delays=STORE_DELAYS)
    except Exception as exc:
        log = logger.error if waiting else logger.warning
        log("%s is not stored on the server (%s): this process keeps it and tries again at "
            "the next pass; a restart before then %s",
            what, error_line(exc), after_restart)  # fmt: skip
        return
    del held[key]
    if waiting:
        logger.warning("%s is stored on the server again", what)


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


class CallCut(Exception):
    """The caller hung up before its call's body arrived."""


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise CallCut(
                f"a call was cut off after {len(body)} bytes of its body, before it could be "
                "read (job and run unknown): Prefect records the webhook action as failed"
            )
        body += bytes(message.get("body", b""))
        if len(body) > MAX_BODY_BYTES:
            raise ValueError("body too large")
        if not message.get("more_body", False):
            return body
