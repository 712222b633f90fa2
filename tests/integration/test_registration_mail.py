"""The registration emails through the outbox into a real SMTP server: the delivered link's
token confirms, and no token stays in the stored payload once the row has ended."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from backjobs.db import session_scope
from backjobs.jobs.expire_unconfirmed_registrations import warn_expiring_registrations
from backjobs.models import AppTask
from backjobs.outbox_admin import RetryRefused, retry_failed
from backjobs.registration import confirm_email, hash_token
from backjobs.settings import get_settings
from tests.support.databases import Database
from tests.support.email_sender import drain
from tests.support.registration import add_user, token_in, tokens, user
from tests.support.smtp import SmtpServer

AS_OF = datetime(2026, 1, 10, 5, 0, tzinfo=UTC)
SOON = AS_OF - timedelta(days=6)  # expires in a day: inside the warning window


def stored_rows(db: Database) -> list[AppTask]:
    with db.session() as s:
        return list(s.query(AppTask).order_by(AppTask.id))


def test_the_delivered_token_confirms_and_is_gone_from_the_payload(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    user_id = add_user(smtp_env, "ann@example.com", created_at=SOON, display_name="<Ann>")
    warn_expiring_registrations(
        smtp_env.engine, now=AS_OF, settings=get_settings(), wall=lambda: AS_OF
    )
    assert drain(smtp_env, now=AS_OF).sent == 1
    [received] = smtp_server.messages
    text = received.message.get_body(preferencelist=("plain",))
    html = received.message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    raw = token_in(text.get_content())
    assert token_in(html.get_content()) == raw
    assert "&lt;Ann&gt;" in html.get_content()
    [stored] = tokens(smtp_env, user_id)
    assert stored.token_hash == hash_token(raw)

    [row] = stored_rows(smtp_env)
    assert row.status == "completed"
    assert raw not in repr(row.payload) and raw not in (row.last_error or "")
    assert row.payload is not None and row.payload["context"]["confirmation_link"] is None

    confirmed_at = AS_OF + timedelta(hours=1)
    with session_scope(smtp_env.engine) as s:
        confirm_email(s, token=raw, now=confirmed_at)
    assert user(smtp_env, user_id).email_confirmed_at == confirmed_at


def test_no_token_stays_in_the_payload_after_a_permanent_failure(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    add_user(smtp_env, "gone@example.com", created_at=SOON)
    smtp_server.answer("gone@example.com", 550, times=None)
    warn_expiring_registrations(
        smtp_env.engine, now=AS_OF, settings=get_settings(), wall=lambda: AS_OF
    )
    [queued] = stored_rows(smtp_env)
    assert queued.payload is not None
    raw = token_in(queued.payload["context"]["confirmation_link"])
    assert drain(smtp_env, now=AS_OF).failed == 1
    [row] = stored_rows(smtp_env)
    assert row.status == "failed"
    assert raw not in repr(row.payload) and raw not in (row.last_error or "")


def test_a_warning_failed_for_good_is_refused_by_retry_and_reissued_by_the_job(
    smtp_env: Database, smtp_server: SmtpServer
) -> None:
    user_id = add_user(smtp_env, "full@example.com", created_at=SOON)
    smtp_server.answer("full@example.com", 552, times=1)  # mailbox full, then fine
    warn_expiring_registrations(
        smtp_env.engine, now=AS_OF, settings=get_settings(), wall=lambda: AS_OF
    )
    assert drain(smtp_env, now=AS_OF).failed == 1
    [failed] = stored_rows(smtp_env)
    # Its link is gone: a retry could never deliver it, and says so.
    with session_scope(smtp_env.engine) as s, pytest.raises(RetryRefused) as refused:
        retry_failed(s, ids=[failed.id], now=AS_OF)
    assert "confirmation_link was removed" in str(refused.value)
    with session_scope(smtp_env.engine) as s:
        assert retry_failed(s, failed_since=AS_OF - timedelta(days=400), now=AS_OF) == []
    # The next run re-issues the link: a new token, the old one superseded.
    later = AS_OF + timedelta(hours=1)
    again = warn_expiring_registrations(
        smtp_env.engine, now=later, settings=get_settings(), wall=lambda: later
    )
    assert (again.warned, again.warnings_reissued) == (1, 1)
    assert drain(smtp_env, now=later).sent == 1
    [received] = smtp_server.messages
    text = received.message.get_body(preferencelist=("plain",))
    assert text is not None
    with session_scope(smtp_env.engine) as s:
        confirm_email(s, token=token_in(text.get_content()), now=later)
    assert user(smtp_env, user_id).email_confirmed_at == later
    # Re-issued once: the failed row no longer re-arms anyone.
    final = warn_expiring_registrations(
        smtp_env.engine, now=later, settings=get_settings(), wall=lambda: later
    )
    assert (final.warned, final.warnings_reissued) == (0, 0)
