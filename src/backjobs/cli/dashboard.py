"""``backjobs dashboard | dashboard-token``: the Prefect server and UI behind the admin gate,
and tokens and sign-in links for it. The logic is in :mod:`backjobs.dashboard`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from backjobs.cli.common import (
    database_unusable,
    port_number,
    prefect_defaults,
    require_database_file,
)

# How far ahead Prefect's scheduler creates runs (its defaults: at least 3 runs and one
# hour, up to 100 runs): for email-send-job's `*/2` that is 30 future runs, which fill the
# deployment's activity bar and hide its failures. A few are enough: the scheduler tops
# them up every minute. Set where the server starts, unless already set; a production
# server started otherwise needs the same three variables (README, "Dashboard").
SCHEDULER_DEFAULTS = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "2",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "3",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_SCHEDULED_TIME": "PT5M",
}


def add_dashboard_commands(commands: Any) -> None:
    dashboard = commands.add_parser(
        "dashboard", help="serve the Prefect server and UI behind the admin-only gate"
    )
    dashboard.add_argument("--host", help="interface (default BACKJOBS_DASHBOARD_HOST, 127.0.0.1)")
    dashboard.add_argument(
        "--port", type=port_number, help="port, 1-65535 (default BACKJOBS_DASHBOARD_PORT, 4200)"
    )
    dashboard.set_defaults(handler=_dashboard)

    token = commands.add_parser(
        "dashboard-token", help="a short-lived dashboard token for an admin, or a sign-in link"
    )
    token.add_argument("email", help="the admin's email in the app's users table")
    token.add_argument(
        "--minutes", type=int, help="lifetime (default BACKJOBS_DASHBOARD_TOKEN_MINUTES, 60)"
    )
    token.add_argument("--url", action="store_true", help="print a one-time sign-in link")
    token.set_defaults(handler=_dashboard_token)


def _dashboard(args: argparse.Namespace) -> int:
    for name, value in SCHEDULER_DEFAULTS.items():  # before Prefect reads its settings
        os.environ.setdefault(name, value)
    from backjobs.dashboard.server import (
        DashboardError,
        dashboard_config,
        serve_dashboard,
    )
    from backjobs.db import make_engine
    from backjobs.settings import get_settings

    settings = get_settings()
    prefect_defaults()
    # The server process has no flow run to send its own logs to.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # Triggers see every run's state at once (no 15-minute hold for a Scheduled event the
    # scheduler never emitted): see backjobs.orchestration.causal_ordering.
    os.environ.setdefault(
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING", "backjobs.orchestration.causal_ordering"
    )
    config = dashboard_config(settings, host=args.host, port=args.port)
    engine = make_engine(config.database_url)
    try:
        serve_dashboard(config, engine=engine)
    except DashboardError as exc:
        print(f"backjobs dashboard: error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


def _dashboard_token(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from backjobs.dashboard.server import public_url
    from backjobs.dashboard.tokens import Purpose, admin_token, sign_in_url
    from backjobs.settings import get_settings

    settings = get_settings()
    if args.minutes is not None and not 1 <= args.minutes <= 7 * 24 * 60:
        raise ValueError("--minutes must be between 1 and 10080 (a week)")
    require_database_file()
    try:
        # A link is of purpose sign-in (spent once, exchanged for a session); a bare
        # token is an API token, refused as a link.
        purpose = Purpose.SIGN_IN if args.url else Purpose.API
        token = admin_token(args.email, settings=settings, minutes=args.minutes, purpose=purpose)
    except SQLAlchemyError as exc:
        raise database_unusable(exc, doing="cannot read the admins") from None
    print(sign_in_url(public_url(settings), token) if args.url else token)
    return 0
