"""EmailSendJob when the mail server refuses the whole run (issue 8): an authentication,
sender or shutdown refusal, or a TLS certificate it cannot verify, is the server's fault —
the run fails naming the reply and every row is kept as it was. Real SQLite and PostgreSQL
(``app_env``), a real aiosmtpd server. The other faults are in ``test_email_faults.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from backjobs.db import is_transient_error
from backjobs.jobs.email_send import EmailServerUnavailable
from tests.support.databases import Database
from tests.support.email_sender import drain
from tests.support.outbox_mail import enqueue, point_at, real_now, row, rows, setenv
from tests.support.smtp import SmtpServer, self_signed_cert


@pytest.mark.parametrize(
    ("script", "reply"),
    [
        ("auth_required", "530 5.7.0 Authentication required"),
        ("mail_from_550", "550 5.1.1 no such user"),  # the sender setting is refused
        ("rcpt_421", "421 4.3.2 service shutting down"),
    ],
)
def test_server_wide_refusal_fails_the_run_and_keeps_every_row(
    app_env: Database,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    script: str,
    reply: str,
) -> None:
    with SmtpServer(auth_required=script == "auth_required") as server:
        if script == "mail_from_550":
            server.handler.mail_forever = 550
        if script == "rcpt_421":
            server.answer("u0@example.com", 421)
        point_at(monkeypatch, server, email_batch_size=50, email_connections=1)
        for i in range(250):
            enqueue(app_env, f"u{i}@example.com")
        with caplog.at_level(logging.ERROR), pytest.raises(EmailServerUnavailable) as caught:
            drain(app_env, now=real_now())
        assert reply in str(caught.value)  # what ops read in the Prefect UI
        assert reply in caplog.text
        assert caught.value.partial_result.failed == 0
        assert not is_transient_error(caught.value)  # the task policy does not retry it
        assert {(t.status, t.attempts, t.last_error) for t in rows(app_env)} == {
            ("pending", 0, None)
        }
        # Fixed on the server: everything goes out.
        server.handler.mail_forever = None
        result = drain(app_env, now=real_now())
        assert (result.sent, result.failed, result.due_now) == (250, 0, 0)


def test_tls_failure_is_the_servers_fault_and_ca_file_fixes_it(
    app_env: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Issue 8, case 7a: STARTTLS to 127.0.0.1 with a self-signed certificate."""
    cert, key = self_signed_cert(tmp_path, name="mail.backjobs.test")
    with SmtpServer(tls=(cert, key)) as server:
        point_at(monkeypatch, server, smtp_security="starttls")
        task_id = enqueue(app_env, "a@example.com")
        with pytest.raises(EmailServerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            drain(app_env, now=real_now())
        assert (row(app_env, task_id).status, row(app_env, task_id).attempts) == ("pending", 0)
        # Trusting the CA but checking the IP against a certificate for a name: refused.
        setenv(monkeypatch, smtp_ca_file=cert)
        with pytest.raises(EmailServerUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|match"):
            drain(app_env, now=real_now())
        setenv(monkeypatch, smtp_ca_file=cert, smtp_tls_server_name="mail.backjobs.test")
        assert drain(app_env, now=real_now()).sent == 1
        assert [m.rcpt_tos for m in server.messages] == [("a@example.com",)]
