"""A pickup folder that cannot be written is the configuration's fault (issue 18): no
attempt is used, the rows go back to pending, the run fails naming the setting."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from backjobs.db import session_scope
from backjobs.jobs.email_send import EmailServerUnavailable, send_due_emails
from backjobs.mail import make_transport
from backjobs.models import AppTask
from backjobs.outbox import enqueue_email
from backjobs.settings import load_settings
from tests.support.databases import Database

NOW = datetime(2030, 1, 10, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("where", "reason"),
    [("a file in its place", "it exists and is not a folder"), ("under a file", "Not a directory")],
)
def test_an_unusable_pickup_folder_uses_no_attempt_and_fails_the_run(
    db: Database, tmp_path: Path, where: str, reason: str
) -> None:
    blocker = tmp_path / "mail"
    blocker.write_text("not a folder")
    folder = blocker if where == "a file in its place" else blocker / "outbox"
    settings = load_settings(email_transport="pickup", email_pickup_dir=str(folder))
    with session_scope(db.engine) as s:
        for n in range(3):
            enqueue_email(
                s,
                to=f"u{n}@example.com",
                template="generic",
                context={"subject": "hi", "body": "b"},
                now=NOW,
                settings=settings,
            )
    transport = make_transport(settings)
    try:
        with pytest.raises(EmailServerUnavailable) as failed:
            send_due_emails(db.engine, now=NOW, settings=settings, transport=transport)
    finally:
        transport.close()
    # It names the transport at fault, never an SMTP server that is not used.
    assert str(failed.value).startswith(
        f"email transport unavailable: cannot write to the pickup folder {folder} "
        f"(BACKJOBS_EMAIL_PICKUP_DIR): {reason}; fix the folder or the setting"
    ), failed.value
    assert "SMTP" not in str(failed.value)
    with db.session() as s:
        rows = s.execute(select(AppTask.status, AppTask.attempts, AppTask.locked_until)).all()
    assert rows == [("pending", 0, None)] * 3
    assert blocker.read_text() == "not a folder"
