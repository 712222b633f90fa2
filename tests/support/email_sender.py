"""One drain of the outbox, settings from the environment: in the test's process
(:func:`drain`), or as a sender process for the crash and concurrency tests:
``python -m tests.support.email_sender 2030-03-01T12:00:00+00:00`` prints the result as
JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime

from backjobs.db import get_engine
from backjobs.jobs.email_send import EmailSendResult, send_due_emails
from backjobs.mail import make_transport
from backjobs.settings import get_settings
from tests.support.databases import Database


def drain(db: Database, *, now: datetime) -> EmailSendResult:
    """Send what is due at ``now`` from ``db`` with the configured transport."""
    settings = get_settings()
    transport = make_transport(settings)
    try:
        return send_due_emails(db.engine, now=now, settings=settings, transport=transport)
    finally:
        transport.close()


def main() -> None:
    settings = get_settings()
    transport = make_transport(settings)
    try:
        result = send_due_emails(
            get_engine(),
            now=datetime.fromisoformat(sys.argv[1]),
            settings=settings,
            transport=transport,
        )
    finally:
        transport.close()
    print(json.dumps(dataclasses.asdict(result)), flush=True)


if __name__ == "__main__":
    main()
