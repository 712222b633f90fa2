"""The dashboard gate, against a real ``backjobs dashboard`` (Prefect server + UI) on a free port.

Who gets in over HTTP and websocket, token purposes and lifetimes, what an admin may call,
the sign-in link and its session, sign-out, the same-origin rule for the cookie, a demoted
admin, websockets closed with their credential, the audit trail, query strings kept out
of the log, and the one-line start-up errors.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import httpx
import jwt
import pytest
from sqlalchemy import text
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from backjobs.db import make_engine
from tests.support.dashboard import (
    AUTH_STRING,
    BACKJOBS,
    SECRET,
    GatedDashboard,
    basic,
    dashboard_env,
    gated_dashboard,
    make_token,
    migrated_sqlite,
    unsigned_token,
)
from tests.support.prefect_api import call_json, free_port

pytestmark = pytest.mark.slow

ADMIN, USER, DEMOTED, SOCKET_ADMIN = "1", "2", "3", "4"
CACHE_SECONDS = 1.0
FILTER = "/api/flow_runs/filter"
HUMAN_READS = ("/events/out", "/logs/out")


@pytest.fixture(scope="module")
def app_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = migrated_sqlite(tmp_path_factory.mktemp("app-db"))
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, email, is_admin) VALUES "
                "(1, 'admin@example.com', true), (2, 'user@example.com', false), "
                "(3, 'demoted@example.com', true), (4, 'socket@example.com', true)"
            )
        )
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, app_db: str) -> Iterator[GatedDashboard]:
    extra = {
        "BACKJOBS_DASHBOARD_ADMIN_CACHE_SECONDS": str(CACHE_SECONDS),
        "BACKJOBS_DASHBOARD_LOGIN_URL": "https://app.example.com/login",
    }
    with gated_dashboard(tmp_path_factory.mktemp("dash"), app_db_url=app_db, extra_env=extra) as d:
        yield d


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# Every way in or not, with the status both an HTTP request and a websocket handshake get.
# Minted when the module is imported, possibly many minutes before a test uses them: every
# margin below is wide enough for the longest suite (an hour's validity, a day beyond).
CREDENTIALS: dict[str, tuple[dict[str, str], int]] = {
    "none": ({}, 401),
    "malformed bearer": (bearer("not-a-jwt"), 401),
    "unknown scheme": ({"Authorization": "Token abc"}, 401),
    "forged signature": (bearer(make_token(ADMIN, secret="x" * 64)), 401),
    "alg none": (bearer(unsigned_token(ADMIN)), 401),
    "HS512": (bearer(make_token(ADMIN, algorithm="HS512")), 401),
    "expired": (bearer(make_token(ADMIN, minutes=-1)), 401),
    "no exp": (bearer(jwt.encode({"sub": ADMIN}, SECRET, algorithm="HS256")), 401),
    "non-admin": (bearer(make_token(USER)), 403),
    "unknown user": (bearer(make_token("999")), 403),
    "admin by id": (bearer(make_token(ADMIN)), 200),
    "admin by email": (bearer(make_token("admin@example.com")), 401),  # ids only
    "odd sub": (bearer(make_token("²")), 401),
    "200-digit sub": (bearer(make_token("9" * 200)), 401),
    "exp in 2999": (bearer(make_token(ADMIN, minutes=(2999 - 2026) * 525_960)), 401),
    "exp beyond the maximum": (bearer(make_token(ADMIN, minutes=10080 + 24 * 60)), 401),
    "sign-in link as bearer": (bearer(make_token(ADMIN, extra={"purpose": "sign-in"})), 401),
    "session as bearer": (bearer(make_token(ADMIN, extra={"purpose": "session"})), 401),
    "api token as bearer": (bearer(make_token(ADMIN, extra={"purpose": "api"})), 200),
    "admin cookie": ({"Cookie": f"prefect_jwt={make_token(ADMIN)}"}, 200),
    "session cookie": (
        {"Cookie": f"prefect_jwt={make_token(ADMIN, extra={'purpose': 'session'})}"},
        200,
    ),
    "sign-in link as cookie": (
        {"Cookie": f"prefect_jwt={make_token(ADMIN, extra={'purpose': 'sign-in'})}"},
        401,
    ),
    "non-admin cookie": ({"Cookie": f"prefect_jwt={make_token(USER)}"}, 403),
    "expired cookie": ({"Cookie": f"prefect_jwt={make_token(ADMIN, minutes=-1)}"}, 401),
    "machine": ({"Authorization": basic(AUTH_STRING)}, 200),
    "wrong machine": ({"Authorization": basic("worker:guess")}, 401),
    "machine string as bearer": (bearer(AUTH_STRING), 401),
}


@pytest.mark.parametrize("name", CREDENTIALS)
def test_http_api_and_ui(dash: GatedDashboard, name: str) -> None:
    headers, expected = CREDENTIALS[name]
    with httpx.Client(base_url=dash.url, headers=headers, timeout=10) as client:
        api = client.get("/api/admin/version")
        ui = client.get("/v2/", headers={"Accept": "text/html"})
    assert (api.status_code, ui.status_code) == (expected, expected)
    if expected != 200:
        assert "exception_message" in api.json()
        assert "Sign in to the dashboard" in ui.text or expected == 403
        assert "https://app.example.com/login" in ui.text


@pytest.mark.parametrize("name", CREDENTIALS)
def test_websocket_handshake(dash: GatedDashboard, name: str) -> None:
    headers, expected = CREDENTIALS[name]
    if headers.get("Cookie"):
        headers = headers | {"Origin": dash.url}
    status = asyncio.run(handshake_status(f"{dash.ws_api}/events/out", headers))
    assert status == (101 if expected == 200 else expected)


async def handshake_status(url: str, headers: dict[str, str]) -> int:
    """The handshake's status; on 101 also Prefect's own auth exchange must succeed."""
    try:
        # Prefect's subprotocol, so the server does its auth exchange; but without any
        # header that would be the first-message path, tested on its own below.
        subprotocols = ["prefect"] if headers else None
        async with connect(url, additional_headers=headers, subprotocols=subprotocols) as ws:  # type: ignore[arg-type]
            await ws.send(json.dumps({"type": "auth", "token": None}))
            assert json.loads(await ws.recv())["type"] == "auth_success"
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


@pytest.mark.parametrize(
    "path", ["/events/in", "/events/out", "/logs/out", "/task_runs/subscriptions/scheduled"]
)
@pytest.mark.parametrize(
    ("token", "outcome"),
    [
        (AUTH_STRING, "auth_success"),
        (make_token(ADMIN), "auth_success"),
        ("worker:guess", "1008 Unauthorized"),
        (make_token(USER), "1008 Forbidden"),
        (unsigned_token(ADMIN), "1008 Unauthorized"),
        (None, "1008 Unauthorized"),
    ],
    # Names, not the tokens: a token made at collection carries the time, and every test
    # process must collect the same ids.
    ids=["machine", "admin", "wrong machine", "non-admin", "unsigned admin", "none"],
)
def test_websocket_first_message_auth(
    dash: GatedDashboard, path: str, token: str | None, outcome: str
) -> None:
    # What Prefect's own clients do: the "prefect" subprotocol, no header, an auth message.
    # An admin reads events and logs; sending events and claiming task runs are machines'.
    if token != AUTH_STRING and outcome == "auth_success" and path not in HUMAN_READS:
        outcome = "1008 Forbidden"
    assert asyncio.run(first_message_outcome(f"{dash.ws_api}{path}", token)) == outcome


async def first_message_outcome(url: str, token: str | None) -> str:
    async with connect(url, subprotocols=["prefect"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "auth", "token": token}))
        try:
            return str(json.loads(await ws.recv())["type"])
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return f"{closed.rcvd.code} {closed.rcvd.reason}"


def test_websocket_without_any_credential_or_subprotocol_is_refused(dash: GatedDashboard) -> None:
    assert asyncio.run(handshake_status(f"{dash.ws_api}/logs/out", {})) == 401


def test_websocket_cookie_from_another_origin_is_refused(dash: GatedDashboard) -> None:
    cookie = {"Cookie": f"prefect_jwt={make_token(ADMIN)}"}
    url = f"{dash.ws_api}/events/out"
    assert asyncio.run(handshake_status(url, cookie | {"Origin": "https://evil.example"})) == 403
    assert asyncio.run(handshake_status(url, cookie | {"Origin": dash.url})) == 101


def test_health_is_open_and_nothing_else(dash: GatedDashboard) -> None:
    assert httpx.get(f"{dash.api}/health").status_code == 200
    for path in ("/api/health/../admin/settings", "/api/admin/settings", "/api/healthz"):
        assert httpx.get(f"{dash.url}{path}").status_code == 401, path
    assert httpx.post(f"{dash.api}/health").status_code == 401


def test_state_changing_cookie_requests_need_the_dashboards_origin(dash: GatedDashboard) -> None:
    cookies = {"prefect_jwt": make_token(ADMIN)}
    with httpx.Client(base_url=dash.url, cookies=cookies, timeout=10) as client:
        assert (
            client.post(FILTER, json={}, headers={"Origin": "https://evil.example"}).status_code
            == 403
        )
        assert client.post(FILTER, json={}).status_code == 403  # no Origin at all
        created = client.post(
            "/api/variables/",
            json={"name": "x", "value": 1},
            headers={"Origin": "http://attacker.test"},
        )
        assert created.status_code == 403
        assert client.post(FILTER, json={}, headers={"Origin": dash.url}).status_code == 200
        assert client.get("/api/variables/name/x").status_code == 404  # never created
    # A bearer token is not sent by browsers on their own: no Origin needed.
    assert (
        httpx.post(f"{dash.url}{FILTER}", json={}, headers=bearer(make_token(ADMIN))).status_code
        == 200
    )


def test_sign_in_link_sets_the_cookie_once(dash: GatedDashboard, app_db: str) -> None:
    env = dashboard_env(dash.log_path.parent, app_db_url=app_db, port=dash.port)
    done = subprocess.run(
        [BACKJOBS, "dashboard-token", "admin@example.com", "--url", "--minutes", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip()
    assert link.startswith(f"{dash.url}/auth/sign-in?token=")
    token = unquote(link.split("token=", 1)[1])
    sign_in = f"{dash.url}/auth/sign-in"

    with httpx.Client(timeout=10) as browser:
        assert browser.get(f"{dash.url}/api/admin/version").status_code == 401
        # Opening the link (as a mail scanner would, twice) only shows the button.
        for _ in range(2):
            shown = browser.get(link)
            assert shown.status_code == 200 and "set-cookie" not in shown.headers
            assert '<form method="post" action="/auth/sign-in">' in shown.text
        assert browser.get(f"{dash.url}/api/admin/version").status_code == 401
        form = {"token": token}
        # Posted from another site (login CSRF): refused, and the link is not spent.
        elsewhere = {"Origin": "https://evil.example"}
        assert browser.post(sign_in, data=form, headers=elsewhere).status_code == 403
        assert browser.post(sign_in, data=form).status_code == 403  # no Origin at all
        signed_in = browser.post(sign_in, data=form, headers={"Origin": dash.url})
        assert signed_in.status_code == 200
        assert 'http-equiv="refresh"' in signed_in.text
        cookie = signed_in.headers["set-cookie"]
        for attribute in ("prefect_jwt=", "HttpOnly", "SameSite=strict", "Path=/"):
            assert attribute in cookie
        assert "Secure" not in cookie  # plain http on localhost
        session = browser.cookies["prefect_jwt"]
        assert session != token  # the cookie is a session of its own, not the link
        claims = jwt.decode(session, SECRET, algorithms=["HS256"])
        assert claims["purpose"] == "session" and claims["sub"] == ADMIN
        assert 480 * 60 - 120 < claims["exp"] - time.time() <= 480 * 60
        assert browser.get(f"{dash.url}/api/admin/version").status_code == 200
        assert browser.get(f"{dash.url}/v2/", headers={"Accept": "text/html"}).status_code == 200

        # Sign-out is a POST with the dashboard's Origin; its GET only shows the button.
        sign_out = f"{dash.url}/auth/sign-out"
        shown = browser.get(sign_out)
        assert '<form method="post" action="/auth/sign-out">' in shown.text
        assert "set-cookie" not in shown.headers
        assert browser.post(sign_out, headers={"Origin": "https://evil.example"}).status_code == 403
        assert browser.post(sign_out).status_code == 403
        assert browser.delete(sign_out).status_code == 405
        assert browser.get(f"{dash.url}/api/admin/version").status_code == 200  # still in
        signed_out = browser.post(sign_out, headers={"Origin": dash.url})
        assert 'prefect_jwt=""' in signed_out.headers["set-cookie"]
        assert browser.get(f"{dash.url}/api/admin/version").status_code == 401

    # The spent link's token is no credential, in any place.
    assert httpx.get(f"{dash.api}/admin/version", headers=bearer(token)).status_code == 401
    link_cookie = {"Cookie": f"prefect_jwt={token}"}
    assert httpx.get(f"{dash.api}/admin/version", headers=link_cookie).status_code == 401
    again = httpx.get(link)
    assert again.status_code == 401 and "already used" in again.text
    twice = httpx.post(sign_in, data={"token": token}, headers={"Origin": dash.url})
    assert twice.status_code == 401 and "already used" in twice.text
    assert httpx.put(sign_in).status_code == 405
    # The token never reaches the access log, though the request does.
    time.sleep(0.5)
    log = dash.log()
    assert "/auth/sign-in" in log
    assert token not in log and token[-20:] not in log


def test_a_spent_app_link_without_purpose_is_no_credential(dash: GatedDashboard) -> None:
    link_token = make_token(ADMIN, extra={"jti": "app-link-1"})  # as the app signs it
    assert httpx.get(f"{dash.api}/admin/version", headers=bearer(link_token)).status_code == 200
    posted = httpx.post(
        f"{dash.url}/auth/sign-in", data={"token": link_token}, headers={"Origin": dash.url}
    )
    assert posted.status_code == 200
    assert httpx.get(f"{dash.api}/admin/version", headers=bearer(link_token)).status_code == 401


def test_a_bare_dashboard_token_is_an_api_token_and_no_link(
    dash: GatedDashboard, app_db: str
) -> None:
    env = dashboard_env(dash.log_path.parent, app_db_url=app_db, port=dash.port)
    done = subprocess.run(
        [BACKJOBS, "dashboard-token", "admin@example.com"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["purpose"] == "api"
    assert httpx.get(f"{dash.api}/admin/version", headers=bearer(token)).status_code == 200
    as_link = httpx.get(f"{dash.url}/auth/sign-in", params={"token": token})
    assert as_link.status_code == 401
    as_cookie = {"Cookie": f"prefect_jwt={token}"}
    assert httpx.get(f"{dash.api}/admin/version", headers=as_cookie).status_code == 401


def test_sign_in_link_for_a_non_admin_or_forged_token_is_refused(dash: GatedDashboard) -> None:
    forged = make_token(ADMIN, secret="y" * 64, extra={"jti": "a"})
    assert httpx.get(f"{dash.url}/auth/sign-in", params={"token": forged}).status_code == 401
    non_admin = make_token(USER, extra={"jti": "b"})
    assert httpx.get(f"{dash.url}/auth/sign-in", params={"token": non_admin}).status_code == 403
    no_jti = make_token(ADMIN)  # not minted as a one-time link
    assert httpx.get(f"{dash.url}/auth/sign-in", params={"token": no_jti}).status_code == 401


def test_dashboard_token_refuses_non_admins(dash: GatedDashboard, app_db: str) -> None:
    env = dashboard_env(dash.log_path.parent, app_db_url=app_db, port=dash.port)
    for email, reason in (("user@example.com", "not an admin"), ("nobody@example.com", "no user")):
        done = subprocess.run(
            [BACKJOBS, "dashboard-token", email],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and reason in done.stderr and done.stdout == ""
        assert "Traceback" not in done.stderr


def test_a_demoted_admin_is_refused_after_the_cache_interval(
    dash: GatedDashboard, app_db: str
) -> None:
    headers = bearer(make_token(DEMOTED))
    assert httpx.get(f"{dash.api}/admin/version", headers=headers).status_code == 200
    engine = make_engine(app_db)
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET is_admin = false WHERE id = 3"))
    engine.dispose()
    time.sleep(CACHE_SECONDS + 0.3)
    assert httpx.get(f"{dash.api}/admin/version", headers=headers).status_code == 403
    assert asyncio.run(handshake_status(f"{dash.ws_api}/events/out", headers)) == 403
    outcome = asyncio.run(first_message_outcome(f"{dash.ws_api}/logs/out", make_token(DEMOTED)))
    assert outcome == "1008 Forbidden"


# -- Start-up errors: one line, no traceback, exit status 2.


def start_error(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [BACKJOBS, "dashboard", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_development_secret_only_on_loopback(
    app_db: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = dashboard_env(tmp_path_factory.mktemp("h"), app_db_url=app_db, port=free_port())
    del env["BACKJOBS_JWT_SECRET"]
    line = start_error(env, "--host", "0.0.0.0")
    assert "BACKJOBS_JWT_SECRET is the development default" in line
    env["BACKJOBS_JWT_SECRET"] = "short"
    assert "shorter than 32 bytes" in start_error(env, "--host", "0.0.0.0")


def test_port_in_use(app_db: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dashboard_env(tmp_path_factory.mktemp("h"), app_db_url=app_db, port=port)
        assert f"port {port} on 127.0.0.1 is already in use" in start_error(env)


def test_unreachable_app_database(tmp_path_factory: pytest.TempPathFactory) -> None:
    url = f"postgresql://backjobs:pw-not-shown@127.0.0.1:{free_port()}/app"
    env = dashboard_env(tmp_path_factory.mktemp("h"), app_db_url=url, port=free_port())
    line = start_error(env)
    assert line.startswith("backjobs dashboard: error: cannot reach the app database")
    assert "pw-not-shown" not in line


def test_prefects_own_auth_string_is_refused(
    app_db: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = dashboard_env(tmp_path_factory.mktemp("h"), app_db_url=app_db, port=free_port())
    env["PREFECT_SERVER_API_AUTH_STRING"] = "a:b"
    assert "BACKJOBS_DASHBOARD_AUTH_STRING" in start_error(env)


def test_dev_secret_behind_a_proxy_is_refused(
    app_db: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = dashboard_env(tmp_path_factory.mktemp("h"), app_db_url=app_db, port=free_port())
    del env["BACKJOBS_JWT_SECRET"]
    env["BACKJOBS_DASHBOARD_PUBLIC_URL"] = "https://jobs.example.com"  # README's production
    line = start_error(env)  # on 127.0.0.1, the default host
    assert "BACKJOBS_JWT_SECRET is the development default" in line
    assert "https://jobs.example.com" in line


# -- Roles, the audit trail, websockets that end with their credential.


def machine_call(dash: GatedDashboard, method: str, path: str, body: object = None) -> Any:
    return call_json(method, f"{dash.api}{path}", headers=dash.machine_headers(), body=body)


def test_an_admin_operates_and_is_audited_but_configures_nothing(dash: GatedDashboard) -> None:
    flow = machine_call(dash, "POST", "/flows/", {"name": "roles-flow"})
    deployment = machine_call(
        dash, "POST", "/deployments/", {"name": "roles-deployment", "flow_id": flow["id"]}
    )["id"]
    admin = bearer(make_token(ADMIN))
    with httpx.Client(base_url=dash.api, headers=admin, timeout=30) as client:
        refused = {
            "POST /variables/": client.post("/variables/", json={"name": "v", "value": 1}),
            "POST /deployments/": client.post(
                "/deployments/", json={"name": "x", "flow_id": flow["id"]}
            ),
            "PATCH /deployments/id": client.patch(
                f"/deployments/{deployment}", json={"parameters": {"a": 1}}
            ),
            "DELETE /deployments/id": client.delete(f"/deployments/{deployment}"),
            "POST /work_pools/": client.post("/work_pools/", json={"name": "p"}),
            "POST /block_documents/": client.post("/block_documents/", json={}),
            "POST /events": client.post("/events", json=[]),
            "POST /flow_runs/": client.post("/flow_runs/", json={"flow_id": flow["id"]}),
            "GET /block_documents/filter secrets": client.post(
                "/block_documents/filter", json={"include_secrets": True}
            ),
            "GET block type secrets": client.get(
                "/block_types/slug/secret/block_documents", params={"include_secrets": "true"}
            ),
            "a route Prefect may add": client.post("/deployments/bulk_pause", json={}),
        }
        assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 403)
        assert "machine credential" in refused["POST /variables/"].json()["exception_message"]
        assert client.post("/block_documents/filter", json={}).status_code == 200
        paused = client.post(f"/deployments/{deployment}/pause_deployment")
        assert paused.status_code == 200, paused.text
        run = client.post(f"/deployments/{deployment}/create_flow_run", json={"parameters": {}})
        assert run.status_code == 201, run.text
        cancelled = client.post(
            f"/flow_runs/{run.json()['id']}/set_state",
            json={"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True},
        )
        assert cancelled.status_code == 201, cancelled.text
    with httpx.Client(base_url=dash.api, headers=dash.machine_headers(), timeout=30) as machine:
        assert machine.get("/variables/name/v").status_code == 404  # never created
        assert machine.post("/variables/", json={"name": "m", "value": 1}).status_code == 201

    run_id = run.json()["id"]
    who = "who=user:1 <admin@example.com>"
    wait_for_log(dash, f"set_state 201 flow_run={run_id}")
    log = wait_for_log(dash, "audit who=machine POST /api/variables/ 201")
    assert f"audit {who} POST /api/deployments/{deployment}/pause_deployment 200" in log
    assert f"audit {who} POST /api/deployments/{deployment}/create_flow_run 201" in log
    assert f"deployment={deployment} flow_run={run_id}" in log
    assert f"audit {who} POST /api/flow_runs/{run_id}/set_state 201 flow_run={run_id}" in log
    assert f"audit {who} POST /api/variables/ 403" in log
    assert "audit who=machine POST /api/variables/ 201" in log
    assert "audit who=user:1 <admin@example.com> POST /api/flow_runs/filter" not in log


def wait_for_log(dash: GatedDashboard, needle: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while needle not in dash.log():
        assert time.monotonic() < deadline, f"{needle!r} not in the log:\n{dash.log()[-3000:]}"
        time.sleep(0.2)
    return dash.log()


def test_an_admin_may_not_open_the_machines_websockets(dash: GatedDashboard) -> None:
    admin = bearer(make_token(ADMIN))
    for path in ("/events/in", "/task_runs/subscriptions/scheduled"):
        assert asyncio.run(handshake_status(f"{dash.ws_api}{path}", admin)) == 403
        outcome = asyncio.run(first_message_outcome(f"{dash.ws_api}{path}", make_token(ADMIN)))
        assert outcome == "1008 Forbidden"


async def close_code(url: str, headers: dict[str, str], limit: float) -> int:
    """The close code of an open events/logs socket once the server closes it."""
    async with connect(url, additional_headers=headers, subprotocols=["prefect"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "auth", "token": None}))
        assert json.loads(await ws.recv())["type"] == "auth_success"
        await ws.send(json.dumps({"type": "filter", "filter": {}}))
        try:
            async with asyncio.timeout(limit):
                while True:
                    await ws.recv()
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code
    raise AssertionError("unreachable")


def test_a_socket_closes_at_its_tokens_exp(dash: GatedDashboard) -> None:
    token = make_token(ADMIN, minutes=6 / 60)  # exp in 6 s
    exp = jwt.decode(token, SECRET, algorithms=["HS256"])["exp"]
    url = f"{dash.ws_api}/events/out"
    code = asyncio.run(close_code(url, bearer(token), limit=60))
    assert code == 1008
    assert abs(time.time() - exp) < 3  # closed at exp (whole seconds), not later


def test_a_socket_closes_when_its_user_is_demoted(dash: GatedDashboard, app_db: str) -> None:
    url = f"{dash.ws_api}/logs/out"

    async def demote_while_open() -> tuple[float, int]:
        waiting = asyncio.create_task(close_code(url, bearer(make_token(SOCKET_ADMIN)), limit=60))
        await asyncio.sleep(2)
        assert not waiting.done()  # an admin's socket stays open
        engine = make_engine(app_db)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM users WHERE id = 4"))
        engine.dispose()
        demoted_at = time.monotonic()
        code = await waiting
        return time.monotonic() - demoted_at, code

    after, code = asyncio.run(demote_while_open())
    assert code == 1008
    # Within BACKJOBS_DASHBOARD_ADMIN_CACHE_SECONDS (1 s here), plus a lookup's time and
    # the minimum re-check step on a loaded machine.
    assert after < CACHE_SECONDS + 2.0, after


def test_binary_frames_are_refused_cleanly(dash: GatedDashboard) -> None:
    async def first_binary() -> str:
        async with connect(f"{dash.ws_api}/logs/out", subprotocols=["prefect"]) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"type": "auth", "token": make_token(ADMIN)}).encode())
            try:
                await ws.recv()
            except ConnectionClosed as closed:
                assert closed.rcvd is not None
                return f"{closed.rcvd.code} {closed.rcvd.reason}"
        return "open"

    async def binary_after_header_auth() -> int:
        headers = bearer(make_token(ADMIN))
        async with connect(
            f"{dash.ws_api}/events/out",
            additional_headers=headers,
            subprotocols=["prefect"],  # type: ignore[list-item]
        ) as ws:
            await ws.send(json.dumps({"type": "auth", "token": None}).encode())
            try:
                await ws.recv()
            except ConnectionClosed as closed:
                assert closed.rcvd is not None
                return closed.rcvd.code
        return 0

    assert asyncio.run(first_binary()) == "1008 Unauthorized"
    assert asyncio.run(binary_after_header_auth()) == 1003
    time.sleep(0.5)
    assert "Traceback" not in dash.log()


def test_no_query_string_in_the_log(dash: GatedDashboard) -> None:
    secret_query = "token=query-secret-4711"
    headers = bearer(make_token(ADMIN))
    status = asyncio.run(handshake_status(f"{dash.ws_api}/events/out?{secret_query}", headers))
    assert status == 101
    assert httpx.get(f"{dash.api}/admin/version?{secret_query}", headers=headers).status_code == 200
    wait_for_log(dash, "GET /api/admin/version")
    assert "query-secret-4711" not in dash.log()


def test_an_odd_sub_is_no_error(dash: GatedDashboard) -> None:
    for sub in ("²", "9" * 200, "١٢"):
        assert (
            httpx.get(f"{dash.api}/admin/version", headers=bearer(make_token(sub))).status_code
            == 401
        )
    assert " ERROR " not in dash.log() and "cannot check admin status" not in dash.log()


# -- Secret values: an admin reads block documents, never a secret in them.

CANARY_URL = "http://127.0.0.1:9/canary-url-5151"
CANARY_HEADER = "Basic canary-credential-5151"
SECRET_ASKS = (
    "include_secrets=true",
    "include_secrets=True",
    "include_secrets=1",
    "include_secrets=yes",
    "include%5Fsecrets=true",  # the key percent-encoded: FastAPI decodes it
    "%69nclude_secrets=on",
    "include_secrets=false&include_secrets=true",  # FastAPI takes the last
)


@pytest.fixture(scope="module")
def webhook_block(dash: GatedDashboard) -> dict[str, str]:
    """A Webhook block whose url and headers hold secrets, as the alerts' receiver block."""
    block_type = machine_call(dash, "GET", "/block_types/slug/webhook")
    schemas = machine_call(
        dash,
        "POST",
        "/block_schemas/filter",
        {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}},
    )
    document = machine_call(
        dash,
        "POST",
        "/block_documents/",
        {
            "name": "gate-canary",
            "block_type_id": block_type["id"],
            "block_schema_id": schemas[0]["id"],
            "data": {
                "method": "POST",
                "url": CANARY_URL,
                "headers": {"Authorization": CANARY_HEADER},
            },
        },
    )
    return {"id": document["id"], "name": document["name"]}


