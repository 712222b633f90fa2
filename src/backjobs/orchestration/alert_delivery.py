"""Getting an alert out: the admins' email through the outbox, and the optional webhook.

The email is queued in the app database (template ``job-alert``, one email to every
approved admin: ``users.is_admin`` and ``registration_status = approved``), so it survives
any process and goes out with the next email-send-job run — when SMTP itself is what
fails, it waits in the outbox and is delivered after recovery. The webhook
(``BACKJOBS_ALERT_WEBHOOK_URL``) is POSTed at once, as JSON with ``job``, ``flow_run_id``,
``state``, ``message``, ``url`` and ``kind`` (plus ``failures``, ``new_failures``,
``first_failure_at``, ``failed_parts`` and ``at``); a webhook that is down is retried
(:data:`WEBHOOK_DELAYS`) and logged, and never stops the email.

What the receiver does between an automation's call and its answer — reading the run,
reading and writing the incident, queueing the email — is retried by :func:`retrying` on a
transient error (a connection refused or reset, a timeout, a 5xx or 429 from the server's
API, a database error), because Prefect's call-webhook action is never retried: an answer
lost there is an alert lost. Each email carries a dedup key (:func:`alert_key`), so a
retried or repeated alert is queued once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from backjobs.db import session_scope
from backjobs.models import RegistrationStatus, User
from backjobs.orchestration.alerts import Alert, deployment_url, run_url
from backjobs.outbox import enqueue_email

logger = logging.getLogger(__name__)

TEMPLATE = "job-alert"
PRIORITY = 1000  # ahead of the app's mail: an alert is what ops wait for
WEBHOOK_DELAYS = (1.0, 3.0, 10.0, 30.0)  # seconds before each retry
WEBHOOK_TIMEOUT = 10.0
# Seconds before each retry of a receiver step: about 15 s in all, long enough for a
# database restart or a locked SQLite file. Past the 5 s Prefect's call-webhook action
# waits, the server records the call as failed, but the receiver goes on and delivers.
RECEIVER_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)

T = TypeVar("T")


def transient(exc: BaseException) -> bool:
    """Whether trying again may help: network and database trouble, a 5xx or a 429."""
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return status >= 500 or status == 429
    return isinstance(exc, httpx.HTTPError | SQLAlchemyError | OSError)


async def retrying(
    what: str,
    call: Callable[[], Awaitable[T]],
    *,
    delays: Sequence[float] = RECEIVER_DELAYS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """``await call()``, tried again after each delay while it fails transiently; the last
    error (or the first one that is not transient) is raised."""
    for attempt, delay in enumerate([*delays, None], start=1):
        try:
            return await call()
        except Exception as exc:
            if delay is None or not transient(exc):
                raise
            logger.warning(
                "%s failed (attempt %d of %d), again in %g s: %s",
                what, attempt, len(delays) + 1, delay, error_line(exc),
            )  # fmt: skip
            await sleep(delay)
    raise AssertionError("unreachable")  # the last attempt returns or raises


def error_line(exc: BaseException) -> str:
    """``Type: the first line of the message``, for one log line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def alert_key(alert: Alert) -> str:
    """The alert email's outbox dedup key: one email per job, incident, kind and count."""
    opened = alert.opened_at.isoformat() if alert.opened_at else "-"
    raw = f"{alert.job}|{opened}|{alert.kind.value}|{alert.failures}"
    return "job-alert:" + hashlib.sha256(raw.encode()).hexdigest()[:40]


def alert_document(alert: Alert, *, public_url: str, deployment_id: str | None) -> dict[str, Any]:
    """The webhook's JSON body; the email's context is built from it."""
    run = alert.run
    if run is not None:
        url: str | None = run_url(public_url, run.flow_run_id)
    elif deployment_id:
        url = deployment_url(public_url, deployment_id)
    else:
        url = None
    return {
        "job": alert.job,
        "kind": alert.kind.value,
        "flow_run_id": run.flow_run_id if run else None,
        "flow_run_name": run.name if run else None,
        "state": run.state if run else None,
        "message": run.message if run else _silent_message(alert),
        "url": url,
        "failed_parts": list(run.failed_parts) if run else [],
        "failures": alert.failures,
        "new_failures": alert.new_failures,
        "first_failure_at": alert.first_failure_at.isoformat() if alert.first_failure_at else None,
        "at": alert.at.isoformat(),
    }


def _silent_message(alert: Alert) -> str:
    return f"{alert.job}: no completed run within its alert window"


def approved_admins(engine: Engine) -> list[str]:
    with session_scope(engine) as session:
        rows = session.execute(
            select(User.email)
            .where(User.is_admin.is_(True))
            .where(User.registration_status == RegistrationStatus.APPROVED.value)
            .order_by(User.id)
        )
        return [str(email) for email in rows.scalars()]


def queue_alert_email(
    engine: Engine, document: dict[str, Any], *, settings: Any, dedup_key: str | None = None
) -> int | None:
    """Queue the alert email for every approved admin; its outbox id (None: no admin).
    With a ``dedup_key`` already queued, nothing is added."""
    admins = approved_admins(engine)
    if not admins:
        logger.warning("alert for %s (%s): no approved admin to email", document["job"],
                       document["kind"])  # fmt: skip
        return None
    context = {
        key: document[key]
        for key in (
            "job", "kind", "at", "flow_run_id", "flow_run_name", "state", "url",
            "failed_parts", "first_failure_at", "failures", "new_failures",
        )
    }  # fmt: skip
    context["message"] = document["message"] or ""
    with session_scope(engine) as session:
        return enqueue_email(
            session,
            to=admins,
            template=TEMPLATE,
            context=context,
            priority=PRIORITY,
            dedup_key=dedup_key,
            settings=settings,
        )


async def post_webhook(
    url: str, document: dict[str, Any], *, delays: Sequence[float] = WEBHOOK_DELAYS
) -> bool:
    """POST ``document`` to ``url``, retried after each delay; True once it got a 2xx."""
    shown = url.split("?", 1)[0]  # a query string may hold a token
    async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT) as client:
        for attempt, delay in enumerate([0.0, *delays], start=1):
            if delay:
                await asyncio.sleep(delay)
            try:
                response = await client.post(url, json=document)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    return True
                problem = f"HTTP {response.status_code}"
            logger.warning(
                "alert webhook %s, attempt %d of %d, for %s (%s): %s",
                shown, attempt, len(delays) + 1, document["job"], document["kind"], problem,
            )  # fmt: skip
    logger.error("alert webhook %s: gave up on %s (%s)", shown, document["job"], document["kind"])
    return False
