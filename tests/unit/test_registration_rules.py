"""Registration jobs, pure parts: the reminder template, links, token hashing, settings,
and the two deployments in prefect.yaml."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from backjobs.mail.render import render_email, sensitive_fields, validate_context
from backjobs.orchestration.prefect_yaml import find_deployment
from backjobs.registration import confirmation_link, hash_token, new_token
from backjobs.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
WHEN = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def waiting(n: int) -> list[dict[str, object]]:
    return [
        {"display_name": f"U{i}", "email": f"u{i}@example.com", "confirmed_at": WHEN,
         "days_waiting": i}
        for i in range(n)
    ]  # fmt: skip


def test_the_reminder_shows_days_waiting_and_how_many_more() -> None:
    rendered = render_email("pending_users_reminder", {"users": waiting(2), "more_waiting": 5})
    assert rendered.subject == "7 users awaiting approval"
    assert "U1 <u1@example.com>, confirmed 2026-01-05 09:00 UTC, waiting 1 day\n" in rendered.text
    assert "and 5 more waiting." in rendered.text
    assert "<td>1</td>" in rendered.html and "and 5 more waiting." in rendered.html
    alone = render_email("pending_users_reminder", {"users": waiting(1)})
    assert alone.subject == "1 user awaiting approval" and "more waiting" not in alone.text


def test_the_reminder_lists_at_most_100_users() -> None:
    validate_context("pending_users_reminder", {"users": waiting(100)})
    with pytest.raises(ValueError, match="users"):
        validate_context("pending_users_reminder", {"users": waiting(101)})


def test_the_confirmation_link_is_sensitive() -> None:
    assert sensitive_fields("registration_expiry_warning") == {"confirmation_link"}


def test_tokens_are_random_url_safe_and_stored_as_sha256_hex() -> None:
    token = new_token()
    assert len(token) == 43 and token != new_token()
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()


def test_the_link_is_base_url_path_and_token() -> None:
    settings = load_settings(app_base_url="https://app.example.com/", confirmation_path="/c/")
    assert confirmation_link("tok", settings) == "https://app.example.com/c/tok"
    default = load_settings()
    assert confirmation_link("tok", default) == "http://localhost:8000/confirm-email?token=tok"


def test_a_bad_confirmation_path_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKJOBS_CONFIRMATION_PATH", "confirm?token=")
    with pytest.raises(SettingsError, match="BACKJOBS_CONFIRMATION_PATH"):
        load_settings()


@pytest.mark.parametrize(
    ("job", "flow_name", "cron"),
    [
        ("PendingUsersReminderJob", "pending-users-reminder-job", "0 6 * * *"),
        ("ExpireUnconfirmedRegistrationsJob", "expire-unconfirmed-registrations-job", "0 5 * * *"),
    ],
)
def test_both_jobs_are_deployed_with_the_seeds_cron(job: str, flow_name: str, cron: str) -> None:
    deployment = find_deployment(ROOT / "prefect.yaml", job)
    assert deployment == find_deployment(ROOT / "prefect.yaml", flow_name)
    assert deployment["name"] == flow_name
    assert deployment["schedules"] == [
        {"cron": cron, "timezone": "UTC", "slug": f"{flow_name}-cron"}
    ]
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert deployment["work_pool"] == {"name": "backjobs"}


def test_prefect_yaml_holds_the_five_seed_jobs() -> None:
    document = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert {d["name"] for d in document["deployments"]} == {
        "cleanup-job",
        "email-send-job",
        "process-recurring-transactions-job",
        "pending-users-reminder-job",
        "expire-unconfirmed-registrations-job",
    }
