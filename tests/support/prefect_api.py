"""Calling a Prefect server's REST API from a test the way Prefect's own client does.

A SQLite-backed server answers 503 ("database is locked") while it is busy writing
(its services starting, a worker reporting, a flow's events): Prefect's client waits and
tries again, so a test that calls the API by hand must too, or it fails on the server's
load instead of on the behaviour it checks. 429 is treated the same way. Any other
status is the answer.
"""

from __future__ import annotations

import os
import socket
import time
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx

RETRIED = {429, 503}
PATIENCE_S = 60.0

# One client for every call of a test process: a new httpx client loads its CA bundle
# (≈ 20 ms of CPU), and the tests poll servers thousands of times. Each call still stands
# alone, as with a client per call: no connection is kept alive (a server restarted on the
# same port is met fresh) and no cookie is kept (a gate's session cookie from one call
# never reaches the next). httpx clients may be shared between threads.
_client = httpx.Client(
    limits=httpx.Limits(max_keepalive_connections=0),
    cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This process's environment without any PREFECT_* or BACKJOBS_* setting.

    ``BACKJOBS_TEST_*`` (how the test run itself is configured) stays.
    """
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "BACKJOBS_")) or key.startswith("BACKJOBS_TEST_")
    }


def healthy(api_url: str) -> bool:
    """Whether the server at ``api_url`` (``…/api``) answers its health check."""
    try:
        return _client.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def call(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
    timeout: float = 30,
) -> httpx.Response:
    """The server's answer to one request, after waiting out 503/429 for up to a minute."""
    deadline = time.monotonic() + PATIENCE_S
    pause = 0.2
    while True:
        response = _client.request(method, url, json=body, headers=headers, timeout=timeout)
        if response.status_code not in RETRIED or time.monotonic() > deadline:
            return response
        retry_after = response.headers.get("Retry-After", "")
        time.sleep(float(retry_after) if retry_after.isdigit() else pause)
        pause = min(pause * 2, 2.0)


def create_process_pool(
    api_url: str,
    name: str,
    *,
    headers: dict[str, str] | None = None,
    template: dict[str, Any] | None = None,
) -> None:
    """What ``prefect work-pool create --type process NAME [--base-job-template F]`` does, as
    one API call: the pool with ``template``, by default the process worker's default job
    template, taken from the installed Prefect as the command takes it. It spares a test a
    Prefect CLI process (≈ 1.2 s of CPU); the tests that follow the README (test_worker,
    test_dashboard_prefect) still run the command."""
    from prefect.workers.process import ProcessWorker

    body = {
        "name": name,
        "type": "process",
        "base_job_template": template or ProcessWorker.get_default_base_job_template(),
    }
    call_json("POST", f"{api_url}/work_pools/", headers=headers, body=body)


def call_json(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
    timeout: float = 30,
) -> Any:
    """The JSON of a successful answer; an HTTP error fails the test with the status."""
    response = call(method, url, headers=headers, body=body, timeout=timeout)
    response.raise_for_status()
    if not response.content:
        return None
    return response.json()
