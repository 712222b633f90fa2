"""Settings: safe defaults, environment names in errors, secrets masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from backjobs.settings import SettingsError, get_settings, load_settings


def test_defaults_are_the_embedded_setup() -> None:
    settings = load_settings()
    assert settings.database_url.startswith("sqlite:///var/")
    assert str(settings.storage_root) == "var/files"
    assert (settings.trash_retention_days, settings.upload_timeout_hours) == (30, 24)
    assert settings.delete_batch_size == 1000
    assert settings.email_transport == "pickup"


def test_environment_values_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKJOBS_TRASH_RETENTION_DAYS", "7")
    get_settings.cache_clear()
    assert get_settings().trash_retention_days == 7


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("BACKJOBS_DELETE_BATCH_SIZE", "0"),
        ("BACKJOBS_TRASH_RETENTION_DAYS", "soon"),
        ("BACKJOBS_DATABASE_URL", "mysql://x"),
        ("BACKJOBS_SMTP_SECURITY", "ssl3"),
    ],
)
def test_an_invalid_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError, match=env):
        load_settings()


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKJOBS_SMTP_PASSWORD", "hunter2-very-secret")
    monkeypatch.setenv("BACKJOBS_JWT_SECRET", "jwt-very-secret")
    settings = load_settings()
    assert "very-secret" not in repr(settings) and "very-secret" not in str(settings)
    assert settings.smtp_password is not None
    assert settings.smtp_password.get_secret_value() == "hunter2-very-secret"


def test_a_bad_secret_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKJOBS_SMTP_PORT", "hunter2")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize("value", ["", "Foo Bar", "noreply@", "@example.com", "a@b\nBcc: x@y.z"])
def test_a_bad_sender_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Issue 8, case 5: "" was a null sender, "Foo Bar" became "Foo"."""
    monkeypatch.setenv("BACKJOBS_EMAIL_FROM", value)
    with pytest.raises(SettingsError, match="BACKJOBS_EMAIL_FROM"):
        load_settings()


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("jobs@example.com", "jobs@example.com"),
        ("Back Jobs <jobs@example.com>", "Back Jobs <jobs@example.com>"),
        ("noreply@bücher.de", "noreply@xn--bcher-kva.de"),  # IDNA: any server takes it
        ("jörg@example.com", "jörg@example.com"),  # needs SMTPUTF8 at send time
    ],
)
def test_a_good_sender_is_kept_with_an_ascii_domain(
    monkeypatch: pytest.MonkeyPatch, value: str, kept: str
) -> None:
    monkeypatch.setenv("BACKJOBS_EMAIL_FROM", value)
    assert load_settings().email_from == kept


def test_a_missing_ca_file_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BACKJOBS_SMTP_CA_FILE", str(tmp_path / "nope.pem"))
    with pytest.raises(SettingsError, match="BACKJOBS_SMTP_CA_FILE"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "value", "why"),
    [
        ("BACKJOBS_SMTP_TIMEOUT_SECONDS", "inf", "finite"),
        ("BACKJOBS_SMTP_TIMEOUT_SECONDS", "nan", "finite"),
        ("BACKJOBS_SMTP_TIMEOUT_SECONDS", "601", "less than or equal to 600"),
        ("BACKJOBS_EMAIL_BACKOFF_BASE_SECONDS", "1e300", "less than or equal to 604800"),
        ("BACKJOBS_EMAIL_BACKOFF_MAX_SECONDS", "1e300", "less than or equal to 604800"),
        ("BACKJOBS_EMAIL_BACKOFF_MAX_SECONDS", "-inf", "finite"),
        ("BACKJOBS_EMAIL_TIME_BUDGET_SECONDS", "0", "greater than 0"),
        ("BACKJOBS_EMAIL_LEASE_SECONDS", "1000000000000", "less than or equal to 86400"),
        ("BACKJOBS_EMAIL_MAX_ATTEMPTS", "1000", "less than or equal to 100"),
        ("BACKJOBS_EMAIL_BATCH_SIZE", "100001", "less than or equal to 100000"),
        ("BACKJOBS_TRASH_RETENTION_DAYS", "1000000000", "less than or equal to 36500"),
        ("BACKJOBS_UPLOAD_TIMEOUT_HOURS", "10000000000000", "less than or equal to 8760"),
        ("BACKJOBS_DELETE_BATCH_SIZE", "100000000000000000000", "less than or equal to 100000"),
        ("BACKJOBS_DELETE_BATCH_SIZE", "1e20", "integer"),
        ("BACKJOBS_RECURRING_BATCH_SIZE", "100001", "less than or equal to 100000"),
        ("BACKJOBS_PENDING_USER_NOTIFICATION_DAYS", "36501", "less than or equal to 36500"),
        ("BACKJOBS_SMTP_HOST", "", "must not be empty"),
        ("BACKJOBS_SMTP_HOST", "  ", "must not be empty"),
        ("BACKJOBS_STORAGE_ROOT", "", "must not be empty"),
        ("BACKJOBS_EMAIL_PICKUP_DIR", "", "must not be empty"),
        ("BACKJOBS_DATABASE_URL", "", "must not be empty"),
        ("BACKJOBS_DATABASE_URL", "postgresqlfoo://x", "unknown database driver 'postgresqlfoo'"),
        ("BACKJOBS_DATABASE_URL", "postgresql+asyncpg://x/db", "unknown database driver"),
        ("BACKJOBS_DATABASE_URL", "sqlite", "not a SQLAlchemy URL"),
    ],
)
def test_nonsense_is_refused_with_the_variable_and_the_reason(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, why: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert f"invalid setting {env}:" in str(raised.value)
    assert why in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///var/app.db",
        "sqlite+pysqlite:///var/app.db",
        "postgresql://u@db/app",
        "postgresql+psycopg://u@db/app",
        "postgres://u@db/app",
    ],
)
def test_every_supported_database_driver_is_accepted(url: str) -> None:
    assert load_settings(database_url=url).database_url == url


def test_the_upper_bounds_themselves_are_accepted() -> None:
    settings = load_settings(
        smtp_timeout_seconds=600,
        email_backoff_base_seconds=604800,
        email_backoff_max_seconds=604800,
        email_lease_seconds=86400,
        trash_retention_days=36500,
        upload_timeout_hours=8760,
        delete_batch_size=100_000,
    )
    assert settings.delete_batch_size == 100_000