def test_an_admin_reads_block_documents_without_their_secrets(
    dash: GatedDashboard, webhook_block: dict[str, str]
) -> None:
    block_id, name = webhook_block["id"], webhook_block["name"]
    reads = {
        "GET": [
            f"/block_documents/{block_id}",
            "/block_types/slug/webhook/block_documents",
            f"/block_types/slug/webhook/block_documents/name/{name}",
        ],
        "POST": ["/block_documents/filter"],
    }
    with httpx.Client(base_url=dash.api, headers=bearer(make_token(ADMIN)), timeout=30) as admin:
        for method, paths in reads.items():
            for path in paths:
                answer = admin.request(method, path, json={} if method == "POST" else None)
                assert answer.status_code == 200, (path, answer.text)
                assert "gate-canary" in answer.text
                assert "canary-url" not in answer.text and "canary-credential" not in answer.text
                for ask in SECRET_ASKS:
                    refused = admin.request(
                        method, f"{path}?{ask}", json={} if method == "POST" else None
                    )
                    leaked = "canary-credential" in refused.text
                    assert (refused.status_code, leaked) == (403, False), (path, ask)
        for body in (b'{"include_secrets": true}', b'{"include\\u005fsecrets": "true"}'):
            refused = admin.post("/block_documents/filter", content=body)
            assert refused.status_code == 403, body
            assert "canary" not in refused.text
    # The machine may read them: the canary is there to be found.
    revealed = httpx.get(
        f"{dash.api}/block_documents/{block_id}?include_secrets=true",
        headers=dash.machine_headers(),
    )
    assert CANARY_HEADER in revealed.text and CANARY_URL in revealed.text


