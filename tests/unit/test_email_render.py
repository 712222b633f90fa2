"""Email templates, addresses, MIME building and backoff: pure functions, no IO."""

from __future__ import annotations

import email
import random
import re
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import default
from typing import Any

import pytest

from backjobs.jobs.email_outcome import backoff_seconds
from backjobs.jobs.email_payload import read_payload
from backjobs.mail.render import (
    TEMPLATES,
    build_message,
    check_address,
    legacy_message_id,
    new_message_id,
    render_email,
    validate_context,
)

WHEN = datetime(2030, 3, 1, 9, 30, tzinfo=UTC)

CONTEXTS: dict[str, dict[str, Any]] = {
    "generic": {"subject": "Maintenance tonight", "body": "Dear all,\n\nwe will be down."},
    "pending_users_reminder": {
        "users": [
            {"display_name": "<script>alert(1)</script>", "email": "p1@example.com",
             "confirmed_at": WHEN},
            {"display_name": None, "email": "p2@example.com", "confirmed_at": WHEN},
        ],
        "review_url": "https://app.example.com/admin/users?status=pending",
    },
    "registration_expiry_warning": {
        "display_name": "Ann", "confirmation_link": "https://app.example.com/confirm?t=abc",
        "expires_at": WHEN + timedelta(days=2),
    },
    "registration_expired": {"display_name": "Ann", "expired_at": WHEN},
    "job-alert": {
        "job": "cleanup-job", "kind": "still failing", "at": WHEN, "flow_run_id": "6b1f",
        "flow_run_name": "brisk-otter", "state": "Failed",
        "message": "cleanup-job: 1 of 4 parts failed: empty_trash_bin (OperationalError: x)",
        "failed_parts": ["empty_trash_bin (OperationalError: x)"],
        "first_failure_at": WHEN, "failures": 3, "new_failures": 2,
        "url": "https://jobs.example.com/runs/flow-run/6b1f",
    },
}  # fmt: skip


def test_every_template_has_a_sample() -> None:
    assert set(CONTEXTS) == set(TEMPLATES)


@pytest.mark.parametrize("template", sorted(CONTEXTS))
def test_every_template_renders_subject_text_and_html(template: str) -> None:
    rendered = render_email(template, CONTEXTS[template])
    assert rendered.subject and "\n" not in rendered.subject
    assert rendered.text.strip() and "<html>" not in rendered.text
    assert rendered.html.lstrip().startswith("<!DOCTYPE html>")


def test_pending_users_reminder_lists_and_escapes_users() -> None:
    rendered = render_email("pending_users_reminder", CONTEXTS["pending_users_reminder"])
    assert rendered.subject == "2 users awaiting approval"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered.html
    assert "<script>" not in rendered.html
    assert "<script>alert(1)</script> <p1@example.com>, confirmed 2030-03-01 09:30 UTC" in (
        rendered.text
    )
    assert "p2@example.com" in rendered.html and "(no name)" in rendered.html


def test_expiry_warning_carries_link_and_date() -> None:
    rendered = render_email("registration_expiry_warning", CONTEXTS["registration_expiry_warning"])
    assert 'href="https://app.example.com/confirm?t=abc"' in rendered.html
    assert "https://app.example.com/confirm?t=abc" in rendered.text
    assert "2030-03-03 09:30 UTC" in rendered.text


def test_generic_body_is_plain_text_escaped_into_paragraphs() -> None:
    rendered = render_email("generic", {"subject": "S", "body": "a < b\nline\n\n<b>x</b>"})
    assert rendered.text == "a < b\nline\n\n<b>x</b>\n"
    assert "<p>a &lt; b<br>\nline</p>" in rendered.html
    assert "<p>&lt;b&gt;x&lt;/b&gt;</p>" in rendered.html


