"""What the command groups of ``backjobs`` share: the usage error, ``--as-of`` parsing, and
the environment a command sets before it imports Prefect."""

from __future__ import annotations

import argparse
import os
from datetime import datetime


class UsageError(Exception):
    """The command line asks for something that cannot be: exit status 2."""


def parse_as_of(value: str, *, option: str = "--as-of") -> datetime:
    """ISO-8601; ``Z`` accepted; a value without offset is UTC."""
    from backjobs.orchestration.jobbase import to_utc

    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{option} {value!r} is not an ISO-8601 date-time (e.g. 2030-01-01T00:00:00Z)"
        ) from None
    try:
        return to_utc(parsed)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is outside years 1-9999 once converted to UTC"
        ) from None


def prefect_defaults() -> None:
    """Environment defaults for a command that talks to Prefect, before it imports Prefect."""
    # Offline machines: no telemetry. (Domain logs reach the run's logs through the job
    # base, which attaches Prefect's API handler itself: by now Prefect may have been
    # imported and PREFECT_LOGGING_EXTRA_LOGGERS would be read too late.)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "backjobs")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
