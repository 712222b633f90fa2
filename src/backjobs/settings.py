"""Settings of every job, read from the environment (prefix ``BACKJOBS_``) and ``.env``.

Nothing is read at import time: call :func:`get_settings`. Every setting has a safe
default for the embedded run (SQLite and a pickup folder under ``./var``). An invalid
value raises :class:`SettingsError` whose message names the environment variable.
Secrets are ``SecretStr``: their ``repr`` and ``str`` are masked, so a logged settings
object never shows them.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "BACKJOBS_"

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]

# The default BACKJOBS_JWT_SECRET: good for local development only (the dashboard refuses
# it when it listens beyond the loopback interface).
DEVELOPMENT_JWT_SECRET = "change-me-in-production"


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
    trash_retention_days: PositiveInt = 30
    upload_timeout_hours: PositiveInt = 24
    delete_batch_size: PositiveInt = 1000

    # Email transport.
    email_transport: EmailTransportKind = EmailTransportKind.PICKUP
    email_pickup_dir: Path = Path("var/mail")
    email_from: str = "backjobs@localhost"
    smtp_host: str = "localhost"
    smtp_port: Annotated[int, Field(gt=0, lt=65536)] = 25
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: SmtpSecurity = SmtpSecurity.NONE
    smtp_timeout_seconds: PositiveFloat = 30.0

    # EmailSendJob.
    email_max_attempts: PositiveInt = 5
    email_backoff_base_seconds: PositiveFloat = 60.0
    email_backoff_max_seconds: PositiveFloat = 3600.0
    email_lease_seconds: PositiveInt = 300
    email_batch_size: PositiveInt = 100
    email_connections: Annotated[int, Field(gt=0, le=64)] = 4
    email_time_budget_seconds: PositiveFloat = 90.0

    # ProcessRecurringTransactionsJob.
    recurring_batch_size: PositiveInt = 5000

    # Registration jobs.
    pending_user_notification_days: PositiveInt = 3
    registration_confirmation_days: PositiveInt = 7
    registration_expiry_warning_days: NonNegativeInt = 2
    app_base_url: str = "http://localhost:8000"

    # Dashboard.
    jwt_secret: SecretStr = SecretStr(DEVELOPMENT_JWT_SECRET)
    dashboard_token_minutes: Annotated[int, Field(gt=0, le=1440)] = 60

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

    # The local stack (backjobs stack): its folder (app database, files, mail, and
    # stack/ with the Prefect server's database, logs, pid files), relative to the cwd.
    stack_dir: Path = Path("var")

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql", "postgres://")):
            raise ValueError("must be a sqlite:// or postgresql:// SQLAlchemy URL")
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


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment (and ``overrides``), naming any bad variable."""
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
