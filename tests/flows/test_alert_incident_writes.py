"""The alert receiver when the server cannot store an incident or where its redelivery read
the event log up to (a locked SQLite file, a restarting database): the alerts already sent
are not counted again, and a call delivered again is not handled again.

The receiver runs in the test process, as in ``backjobs dashboard``, in front of the test
run's real Prefect server; between them a proxy passes every request through, or answers
503 to the writes of Prefect Variables (where incidents and the redelivery's mark live)
while told to. The runs are real failed flow runs on that server; the alerts are read from
the app database's outbox. No other receiver uses that server: the redelivery's mark, one
per server, is this module's own.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect import flow
from prefect.settings import PREFECT_API_URL
from sqlalchemy import Engine

from backjobs.db import make_engine
from backjobs.orchestration.alert_delivery import retrying
from backjobs.orchestration.alert_receiver import RECEIVER_PATH, AlertReceiver
from backjobs.orchestration.alert_redelivery import (
    WATERMARK,
    undelivered_calls,
    write_watermark,
)
from backjobs.orchestration.alert_store import variable_name
from backjobs.orchestration.automations import wanted_automations
from backjobs.settings import Settings
from tests.support.alerts import (
    add_admins,
    alert_emails,
    call_event,
    event,
    post_retried,
)
from tests.support.dashboard import migrated_sqlite

pytestmark = pytest.mark.usefixtures("prefect_harness")

AUTH = "machine:a-credential-for-this-test"
REPEAT_MINUTES = 0.05  # "still failing" 3 s after the last alert; the flusher passes every 1 s


@flow(name="doomed-job")
def doomed_job() -> None:
    raise RuntimeError("doomed-job failed on purpose")


class VariableWritesRefused:
    """ASGI: Prefect's API as the receiver reaches it in process; passed through to the
    server over HTTP, except writes to the paths under ``refusing`` (answered 503, as the
    server answers when its database is locked)."""

    def __init__(self, api_url: str) -> None:
        self.origin = api_url.removesuffix("/api")
        self.refusing: str | None = None
        self.refused = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        path, method = scope["path"], scope["method"]
        write = method in ("POST", "PATCH", "DELETE") and not path.endswith("/filter")
        if self.refusing and path.startswith(self.refusing) and write:
            self.refused += 1
            status, content = 503, b'{"exception_message": "database is locked"}'
        else:
            query = scope["query_string"].decode()
            url = f"{self.origin}{path}" + (f"?{query}" if query else "")
            async with httpx.AsyncClient(timeout=30) as client:
                answer = await client.request(
                    method, url, content=body, headers={"content-type": "application/json"}
                )
            status, content = answer.status_code, answer.content
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


async def not_found(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def failed_runs(count: int) -> list[str]:
    runs = []
    for _ in range(count):
        state = doomed_job(return_state=True)
        assert state.is_failed()
        runs.append(str(state.state_details.flow_run_id))
    return runs


def receiver_behind_proxy(
    app_db: str, api_url: str
) -> tuple[AlertReceiver, VariableWritesRefused, Engine]:
    """The receiver as ``backjobs dashboard`` runs it, reaching the server through the proxy
    (its engine, on the app database, is the caller's to dispose of)."""
    proxy = VariableWritesRefused(api_url)
    engine = make_engine(app_db)
    settings = Settings(database_url=app_db, alert_repeat_minutes=REPEAT_MINUTES)
    receiver = AlertReceiver(
        not_found,
        prefect_app=proxy,
        auth_string=AUTH,
        engine=engine,
        settings=settings,
        public_url="https://jobs.example",
    )
    return receiver, proxy, engine


async def wait_until(what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.2)


def test_an_incident_the_server_cannot_store_is_kept_and_its_alerts_never_count_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app_db = migrated_sqlite(tmp_path)
    add_admins(app_db)
    runs = failed_runs(3)
    job = f"doomed-{uuid.uuid4().hex[:8]}-job"
    api_url = PREFECT_API_URL.value()
    receiver, proxy, engine = receiver_behind_proxy(app_db, api_url)
    caplog.set_level(logging.WARNING, logger="backjobs.orchestration.alert_receiver")

    def kinds() -> list[tuple[str, int, int]]:
        return [
            (e["context"]["kind"], e["context"]["failures"], e["context"]["new_failures"])
            for e in alert_emails(app_db)
            if e["context"]["job"] == job
        ]

    async def stored() -> dict[str, Any] | None:
        async with httpx.AsyncClient(base_url=api_url, timeout=30) as api:
            answer = await api.get(f"/variables/name/{variable_name(job)}")
        return None if answer.status_code == 404 else dict(answer.json()["value"])

    async def scenario() -> None:
        headers = {"authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()}
        transport = httpx.ASGITransport(app=receiver)
        async with httpx.AsyncClient(transport=transport, base_url="http://dash") as dash:

            async def call(run: str, event_id: str) -> str:
                body = {"signal": "state", "job": job, "deployment_id": str(uuid.uuid4()),
                        "flow_run_id": run, "event_id": event_id,
                        "event": "prefect.flow-run.Failed"}  # fmt: skip
                answer = await dash.post(RECEIVER_PATH, json=body, headers=headers)
                assert answer.status_code == 200, answer.text
                return str(answer.json()["outcome"])

            assert await call(runs[0], str(uuid.uuid4())) == "failed"
            first = await stored()
            assert first is not None and (first["failures"], first["reported"]) == (1, 1)

            proxy.refusing = "/api/variables"
            second = str(uuid.uuid4())
            assert await call(runs[1], second) == "counted"

            async def still_failing_sent() -> bool:
                return len(kinds()) == 2

            await wait_until("the 'still failing' alert", still_failing_sent)
            # The server still has the first write, but the receiver counts from its own.
            assert await call(runs[1], second) == "duplicate"
            assert await call(runs[1], str(uuid.uuid4())) == "duplicate"  # the same attempt
            # Within the repeat time it is counted for the next "still failing"; past it,
            # it is that alert itself. Either way the alerts below are the same.
            assert await call(runs[2], str(uuid.uuid4())) in ("counted", "still failing")
            assert (await stored()) == first and proxy.refused > 0

            proxy.refusing = None

            async def all_reported_and_stored() -> bool:
                found = await stored()
                return found is not None and (found["failures"], found["reported"]) == (3, 3)

            await wait_until(
                "the incident stored with every failure reported", all_reported_and_stored
            )

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()
    assert kinds() == [("failed", 1, 1), ("still failing", 2, 1), ("still failing", 3, 1)]
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith(f"the incident of {job} is not stored on the server (HTTPStatusError")
        for m in messages
    ), messages
    assert f"the incident of {job} is stored on the server again" in messages


def test_a_call_delivered_again_is_handled_once_while_the_server_cannot_store_the_mark(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook call answered 401 (in the server's event log, as Prefect records it) is
    delivered again by the flusher; where the log was read up to cannot be written for
    several passes. The call is handled once, not at every pass; the mark reaches the server
    once it takes writes again."""
    app_db = migrated_sqlite(tmp_path)
    add_admins(app_db)
    [run] = failed_runs(1)
    job = f"doomed-{uuid.uuid4().hex[:8]}-job"
    [automation, *_] = wanted_automations(
        job, str(uuid.uuid4()), block_id=str(uuid.uuid4()), silent_after=None,
        heartbeat_seconds=30,
    )  # fmt: skip
    api_url = PREFECT_API_URL.value()
    receiver, proxy, engine = receiver_behind_proxy(app_db, api_url)
    caplog.set_level(logging.WARNING, logger="backjobs.orchestration.alert_receiver")
    handled = f"alert redelivered: state call for job {job}, run {run} (it answered 401): "

    def lines(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith(text)]

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=api_url, timeout=30) as api:
            # The shared server answers 503 while its SQLite file is locked by the other
            # test processes' writes: the set-up's writes are retried, as the receiver's are.
            start = datetime.now(UTC)
            await retrying(
                "setting the mark",
                lambda: write_watermark(api, start - timedelta(minutes=1), set()),
            )
            created = await post_retried(api, "/automations/", automation)
            failed = event("prefect.flow-run.Failed",
                           {"prefect.resource.id": f"prefect.flow-run.{run}"},
                           start - timedelta(seconds=36))  # fmt: skip
            call = call_event(created.json(), failed, start - timedelta(seconds=35),
                              status_code=401)  # fmt: skip
            await post_retried(api, "/events", [failed, call])
            window = {"since": start - timedelta(seconds=60), "until": start}

            async def stored() -> bool:  # before the flusher passes the call's time
                found = await undelivered_calls(api, **window, handled=set())
                return call["id"] in {c.event_id for c in found}

            await wait_until("the call's event stored", stored)
            proxy.refusing = f"/api/variables/name/{WATERMARK}"
            transport = httpx.ASGITransport(app=receiver)
            async with httpx.AsyncClient(transport=transport, base_url="http://dash") as dash:
                assert (await dash.get("/")).status_code == 404  # the flusher starts

                async def passes_refused() -> bool:  # the call's pass and two more
                    return proxy.refused >= 12

                await wait_until("three passes' writes of the mark refused", passes_refused)
                assert len(lines(handled)) == 1, lines(handled)
                proxy.refusing = None

                async def mark_stored() -> bool:
                    answer = await api.get(f"/variables/name/{WATERMARK}")
                    value = answer.raise_for_status().json()["value"]
                    return datetime.fromisoformat(value["until"]) > start - timedelta(seconds=30)

                await wait_until("the mark stored past the call", mark_stored)

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()
    assert [line.removeprefix(handled) for line in lines(handled)] == ["failed"]
    assert [(e["context"]["kind"], e["context"]["failures"]) for e in alert_emails(app_db)
            if e["context"]["job"] == job] == [("failed", 1)]  # fmt: skip
    mark = "where the alert redelivery read up to is"
    levels = [r.levelname for r in caplog.records if r.getMessage().startswith(f"{mark} not")]
    assert levels[0] == "WARNING" and set(levels[1:]) == {"ERROR"}, levels
    assert lines(f"{mark} stored on the server again")