@pytest.mark.parametrize(
    ("template", "context", "message"),
    [
        ("nope", {}, "unknown email template 'nope'"),
        ("generic", {"subject": "S"}, "body: Field required"),
        ("generic", {"subject": "S", "body": "b", "cc": "x"}, "cc: Extra inputs"),
        ("generic", {"subject": "S\nBcc: x@y.z", "body": "b"}, "one line"),
        ("pending_users_reminder", {"users": []}, "users"),
        ("registration_expired", {"expired_at": "yesterday"}, "expired_at"),
    ],
)
def test_context_that_does_not_fit_is_a_value_error(
    template: str, context: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_email(template, context)


def test_validated_context_is_json_ready_and_renders_the_same() -> None:
    stored = validate_context("registration_expired", CONTEXTS["registration_expired"])
    assert stored["expired_at"] == "2030-03-01T09:30:00Z"
    expected = render_email("registration_expired", CONTEXTS["registration_expired"])
    assert render_email("registration_expired", stored) == expected


@pytest.mark.parametrize(
    "address", ["a@example.com", "first.last+tag@sub.example.co.uk", "x@localhost"]
)
def test_good_addresses(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize(
    "address",
    ["", "plain", "@example.com", "a@", "a b@example.com", "a@exa mple.com",
     "Ann <a@example.com>", "a@example.com\r\nBcc: b@example.com", "a@-bad.com",
     "a@example.com,b@example.com", "a" * 320 + "@example.com"],
)  # fmt: skip
def test_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        check_address(address)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=default)
    assert isinstance(message, EmailMessage)
    return message


def test_built_message_parses_with_both_parts_and_a_stable_id() -> None:
    rendered = render_email("generic", {"subject": "Grüße ünd mehr", "body": "Hällo\n\n<ok>"})
    built = build_message(rendered, task_id=42, to=["a@example.com", "b@example.com"],
                          sender="Back Jobs <jobs@mail.example.com>", date=WHEN)  # fmt: skip
    assert built.message_id == "<app-task-42@mail.example.com>"
    assert built.to == ("a@example.com", "b@example.com")
    assert b"\r\n" in built.data and b"\n" not in built.data.replace(b"\r\n", b"")
    message = parse(built.data)
    assert message["Message-ID"] == built.message_id
    assert message["Subject"] == "Grüße ünd mehr"
    assert message["From"] == "Back Jobs <jobs@mail.example.com>"
    assert [str(a) for a in message["To"].addresses] == ["a@example.com", "b@example.com"]
    assert message.get_content_type() == "multipart/alternative"
    text, html = message.get_body(("plain",)), message.get_body(("html",))
    assert text is not None and text.get_content() == rendered.text
    assert html is not None and html.get_content() == rendered.html
    assert not message.defects


def test_message_id_follows_the_sender_domain() -> None:
    assert legacy_message_id(task_id=7, sender="noreply@app.example") == "<app-task-7@app.example>"
    assert legacy_message_id(task_id=7, sender="no domain") == "<app-task-7@localhost>"


def test_new_message_ids_are_random_and_carry_the_sender_domain() -> None:
    ids = {new_message_id(sender="Jobs <noreply@app.example>") for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"<[0-9a-f]{32}@app\.example>", i) for i in ids)


def test_stored_message_id_and_envelope_subset() -> None:
    rendered = render_email("generic", {"subject": "s", "body": "b"})
    built = build_message(rendered, task_id=1, to=["a@x.com", "b@x.com"], sender="j@x.com",
                          date=WHEN, message_id="<abc@x.com>", envelope_to=["b@x.com"])  # fmt: skip
    assert (built.message_id, built.to) == ("<abc@x.com>", ("b@x.com",))
    message = parse(built.data)
    assert message["Message-ID"] == "<abc@x.com>"
    assert [str(a) for a in message["To"].addresses] == ["a@x.com", "b@x.com"]


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    for attempt, full in [(1, 10.0), (2, 20.0), (3, 40.0), (8, 300.0), (80, 300.0)]:
        delays = [backoff_seconds(attempt=attempt, base=10, cap=300, rng=rng) for _ in range(50)]
        assert all(full / 2 <= delay <= full for delay in delays)
        assert len(set(delays)) > 40  # jittered: runs that failed together spread out


@pytest.mark.parametrize(
    "payload",
    [None, [], {"template": 1, "context": {}, "to": ["a@b.c"]},
     {"template": "generic", "context": [], "to": ["a@b.c"]},
     {"template": "generic", "context": {}, "to": [1]},
     {"template": "generic", "context": {}, "to": ["not an address"]}],
)  # fmt: skip
def test_read_payload_refuses_malformed_payloads(payload: Any) -> None:
    with pytest.raises(ValueError):
        read_payload(payload)


def test_read_payload_accepts_one_address() -> None:
    payload = {"template": "generic", "context": {"a": 1}, "to": "a@example.com"}
    assert read_payload(payload) == (["a@example.com"], "generic", {"a": 1})
