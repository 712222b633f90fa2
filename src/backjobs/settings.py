"""Settings of every job, read from the environment (prefix ``BACKJOBS_``) and ``.env``.

Nothing is read at import time: call :func:`get_settings`. Every setting has a safe
default for the embedded run (SQLite and a pickup folder under ``./var``). An invalid
value raises :class:`SettingsError` whose message names the environment variable.
Secrets are ``SecretStr``: their ``repr`` and ``str`` are masked, so a logged settings
object never shows them.
"""

from __future__ import annotations

import re
from email.utils import parseaddr
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "BACKJOBS_"

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

# The default BACKJOBS_JWT_SECRET: good for local development only (the dashboard refuses
# it when it listens beyond the loopback interface).
DEVELOPMENT_JWT_SECRET = "change-me-in-production"

# Upper bounds: far above any sensible value, low enough that date and timer arithmetic
# never overflows (a backoff of 1e300 s, a retention of 1e9 days) — see the README table.
MINUTE, DAY = 60, 86400
SILENCE_FLOOR_MINUTES = 10  # issue 17: a silent window is never shorter, except on a test rig
MAX_DAYS = 36500  # 100 years
MAX_BATCH = 100_000
Days = Annotated[int, Field(gt=0, le=MAX_DAYS)]
Batch = Annotated[int, Field(gt=0, le=MAX_BATCH)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # finite: no inf, no nan


DATABASE_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql", "postgresql+psycopg", "postgres")
NON_EMPTY = ("database_url", "storage_root", "email_pickup_dir", "smtp_host")


class SettingsError(ValueError):
    """A setting has an invalid value; the message names its environment variable."""


class EmailTransportKind(StrEnum):
    SMTP = "smtp"
    PICKUP = "pickup"


class SmtpSecurity(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # Storage.
    database_url: str = "sqlite:///var/backjobs.db"
    storage_root: Path = Path("var/files")

    # CleanupJob.
    trash_retention_days: Days = 30
    upload_timeout_hours: Annotated[int, Field(gt=0, le=8760)] = 24
    delete_batch_size: Batch = 10_000

    # Email transport.
    email_transport: EmailTransportKind = EmailTransportKind.PICKUP
    email_pickup_dir: Path = Path("var/mail")
    email_from: str = "backjobs@localhost"
    smtp_host: str = "localhost"
    smtp_port: Annotated[int, Field(gt=0, lt=65536)] = 25
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: SmtpSecurity = SmtpSecurity.NONE
    smtp_timeout_seconds: Annotated[Seconds, Field(le=600)] = 30.0
    smtp_ca_file: Path | None = None  # CA bundle trusted for (START)TLS, e.g. a self-signed cert
    smtp_tls_server_name: str | None = None  # name the certificate must carry (host is an IP)

    # EmailSendJob.
    email_max_attempts: Annotated[int, Field(gt=0, le=100)] = 5
    email_backoff_base_seconds: Annotated[Seconds, Field(le=7 * DAY)] = 60.0
    email_backoff_max_seconds: Annotated[Seconds, Field(le=7 * DAY)] = 3600.0
    email_lease_seconds: Annotated[int, Field(gt=0, le=DAY)] = 300
    email_batch_size: Batch = 100
    email_connections: Annotated[int, Field(gt=0, le=64)] = 4
    email_time_budget_seconds: Annotated[Seconds, Field(le=DAY)] = 90.0

    # ProcessRecurringTransactionsJob.
    recurring_batch_size: Batch = 5000

    # Registration jobs.
    pending_user_notification_days: Days = 3
    registration_confirmation_days: Days = 7
    registration_expiry_warning_days: Annotated[int, Field(ge=0, le=MAX_DAYS)] = 2
    app_base_url: str = "http://localhost:8000"
    # The confirmation link is APP_BASE_URL (without a trailing "/") + this + the token,
    # appended as is (token_urlsafe needs no escaping): end the path where the token goes.
    confirmation_path: str = "/confirm-email?token="
    registration_batch_size: Batch = 1000

    # Every job: an as_of more than 5 minutes ahead is refused unless this is true
    # (rehearsals and test rigs; see backjobs.orchestration.jobbase).
    allow_future_as_of: bool = False

    # CleanupJob: ended outbox rows are kept this long.
    outbox_retention_days: Days = 30

    # Dashboard.
    jwt_secret: SecretStr = SecretStr(DEVELOPMENT_JWT_SECRET)
    dashboard_token_minutes: Annotated[int, Field(gt=0, le=7 * DAY // MINUTE)] = 60

    # Dashboard gate (backjobs dashboard): where it listens, the URL browsers use to reach
    # it (default http://HOST:PORT), the app's sign-in page for its 401 page, the machine
    # credential Prefect clients send as PREFECT_API_AUTH_STRING, and how long "is this
    # user an admin" is remembered (at most 30 s: a demoted admin is out within that).
    dashboard_host: str = "127.0.0.1"
    dashboard_port: Annotated[int, Field(ge=0, lt=65536)] = 4200
    dashboard_public_url: str | None = None
    dashboard_login_url: str | None = None
    dashboard_auth_string: SecretStr | None = None
    dashboard_admin_cache_seconds: Annotated[float, Field(ge=0, le=30)] = 30.0
    # The session a sign-in link is exchanged for lasts this long; a token whose exp is
    # further ahead than the maximum is refused (the app cannot mint year-2999 tokens).
    dashboard_session_minutes: Annotated[int, Field(gt=0, le=7 * DAY // MINUTE)] = 480
    dashboard_max_token_minutes: Annotated[int, Field(gt=0, le=366 * DAY // MINUTE)] = 10080

    # Alerts (backjobs.orchestration.alerts): where they are POSTed as JSON (besides the
    # admins' email), how often a job still failing alerts again (0: at every failure),
    # and after how many schedule periods without a completed run a job counts as silent
    # (never sooner than alert_silent_min_minutes, 10; a test rig may go lower only with
    # alert_allow_short_silence, declared first so the check below can read it).
    alert_webhook_url: str | None = None
    alert_repeat_minutes: Annotated[float, Field(ge=0, le=7 * DAY // MINUTE)] = 60.0
    alert_silent_after_periods: Annotated[int, Field(gt=0, le=1000)] = 3
    alert_allow_short_silence: bool = False
    alert_silent_min_minutes: Annotated[float, Field(gt=0, le=7 * DAY // MINUTE)] = 10.0
    # Where the server's automations reach `backjobs dashboard` (default: PREFECT_API_URL of
    # `backjobs deploy` without /api, + /backjobs/alerts).
    alert_receiver_url: str | None = None

    # The local stack (backjobs stack): its folder (app database, files, mail, and
    # stack/ with the Prefect server's database, logs, pid files), relative to the cwd.
    stack_dir: Path = Path("var")

    @field_validator(*NON_EMPTY, mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # An empty path would silently become the working directory.
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            driver = make_url(value).drivername
        except ArgumentError:
            raise ValueError(
                "is not a SQLAlchemy URL (e.g. sqlite:///var/backjobs.db, "
                "postgresql://user@host/db)"
            ) from None
        if driver not in DATABASE_DRIVERS:
            raise ValueError(
                f"unknown database driver {driver!r}; use one of {', '.join(DATABASE_DRIVERS)}"
            )
        return value

    @field_validator("app_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("alert_webhook_url", "alert_receiver_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if not value:  # set but empty: no webhook
            return None
        if not re.match(r"https?://[^\s/]+", value) or any(c.isspace() for c in value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("alert_silent_min_minutes")
    @classmethod
    def _silence_floor(cls, value: float, info: ValidationInfo) -> float:
        if value < SILENCE_FLOOR_MINUTES and not info.data.get("alert_allow_short_silence"):
            raise ValueError(
                f"{value:g} is below {SILENCE_FLOOR_MINUTES} minutes; a silent window that "
                "short is for test rigs only: set BACKJOBS_ALERT_ALLOW_SHORT_SILENCE=true "
                "to allow it"
            )
        return value

    @field_validator("confirmation_path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError("must start with '/' and hold no whitespace")
        return value

    @field_validator("email_from")
    @classmethod
    def _sender(cls, value: str) -> str:
        return check_sender(value)

    @field_validator("smtp_ca_file")
    @classmethod
    def _ca_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.email_backoff_max_seconds < self.email_backoff_base_seconds:
            raise ValueError(
                "BACKJOBS_EMAIL_BACKOFF_MAX_SECONDS must be >= BACKJOBS_EMAIL_BACKOFF_BASE_SECONDS"
            )
        if self.registration_expiry_warning_days >= self.registration_confirmation_days:
            raise ValueError(
                "BACKJOBS_REGISTRATION_EXPIRY_WARNING_DAYS must be smaller than "
                "BACKJOBS_REGISTRATION_CONFIRMATION_DAYS"
            )
        return self


def check_base_url(value: str) -> str:
    """The app's address for links in emails: an absolute http(s) URL with a host, no
    query or fragment (the confirmation path and token are appended to it)."""
    from urllib.parse import urlsplit

    if any(c.isspace() for c in value):
        raise ValueError("must be an absolute http(s) URL without spaces")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        raise ValueError(f"{value!r} is not a URL (e.g. https://app.example.com)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an absolute http(s) URL (e.g. https://app.example.com)")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r} must not have a query or fragment")
    return value


def check_sender(value: str) -> str:
    """A sender: ``addr@domain`` or ``Name <addr@domain>``, one line; the domain as IDNA.

    A non-ASCII domain is converted to its ASCII (IDNA) form, so it works with any server;
    a non-ASCII local part is kept and needs a server offering SMTPUTF8 (checked when
    sending).
    """
    if any(char in value for char in "\r\n\x00"):
        raise ValueError("must be one line")
    name, address = parseaddr(value)
    local, at, domain = address.rpartition("@")
    if not (at and local and domain) or " " in address or "@" in local:
        raise ValueError(f"{value!r} is not an email address (user@example.com or Name <…>)")
    try:
        domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        raise ValueError(f"{value!r}: the domain is not a valid host name") from None
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", domain) or ".." in domain:
        raise ValueError(f"{value!r}: the domain is not a valid host name")
    address = f"{local}@{domain}"
    return format_sender(name, address)


def format_sender(name: str, address: str) -> str:
    """``Name <address>`` (name quoted when needed); ``formataddr`` refuses non-ASCII
    addresses, which SMTPUTF8 allows."""
    if not name:
        return address
    if re.search(r'[][\\()<>@,:;".]', name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{address}>"


ENV_FILE = Path(".env")


def check_env_file(path: Path = ENV_FILE) -> None:
    """A ``.env`` that is there but unusable is an error naming it, never skipped: a folder
    named ``.env`` (pydantic-settings would ignore it and the defaults would put a new
    database under ./var), a file that cannot be read or is not UTF-8."""
    if not path.exists() and not path.is_symlink():
        return
    shown = path.absolute()
    if not path.is_file():
        raise SettingsError(f"{shown} is not a file (a folder?); make it a file or remove it")
    try:
        path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise SettingsError(f"{shown} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise SettingsError(
            f"{shown} is not UTF-8 (byte {exc.object[exc.start]:#04x} on line {line}); "
            "save it as UTF-8"
        ) from None


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment (and ``overrides``), naming any bad variable."""
    check_env_file()
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_explain(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; ``get_settings.cache_clear()`` re-reads them."""
    return load_settings()


def _explain(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
        # Never echo the input: it may be a secret.
        lines.append(f"invalid setting {name}: {error['msg']}")
    return "; ".join(lines)
