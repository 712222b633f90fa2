"""Dashboard tokens without a server: what verify_token accepts, one-time link ids, URLs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt
import pytest

from backjobs.dashboard.server import (
    DashboardConfig,
    DashboardError,
    check_secret,
    public_url,
)
from backjobs.dashboard.tokens import (
    TokenError,
    UsedTokenIds,
    mint_token,
    sign_in_url,
    verify_token,
)
from backjobs.settings import DEVELOPMENT_JWT_SECRET, load_settings

SECRET = "s" * 64
NOW = datetime.now(UTC)


def test_a_minted_token_verifies_with_its_claims() -> None:
    now = datetime.now(UTC)
    claims = verify_token(mint_token(sub="7", secret=SECRET, now=now, minutes=5), secret=SECRET)
    assert claims.sub == "7" and claims.jti and len(claims.jti) == 32
    assert claims.exp == int((now + timedelta(minutes=5)).timestamp())


@pytest.mark.parametrize(
    "token",
    [
        mint_token(sub="7", secret="t" * 64, now=NOW, minutes=5),  # another secret
        mint_token(sub="7", secret=SECRET, now=NOW - timedelta(hours=1), minutes=5),  # expired
        jwt.encode({"sub": "7"}, SECRET, algorithm="HS256"),  # no exp
        jwt.encode({"exp": NOW + timedelta(minutes=5)}, SECRET, algorithm="HS256"),  # no sub
        jwt.encode({"sub": "7", "exp": NOW + timedelta(minutes=5)}, SECRET, algorithm="HS384"),
        jwt.encode({"sub": "7", "exp": NOW + timedelta(minutes=5)}, None, algorithm="none"),
        "not.a.jwt",
        "",
    ],
    ids=["forged", "expired", "no-exp", "no-sub", "HS384", "alg-none", "garbage", "empty"],
)
def test_anything_else_is_refused(token: str) -> None:
    with pytest.raises(TokenError):
        verify_token(token, secret=SECRET)


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


def config(host: str, secret: str) -> DashboardConfig:
    return DashboardConfig(host, 4200, "http://x", secret, None, None, "sqlite://")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_the_development_secret_is_fine_on_loopback(host: str) -> None:
    check_secret(config(host, DEVELOPMENT_JWT_SECRET))


@pytest.mark.parametrize(
    ("secret", "message"),
    [(DEVELOPMENT_JWT_SECRET, "development default"), ("short", "shorter than 32")],
)
def test_beyond_loopback_a_real_secret_is_needed(secret: str, message: str) -> None:
    with pytest.raises(DashboardError, match=message):
        check_secret(config("0.0.0.0", secret))
    check_secret(config("0.0.0.0", "r" * 32))