def test_an_admin_sends_no_events_into_the_server(dash: GatedDashboard) -> None:
    event = {
        "id": "0b7f06a3-8c6f-4a4e-9a5c-2f4b1c1e5151",
        "occurred": "2026-01-01T00:00:00Z",
        "event": "gate.forged-event",
        "resource": {"prefect.resource.id": "gate.forged"},
    }
    with httpx.Client(base_url=dash.api, headers=bearer(make_token(ADMIN)), timeout=30) as admin:
        for path in ("/events", "/events/", "/events/in"):
            assert admin.post(path, json=[event]).status_code == 403, path
    assert (
        asyncio.run(handshake_status(f"{dash.ws_api}/events/in", bearer(make_token(ADMIN)))) == 403
    )
    machine_read = machine_call(
        dash, "POST", "/events/filter", {"filter": {"event": {"prefix": ["gate."]}}}
    )
    assert machine_read["events"] == []


def test_an_admin_cannot_choose_a_runs_work_queue(dash: GatedDashboard) -> None:
    # Prefect creates the named queue in the deployment's pool when it is missing, and a
    # queue of its own escapes the deployment's queue and its limits: configuration.
    flow = machine_call(dash, "POST", "/flows/", {"name": "queue-flow"})
    deployment = machine_call(
        dash, "POST", "/deployments/", {"name": "queue-deployment", "flow_id": flow["id"]}
    )["id"]
    with httpx.Client(base_url=dash.api, headers=bearer(make_token(ADMIN)), timeout=30) as admin:
        path = f"/deployments/{deployment}/create_flow_run"
        refused = admin.post(path, json={"parameters": {}, "work_queue_name": "admin-queue"})
        assert refused.status_code == 403
        assert "work_queue_name" in refused.json()["exception_message"]
        assert admin.post(path, json={"parameters": {}, "work_queue_name": None}).status_code == 201


