"""The dashboard gate, against a real ``backjobs dashboard`` (Prefect server + UI) on a free port.

Who gets in over HTTP and websocket, the sign-in link, the same-origin rule for the cookie,
a demoted admin, and the one-line start-up errors.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Iterator
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
from tests.support.prefect_api import free_port

pytestmark = pytest.mark.slow

ADMIN, USER, DEMOTED = "1", "2", "3"
CACHE_SECONDS = 1.0
FILTER = "/api/flow_runs/filter"


@pytest.fixture(scope="module")
def app_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = migrated_sqlite(tmp_path_factory.mktemp("app-db"))
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, email, is_admin) VALUES "
                "(1, 'admin@example.com', true), (2, 'user@example.com', false), "
                "(3, 'demoted@example.com', true)"
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
    "admin by email": (bearer(make_token("Admin@Example.com")), 200),
    "admin cookie": ({"Cookie": f"prefect_jwt={make_token(ADMIN)}"}, 200),
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
)
def test_websocket_first_message_auth(
    dash: GatedDashboard, path: str, token: str | None, outcome: str
) -> None:
    # What Prefect's own clients do: the "prefect" subprotocol, no header, an auth message.
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
        assert browser.get(f"{dash.url}/api/admin/version").status_code == 200
        assert browser.get(f"{dash.url}/v2/", headers={"Accept": "text/html"}).status_code == 200

        signed_out = browser.get(f"{dash.url}/auth/sign-out")
        assert 'prefect_jwt=""' in signed_out.headers["set-cookie"]
        assert browser.get(f"{dash.url}/api/admin/version").status_code == 401

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
