"""A sender process for the crash and concurrency tests: one drain, settings from the env.

``python -m tests.integration.email_sender 2030-03-01T12:00:00+00:00`` prints the result
as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime

from backjobs.db import get_engine
from backjobs.email_send import send_due_emails
from backjobs.settings import get_settings
from backjobs.transport import make_transport


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