def test_an_admins_run_from_the_future_is_refused_before_it_exists(dash: GatedDashboard) -> None:
    # The UI's custom run used to accept it; the worker then failed it (a Failed run).
    flow = machine_call(dash, "POST", "/flows/", {"name": "clock-flow"})
    deployment = machine_call(
        dash, "POST", "/deployments/", {"name": "clock-deployment", "flow_id": flow["id"]}
    )["id"]
    path = f"/deployments/{deployment}/create_flow_run"
    ahead = (datetime.now(UTC) + timedelta(minutes=20)).isoformat()
    with httpx.Client(base_url=dash.api, headers=bearer(make_token(ADMIN)), timeout=30) as admin:
        refused = admin.post(path, json={"parameters": {"as_of": ahead}})
        assert refused.status_code == 403
        assert "BACKJOBS_ALLOW_FUTURE_AS_OF" in refused.json()["exception_message"]
        past = (datetime.now(UTC) - timedelta(days=3)).isoformat()
        assert admin.post(path, json={"parameters": {"as_of": past}}).status_code == 201
    runs = machine_call(
        dash, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment]}}}
    )
    assert [r["parameters"]["as_of"] for r in runs] == [past]


# -- The alert receiver (in front of the gate): the machine credential, or nothing.


def test_the_alert_receiver_refuses_every_caller_but_the_machine(dash: GatedDashboard) -> None:
    receiver = f"{dash.url}/backjobs/alerts"
    body = {"signal": "silent", "job": "gate-test-job"}
    callers = {
        "none": {},
        "admin bearer": bearer(make_token(ADMIN)),
        "admin api token": bearer(make_token(ADMIN, extra={"purpose": "api"})),
        "admin cookie": {"Cookie": f"prefect_jwt={make_token(ADMIN)}", "Origin": dash.url},
        "wrong machine": {"Authorization": basic("worker:guess")},
        "machine string as bearer": bearer(AUTH_STRING),
        "machine string bare": {"Authorization": AUTH_STRING},
        "not base64": {"Authorization": "Basic !!!"},
    }
    answers = {name: httpx.post(receiver, json=body, headers=h) for name, h in callers.items()}
    assert {n: a.status_code for n, a in answers.items()} == dict.fromkeys(callers, 401)
    for method in ("GET", "PUT", "DELETE"):
        assert httpx.request(method, receiver).status_code in (401, 405), method
    # The machine credential gets through to the receiver's own checks (a bad call: 400).
    accepted = httpx.post(receiver, content=b"{}", headers=dash.machine_headers())
    assert accepted.status_code == 400, accepted.text
    assert "gate-test-job" not in dash.log()


def test_a_receiver_call_cut_off_before_its_body_arrived_is_logged_as_lost(
    dash: GatedDashboard,
) -> None:
    """A caller that hangs up mid-body (as Prefect's webhook calls did when one closed the
    others' connections) is an ``alert LOST`` line, not a silent bad request."""
    port = int(dash.url.rsplit(":", 1)[1])
    half = b'{"signal": "failed", "job": "cut-'
    head = (
        "POST /backjobs/alerts HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {dash.machine_headers()['Authorization']}\r\n"
        "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as caller:
        caller.sendall(head.encode() + half)
        time.sleep(0.5)  # the receiver is waiting for the rest of the body
    # uvicorn hands over what arrived (len(half) bytes) unless the hang-up is seen first (0).
    wanted = re.compile(rf"alert LOST: a call was cut off after (0|{len(half)}) bytes of its body")
    deadline = time.monotonic() + 15
    while not wanted.search(dash.log()):
        assert time.monotonic() < deadline, dash.log()[-2000:]
        time.sleep(0.2)
