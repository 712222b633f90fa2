"""Dashboard tokens without a server: what verify_token accepts (purposes, lifetimes, user
ids), one-time link ids, URLs, the secret's check, and the admin role's allow-list."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt
import pytest

from backjobs.dashboard.roles import Kind, Role, check_body, decide
from backjobs.dashboard.server import (
    DashboardConfig,
    DashboardError,
    check_secret,
    public_url,
)
from backjobs.dashboard.tokens import (
    Channel,
    Purpose,
    TokenError,
    UsedTokenIds,
    mint_token,
    sign_in_url,
    verify_token,
)
from backjobs.settings import DEVELOPMENT_JWT_SECRET, load_settings

SECRET = "s" * 64
NOW = datetime.now(UTC)  # read at collection: tests in other processes may run long after
WEEK = 10080
LIVE = 180  # minutes: a live token outlives the whole suite, whenever this module runs


def verify(token: str, channel: Channel = Channel.BEARER, max_minutes: float = WEEK) -> object:
    return verify_token(
        token, secret=SECRET, now=NOW.timestamp(), max_minutes=max_minutes, channel=channel
    )


def signed(claims: dict[str, object]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def in_minutes(minutes: float) -> int:
    return int((NOW + timedelta(minutes=minutes)).timestamp())


def test_a_minted_token_verifies_with_its_claims() -> None:
    token = mint_token(sub="7", secret=SECRET, now=NOW, minutes=LIVE, purpose=Purpose.API)
    claims = verify_token(
        token, secret=SECRET, now=NOW.timestamp(), max_minutes=WEEK, channel=Channel.BEARER
    )
    assert claims.sub == "7" and claims.jti and len(claims.jti) == 32
    assert claims.exp == in_minutes(LIVE) and claims.purpose is Purpose.API


@pytest.mark.parametrize(
    ("purpose", "accepted_on"),
    [
        (Purpose.SIGN_IN, {Channel.LINK}),
        (Purpose.SESSION, {Channel.COOKIE}),
        (Purpose.API, {Channel.BEARER}),
        (None, {Channel.LINK, Channel.COOKIE, Channel.BEARER}),  # the app's own tokens
    ],
)
def test_a_token_is_accepted_only_for_its_purpose(
    purpose: Purpose | None, accepted_on: set[Channel]
) -> None:
    claims: dict[str, object] = {"sub": "7", "exp": in_minutes(LIVE), "jti": "j"}
    if purpose is not None:
        claims["purpose"] = purpose.value
    for channel in Channel:
        if channel in accepted_on:
            verify(signed(claims), channel)
        else:
            with pytest.raises(TokenError, match="not accepted"):
                verify(signed(claims), channel)


def test_a_token_living_longer_than_the_maximum_is_refused() -> None:
    verify(signed({"sub": "7", "exp": in_minutes(WEEK - 1)}))
    with pytest.raises(TokenError, match="MAX_TOKEN_MINUTES"):
        verify(signed({"sub": "7", "exp": in_minutes(WEEK + 2)}))
    with pytest.raises(TokenError, match="MAX_TOKEN_MINUTES"):
        verify(signed({"sub": "7", "exp": 32503680000}))  # the year 3000
    with pytest.raises(TokenError, match="MAX_TOKEN_MINUTES"):
        verify(signed({"sub": "7", "exp": in_minutes(30)}), max_minutes=20)


@pytest.mark.parametrize(
    "sub", ["²", "1" * 200, "-1", "1.0", " 1", "admin@example.com", "\u212aate@example.com", ""]
)
def test_only_a_user_id_is_a_subject(sub: str) -> None:
    with pytest.raises(TokenError):
        verify(signed({"sub": sub, "exp": in_minutes(LIVE)}))


def test_an_unknown_purpose_is_refused() -> None:
    with pytest.raises(TokenError, match="unknown purpose"):
        verify(signed({"sub": "7", "exp": in_minutes(LIVE), "purpose": "admin"}))


@pytest.mark.parametrize(
    "token",
    [
        mint_token(sub="7", secret="t" * 64, now=NOW, minutes=LIVE, purpose=Purpose.API),
        mint_token(
            sub="7", secret=SECRET, now=NOW - timedelta(hours=1), minutes=5, purpose=Purpose.API
        ),
        jwt.encode({"sub": "7"}, SECRET, algorithm="HS256"),  # no exp
        jwt.encode({"exp": NOW + timedelta(minutes=LIVE)}, SECRET, algorithm="HS256"),  # no sub
        jwt.encode({"sub": "7", "exp": NOW + timedelta(minutes=LIVE)}, SECRET, algorithm="HS384"),
        jwt.encode({"sub": "7", "exp": NOW + timedelta(minutes=LIVE)}, None, algorithm="none"),
        "not.a.jwt",
        "",
    ],
    ids=["forged", "expired", "no-exp", "no-sub", "HS384", "alg-none", "garbage", "empty"],
)
def test_anything_else_is_refused(token: str) -> None:
    with pytest.raises(TokenError):
        verify(token)


def test_a_link_id_is_accepted_once_and_forgotten_after_expiry() -> None:
    clock = [1000.0]
    used = UsedTokenIds(clock=lambda: clock[0])
    assert not used.used("a")
    assert used.claim("a", exp=1100) and not used.claim("a", exp=1100)
    assert used.used("a") and not used.used("b")
    assert used.claim("b", exp=1100)
    clock[0] = 1200.0  # both expired: forgotten (a token that old is refused anyway)
    assert not used.used("a")
    assert used.claim("a", exp=1300)


def test_public_url_and_sign_in_link() -> None:
    settings = load_settings(dashboard_port=4300)
    assert public_url(settings) == "http://127.0.0.1:4300"
    assert public_url(settings, host="0.0.0.0", port=80) == "http://localhost:80"
    behind = load_settings(dashboard_public_url="https://jobs.example.com/")
    assert public_url(behind) == "https://jobs.example.com"
    assert sign_in_url("https://jobs.example.com", "a.b+c") == (
        "https://jobs.example.com/auth/sign-in?token=a.b%2Bc"
    )


def config(host: str, secret: str, url: str = "http://127.0.0.1:4200") -> DashboardConfig:
    return DashboardConfig(host, 4200, url, secret, None, None, "sqlite://")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_the_development_secret_is_fine_on_loopback(host: str) -> None:
    check_secret(config(host, DEVELOPMENT_JWT_SECRET))
    check_secret(config(host, "short", url="http://localhost:4200"))


@pytest.mark.parametrize(
    ("secret", "message"),
    [(DEVELOPMENT_JWT_SECRET, "development default"), ("short", "shorter than 32")],
)
@pytest.mark.parametrize(
    ("host", "url"),
    [("0.0.0.0", "http://localhost:4200"), ("127.0.0.1", "https://jobs.example.com")],
    ids=["beyond-loopback", "behind-a-proxy"],
)
def test_in_production_a_real_secret_is_needed(
    secret: str, message: str, host: str, url: str
) -> None:
    with pytest.raises(DashboardError, match=message):
        check_secret(config(host, secret, url))
    check_secret(config(host, "r" * 32, url))


UUID = "0b1e2a8e-3c1f-4f2a-9a55-6c1f0f2f9a10"


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("GET", "/v2/deployments", Kind.READ),
        ("GET", f"/api/deployments/{UUID}", Kind.READ),
        ("POST", "/api/flow_runs/filter", Kind.READ),
        ("POST", "/api/ui/flow_runs/history", Kind.READ),
        ("POST", "/api/events/filter", Kind.READ),
        ("POST", "/api/task_runs/history", Kind.READ),
        ("POST", f"/api/deployments/{UUID}/create_flow_run", Kind.OPERATE),
        ("POST", f"/api/flow_runs/{UUID}/set_state", Kind.OPERATE),
        ("POST", f"/api/deployments/{UUID}/pause_deployment", Kind.OPERATE),
        ("PATCH", f"/api/deployments/{UUID}/schedules/{UUID}", Kind.OPERATE),
    ],
)
def test_an_admin_reads_and_operates(method: str, path: str, kind: Kind) -> None:
    decision = decide(Role.HUMAN, method, path, b"")
    assert decision.allowed and decision.kind is kind


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/deployments/"),
        ("PATCH", f"/api/deployments/{UUID}/../../work_pools/backjobs"),
        ("PATCH", "/api/work_pools/backjobs"),
        ("POST", "/api/work_pools/"),
        ("POST", "/api/block_documents/"),
        ("POST", "/api/variables/"),
        ("POST", "/api/automations/"),
        ("POST", "/api/events"),
        ("POST", "/api/logs/"),
        ("POST", "/api/flow_runs/"),
        ("DELETE", f"/api/flow_runs/{UUID}"),
        ("POST", "/api/flows/"),
        ("PUT", "/api/admin/storage"),
        ("POST", "/api/some_route_of_a_later_prefect"),
        ("GET", "/api/some_route_of_a_later_prefect"),
        ("POST", "/v2/deployments"),
    ],
)
def test_the_machines_routes_and_unknown_ones_are_closed_to_admins(method: str, path: str) -> None:
    assert not decide(Role.HUMAN, method, path, b"").allowed
    assert decide(Role.MACHINE, method, path, b"").allowed


def test_block_secrets_and_job_variables_are_refused_to_admins() -> None:
    block = f"/api/block_documents/{UUID}"
    assert decide(Role.HUMAN, "GET", block, b"include_secrets=false").allowed
    for query in (
        b"include_secrets=True",
        b"include%5Fsecrets=true",  # FastAPI decodes the key: the same parameter
        b"%69nclude_secrets=1",
        b"include_secrets=false&include_secrets=on",
    ):
        assert not decide(Role.HUMAN, "GET", block, query).allowed, query
        assert decide(Role.MACHINE, "GET", block, query).allowed
    secrets_filter = decide(Role.HUMAN, "POST", "/api/block_documents/filter", b"")
    assert secrets_filter.body_check is not None
    assert check_body(secrets_filter.body_check, b'{"include_secrets": true}')
    assert check_body(secrets_filter.body_check, b"{}") is None
    run = decide(Role.HUMAN, "POST", f"/api/deployments/{UUID}/create_flow_run", b"")
    assert run.body_check is not None
    parameters_only = b'{"parameters": {"as_of": null}, "job_variables": {}}'
    assert check_body(run.body_check, parameters_only) is None
    assert check_body(run.body_check, b'{"parameters": {}, "work_queue_name": null}') is None
    for body in (
        b'{"job_variables": {"command": "id"}}',
        b'{"job_variables": {"env": {"X": "1"}}}',
        b'{"infrastructure_document_id": "x"}',
        b'{"parameters": {}, "work_queue_name": "a-queue-of-its-own"}',
        b"[1]",
        b"not json",
    ):
        assert check_body(run.body_check, body), body
    schedule = decide(Role.HUMAN, "PATCH", f"/api/deployments/{UUID}/schedules/{UUID}", b"")
    assert schedule.body_check is not None
    assert check_body(schedule.body_check, b'{"active": false}') is None
    assert check_body(schedule.body_check, b'{"active": true, "schedule": {"cron": "* * * * *"}}')
