"""``backjobs dashboard-token EMAIL`` finds its admin the same way on SQLite and PostgreSQL:
emails compared NFKC-casefolded on both sides, never by SQL ``lower()`` (which folds only
ASCII on SQLite and per collation on PostgreSQL)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from backjobs.dashboard.tokens import email_key, find_admin_id
from tests.support.databases import Database

KELVIN = "\u212a"  # KELVIN SIGN: NFKC makes it K
LIGATURE_FI = "\ufb01"  # LATIN SMALL LIGATURE FI: NFKC makes it "fi"


@pytest.fixture
def users(db: Database) -> Database:
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, email, is_admin) VALUES "
                "(1, 'kate@example.com', true), (2, 'user@example.com', false), "
                "(3, 'fi@example.com', true), (4, :ligature, true), (5, :kelvin, true)"
            ),
            {"ligature": f"{LIGATURE_FI}@example.com", "kelvin": f"{KELVIN}arl@example.com"},
        )
    return db


def test_email_key_folds_case_and_compatibility_forms() -> None:
    assert email_key(f" {KELVIN}ATE@Example.COM ") == "kate@example.com"
    assert email_key(f"{LIGATURE_FI}@example.com") == "fi@example.com"
    assert email_key("STRASSE@example.com") == email_key("straße@example.com")


@pytest.mark.parametrize(
    "typed",
    ["kate@example.com", "KATE@Example.com", f"{KELVIN}ate@example.com", " kate@example.com "],
)
def test_the_admin_is_found_however_the_email_is_written(users: Database, typed: str) -> None:
    with users.session() as session:
        assert find_admin_id(session, email=typed) == 1


@pytest.mark.parametrize("typed", ["karl@example.com", "Karl@example.com"])
def test_an_admin_stored_with_a_compatibility_form_is_found(users: Database, typed: str) -> None:
    # SQL lower() leaves the Kelvin sign alone on SQLite (and folds it on PostgreSQL).
    with users.session() as session:
        assert find_admin_id(session, email=typed) == 5


def test_non_admins_unknown_and_ambiguous_emails_are_refused(users: Database) -> None:
    with users.session() as session:
        with pytest.raises(LookupError, match="is not an admin"):
            find_admin_id(session, email="User@example.com")
        with pytest.raises(LookupError, match="no user with email"):
            find_admin_id(session, email="nobody@example.com")
        # Two admins whose emails fold alike: refused, never one of them guessed.
        with pytest.raises(LookupError, match="admins 3, 4 all have the email"):
            find_admin_id(session, email="FI@example.com")
